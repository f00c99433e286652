"""RMT gradient denoising: the shrinkage math on synthetic matrices with known noise, and the RMTDenoise callback
inside a DPSGDStrategy Trainer (post-processing: same ε; the optimizer steps on the denoised gradient)."""

import csv
import glob
import math
import os
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from helpers import linear_data, loader, trainer_kwargs
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_dp.callbacks.rmt import RMTDenoise
from lightning_dp.denoise import denoise_matrix, mp_edge, optimal_shrinkage, rmt_denoise, weight_matrices
from lightning_dp.strategies.dpsgd import DPSGDStrategy
from lightning_dp.strategies.dpzero import DPZeroStrategy


# ---------------------------------------------------------------------------------------------- the math
def low_rank_problem(m, n, strengths, noise_std, seed=0):
    """``G`` of rank r with normalized singular values ``strengths`` (in units of ``s·√max(m, n)``), and noise."""
    g = torch.Generator().manual_seed(seed)
    r = len(strengths)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    x = torch.tensor(strengths, dtype=torch.float64) * noise_std * math.sqrt(max(m, n))
    signal = (u * x) @ v.T
    noise = noise_std * torch.randn(m, n, generator=g, dtype=torch.float64)
    return signal.float(), noise.float()


def test_shrinker_is_the_bbp_estimate_times_the_two_cosines():
    """η(y(x)) = x · cos(left angle) · cos(right angle) (Gavish–Donoho's closed form), for m ≤ n, β = m/n."""
    for beta in (0.1, 0.5, 1.0):
        x = torch.linspace(beta**0.25 + 0.05, 6.0, 40, dtype=torch.float64)
        y = torch.sqrt((1 + x**2) * (beta + x**2)) / x  # where a signal value x appears (BBP)
        cos_left = torch.sqrt((x**4 - beta) / (x**4 + beta * x**2))
        cos_right = torch.sqrt((x**4 - beta) / (x**4 + x**2))
        torch.testing.assert_close(optimal_shrinkage(y, beta), x * cos_left * cos_right, rtol=1e-10, atol=1e-12)
        edge = 1 + math.sqrt(beta)
        below = torch.tensor([0.0, 0.5, edge - 1e-6, edge], dtype=torch.float64)
        assert torch.equal(optimal_shrinkage(below, beta), torch.zeros(4, dtype=torch.float64))
    assert mp_edge(100, 400, 0.5) == pytest.approx(0.5 * (10 + 20))


@pytest.mark.parametrize("shape", [(96, 320), (320, 96), (160, 160)])
@pytest.mark.parametrize("svd", ["full", "lowrank"])
def test_low_rank_signal_is_recovered_with_known_noise(shape, svd):
    m, n = shape
    s = 0.01
    signal, noise = low_rank_problem(m, n, [4.0, 2.5, 1.8], s, seed=m + n)
    noisy = signal + noise
    result = denoise_matrix(noisy, s, kappa=1.1, svd=svd)
    assert result.method == svd
    assert result.rank == 3
    noisy_err = (noisy - signal).norm()
    err = (result.matrix - signal).norm()
    # measured: err / noisy_err = 0.18-0.20 (a ~5x smaller error; full and low-rank agree), and the optimal
    # shrinker's error is 0.84-0.91x that of plain truncation to the same rank
    assert err < 0.25 * noisy_err
    u, vals, vh = torch.linalg.svd(noisy, full_matrices=False)
    truncated = (u[:, :3] * vals[:3]) @ vh[:3]
    assert err < 0.95 * (truncated - signal).norm()
    # κ = 1 (the bulk edge itself) may keep a noise value just above the edge, but gives it ~no weight
    at_edge = denoise_matrix(noisy, s, kappa=1.0, svd=svd)
    assert at_edge.rank in (3, 4)
    assert (at_edge.matrix - signal).norm() < 0.25 * noisy_err


