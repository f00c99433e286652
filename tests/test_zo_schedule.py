"""The two-pass schedule (the next step's +λz fused into the update pass) gives the same trajectory as the
three-pass one, and its pending perturbation is never visible outside the step."""

import lightning.pytorch as L
import pytest
import torch
from helpers import TinyClassifier, flat_params, linear_data, loader, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dp import DPZeroStrategy, PrivacyBudget


class Recording(TinyClassifier):
    def __init__(self):
        super().__init__(lr=0.05)
        self.seen_in_validation = []

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.seen_in_validation.append(flat_params(self))
        return super().validation_step(batch, batch_idx)


def _run(schedule, steps, tmp_path=None, val_every=None):
    torch.manual_seed(0)
    model = Recording()
    strategy = DPZeroStrategy(noise_multiplier=0.0, clip=2.0, seed=17, sampling_seed=4, accountant="rdp",
                              zo_schedule=schedule)
    callbacks = [PrivacyBudget(log_every_n_steps=1000)]
    kw = {}
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1))
        kw["enable_checkpointing"] = True
    if val_every:
        kw.update(val_check_interval=val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                  limit_val_batches=1)
    trainer = L.Trainer(strategy=strategy, callbacks=callbacks, **trainer_kwargs(max_steps=steps, **kw))
    data = linear_data()
    trainer.fit(model, loader(data), loader(data) if val_every else None)
    return model, strategy


def test_two_pass_equals_three_pass_over_50_steps():
    m2, s2 = _run("two_pass", 50)
    m3, s3 = _run("three_pass", 50)
    assert s2.schedule == "two_pass" and s3.schedule == "three_pass"
    torch.testing.assert_close(flat_params(m2), flat_params(m3), atol=1e-5, rtol=0)
    assert s3.directions.passes == 3 * 50
    # 2 passes per step, plus the first step's +λz (nothing was pending yet)
    assert s2.directions.passes == 2 * 50 + 1
    assert s2.directions.pending == {}  # nothing left pending after training


def test_validation_and_checkpoints_see_clean_parameters(tmp_path):
    m2, _ = _run("two_pass", 6, tmp_path=tmp_path / "two", val_every=2)
    m3, _ = _run("three_pass", 6, tmp_path=tmp_path / "three", val_every=2)
    assert len(m2.seen_in_validation) == len(m3.seen_in_validation) == 3
    for a, b in zip(m2.seen_in_validation, m3.seen_in_validation):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for step in range(1, 6):
        (c2,) = (tmp_path / "two").glob(f"*step={step}.ckpt")
        (c3,) = (tmp_path / "three").glob(f"*step={step}.ckpt")
        s2 = torch.load(c2, weights_only=True)["state_dict"]
        s3 = torch.load(c3, weights_only=True)["state_dict"]
        for k in s3:
            torch.testing.assert_close(s2[k], s3[k], atol=1e-6, rtol=0)


def test_auto_uses_three_passes_when_user_code_may_read_parameters():
    class Peek(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pass

    class Hooked(TinyClassifier):
        def on_train_batch_start(self, batch, batch_idx):
            pass

    def resolved(model, callbacks):
        strategy = DPZeroStrategy(noise_multiplier=1.0)
        trainer = L.Trainer(strategy=strategy, callbacks=callbacks, **trainer_kwargs(max_steps=1))
        trainer.fit(model, loader(linear_data()))
        return strategy.schedule

    assert resolved(TinyClassifier(), [PrivacyBudget()]) == "two_pass"
    assert resolved(TinyClassifier(), [Peek()]) == "three_pass"
    assert resolved(Hooked(), []) == "three_pass"


def test_interrupted_run_leaves_clean_parameters():
    class Boom(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                raise RuntimeError("interrupted")

    torch.manual_seed(0)
    model = TinyClassifier()
    strategy = DPZeroStrategy(noise_multiplier=0.0, clip=2.0, seed=17, sampling_seed=4, zo_schedule="two_pass")
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer = L.Trainer(strategy=strategy, callbacks=[Boom()], **trainer_kwargs(max_steps=10))
        trainer.fit(model, loader(linear_data()))
    assert strategy.directions.pending == {}
    m3, s3 = _run("three_pass", 3)
    torch.testing.assert_close(flat_params(model), flat_params(m3), atol=1e-6, rtol=0)


def test_invalid_schedule():
    with pytest.raises(ValueError, match="zo_schedule"):
        DPZeroStrategy(eps=1.0, zo_schedule="one_pass")
