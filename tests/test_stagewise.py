"""Stagewise DP-ZO (StagewiseZO): the schedule's values at every step, the proximal update, several directions per
step accounted as one mechanism at σ/√q, and resume."""

import math
import warnings

import lightning.pytorch as L
import pytest
import torch
from helpers import TinyClassifier, clipped_difference_mean, flat_params, linear_data, loader, trainer_kwargs
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from custom_kernels import normal_stream
from lightning_dp.callbacks.stagewise import StagewiseZO
from lightning_dp.mechanisms.zo import StagewiseSchedule
from lightning_dp.strategies.dpzero import DPZeroStrategy


class Recording(TinyClassifier):
    """Records, at every probe, the step, the strategy's λ, the optimizer's lr and the parameters."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.records = []

    def training_step(self, batch, batch_idx):
        strategy = self.trainer.strategy
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.records.append((self.trainer.global_step, strategy.zo_eps, lr, flat_params(self)))
        return super().training_step(batch, batch_idx)


def _strategy(**kw):
    kw = {"noise_multiplier": 0.0, "clip": 2.0, "seed": 17, "sampling_seed": 4, "accountant": "rdp", **kw}
    return DPZeroStrategy(**kw)


def _fit(model, strategy, callbacks=(), steps=5, data=None, batch_size=8, **kw):
    trainer = L.Trainer(strategy=strategy, callbacks=list(callbacks), **trainer_kwargs(max_steps=steps, **kw))
    trainer.fit(model, loader(data if data is not None else linear_data(), batch_size))
    return trainer


# ---------------------------------------------------------------------------------------------- the schedule
def test_schedule_stage_boundaries_and_values():
    s = StagewiseSchedule(stages=3, first_stage_steps=4, lr_decay=0.5, zo_eps_start=1e-2, zo_eps_end=1e-4)
    assert [s.stage_start(k) for k in range(3)] == [0, 4, 12]  # lengths 4, 8, then to the end
    assert [s.stage_of(t) for t in range(30)] == [0] * 4 + [1] * 8 + [2] * 18
    assert [t for t in range(30) if s.is_stage_start(t)] == [4, 12]
    assert [s.zo_eps(k) for k in range(3)] == [1e-2, pytest.approx(1e-3, rel=1e-12), 1e-4]  # endpoints exact
    assert [s.lr_factor(k) for k in range(3)] == [1.0, 0.5, 0.25]


@pytest.mark.parametrize("start, end", [(1e-3, 1e-6), (1e-3, 1e-3), (1e-6, 1e-3), (1e-300, 1e300)])
def test_zo_eps_decay_is_geometric_finite_and_positive(start, end):
    """The public code's λ_k = (λ_end − λ_start)^(1/S) is NaN for λ_end < λ_start and 1 for λ_end = λ_start; ours is
    finite, positive and geometric for every pair of positive endpoints."""
    s = StagewiseSchedule(stages=5, first_stage_steps=1, zo_eps_start=start, zo_eps_end=end)
    values = [s.zo_eps(k) for k in range(5)]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert values[0] == start and values[-1] == end
    steps = [math.log(b) - math.log(a) for a, b in zip(values, values[1:])]
    for r in steps:
        assert r == pytest.approx((math.log(end) - math.log(start)) / 4, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kw", [dict(stages=0), dict(first_stage_steps=0), dict(lr_decay=0.0), dict(lr_decay=1.5),
                                dict(zo_eps_end=0.0), dict(zo_eps_end=float("nan")), dict(prox=-1.0)])
def test_invalid_arguments(kw):
    with pytest.raises(ValueError):
        StagewiseZO(**kw)


def test_values_used_by_the_trainer_at_every_step():
    """λ and lr at every step are the schedule's, and the probes really perturb by ±λ_stage·z."""
    model = Recording(lr=0.1)
    strategy = _strategy(zo_eps=1e-2)
    stagewise = StagewiseZO(stages=3, first_stage_steps=2, lr_decay=0.5, zo_eps_end=1e-4)
    _fit(model, strategy, [stagewise], steps=16)  # stages: [0, 2), [2, 6), [6, 16)
    expected_eps = {0: 1e-2, 1: 1e-3, 2: 1e-4}
    probes = {}
    for step, eps, lr, params in model.records:
        stage = 0 if step < 2 else 1 if step < 6 else 2
        assert eps == pytest.approx(expected_eps[stage], rel=1e-12)
        assert lr == pytest.approx(0.1 * 0.5**stage, rel=1e-12)
        probes.setdefault(step, []).append(params)
    assert sorted(probes) == list(range(16))
    offsets = strategy.directions.offsets
    for step, (plus, minus) in probes.items():
        stage = 0 if step < 2 else 1 if step < 6 else 2
        seed = strategy.directions.seed_for(step)
        z = torch.cat([normal_stream(seed, o, p.numel()) for p, o in zip(model.parameters(), offsets)])
        torch.testing.assert_close((plus - minus) / 2, expected_eps[stage] * z, atol=1e-6, rtol=1e-4)
    # the optimizer itself carries the decayed lr (what checkpoints save and LearningRateMonitor logs)
    assert strategy.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.025)