def test_pure_noise_is_removed():
    s = 0.3
    for m, n in ((128, 384), (384, 128), (200, 200)):
        noise = s * torch.randn(m, n)
        at_edge = denoise_matrix(noise, s)  # finite-size fluctuations may poke just above the edge
        assert at_edge.rank <= 2
        assert at_edge.matrix.norm() < 0.05 * noise.norm()
        assert at_edge.threshold == pytest.approx(s * (math.sqrt(m) + math.sqrt(n)))
        above = denoise_matrix(noise, s, kappa=1.1)
        assert above.rank == 0 and torch.count_nonzero(above.matrix) == 0
    # the same matrix treated as if its noise were 10x smaller keeps its top singular values: the std matters
    assert denoise_matrix(noise, s / 10).rank > 10


def test_low_rank_path_grows_until_it_has_every_surviving_value():
    s = 0.01
    strengths = [6.0 - 0.2 * i for i in range(20)]
    signal, noise = low_rank_problem(200, 600, strengths, s, seed=3)
    full = denoise_matrix(signal + noise, s, svd="full")
    low = denoise_matrix(signal + noise, s, svd="lowrank", rank_hint=2)
    assert full.rank == low.rank == 20
    torch.testing.assert_close(low.singular_values, full.singular_values, rtol=2e-3, atol=0)
    # 2 power iterations: ~1% relative difference (measured 1.2%), none in the error to the signal
    assert (low.matrix - full.matrix).norm() < 0.02 * full.matrix.norm()
    assert (low.matrix - signal).norm() < 1.01 * (full.matrix - signal).norm()
    # "auto" picks the randomized path for a large matrix with a small rank hint, the full one otherwise
    assert denoise_matrix(signal + noise, s, rank_hint=8).method == "lowrank"
    assert denoise_matrix(signal + noise, s, rank_hint=64).method == "full"
    # the randomized path is deterministic in its seed (ranks agree)
    again = denoise_matrix(signal + noise, s, svd="lowrank", rank_hint=2)
    assert torch.equal(again.matrix, low.matrix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_shapes_and_dtypes_are_preserved(dtype):
    s = 0.01
    signal, noise = low_rank_problem(70, 130, [5.0, 4.0], s, seed=1)
    rounding = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype, 1e-5)
    for noisy in ((signal + noise).to(dtype), (signal + noise).T.to(dtype)):
        out = rmt_denoise(noisy, s, kappa=1.1, svd="full")
        assert out.shape == noisy.shape and out.dtype == dtype and out.device == noisy.device
        # the math runs in fp32 (fp64 for fp64) whatever the input dtype: only the output is rounded
        reference = rmt_denoise(noisy.float(), s, kappa=1.1, svd="full")
        torch.testing.assert_close(out.float(), reference, rtol=0, atol=rounding * reference.abs().max().item())
        assert torch.linalg.matrix_rank(out.double(), rtol=10 * rounding) == 2


def test_norm_correction_and_invalid_inputs():
    s = 0.02
    signal, noise = low_rank_problem(100, 300, [4.0, 3.0], s, seed=5)
    noisy = signal + noise
    plain = rmt_denoise(noisy, s, kappa=1.1)
    observed = rmt_denoise(noisy, s, kappa=1.1, norm_correction="observed")
    estimated = rmt_denoise(noisy, s, kappa=1.1, norm_correction="signal")
    assert observed.norm() == pytest.approx(noisy.norm().item(), rel=1e-4)
    unbiased = math.sqrt(noisy.square().sum().item() - 100 * 300 * s**2)
    assert estimated.norm() == pytest.approx(unbiased, rel=1e-4)
    assert plain.norm() < estimated.norm()  # the shrunk estimate is smaller than the signal's norm...
    assert abs(estimated.norm() - signal.norm()) < 0.1 * signal.norm()  # ...which the "signal" target recovers
    # same direction: the correction only rescales
    torch.testing.assert_close(observed / observed.norm(), plain / plain.norm(), rtol=0, atol=1e-5)
    assert torch.equal(rmt_denoise(noisy, 0.0), noisy)  # no noise: nothing to remove
    with pytest.raises(ValueError, match="2-D"):
        rmt_denoise(torch.randn(4, 4, 4), s)
    with pytest.raises(ValueError, match="noise_std"):
        rmt_denoise(noisy, -1.0)
    with pytest.raises(ValueError, match="kappa"):
        rmt_denoise(noisy, s, kappa=0.5)
    with pytest.raises(ValueError, match="non-finite"):
        rmt_denoise(torch.full((8, 8), float("nan")), s)
    with pytest.raises(ValueError, match="norm_correction"):
        rmt_denoise(noisy, s, norm_correction="paper")


