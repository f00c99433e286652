"""DPZeroStrategy inside a real Trainer (CPU, one process)."""

import json
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyClassifier, flat_params, linear_data, loader, trainer_kwargs
from opacus.accountants.utils import get_noise_multiplier

from custom_kernels import normal_stream
from lightning_dp import (
    DPZeroStrategy,
    EmptyBatch,
    IncompatibleStrategyError,
    PerSampleLossError,
    PrivacyBudget,
    UnsafeSettingError,
)


def fit(model, strategy, data=None, batch_size=8, **kw):
    trainer = L.Trainer(strategy=strategy, **trainer_kwargs(**kw))
    trainer.fit(model, loader(data if data is not None else linear_data(), batch_size))
    return trainer


def test_trains_and_calibrates_sigma_with_opacus():
    model = TinyClassifier()
    before = flat_params(model)
    strategy = DPZeroStrategy(eps=3.0, clip=5.0, accountant="rdp")
    fit(model, strategy, max_steps=12)
    report = strategy.privacy_report()
    expected_sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=64**-1.1, sample_rate=8 / 64, steps=12, accountant="rdp",
        epsilon_tolerance=0.01,
    )
    assert report["noise_multiplier"] == expected_sigma
    assert report["delta"] == pytest.approx(64**-1.1)
    assert report["sample_rate"] == 8 / 64 and report["steps"] == 12 and report["planned_steps"] == 12
    assert 2.9 < report["epsilon"] <= 3.0
    for key in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant", "clip"):
        assert key in report
    assert report["accountant"] == "rdp" and report["clip"] == 5.0
    assert not torch.equal(before, flat_params(model))
    assert model.calls == 24  # two probes per step


def test_steps_from_max_epochs():
    strategy = DPZeroStrategy(eps=8.0, accountant="rdp")
    fit(TinyClassifier(), strategy, max_steps=-1, max_epochs=2)
    assert strategy.planned_steps == 2 * 8 == strategy.accountant.steps