def test_first_stage_steps_fit_the_planned_steps():
    strategy = _strategy()
    stagewise = StagewiseZO(stages=3)
    _fit(TinyClassifier(), strategy, [stagewise], steps=14)
    assert stagewise.schedule(strategy).first_stage_steps == 2  # 14 / (1 + 2 + 4)


def test_refuses_an_lr_scheduler_it_would_fight():
    class WithScheduler(TinyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2)]

    with pytest.raises(ValueError, match="scheduler"):
        _fit(WithScheduler(), _strategy(), [StagewiseZO(stages=2, first_stage_steps=2)])
    _fit(WithScheduler(), _strategy(), [StagewiseZO(stages=2, first_stage_steps=2, lr_decay=1.0)])


def test_needs_dpzero_strategy():
    from lightning_dp import DPSGDStrategy

    with pytest.raises(TypeError, match="DPZeroStrategy"):
        _fit(TinyClassifier(), DPSGDStrategy(noise_multiplier=1.0), [StagewiseZO()])


def test_keeps_two_passes_and_matches_three_passes():
    """Stage boundaries change λ, lr and the anchor between steps: the two-pass schedule (which must not fuse the
    next step's +λz across a boundary) follows the three-pass trajectory."""

    def run(schedule):
        torch.manual_seed(0)
        model = TinyClassifier(weight_decay=0.01)
        strategy = _strategy(zo_schedule=schedule, zo_eps=1e-2)
        _fit(model, strategy, [StagewiseZO(stages=3, first_stage_steps=3, zo_eps_end=1e-3, prox=0.5)], steps=25)
        return model, strategy

    m2, s2 = run("auto")
    m3, s3 = run("three_pass")
    assert s2.schedule == "two_pass"
    torch.testing.assert_close(flat_params(m2), flat_params(m3), atol=1e-5, rtol=0)
    # 2 passes + 1 proximal pass per step, + the first step's +λz and one unfused +λz at each of the 2 boundaries
    assert s2.directions.passes == 3 * 25 + 1 + 2
    assert s3.directions.passes == 4 * 25


