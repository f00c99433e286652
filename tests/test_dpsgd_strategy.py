"""DPSGDStrategy inside a real Trainer (CPU, one process)."""

import copy
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, flat_params, linear_data, loader, trainer_kwargs
from torch import nn

from lightning_dp import DPSGDStrategy, EmptyBatch, PerSampleLossError, UnsafeSettingError, ValidationError


def fit(model, strategy, data=None, batch_size=8, callbacks=(), **kw):
    trainer = L.Trainer(strategy=strategy, callbacks=list(callbacks), **trainer_kwargs(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(data if data is not None else linear_data(), batch_size))
    return trainer


class GradRecorder(L.Callback):
    def __init__(self):
        self.after_backward, self.before_step = [], []

    @staticmethod
    def _grads(pl_module):
        return torch.cat([p.grad.detach().reshape(-1).clone() for p in pl_module.parameters()])

    def on_after_backward(self, trainer, pl_module):
        self.after_backward.append(self._grads(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_step.append(self._grads(pl_module))


class AdamClassifier(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def reference_update(model, x, y, clip, expected_batch_size):
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        gs = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    per_ex = torch.stack(rows).double()
    norms = per_ex.norm(dim=1)
    c = (clip / (norms + 1e-6)).clamp(max=1.0)
    return (c[:, None] * per_ex).sum(0) / expected_batch_size, c


def test_hooks_see_only_the_private_gradient_and_adam_steps_on_it():
    torch.manual_seed(0)
    model = AdamClassifier()
    initial = copy.deepcopy(model)
    data = linear_data(n=16)
    rec = GradRecorder()
    strategy = DPSGDStrategy(noise_multiplier=0.0, clip=1.8, poisson_sampling=False)
    fit(model, strategy, data=data, batch_size=16, max_steps=1, callbacks=[rec])
    expected, c = reference_update(initial, *data.tensors, clip=1.8, expected_batch_size=16)
    assert (c < 1).any() and (c == 1).any()
    assert len(rec.after_backward) == len(rec.before_step) == 1
    for seen in (rec.after_backward[0], rec.before_step[0]):
        torch.testing.assert_close(seen.double(), expected, rtol=1e-5, atol=1e-8)
    # Adam's first step moves each coordinate by lr * sign(g) (up to its eps)
    moved = flat_params(initial) - flat_params(model)
    nonzero = expected.abs() > 1e-6
    torch.testing.assert_close(moved[nonzero].double(), 1e-2 * expected[nonzero].sign(), rtol=1e-3, atol=1e-5)
    assert strategy.accountant.steps == 1 and strategy.last_step.num_examples == 16


class StateRecorder(GradRecorder):
    def __init__(self):
        super().__init__()
        self.states = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append(copy.deepcopy(pl_module.state_dict()))


@pytest.mark.parametrize("clipping", ["bk", "ghost"])
def test_steps_after_the_first_skip_autograd_weight_gradients_and_stay_exact(clipping):
    """From the second step on, backward stops at the hooked outputs (bk: no autograd weight gradients; ghost: a
    first backward for the norms, a second for Σ c_i ℓ_i); the private gradient is exact at every step."""
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.5)
    data = linear_data(n=16)
    rec = StateRecorder()
    strategy = DPSGDStrategy(noise_multiplier=0.0, clip=1.8, poisson_sampling=False, clipping=clipping)
    fit(model, strategy, data=data, batch_size=16, max_steps=3, callbacks=[rec])
    assert len(rec.states) == len(rec.before_step) == 3
    for state, seen in zip(rec.states, rec.before_step):
        at = copy.deepcopy(model)
        at.load_state_dict(state)
        expected, _ = reference_update(at, *data.tensors, clip=1.8, expected_batch_size=16)
        torch.testing.assert_close(seen.double(), expected, rtol=1e-5, atol=1e-8)


def test_noisy_gradient_is_what_hooks_see():
    rec = GradRecorder()
    strategy = DPSGDStrategy(noise_multiplier=2.0, clip=0.5, poisson_sampling=False)
    fit(TinyClassifier(), strategy, data=linear_data(n=16), batch_size=16, max_steps=2, callbacks=[rec])
    for a, b in zip(rec.after_backward, rec.before_step):
        assert torch.equal(a, b)
    # noise σC/E[B] per coordinate dominates the (clipped, ≤ C/E[B]·...) signal
    assert rec.after_backward[0].std() > 0.3 * 2.0 * 0.5 / 16


def test_trains_with_eps_and_reports():
    model = TinyClassifier(lr=0.5)
    before = flat_params(model)
    strategy = DPSGDStrategy(eps=3.0, clip=1.0)
    fit(model, strategy, max_steps=10)
    report = strategy.privacy_report()
    assert report["mechanism"] == "dpsgd" and report["steps"] == 10 and report["planned_steps"] == 10
    assert report["noise_multiplier"] > 0 and 2.5 < report["epsilon"] <= 3.0
    assert report["sample_rate"] == 8 / 64 and report["clip"] == 1.0
    assert not torch.equal(before, flat_params(model))


def test_learns_without_noise():
    torch.manual_seed(0)
    model = TinyClassifier()
    data = linear_data(n=64)
    x, y = data.tensors
    before = F.cross_entropy(model(x), y).item()
    fit(model, DPSGDStrategy(noise_multiplier=0.0, clip=1.0), data=data, max_steps=40)
    assert F.cross_entropy(model(x), y).item() < 0.8 * before


def test_registered_name_and_defaults():
    trainer = L.Trainer(strategy="dpsgd", **trainer_kwargs(max_steps=2))
    assert isinstance(trainer.strategy, DPSGDStrategy)
    assert trainer.strategy.target_epsilon == 3.0


def test_empty_batches_are_noise_only_steps():
    seen = []

    class Spy(TinyClassifier):
        def on_train_batch_start(self, batch, batch_idx):
            seen.append(isinstance(batch, EmptyBatch))

    rec = GradRecorder()
    model = Spy()
    strategy = DPSGDStrategy(noise_multiplier=1.0, clip=1.0)
    fit(model, strategy, data=linear_data(n=64), batch_size=1, max_steps=30, callbacks=[rec])
    assert len(seen) == 30 and any(seen) and not all(seen)
    assert strategy.accountant.steps == 30 and len(rec.after_backward) == 30
    assert model.calls == seen.count(False)
    for empty, g in zip(seen, rec.after_backward):
        if empty:
            assert g.abs().sum() > 0  # noise / E[B], not zero


def test_bf16_mixed_trains():
    model = TinyClassifier()
    before = flat_params(model)
    strategy = DPSGDStrategy(noise_multiplier=1.0)
    fit(model, strategy, precision="bf16-mixed", max_steps=3)
    assert strategy.accountant.steps == 3
    assert not torch.equal(before, flat_params(model))


def test_bf16_mixed_matches_fp32_without_noise():
    data = linear_data(n=16)
    grads = []
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        rec = GradRecorder()
        fit(TinyClassifier(), DPSGDStrategy(noise_multiplier=0.0, clip=1.8, poisson_sampling=False), data=data,
            batch_size=16, max_steps=1, callbacks=[rec], precision=precision)
        grads.append(rec.after_backward[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=2e-3)


def test_batchnorm_is_refused():
    class BN(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))

    with pytest.raises(ValidationError, match="BatchNorm1d"):
        fit(BN(), DPSGDStrategy(noise_multiplier=1.0))


def test_unsupported_layer_is_refused():
    class Scaled(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.net(x) * self.scale

    with pytest.raises(ValidationError, match=r"<root> \(Scaled\)"):
        fit(Scaled(), DPSGDStrategy(noise_multiplier=1.0))


def test_frozen_layers_are_untouched():
    model = TinyClassifier()
    model.net[0].requires_grad_(False)
    frozen = model.net[0].weight.detach().clone()
    fit(model, DPSGDStrategy(noise_multiplier=1.0), max_steps=3)
    assert torch.equal(frozen, model.net[0].weight)
    assert model.net[0].weight.grad is None
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed at teardown


@pytest.mark.parametrize("output", ["mean", "dict_no_psl"])
def test_per_sample_contract_errors(output):
    with pytest.raises(PerSampleLossError, match="one loss per example"):
        fit(TinyClassifier(output=output), DPSGDStrategy(noise_multiplier=1.0), max_steps=2)


def test_dict_output_and_validation():
    model = TinyClassifier(output="dict")
    trainer = L.Trainer(strategy=DPSGDStrategy(noise_multiplier=1.0), **trainer_kwargs(max_steps=2,
                        val_check_interval=1, limit_val_batches=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(linear_data(), 8), loader(linear_data(), 8))
    assert trainer.strategy.accountant.steps == 2


@pytest.mark.parametrize(
    "trainer_kw, match",
    [(dict(accumulate_grad_batches=2), "accumulate_grad_batches"), (dict(gradient_clip_val=1.0), "gradient_clip_val")],
)
def test_refuses_unsafe_trainer_settings(trainer_kw, match):
    with pytest.raises(UnsafeSettingError, match=match):
        fit(TinyClassifier(), DPSGDStrategy(noise_multiplier=1.0), **trainer_kw)


def test_refuses_manual_optimization():
    class Manual(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(UnsafeSettingError, match="manual optimization"):
        fit(Manual(), DPSGDStrategy(noise_multiplier=1.0))


@pytest.mark.parametrize("clipping", ["bk", "ghost"])
def test_functional_use_of_a_parameter_is_detected(clipping):
    class Functional(TinyClassifier):
        def forward(self, x):
            h = self.net[1](self.net[0](x))
            return F.linear(h, self.net[3].weight) + self.net[3](h)  # second use bypasses the module's hooks

    with pytest.raises(ValidationError, match=r"'net.3.weight'.*used outside the module"):
        fit(Functional(), DPSGDStrategy(noise_multiplier=1.0, clipping=clipping), max_steps=2)


def test_clipping_argument():
    assert DPSGDStrategy(noise_multiplier=1.0).clipping_mode == "bk"
    assert DPSGDStrategy(noise_multiplier=1.0, clipping="ghost").clipping_mode == "ghost"
    with pytest.raises(ValueError, match="clipping"):
        DPSGDStrategy(noise_multiplier=1.0, clipping="fast")


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    """σ = 0 (noise is OS entropy): same Poisson masks, same Adam updates, same accountant history after resume."""

    def run(max_steps, ckpt=None, save=None):
        torch.manual_seed(0)
        model = AdamClassifier()
        strategy = DPSGDStrategy(noise_multiplier=0.0, clip=1.0, sampling_seed=None if ckpt else 3, accountant="rdp")
        trainer = L.Trainer(strategy=strategy, **trainer_kwargs(max_steps=max_steps))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, loader(linear_data()), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return model, strategy

    full_model, full = run(8)
    run(4, save=tmp_path / "half.ckpt")
    resumed_model, resumed = run(8, ckpt=tmp_path / "half.ckpt")
    assert resumed.sampling_seed == 3 and resumed.accountant.steps == 8
    assert resumed.accountant.history == full.accountant.history
    torch.testing.assert_close(flat_params(resumed_model), flat_params(full_model), atol=1e-6, rtol=0)

    from lightning_dp import DPZeroStrategy

    with pytest.raises(UnsafeSettingError, match="'dpsgd' mechanism"):
        L.Trainer(strategy=DPZeroStrategy(noise_multiplier=0.0), **trainer_kwargs(max_steps=8)).fit(
            TinyClassifier(), loader(linear_data()), ckpt_path=tmp_path / "half.ckpt"
        )
