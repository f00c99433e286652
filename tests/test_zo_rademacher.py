"""Rademacher directions (``distribution="rademacher"``): the two streams of `custom_kernels.perturb_` against their
definitions, their balance, and `DPZeroStrategy(direction_distribution="rademacher")` in a Trainer."""

import math

import lightning.pytorch as L
import pytest
import torch
from helpers import TinyClassifier, linear_data, loader, trainer_kwargs, with_threads

from custom_kernels import BLOCK, mix_seed, normal_stream, offsets_for, perturb_
from custom_kernels.zo_perturb import _perturb_triton
from lightning_dp import DPZeroStrategy, UnsafeSettingError
from lightning_dp.mechanisms.zo import SeededDirections

BACKENDS = ["torch", "triton"]
RAD = {"distribution": "rademacher"}


def _signs(seed: int, offset: int, count: int, backend: str) -> torch.Tensor:
    return normal_stream(seed, offset, count, backend=backend, **RAD)


def _reference_by_definition(seed: int, offset: int, count: int) -> torch.Tensor:
    """Block ``b``: ``ceil(n / 32)`` words ``random_(0, 2**32)`` of a generator seeded with ``mix_seed(seed, b)``;
    element ``i`` is -1 where bit ``i % 32`` of word ``i // 32`` is set (written with plain integer shifts)."""
    gen, parts = torch.Generator(), []
    for b, start in enumerate(range(0, count, BLOCK)):
        n = min(BLOCK, count - start)
        gen.manual_seed(mix_seed(seed, offset // BLOCK + b))
        words = torch.empty(-(-n // 32), dtype=torch.int64).random_(0, 1 << 32, generator=gen)
        bits = (words[:, None] >> torch.arange(32)) & 1
        parts.append((1 - 2 * bits).reshape(-1)[:n].float())
    return torch.cat(parts)


@pytest.mark.parametrize("threads", [1, 3])
def test_reference_stream_keeps_its_definition(threads):
    count, offset = 3 * BLOCK + 37, 2 * BLOCK
    z = with_threads(threads, lambda: _signs(77, offset, count, "torch"))
    assert torch.equal(z, _reference_by_definition(77, offset, count))
    theta = torch.zeros(count)
    with_threads(threads, lambda: perturb_([theta], [offset], 77, 0.5, seed2=78, scale2=-0.25, backend="torch", **RAD))
    expected = 0.5 * _reference_by_definition(77, offset, count) - 0.25 * _reference_by_definition(78, offset, count)
    assert torch.equal(theta, expected)
    # a prefix of a block is the prefix of the longer block: the value depends on (seed, offset) only
    assert torch.equal(_signs(77, offset, 100, "torch"), z[:100])


def test_kernel_stream_definition_and_tiles():
    """r(seed, j) = -1 where the top bit of tl.randint4x(seed, j // 4)[j % 4] is set, +1 otherwise; independent of
    the tile size, of the grouping of tensors and of the alignment of the start; 64-bit indices."""
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(out, seed, first_counter, R: tl.constexpr):
        r = tl.arange(0, R)
        w0, w1, w2, w3 = tl.randint4x(seed, first_counter + r.to(tl.int64))
        tl.store(out + 4 * r, (w0 >> 31).to(tl.int32))
        tl.store(out + 4 * r + 1, (w1 >> 31).to(tl.int32))
        tl.store(out + 4 * r + 2, (w2 >> 31).to(tl.int32))
        tl.store(out + 4 * r + 3, (w3 >> 31).to(tl.int32))

    seed = mix_seed(5, 6)
    for base in (0, (1 << 31) + 4, (1 << 35) + 12):
        z = _signs(seed, base, 4096, "triton")
        top = torch.empty(4096, dtype=torch.int32)
        randint4x_kernel[(1,)](top, seed, base // 4, R=1024)
        assert torch.equal(z, (1 - 2 * top).float()), base
    n = 3 * BLOCK + 5
    z = _signs(seed, 0, n, "triton")
    for tile in (1 << 12, 1 << 17):
        out = torch.zeros(n)
        _perturb_triton([out], [0], seed, [1.0], None, None, None, tile=tile, **RAD)
        assert torch.equal(out, z)
    parts = [torch.zeros(BLOCK), torch.zeros(n - BLOCK - 7), torch.zeros(7)]
    perturb_(parts[::-1], [n - 7, BLOCK, 0], seed, 1.0, backend="triton", **RAD)
    assert torch.equal(torch.cat(parts), z)
    assert torch.equal(_signs(seed, 5, 1000, "triton"), z[5:1005])  # unaligned start


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_is_balanced_signs(backend):
    """>= 10**6 draws: only ±1; overall mean, the mean at every bit position of a word (j % 32) and of a Philox call
    (j % 4), and neighbour correlations all within 5 standard errors of 0; other seeds uncorrelated."""
    n = 1 << 20
    z = _signs(2024, 0, n, backend).double()
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    lane_se = 5 / math.sqrt(n // 32)
    assert (z.view(-1, 32).mean(0).abs() < lane_se).all()  # a constant bit (e.g. a 31-bit word) would show here
    assert (z.view(-1, 4).mean(0).abs() < lane_se).all()
    for lag in (1, 4, 32, 64):
        assert abs((z[:-lag] * z[lag:]).mean().item()) < 5 / math.sqrt(n), lag
    other = _signs(2025, 0, 1 << 16, backend).double()
    assert abs((z[: 1 << 16] * other).mean().item()) < 5 / math.sqrt(1 << 16)
    block_two = _signs(2024, BLOCK, BLOCK, backend).double()  # blocks of the reference are independent streams
    assert abs((z[:BLOCK] * block_two).mean().item()) < 5 / math.sqrt(BLOCK)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_masked_update_is_the_formula(backend, dtype):
    """decay·p + s·r1 + s2·r2 on the coordinates of a compact index list, evaluated in fp32 and rounded once: the
    same bits on both paths; every other coordinate untouched."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(2 * BLOCK + 11, generator=gen).to(dtype)
    idx = torch.randperm(theta.numel(), generator=gen)[: BLOCK + 3].to(torch.int32)
    before = theta.clone()
    perturb_([theta], offsets_for([theta], [idx]), 3, 0.5, seed2=4, scale2=-0.125, decay=0.99, indices=[idx],
             backend=backend, **RAD)  # fmt: skip
    r1, r2 = _signs(3, 0, idx.numel(), backend), _signs(4, 0, idx.numel(), backend)
    expected = before.clone()
    expected[idx.long()] = ((before[idx.long()].float() * 0.99 + 0.5 * r1) + -0.125 * r2).to(dtype)
    assert torch.equal(theta, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_then_minus_restores(backend):
    theta = torch.randn((1 << 16) + 3)
    before = theta.clone()
    perturb_([theta], [0], 5, 1e-3, backend=backend, **RAD)
    assert torch.equal((theta - before).abs() > 0, torch.ones_like(theta, dtype=torch.bool))
    perturb_([theta], [0], 5, -1e-3, backend=backend, **RAD)
    ulp = torch.nextafter(before.abs() + 1e-3, torch.tensor(math.inf)) - (before.abs() + 1e-3)
    assert ((theta - before).abs() <= ulp).all()


def test_invalid_distribution_is_an_error():
    with pytest.raises(ValueError, match="distribution"):
        perturb_([torch.zeros(8)], [0], 1, 1.0, distribution="uniform")
    with pytest.raises(ValueError, match="distribution"):
        SeededDirections([torch.zeros(8)], 1, distribution="sphere")
    with pytest.raises(ValueError, match="direction_distribution"):
        DPZeroStrategy(eps=1.0, direction_distribution="bernoulli")


def test_seeded_directions_estimate_the_gradient_of_a_linear_loss():
    """E[(zᵀg)·z] = g: the average two-point estimate over 4,000 Rademacher directions of a linear loss is within 5
    standard errors of its gradient, coordinate by coordinate."""
    g = torch.linspace(-1, 1, 48)
    theta = torch.zeros(48)
    directions = SeededDirections([theta], base_seed=3, distribution="rademacher")
    estimates = []
    for t in range(4000):
        seed = directions.seed_for(t)
        directions.move_to(seed, 1.0)  # theta = z exactly (z = ±1, theta was 0)
        z = theta.clone()
        directions.restore()
        assert set(z.unique().tolist()) <= {-1.0, 1.0}
        estimates.append((z @ g) * z)
    mean = torch.stack(estimates).mean(0)
    se = torch.sqrt((g.square().sum() - g.square()) / 4000)  # var of (zᵀg) z_i is ||g||² − g_i²
    assert ((mean - g).abs() < 5 * se).all()


def _fit(strategy, ckpt=None, steps=2):
    trainer = L.Trainer(strategy=strategy, **trainer_kwargs(max_steps=steps))
    model = TinyClassifier()
    trainer.fit(model, loader(linear_data(), 8), ckpt_path=ckpt)
    return trainer, model


def test_strategy_reports_saves_and_refuses_another_distribution_on_resume(tmp_path):
    strategy = DPZeroStrategy(noise_multiplier=1.0, direction_distribution="rademacher", seed=3)
    trainer, model = _fit(strategy)
    assert strategy.privacy_report()["direction_distribution"] == "rademacher"
    assert strategy.directions.distribution == "rademacher"
    trainer.save_checkpoint(tmp_path / "r.ckpt")
    saved = torch.load(tmp_path / "r.ckpt", weights_only=True)["lightning_dp"]["zo"]
    assert saved["direction_distribution"] == "rademacher"
    _fit(DPZeroStrategy(noise_multiplier=1.0, direction_distribution="rademacher"), ckpt=tmp_path / "r.ckpt", steps=4)
    with pytest.raises(UnsafeSettingError, match="direction_distribution='rademacher'"):
        _fit(DPZeroStrategy(noise_multiplier=1.0), ckpt=tmp_path / "r.ckpt", steps=4)