# ---------------------------------------------------------------------------------------------- proximal term
def test_proximal_update_formula_and_anchor_per_stage():
    """θ_{t+1} = θ_t − η·(ĝ_t·z_t + γ·(θ_t − θ_anchor)), with θ_anchor the θ at the start of the stage."""
    gamma, lr = 0.5, 0.1

    def run(steps):
        torch.manual_seed(0)
        model = TinyClassifier(lr=lr)
        strategy = _strategy()
        _fit(model, strategy, [StagewiseZO(stages=2, first_stage_steps=3, lr_decay=1.0, prox=gamma)], steps=steps)
        return model, strategy

    models = [run(n) for n in range(0, 6)]
    thetas = [flat_params(m) for m, _ in models]  # θ_0 .. θ_5 (the first run trains 0 steps)
    for t in range(1, 5):
        model, strategy = models[t + 1]
        seed = strategy.directions.seed_for(t)
        offsets = strategy.directions.offsets
        z = torch.cat([normal_stream(seed, o, p.numel()) for p, o in zip(model.parameters(), offsets)])
        anchor = thetas[0] if t < 3 else thetas[3]  # stage 1 starts at step 3
        expected = thetas[t] - lr * (strategy.last_step.projected_grad * z + gamma * (thetas[t] - anchor))
        torch.testing.assert_close(thetas[t + 1], expected, atol=1e-6, rtol=0)
    _, last = models[5]
    torch.testing.assert_close(torch.cat([a.reshape(-1) for a in last.directions.anchor]), thetas[3], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- q directions
def test_q_directions_are_one_mechanism_at_sigma_over_sqrt_q():
    """q releases on one Poisson batch are one Gaussian mechanism (sensitivity √q·C, noise σC per entry): σ is
    √q times the single-release σ for T steps, and one step at σ/√q is recorded per optimizer step."""
    q, steps, eps = 3, 6, 3.0
    model = TinyClassifier()
    strategy = DPZeroStrategy(eps=eps, clip=2.0, accountant="rdp", num_directions=q)
    _fit(model, strategy, steps=steps)
    delta, rate = 64**-1.1, 8 / 64
    sigma_1 = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=rate, steps=steps,
                                   accountant="rdp", epsilon_tolerance=0.01)
    assert strategy.noise_multiplier == pytest.approx(sigma_1 * q**0.5, rel=1e-12)  # σ grows with √q at a fixed ε
    assert strategy.accountant.history == [(pytest.approx(sigma_1, rel=1e-12), rate, steps)]

    def opacus_epsilon(n, sigma=sigma_1):
        acc = create_accountant("rdp")
        acc.history = [(sigma, rate, n)]
        return acc.get_epsilon(delta=delta)

    report = strategy.privacy_report()
    assert report["epsilon"] == pytest.approx(opacus_epsilon(steps), rel=1e-9)
    assert 2.9 < report["epsilon"] <= eps
    assert report["steps"] == steps and report["num_directions"] == q and report["releases_per_step"] == q
    assert report["effective_noise_multiplier"] == pytest.approx(sigma_1, rel=1e-12)
    assert "σ/√3" in report["accounting"]
    assert strategy.epsilon_after(1) == pytest.approx(opacus_epsilon(steps + 1), rel=1e-9)
    assert model.calls == 2 * q * steps
    assert len(strategy.last_steps) == q and len({r.noise for r in strategy.last_steps}) == q  # q noise draws


def test_q_same_batch_releases_counted_as_independent_steps_under_report_epsilon():
    """The issue's measurement: N = 10⁴, q = 0.0064, T = 1000, k = 4 releases per step. Calibrating σ as if the
    k releases were k independently sampled steps gives ε = 8 on paper; the one mechanism they form (σ/√k) spends
    far more. The strategy's calibration is that of the one mechanism, so its σ is the right one."""
    from lightning_dp.privacy import PrivacyAccountant, calibrate_noise_multiplier

    k, rate, steps, delta = 4, 0.0064, 1000, 1e-5
    wrong_sigma = calibrate_noise_multiplier(8.0, delta, rate, k * steps, "rdp")
    true = PrivacyAccountant("rdp")
    true.step(wrong_sigma / k**0.5, rate, steps)
    assert true.epsilon(delta) > 30  # ≈ 47 (PRV), far above the 8 the old accounting reported
    right_sigma = calibrate_noise_multiplier(8.0, delta, rate, steps, "rdp") * k**0.5
    fixed = PrivacyAccountant("rdp")
    fixed.step(right_sigma / k**0.5, rate, steps)
    assert fixed.epsilon(delta) <= 8.0 and right_sigma > wrong_sigma


