"""Privacy state, step and seeds survive a checkpoint: a resumed run reports the same ε as an uninterrupted one
and continues the same z stream (and the same Poisson masks)."""

import lightning.pytorch as L
import pytest
import torch
from helpers import TinyClassifier, flat_params, linear_data, loader, trainer_kwargs

from lightning_dp import DPZeroStrategy, UnsafeSettingError


def _strategy(**kw):
    kw = {"noise_multiplier": 0.0, "seed": 99, "sampling_seed": 3, **kw}  # σ=0: deterministic (noise is OS entropy)
    return DPZeroStrategy(clip=2.0, accountant="rdp", **kw)


def _model():
    torch.manual_seed(0)
    return TinyClassifier()


def test_resume_matches_uninterrupted(tmp_path):
    full_model, full = _model(), _strategy()
    L.Trainer(strategy=full, **trainer_kwargs(max_steps=8)).fit(full_model, loader(linear_data()))

    first_model, first = _model(), _strategy()
    trainer = L.Trainer(strategy=first, **trainer_kwargs(max_steps=4))
    trainer.fit(first_model, loader(linear_data()))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["lightning_dp"]["accountant"]["history"] == [[0.0, 0.125, 4]]

    resumed_model, resumed = _model(), _strategy(seed=None, sampling_seed=None)  # seeds come from the checkpoint
    L.Trainer(strategy=resumed, **trainer_kwargs(max_steps=8)).fit(resumed_model, loader(linear_data()), ckpt_path=ckpt)
    assert resumed.seed == 99 and resumed.sampling_seed == 3
    assert resumed.accountant.steps == 8
    assert resumed.accountant.history == full.accountant.history
    assert torch.equal(flat_params(resumed_model), flat_params(full_model))


def test_resumed_epsilon_equals_uninterrupted(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def strategy():
        return DPZeroStrategy(eps=4.0, clip=2.0, accountant="rdp")

    full = strategy()
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    L.Trainer(strategy=full, callbacks=[cb], **trainer_kwargs(max_steps=10, enable_checkpointing=True)).fit(
        _model(), loader(linear_data())
    )
    halfway = sorted(tmp_path.glob("*step=5*.ckpt"))[0]
    resumed = strategy()
    L.Trainer(strategy=resumed, **trainer_kwargs(max_steps=10)).fit(_model(), loader(linear_data()), ckpt_path=halfway)
    assert resumed.noise_multiplier == full.noise_multiplier
    assert resumed.accountant.steps == 10
    assert resumed.privacy_report()["epsilon"] == pytest.approx(full.privacy_report()["epsilon"], rel=1e-12)
    assert 3.9 < resumed.privacy_report()["epsilon"] <= 4.0


def test_resume_with_other_sample_rate_is_refused(tmp_path):
    trainer = L.Trainer(strategy=_strategy(), **trainer_kwargs(max_steps=2))
    trainer.fit(_model(), loader(linear_data()))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    with pytest.raises(UnsafeSettingError, match="sample rate"):
        L.Trainer(strategy=_strategy(), **trainer_kwargs(max_steps=4)).fit(
            _model(), loader(linear_data(), batch_size=16), ckpt_path=tmp_path / "c.ckpt"
        )


def test_checkpoint_holds_clean_parameters(tmp_path):
    """A checkpoint written during training (ModelCheckpoint) holds θ, not a perturbed θ ± λz."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = _model()
    strategy = _strategy()
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(strategy=strategy, callbacks=[cb], **trainer_kwargs(max_steps=3, enable_checkpointing=True))
    trainer.fit(model, loader(linear_data()))
    last = sorted(tmp_path.glob("*step=3*.ckpt"))[0]
    state = torch.load(last, weights_only=True)["state_dict"]
    for name, p in model.state_dict().items():
        assert torch.equal(state[name], p)
    assert strategy.directions.pending == {}