def test_weight_matrices_selects_linear_layers_and_skips_embeddings():
    from transformers.pytorch_utils import Conv1D

    model = nn.ModuleDict({
        "emb": nn.Embedding(100, 32),
        "proj": nn.Linear(32, 64),
        "conv": Conv1D(64, 32),  # GPT-2 style: weight stored [in=32, out=64]
        "norm": nn.LayerNorm(64),
        "frozen": nn.Linear(64, 64),
        "head": nn.Linear(64, 2),
    })
    model["frozen"].weight.requires_grad_(False)
    assert model["conv"].weight.shape == (32, 64)
    names = lambda sel: [name for name, _ in sel]  # noqa: E731
    assert names(weight_matrices(model)) == ["proj", "conv", "head"]
    assert names(weight_matrices(model, min_dim=16)) == ["proj", "conv"]
    assert names(weight_matrices(model, embeddings=True, min_dim=16)) == ["emb", "proj", "conv"]
    assert names(weight_matrices(model, layers=["co*", "head"])) == ["conv", "head"]
    assert names(weight_matrices(model, trainable_only=False, min_dim=16)) == ["proj", "conv", "frozen"]
    assert weight_matrices(model, layers="proj")[0][1] is model["proj"].weight
    with pytest.raises(ValueError, match="match no linear layer"):
        weight_matrices(model, layers=["proj", "attention*"])


# ---------------------------------------------------------------------------------------------- the callback
class Net(L.LightningModule):
    """Linear(32→48) → Linear(48→48) → Linear(48→2): two matrices above min_dim=16, a 2-row head below it."""

    def __init__(self, lr=0.1, freeze_first=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 2))
        if freeze_first:
            self.net[0].requires_grad_(False)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction="none")

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class Recorder(L.Callback):
    """Gradients and parameters around the optimizer step (place it before and/or after RMTDenoise)."""

    def __init__(self):
        self.grads, self.params_before, self.params_after = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        self.params_before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params_after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def fit(model, strategy, callbacks, max_steps=2, logger=False, **kw):
    trainer = L.Trainer(strategy=strategy, callbacks=callbacks, log_every_n_steps=1,
                        **trainer_kwargs(max_steps=max_steps, logger=logger))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(linear_data(n=128, d=32), batch_size=16), **kw)
    return trainer


def strategy(**kw):
    return DPSGDStrategy(**{"eps": 8.0, "clip": 1.0, "sampling_seed": 7, "accountant": "rdp", **kw})