def test_unbounded_training_is_an_error():
    with pytest.raises(UnsafeSettingError, match="not bounded"):
        fit(TinyClassifier(), DPZeroStrategy(eps=8.0), max_steps=-1, max_epochs=-1)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_update_is_dpzero_formula(distribution):
    """One step with σ=0, checked against the algorithm written out by hand (z from the chosen stream)."""
    torch.manual_seed(0)
    model = TinyClassifier(lr=0.1)
    reference = TinyClassifier(lr=0.1)
    reference.load_state_dict(model.state_dict())
    data = linear_data(n=16)
    strategy = DPZeroStrategy(noise_multiplier=0.0, clip=0.5, zo_eps=1e-3, seed=5, poisson_sampling=False,
                              direction_distribution=distribution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(model, strategy, data=data, batch_size=16, max_steps=1)
    x, y = data.tensors
    params = list(reference.parameters())
    seed = strategy.directions.seed_for(0)
    zs = [normal_stream(seed, o, p.numel(), distribution=distribution).view_as(p)
          for p, o in zip(params, strategy.directions.offsets)]
    with torch.no_grad():
        for p, z in zip(params, zs):
            p.add_(1e-3 * z)
        lp = F.cross_entropy(reference(x), y, reduction="none")
        for p, z in zip(params, zs):
            p.add_(-2e-3 * z)
        lm = F.cross_entropy(reference(x), y, reduction="none")
        for p, z in zip(params, zs):
            p.add_(1e-3 * z)
        s = ((lp.double() - lm.double()) / 2e-3).clamp(-0.5, 0.5)
        g = s.sum().item() / 16
        for p, z in zip(params, zs):
            p.add_(-0.1 * g * z)
    assert strategy.last_step.projected_grad == pytest.approx(g, rel=1e-4, abs=1e-7)
    torch.testing.assert_close(flat_params(model), flat_params(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("output", ["mean", "dict_no_psl"])
def test_per_sample_contract_errors(output):
    with pytest.raises(PerSampleLossError, match="one loss per example"):
        fit(TinyClassifier(output=output), DPZeroStrategy(noise_multiplier=1.0), max_steps=2)


def test_dict_output_accepted():
    fit(TinyClassifier(output="dict"), DPZeroStrategy(noise_multiplier=1.0), max_steps=2)


def test_wrong_length_is_an_error():
    class Wrong(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y, reduction="none")[:1]

    with pytest.raises(PerSampleLossError, match="batch has"):
        fit(Wrong(), DPZeroStrategy(noise_multiplier=1.0, poisson_sampling=False), max_steps=1)


@pytest.mark.parametrize(
    "trainer_kw, match",
    [
        (dict(accumulate_grad_batches=2), "accumulate_grad_batches"),
        (dict(gradient_clip_val=1.0), "gradient_clip_val"),
    ],
)
def test_refuses_unsafe_trainer_settings(trainer_kw, match):
    with pytest.raises(UnsafeSettingError, match=match):
        fit(TinyClassifier(), DPZeroStrategy(noise_multiplier=1.0), **trainer_kw)


def test_refuses_fp16_grad_scaler():
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu")
    strategy = DPZeroStrategy(noise_multiplier=1.0)
    with pytest.raises(UnsafeSettingError, match="GradScaler"):
        fit(TinyClassifier(), strategy, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])


def test_refuses_manual_optimization():
    class Manual(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(UnsafeSettingError, match="manual optimization"):
        fit(Manual(), DPZeroStrategy(noise_multiplier=1.0))


@pytest.mark.parametrize("make_opt, match", [
    (lambda p: torch.optim.Adam(p, lr=1e-3), "torch.optim.SGD"),
    (lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9), "momentum"),
])
def test_refuses_optimizers_whose_rule_would_be_ignored(make_opt, match):
    class M(TinyClassifier):
        def configure_optimizers(self):
            return make_opt(self.parameters())

    with pytest.raises(UnsafeSettingError, match=match):
        fit(M(), DPZeroStrategy(noise_multiplier=1.0))


def test_bf16_mixed_trains():
    model = TinyClassifier()
    before = flat_params(model)
    strategy = DPZeroStrategy(noise_multiplier=1.0)
    fit(model, strategy, precision="bf16-mixed", max_steps=3)
    assert strategy.accountant.steps == 3
    assert not torch.equal(before, flat_params(model))


def test_only_trainable_parameters_move():
    model = TinyClassifier()
    model.net[0].weight.requires_grad_(False)
    frozen = model.net[0].weight.detach().clone()
    fit(model, DPZeroStrategy(noise_multiplier=1.0), max_steps=3)
    assert torch.equal(frozen, model.net[0].weight)


class _DropoutProbe(TinyClassifier):
    def __init__(self):
        super().__init__(dropout=0.5)
        self.masks, self.modes = [], []
        self.net[2].register_forward_hook(lambda m, i, o: self.masks.append((o == 0).clone()))

    def training_step(self, batch, batch_idx):
        self.modes.append(self.training)
        return super().training_step(batch, batch_idx)


def test_dropout_off_by_default():
    model = _DropoutProbe()
    fit(model, DPZeroStrategy(noise_multiplier=1.0), max_steps=2)
    assert model.modes == [False] * 4
    assert model.training  # restored after the probes


class _FrozenPartInEval(_DropoutProbe):
    """A user who keeps one submodule in eval mode (e.g. a frozen encoder with dropout or running statistics)."""

    def on_train_batch_start(self, batch, batch_idx):
        self.net[2].eval()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after.append((self.training, self.net[0].training, self.net[2].training))


def test_probes_restore_each_submodule_mode():
    model = _FrozenPartInEval()
    model.after = []
    fit(model, DPZeroStrategy(noise_multiplier=1.0, num_directions=2), max_steps=2)
    assert model.modes == [False] * 8  # every probe in eval mode (dropout off)
    # after the step, the module is back in train mode but the submodule the user put in eval stays there
    assert model.after == [(True, True, False)] * 2


def test_dropout_same_masks_in_both_probes():
    model = _DropoutProbe()
    fit(model, DPZeroStrategy(noise_multiplier=1.0, dropout="same"), max_steps=3)
    assert model.modes == [True] * 6
    for step in range(3):
        plus, minus = model.masks[2 * step], model.masks[2 * step + 1]
        if plus.shape == minus.shape and plus.numel():
            assert torch.equal(plus, minus)
    assert any(m.any() for m in model.masks)  # dropout really was active


def test_empty_batches_are_steps_too():
    seen = []

    class Spy(TinyClassifier):
        def on_train_batch_start(self, batch, batch_idx):
            seen.append(isinstance(batch, EmptyBatch))

    model = Spy()
    strategy = DPZeroStrategy(noise_multiplier=1.0)
    # q = 1/64: most Poisson batches are empty
    fit(model, strategy, data=linear_data(n=64), batch_size=1, max_steps=40)
    assert len(seen) == 40 and any(seen) and not all(seen)
    assert strategy.accountant.steps == 40
    assert model.calls == 2 * seen.count(False)


def test_registered_name_and_defaults():
    trainer = L.Trainer(strategy="dpzero", **trainer_kwargs(max_steps=2))
    assert isinstance(trainer.strategy, DPZeroStrategy)
    assert trainer.strategy.target_epsilon == 8.0


def test_lightning_cli_yaml(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_dp.DPZeroStrategy\n    init_args:\n      eps: 3.0\n"
        "      clip: 7.0\n  accelerator: cpu\n  devices: 1\n"
    )
    cli = LightningCLI(TinyClassifier, run=False, args=["--config", str(cfg)], save_config_callback=None)
    assert isinstance(cli.trainer.strategy, DPZeroStrategy)
    assert cli.trainer.strategy.target_epsilon == 3.0 and cli.trainer.strategy.clip == 7.0
    cli2 = LightningCLI(TinyClassifier, run=False, args=["--trainer.strategy=dpzero"], save_config_callback=None)
    assert isinstance(cli2.trainer.strategy, DPZeroStrategy)


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        DPZeroStrategy()
    with pytest.raises(ValueError, match="exactly one"):
        DPZeroStrategy(eps=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="clip"):
        DPZeroStrategy(eps=1.0, clip=0.0)
    with pytest.raises(ValueError, match="zo_eps"):
        DPZeroStrategy(eps=1.0, zo_eps=0.0)
    with pytest.raises(ValueError, match="delta"):
        DPZeroStrategy(eps=1.0, delta=1.5)


def test_privacy_budget_logs_reports_and_stops(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    budget = PrivacyBudget(max_epsilon=2.0)
    strategy = DPZeroStrategy(noise_multiplier=1.0, accountant="rdp")
    trainer = L.Trainer(
        strategy=strategy, callbacks=[budget], logger=CSVLogger(tmp_path), default_root_dir=tmp_path,
        accelerator="cpu", devices=1, max_steps=500, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(TinyClassifier(), loader(linear_data(), 8))
    steps = strategy.accountant.steps
    assert 0 < steps < 500
    assert strategy.epsilon <= 2.0 < strategy.epsilon_after(1)  # stopped right before exceeding
    assert budget.stopped_at_step == steps
    assert trainer.callback_metrics["privacy/epsilon"].item() == pytest.approx(strategy.epsilon, rel=1e-6)
    assert trainer.callback_metrics["privacy/delta"].item() == pytest.approx(strategy.delta)
    report = json.loads((tmp_path / "lightning_logs" / "version_0" / "privacy_report.json").read_text())
    assert report["epsilon"] == pytest.approx(strategy.epsilon) and report["stopped_by_budget_at_step"] == steps
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "privacy/epsilon" in metrics and "privacy/delta" in metrics


def test_privacy_budget_needs_a_dp_strategy():
    with pytest.raises(IncompatibleStrategyError, match="privacy_report"):
        L.Trainer(callbacks=[PrivacyBudget()], **trainer_kwargs()).fit(TinyClassifier(), loader(linear_data()))


def test_privacy_budget_verifies_many_steps_per_accountant_evaluation(tmp_path):
    """With max_epsilon, the stop still comes right before the step that would exceed it, but the accountant is
    evaluated O(log T) times, not at every step (one PRV evaluation can take seconds on a CPU)."""
    budget = PrivacyBudget(max_epsilon=6.0, log_every_n_steps=10_000)
    strategy = DPZeroStrategy(noise_multiplier=1.0, accountant="rdp")
    calls = []
    compute = strategy.accountant._compute
    strategy.accountant._compute = lambda history, delta: calls.append(len(calls)) or compute(history, delta)
    kw = trainer_kwargs(max_steps=500, default_root_dir=tmp_path)
    trainer = L.Trainer(strategy=strategy, callbacks=[budget], **kw)
    trainer.fit(TinyClassifier(), loader(linear_data(), 8))
    steps = strategy.accountant.steps
    assert 50 < steps < 500 and budget.stopped_at_step == steps
    assert strategy.epsilon <= 6.0 < strategy.epsilon_after(1)  # the same stop as a check at every step
    assert len(calls) < steps / 4, (len(calls), steps)
