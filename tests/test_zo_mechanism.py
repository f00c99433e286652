"""DPZero's math on plain tensors: clipping bounds each example, the noise has std σC and is drawn once, the
seeded in-place update is exactly θ <- (1 − η·wd)·θ − η·ĝ·z."""

import math

import pytest
import torch

from custom_kernels import normal_stream
from lightning_dp.mechanisms.collective import LocalCollective
from lightning_dp.mechanisms.noise import GaussianNoise
from lightning_dp.mechanisms.zo import (
    SeededDirections,
    clip_differences,
    privatize_projected_gradient,
    privatize_projected_gradients,
)


def test_each_example_contributes_at_most_clip():
    C, lam = 2.0, 1e-3
    plus = torch.tensor([10.0, 0.0, 1.0, 1.0005, float("nan")])
    minus = torch.tensor([0.0, 10.0, 1.0, 1.0, 0.0])
    clipped = clip_differences(plus, minus, lam, C)
    assert clipped.abs().max() <= C
    assert clipped.tolist()[:3] == [C, -C, 0.0]
    assert clipped[3].item() == pytest.approx(0.25, rel=1e-3)  # small differences pass unclipped
    # sensitivity: removing any one example changes the sum by at most C (add/remove adjacency)
    total = clipped.sum()
    for i in range(len(clipped)):
        assert abs(total - torch.cat([clipped[:i], clipped[i + 1 :]]).sum()) <= C + 1e-12


def test_clip_rejects_batch_level_losses():
    with pytest.raises(ValueError, match=r"\[B\]"):
        clip_differences(torch.tensor(1.0), torch.tensor(0.5), 1e-3, 1.0)


@pytest.mark.parametrize("sigma, clip", [(0.7, 3.0), (2.0, 0.5)])
def test_released_scalar_has_noise_std_sigma_clip(sigma, clip):
    noise = GaussianNoise(seed=1234)
    clipped = torch.full((16,), 0.25, dtype=torch.float64)
    draws = torch.tensor(
        [
            privatize_projected_gradient(clipped, sigma * clip, 16.0, LocalCollective(), noise).projected_grad
            for _ in range(4000)
        ]
    )
    noisy_sums = draws * 16.0
    # mean is the clipped sum (unbiased), std is σC; 4000 draws: std error ≈ 1.1%
    assert abs(noisy_sums.mean().item() - 4.0) < 4 * sigma * clip / math.sqrt(4000)
    assert noisy_sums.std().item() == pytest.approx(sigma * clip, rel=0.05)


def test_noise_is_added_by_rank_zero_only():
    class FakeRank(LocalCollective):
        def __init__(self, rank):
            self.rank, self.world_size = rank, 2

    noise = GaussianNoise(seed=0)
    r1 = privatize_projected_gradient(torch.ones(3, dtype=torch.float64), 5.0, 3.0, FakeRank(1), noise)
    assert r1.noise == 0.0 and r1.clipped_sum == 3.0
    r0 = privatize_projected_gradient(torch.ones(3, dtype=torch.float64), 5.0, 3.0, FakeRank(0), noise)
    assert r0.noise != 0.0
    assert r0.projected_grad == pytest.approx((3.0 + r0.noise) / 3.0)


def test_empty_batch_releases_only_noise():
    r = privatize_projected_gradient(None, 1.0, 4.0, LocalCollective(), GaussianNoise(seed=3))
    assert r.num_examples == 0 and r.clipped_sum == 0.0
    assert r.projected_grad == pytest.approx(r.noise / 4.0)


class _CountingCollective(LocalCollective):
    """One process, rank ``rank`` of two: records what each all-reduce carried (and returns it unchanged)."""

    def __init__(self, rank=0):
        self.rank, self.world_size, self.calls = rank, 2, []

    def all_reduce_sum(self, tensor):
        self.calls.append(tensor.clone())
        return tensor