def test_q_directions_update_formula():
    """θ <- θ − η·(1/q)·Σ_j ĝ_j·z_j, every ĝ_j estimated at the same θ on the same batch."""
    torch.manual_seed(0)
    q, lr, lam, clip = 2, 0.1, 1e-3, 0.5
    model = TinyClassifier(lr=lr)
    reference = TinyClassifier(lr=lr)
    reference.load_state_dict(model.state_dict())
    data = linear_data(n=16)
    strategy = DPZeroStrategy(noise_multiplier=0.0, clip=clip, zo_eps=lam, seed=5, poisson_sampling=False,
                              num_directions=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(model, strategy, data=data, batch_size=16, steps=1)
    x, y = data.tensors
    params = list(reference.parameters())
    update = [torch.zeros_like(p) for p in params]
    for j in range(q):
        seed = strategy.directions.seed_for(0, j)
        zs = [normal_stream(seed, o, p.numel()).view_as(p) for p, o in zip(params, strategy.directions.offsets)]
        g = clipped_difference_mean(reference, zs, x, y, lam, clip, 16)
        assert strategy.last_steps[j].projected_grad == pytest.approx(g, rel=1e-4, abs=1e-7)
        for u, z in zip(update, zs):
            u.add_(g * z / q)
    with torch.no_grad():
        for p, u in zip(params, update):
            p.sub_(lr * u)
    torch.testing.assert_close(flat_params(model), flat_params(reference), atol=1e-5, rtol=0)


def test_invalid_num_directions():
    with pytest.raises(ValueError, match="num_directions"):
        DPZeroStrategy(eps=1.0, num_directions=0)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_resume_restores_stage_state(tmp_path):
    """A run resumed mid-stage (λ, lr, anchor restored) ends where the uninterrupted run ends."""

    def run(steps, ckpt=None):
        torch.manual_seed(0)
        model = TinyClassifier(lr=0.1)
        strategy = _strategy(zo_eps=1e-2, num_directions=2, seed=None if ckpt else 17,
                             sampling_seed=None if ckpt else 4)
        stagewise = StagewiseZO(stages=3, first_stage_steps=2, zo_eps_end=1e-4, prox=0.3)
        trainer = L.Trainer(strategy=strategy, callbacks=[stagewise], **trainer_kwargs(max_steps=steps))
        trainer.fit(model, loader(linear_data()), ckpt_path=ckpt)
        return model, strategy, trainer

    full_model, full, _ = run(12)
    _, half, trainer = run(4)  # stopped inside stage 1 (steps 2..5)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    saved = torch.load(tmp_path / "half.ckpt", weights_only=True)["lightning_dp"]["zo"]
    assert saved["zo_eps"] == pytest.approx(1e-3) and saved["num_directions"] == 2 and saved["indices"] is None
    assert saved["anchor"] is not None
    resumed_model, resumed, _ = run(12, ckpt=tmp_path / "half.ckpt")
    assert resumed.zo_eps == full.zo_eps == pytest.approx(1e-4)
    assert resumed.accountant.history == full.accountant.history
    assert torch.equal(flat_params(resumed_model), flat_params(full_model))


def test_resume_with_other_num_directions_is_refused(tmp_path):
    from lightning_dp import UnsafeSettingError

    trainer = L.Trainer(strategy=_strategy(num_directions=2), **trainer_kwargs(max_steps=2))
    trainer.fit(TinyClassifier(), loader(linear_data()))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    with pytest.raises(UnsafeSettingError, match="num_directions"):
        L.Trainer(strategy=_strategy(), **trainer_kwargs(max_steps=4)).fit(
            TinyClassifier(), loader(linear_data()), ckpt_path=tmp_path / "c.ckpt"
        )