def test_optimizer_steps_on_the_denoised_gradient_and_others_are_untouched():
    torch.manual_seed(0)
    model = Net(lr=1.0)
    before, after = Recorder(), Recorder()
    rmt = RMTDenoise(min_dim=16, svd="full")
    dp = strategy()
    fit(model, dp, [before, rmt, after], max_steps=2)
    report = dp.privacy_report()
    s = report["noise_multiplier"] * report["clip"] / (report["sample_rate"] * report["dataset_size"])
    assert dp.gradient_noise_std == pytest.approx(s, rel=1e-12)
    assert [name for name, _ in rmt.targets] == ["net.0", "net.2"]
    changed = 0
    for step in range(2):
        raw, seen = before.grads[step], after.grads[step]
        for name in raw:
            if name in ("net.0.weight", "net.2.weight"):
                expected = denoise_matrix(raw[name], s, svd="full")
                torch.testing.assert_close(seen[name], expected.matrix, rtol=0, atol=0)
                assert expected.rank == rmt.last_ranks[name[:-len(".weight")]] or step == 0
                changed += int(not torch.equal(seen[name], raw[name]))
            else:  # biases and the 2 × 48 head (below min_dim) are the strategy's private gradient, unchanged
                assert torch.equal(seen[name], raw[name])
        # plain SGD with lr = 1: the update is exactly minus the gradient the optimizer was handed
        for name, p_before in after.params_before[step].items():
            torch.testing.assert_close(p_before - after.params_after[step][name], seen[name], rtol=0, atol=1e-6)
    assert changed == 4  # at σ for ε = 8 the noise dominates: every denoised matrix differs from the raw one
    raw = before.grads[1]
    ratios = [torch.linalg.svdvals(raw[f"{name}.weight"])[0] / mp_edge(*w.shape, s) for name, w in rmt.targets]
    assert rmt.last_max_edge_ratio == pytest.approx(max(ratios).item(), rel=1e-5)
    assert (rmt.last_max_edge_ratio > 1) == (sum(rmt.last_ranks.values()) > 0)
    assert rmt.steps == 2 and rmt.total_seconds > 0


def test_epsilon_is_identical_with_and_without_denoising():
    reports, finals = [], []
    for callbacks in ([], [RMTDenoise(min_dim=16)]):
        torch.manual_seed(0)
        model = Net()
        dp = strategy()
        fit(model, dp, callbacks, max_steps=4)
        reports.append(dp.privacy_report())
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert reports[0] == reports[1]
    assert reports[0]["steps"] == 4 and 0 < reports[0]["epsilon"] <= 8.0
    assert not torch.equal(finals[0], finals[1])  # the callback did act on the training


def test_frozen_parameters_are_not_touched_and_metrics_are_logged(tmp_path):
    torch.manual_seed(0)
    model = Net(freeze_first=True)
    frozen = model.net[0].weight.detach().clone()
    rec = Recorder()
    rmt = RMTDenoise(min_dim=16)
    trainer = fit(model, strategy(), [rmt, rec], max_steps=3,
                  logger=CSVLogger(str(tmp_path), name="rmt", version=0))
    assert [name for name, _ in rmt.targets] == ["net.2"]
    assert model.net[0].weight.grad is None and torch.equal(model.net[0].weight, frozen)
    assert all("net.0.weight" not in grads for grads in rec.grads)
    metrics = trainer.callback_metrics
    assert metrics["rmt/rank_total"].item() == rmt.last_ranks["net.2"] == metrics["rmt/rank/net.2"].item()
    assert metrics["rmt/ms"].item() > 0
    trainer.loggers[0].save()
    (path,) = glob.glob(os.path.join(str(tmp_path), "rmt", "version_0", "metrics.csv"))
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("rmt/rank_total")]
    assert len(rows) == 3 and {"rmt/ms", "rmt/rank_mean", "rmt/zeroed_layers", "rmt/rank/net.2"} <= set(rows[0])


def test_refuses_strategies_without_a_known_gradient_noise():
    with pytest.raises(TypeError, match="DPSGDStrategy"):
        fit(Net(), "auto", [RMTDenoise(min_dim=16)], max_steps=1)
    with pytest.raises(TypeError, match="DPSGDStrategy"):
        fit(Net(), DPZeroStrategy(eps=8.0), [RMTDenoise(min_dim=16)], max_steps=1)
    with pytest.raises(ValueError, match="no trainable weight matrix"):
        fit(Net(), strategy(), [RMTDenoise(min_dim=64)], max_steps=1)
    with pytest.raises(ValueError, match="match no linear layer"):
        fit(Net(), strategy(), [RMTDenoise(min_dim=16, layers="encoder.*")], max_steps=1)
    with pytest.raises(ValueError, match="kappa"):
        RMTDenoise(kappa=0.9)