def test_directions_of_one_step_release_in_one_all_reduce_with_their_own_sums():
    collective = _CountingCollective()
    clipped = [torch.full((5,), float(j), dtype=torch.float64) for j in range(4)]
    results = privatize_projected_gradients(clipped, 0.0, 10.0, collective, None)
    assert len(collective.calls) == 1 and collective.calls[0].shape == (12,)
    assert [r.clipped_sum for r in results] == [0.0, 5.0, 10.0, 15.0]
    assert [r.projected_grad for r in results] == [0.0, 0.5, 1.0, 1.5]
    assert all(r.num_examples == 5 and r.noise == 0.0 for r in results)
    # an empty shard still takes part in the one all-reduce, with zeros
    empty = privatize_projected_gradients([None] * 4, 0.0, 10.0, collective, None)
    assert len(collective.calls) == 2 and torch.equal(collective.calls[1], torch.zeros(12, dtype=torch.float64))
    assert all(r.num_examples == 0 and r.projected_grad == 0.0 for r in empty)
    with pytest.raises(ValueError, match="no direction"):
        privatize_projected_gradients([], 1.0, 10.0, collective, GaussianNoise(seed=0))


def test_directions_of_one_step_get_independent_noise_of_std_sigma_clip_from_rank_zero_only():
    sigma, clip, k, calls = 1.5, 2.0, 8, 3000
    noise = GaussianNoise(seed=99)
    clipped = [torch.zeros(3, dtype=torch.float64)] * k
    draws = torch.tensor(
        [[r.noise for r in privatize_projected_gradients(clipped, sigma * clip, 3.0, LocalCollective(), noise)]
         for _ in range(calls)],
        dtype=torch.float64,
    )  # [calls, k]
    tol = 5 / math.sqrt(calls)
    assert draws.mean(0).abs().max().item() < tol * sigma * clip
    assert torch.allclose(draws.std(0), torch.full((k,), sigma * clip, dtype=torch.float64), rtol=0.06)
    # no two directions share (or mirror) their noise: a shared draw would make the q releases one release of
    # sensitivity √q·C with noise σC, not q releases of σC each
    corr = torch.corrcoef(draws.T)
    assert (corr - torch.eye(k, dtype=torch.float64)).abs().max().item() < tol
    others = privatize_projected_gradients(clipped, sigma * clip, 3.0, _CountingCollective(rank=1), noise)
    assert all(r.noise == 0.0 for r in others)


def test_noise_generators_are_independent_of_global_rng():
    torch.manual_seed(0)
    a = GaussianNoise().scalar(1.0)
    torch.manual_seed(0)
    b = GaussianNoise().scalar(1.0)
    assert a != b  # seeded from OS entropy, not from the global RNG
    state = torch.get_rng_state()
    GaussianNoise().sample((100,), 1.0)
    assert torch.equal(state, torch.get_rng_state())


def _params():
    torch.manual_seed(0)
    return [torch.randn(300, 70), torch.randn(5), torch.randn(70_000)]


def test_perturb_then_restore_and_seeded_update_formula():
    params = _params()
    clean = [p.clone() for p in params]
    d = SeededDirections(params, base_seed=42)
    seed = d.seed_for(7)
    assert seed == SeededDirections(_params(), base_seed=42).seed_for(7)  # a function of (base seed, step)
    assert seed != d.seed_for(8)
    d.move_to(seed, 1e-3)
    d.move_to(seed, -1e-3)
    assert d.pending == {seed: -1e-3}
    lrs, wds, g = [0.1, 0.2, 0.3], [0.0, 0.5, 0.0], 1.7
    d.update(seed, g, lrs, wds)
    assert d.pending == {}
    for p, c, o, lr, wd in zip(params, clean, d.offsets, lrs, wds):
        z = normal_stream(seed, o, p.numel()).view_as(p)
        expected = (1 - lr * wd) * c - lr * g * z
        torch.testing.assert_close(p, expected, atol=2e-6, rtol=1e-6)


def test_restore_returns_clean_parameters():
    params = _params()
    clean = [p.clone() for p in params]
    d = SeededDirections(params, base_seed=1)
    d.move_to(d.seed_for(0), 1e-3)
    d.move_to(d.seed_for(0), -1e-3)
    d.restore()
    assert d.pending == {}
    for p, c in zip(params, clean):
        torch.testing.assert_close(p, c, atol=1e-6, rtol=0)
