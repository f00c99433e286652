"""Seeded in-place ZO perturbation (`custom_kernels.zo_perturb`): the Triton kernel (run on the CPU by the Triton
interpreter, TRITON_INTERPRET=1 from conftest) against the plain-torch reference and against its own definition."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import with_threads

from custom_kernels import BLOCK, mix_seed, normal_stream, offsets_for, perturb_
from custom_kernels.zo_perturb import _perturb_triton

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["torch", "triton"]
N = (1 << 16) + 3  # one full interpreter tile plus a masked tail


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of fp32 numbers at |x|."""
    x = x.float().abs()
    return torch.nextafter(x, torch.full_like(x, math.inf)) - x


def test_import_is_cheap_and_triton_optional():
    """`import custom_kernels` does not import triton; without triton the reference works and 'triton' says why."""
    code = (
        "import sys\n"
        "import custom_kernels\n"
        "assert 'triton' not in sys.modules, 'import custom_kernels imported triton'\n"
        "sys.modules['triton'] = None  # simulate a machine without triton\n"
        "z = custom_kernels.normal_stream(1, 0, 8)\n"
        "try:\n"
        "    custom_kernels.normal_stream(1, 0, 8, backend='triton')\n"
        "except RuntimeError as err:\n"
        "    assert 'triton' in str(err)\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT)


def test_compiled_triton_rejects_cpu_tensors():
    """Without the interpreter, backend='triton' on CPU tensors is a clear error, and 'auto' uses the reference."""
    code = (
        "import torch, custom_kernels\n"
        "assert torch.equal(custom_kernels.normal_stream(1, 0, 8),"
        " custom_kernels.normal_stream(1, 0, 8, backend='torch'))\n"
        "try:\n"
        "    custom_kernels.normal_stream(1, 0, 8, backend='triton')\n"
        "except ValueError as err:\n"
        "    assert 'TRITON_INTERPRET=1' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('no error for CPU tensors')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env, cwd=ROOT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_arithmetic_matches_formula(dtype):
    """theta <- decay * theta + s * z on the kernel's own z: fp32 to rounding, bf16/fp16 rounded to nearest-even
    exactly as torch's `.to(dtype)` rounds the fp32 result."""
    seed, offset, decay, s = 1234, 3 * BLOCK, 0.9, 1e-2
    theta = torch.randn(N).to(dtype)
    before = theta.clone()
    perturb_([theta], [offset], seed, s, decay=decay, backend="triton")
    z = normal_stream(seed, offset, N, backend="triton")
    expected = decay * before.float() + s * z  # separately rounded fp32 ops, as in the kernel
    if dtype == torch.float32:
        assert ((theta - expected).abs() <= _ulp(expected)).all()
    else:
        assert torch.equal(theta, expected.to(dtype))


def test_bf16_store_rounds_to_nearest_even_on_edge_cases():
    """Ties to even, just-above-tie and overflow to inf as `torch.Tensor.to(torch.bfloat16)` does; NaN stays NaN."""
    decays = [
        1 + 2**-8,  # tie between 1 and 1 + 2**-7: even -> 1
        1 + 3 * 2**-8,  # tie between 1 + 2**-7 and 1 + 2**-6: even -> 1 + 2**-6 (truncation gives 1 + 2**-7)
        1 + 2**-8 + 2**-20,  # above the tie -> 1 + 2**-7
        -(1 + 3 * 2**-8),
        3.3964e38,  # between bf16 max and fp32 max, past the midpoint -> inf
        float("nan"),
    ]
    tensors = [torch.ones(1, dtype=torch.bfloat16) for _ in decays]
    perturb_(tensors, offsets_for(tensors), 0, 0.0, decay=decays, backend="triton")
    got = torch.cat(tensors)
    expected = torch.tensor(decays, dtype=torch.float32).to(torch.bfloat16)
    assert torch.equal(got[:-1], expected[:-1])
    assert got[-1].isnan()  # NaN payloads differ between torch's own code paths; NaN must stay NaN


def test_kernel_stream_is_a_function_of_seed_and_index_only():
    """Same seed -> bit-identical z for any tile size, grouping, tensor order or offset alignment."""
    seed, n = 77, 3 * BLOCK + 5
    z = normal_stream(seed, 0, n, backend="triton")
    for tile in (1 << 12, 1 << 17):  # interpreter default is 1 << 16
        out = torch.zeros(n)
        _perturb_triton([out], [0], seed, [1.0], None, None, None, tile=tile)
        assert torch.equal(out, z)
    parts = [torch.zeros(BLOCK), torch.zeros(n - BLOCK - 7), torch.zeros(7)]
    bases = [0, BLOCK, n - 7]  # contiguous ranges, last one not a multiple of 4
    perturb_(parts[::-1], bases[::-1], seed, 1.0, backend="triton")  # one grouped launch, reversed order
    assert torch.equal(torch.cat(parts), z)
    assert torch.equal(normal_stream(seed, 5, 1000, backend="triton"), z[5:1005])  # unaligned start


def test_kernel_stream_definition_and_64bit_indices():
    """z(seed, j) == tl.randn4x(seed, j // 4)[j % 4], also for indices past 2**31 and counters past 2**32;
    the full 64-bit seed keys Philox (seed taken modulo 2**64)."""
    import triton
    import triton.language as tl

    @triton.jit
    def randn4x_kernel(out, seed, first_counter, R: tl.constexpr):
        r = tl.arange(0, R)
        n0, n1, n2, n3 = tl.randn4x(seed, first_counter + r.to(tl.int64))
        tl.store(out + 4 * r, n0)
        tl.store(out + 4 * r + 1, n1)
        tl.store(out + 4 * r + 2, n2)
        tl.store(out + 4 * r + 3, n3)

    seed = mix_seed(5, 6)  # a 63-bit seed: both key words non-zero
    for base in (0, (1 << 31) + 4, (1 << 35) + 12):
        z = normal_stream(seed, base, 4096, backend="triton")
        direct = torch.empty(4096)
        randn4x_kernel[(1,)](direct, seed, base // 4, R=1024)
        assert torch.equal(z, direct), base
    assert torch.equal(normal_stream(-3, 0, 64, backend="triton"), normal_stream(2**64 - 3, 0, 64, backend="triton"))
    assert not torch.equal(normal_stream(1, 0, 64, backend="triton"), normal_stream(1 + 2**32, 0, 64, backend="triton"))


def test_reference_stream_is_order_and_grouping_independent():
    seed = 9
    z = normal_stream(seed, 0, 3 * BLOCK, backend="torch")
    a, b = torch.zeros(BLOCK), torch.zeros(2 * BLOCK)
    perturb_([a, b], [2 * BLOCK, 0], seed, 1.0, backend="torch")  # visited in the opposite order of the offsets
    assert torch.equal(a, z[2 * BLOCK :]) and torch.equal(b, z[: 2 * BLOCK])
    assert torch.equal(normal_stream(seed, BLOCK, BLOCK, backend="torch"), z[BLOCK : 2 * BLOCK])


def test_auto_backend_uses_the_reference_on_cpu():
    assert torch.equal(normal_stream(3, 0, 1000), normal_stream(3, 0, 1000, backend="torch"))
    assert not torch.equal(normal_stream(3, 0, 1000, backend="triton"), normal_stream(3, 0, 1000, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_then_minus_restores_within_one_ulp(backend):
    """+s z then -s z gives theta back within one fp32 ulp of the larger of |theta| and |theta + s z| (the only
    rounding is that of the perturbed value and of the restore)."""
    theta = torch.randn(N)
    before = theta.clone()
    perturb_([theta], [0], 5, 1e-3, backend=backend)
    perturbed = theta.clone()
    assert not torch.equal(perturbed, before)
    perturb_([theta], [0], 5, -1e-3, backend=backend)
    assert ((theta - before).abs() <= _ulp(torch.maximum(before.abs(), perturbed.abs()))).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_is_standard_normal(backend):
    """>= 10**6 draws: moments and a Kolmogorov-Smirnov test against N(0, 1); neighbours and seeds uncorrelated."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 1 << 20
    z = normal_stream(2024, 0, n, backend=backend).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.std().item() - 1) < 5 * se
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15 / n)  # skewness, var(z^3) = 15
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # kurtosis, var(z^4) = 96
    assert scipy_stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 5 * se
    assert abs(torch.corrcoef(torch.stack([z[:-4], z[4:]]))[0, 1].item()) < 5 * se
    other = normal_stream(2025, 0, 1 << 16, backend=backend).double()
    assert abs(torch.corrcoef(torch.stack([z[: 1 << 16], other]))[0, 1].item()) < 5 / math.sqrt(1 << 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_two_streams_equal_two_single_passes(backend, dtype):
    theta = torch.randn(N).to(dtype)
    fused, twice = theta.clone(), theta.clone()
    perturb_([fused], [0], 1, 0.5, seed2=2, scale2=-0.25, decay=0.99, backend=backend)
    perturb_([twice], [0], 1, 0.5, decay=0.99, backend=backend)
    middle = twice.clone()
    perturb_([twice], [0], 2, -0.25, backend=backend)
    if dtype == torch.float32:  # the fp32 intermediate is stored exactly: identical
        assert torch.equal(fused, twice)
    else:  # the two-pass version also rounds the intermediate to bf16: one bf16 ulp of the larger magnitude
        bf16_ulp = _ulp(torch.maximum(middle.float().abs(), fused.float().abs())) * 2**16
        assert ((fused.float() - twice.float()).abs() <= bf16_ulp).all()


def _linreg_dpzero(backend: str, fused: bool, steps: int = 50):
    """DPZero on linear regression with per-example clipped finite differences (noise off), parameters [w, b]."""
    gen = torch.Generator().manual_seed(0)
    d, n, batch = 256, 256, 32
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.5
    w, b = torch.zeros(d), torch.zeros(1)
    params, offsets = [w, b], offsets_for([w, b])
    lam, lr, clip, wd = 1e-2, 0.1, 1.0, 0.1  # about a third of the finite differences get clipped
    decay = 1 - lr * wd

    def per_example_loss(idx):
        return 0.5 * (x[idx] @ w.double() + b.double() - y[idx]) ** 2

    def grad_scalar(lp, lm):
        diff = (lp - lm) / (2 * lam)
        return (diff * (clip / diff.abs().clamp(min=1e-12)).clamp(max=1.0)).mean().item()

    seeds = [mix_seed(42, t) for t in range(steps)]
    losses = []
    if fused:
        perturb_(params, offsets, seeds[0], lam, backend=backend)  # prologue: +lam z_0
    for t in range(steps):
        idx = torch.arange(t * batch, (t + 1) * batch) % n
        losses.append(per_example_loss(torch.arange(n)).mean().item() if not fused else None)
        if fused:  # 2 passes: -2 lam z_t; then restore + update + next +lam z_{t+1} in one pass
            lp = per_example_loss(idx)
            perturb_(params, offsets, seeds[t], -2 * lam, backend=backend)
            lm = per_example_loss(idx)
            g = grad_scalar(lp, lm)
            scale = decay * lam - lr * g  # decay * (theta_- + lam z_t) - lr g z_t
            if t + 1 < steps:
                perturb_(params, offsets, seeds[t], scale, seed2=seeds[t + 1], scale2=lam, decay=decay, backend=backend)
            else:
                perturb_(params, offsets, seeds[t], scale, decay=decay, backend=backend)
        else:  # MeZO's 4 passes: +lam, -2 lam, +lam (restore), update
            perturb_(params, offsets, seeds[t], lam, backend=backend)
            lp = per_example_loss(idx)
            perturb_(params, offsets, seeds[t], -2 * lam, backend=backend)
            lm = per_example_loss(idx)
            perturb_(params, offsets, seeds[t], lam, backend=backend)
            g = grad_scalar(lp, lm)
            perturb_(params, offsets, seeds[t], -lr * g, decay=decay, backend=backend)
    final = per_example_loss(torch.arange(n)).mean().item()
    return torch.cat([w, b]), losses, final


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpzero_two_pass_schedule_matches_four_pass(backend):
    theta4, losses, final4 = _linreg_dpzero(backend, fused=False)
    theta2, _, final2 = _linreg_dpzero(backend, fused=True)
    assert final4 < 0.85 * losses[0]  # it trains
    scale = theta4.abs().max().item()
    assert (theta2 - theta4).abs().max().item() <= 5e-6 * scale  # observed ~3e-7; a missed pass would be ~lam
    assert final2 == pytest.approx(final4, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_errors(backend):
    with pytest.raises(ValueError, match="not contiguous"):
        perturb_([torch.zeros(64, 64).t()], [0], 1, 1.0, backend=backend)
    with pytest.raises(ValueError, match="floating-point"):
        perturb_([torch.zeros(64, dtype=torch.int32)], [0], 1, 1.0, backend=backend)
    with pytest.raises(ValueError, match="offsets"):
        perturb_([torch.zeros(64)], [0, BLOCK], 1, 1.0, backend=backend)
    with pytest.raises(ValueError, match="scale"):
        perturb_([torch.zeros(64), torch.zeros(64)], [0, BLOCK], 1, [1.0, 2.0, 3.0], backend=backend)
    with pytest.raises(ValueError, match="scale2"):
        perturb_([torch.zeros(64)], [0], 1, 1.0, seed2=2, backend=backend)
    with pytest.raises(ValueError, match="offset"):
        perturb_([torch.zeros(64)], [-4], 1, 1.0, backend=backend)


def test_backend_specific_errors():
    with pytest.raises(ValueError, match="multiple of BLOCK"):
        perturb_([torch.zeros(64)], [4], 1, 1.0, backend="torch")
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        perturb_([torch.zeros(64, dtype=torch.float64)], [0], 1, 1.0, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        perturb_([torch.zeros(64)], [0], 1, 1.0, backend="cuda")
    theta = torch.zeros(64, dtype=torch.float64)  # auto: the reference handles any float dtype on the CPU
    perturb_([theta], [0], 1, 1.0)
    assert torch.equal(theta, normal_stream(1, 0, 64).double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_rng_untouched(backend):
    state = torch.get_rng_state()
    perturb_([torch.zeros(1000)], [0], 1, 1.0, seed2=2, scale2=1.0, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------- reference threads
def _reference_by_definition(seed: int, offset: int, count: int) -> torch.Tensor:
    """The reference stream from its definition: block ``b`` is ``torch.randn`` of a generator seeded with
    ``mix_seed(seed, b)``, drawn on one thread, block after block."""
    gen, parts = torch.Generator(), []
    for b, start in enumerate(range(0, count, BLOCK)):
        gen.manual_seed(mix_seed(seed, offset // BLOCK + b))
        parts.append(torch.randn(min(BLOCK, count - start), generator=gen))
    return torch.cat(parts)


def _threaded_case(dtype: torch.dtype, masked: bool, fused: bool, decay: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    sizes = [5 * BLOCK + 17, 3, 2 * BLOCK, BLOCK - 1, 3 * BLOCK + 1]  # 13 blocks of uneven sizes
    tensors = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    indices = None
    if masked:  # every other tensor sparse: distinct, unsorted flat indices (int32 and int64)
        indices = [
            torch.randperm(t.numel(), generator=gen)[: (t.numel() + 1) // 2].to(torch.int32 if k % 4 else torch.int64)
            if k % 2 == 0 else None
            for k, t in enumerate(tensors)
        ]
    offsets = offsets_for(tensors, indices)
    kwargs = {"indices": indices, "backend": "torch"}
    if fused:
        kwargs.update(seed2=12, scale2=[-0.25, 0.0, 0.5, 1.0, -1.0])
    if decay:
        kwargs["decay"] = [0.99, 1.0, 0.5, 0.9, 0.999]
    perturb_(tensors, offsets, 11, [0.5, 1.0, 0.0, -2.0, 0.125], **kwargs)
    return tensors


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize(
    ("dtype", "masked", "fused", "decay"),
    [
        (torch.float32, False, False, False),
        (torch.float32, False, True, True),
        (torch.float32, True, False, False),
        (torch.float32, True, True, True),
        (torch.bfloat16, False, True, True),
        (torch.bfloat16, True, True, False),
        (torch.float64, False, True, False),
    ],
)
def test_reference_threads_do_not_change_a_value(threads, dtype, masked, fused, decay):
    """The blocks are spread over ``torch.get_num_threads()`` workers: the result is bit-identical to one thread's,
    for dense and sparse tensors, one or two fused streams, decay and low precision."""
    one = with_threads(1, lambda: _threaded_case(dtype, masked, fused, decay))
    many = with_threads(threads, lambda: _threaded_case(dtype, masked, fused, decay))
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 4])
def test_reference_stream_keeps_its_definition(threads):
    """With any number of threads, the reference stream is the per-block ``torch.randn`` of the module docstring,
    value for value (so directions of earlier runs and checkpoints are unchanged)."""
    count, offset = 7 * BLOCK + 5, 3 * BLOCK
    z = with_threads(threads, lambda: normal_stream(77, offset, count, backend="torch"))
    assert torch.equal(z, _reference_by_definition(77, offset, count))
    theta = torch.zeros(count)
    with_threads(threads, lambda: perturb_([theta], [offset], 77, 1.0, seed2=78, scale2=-1.0, backend="torch"))
    assert torch.equal(theta, _reference_by_definition(77, offset, count) - _reference_by_definition(78, offset, count))


def test_reference_threads_update_parameters_that_require_grad():
    """Grad mode is per thread: the workers update leaf parameters in place as the caller's ``no_grad`` does."""
    params = [torch.nn.Parameter(torch.zeros(3 * BLOCK)), torch.nn.Parameter(torch.zeros(2 * BLOCK + 1))]
    offsets = offsets_for(params)
    with_threads(4, lambda: perturb_(params, offsets, 5, 1.0, seed2=6, scale2=0.5, backend="torch"))
    for p, o in zip(params, offsets):
        assert p.grad_fn is None and p.requires_grad
        expected = _reference_by_definition(5, o, p.numel()) + 0.5 * _reference_by_definition(6, o, p.numel())
        assert torch.equal(p.detach(), expected)


def test_reference_uses_a_small_persistent_pool_of_num_threads():
    """Several threads take part, as many as ``torch.get_num_threads()`` (the caller included), and the same pool
    serves the next call."""
    import threading

    def workers_after_call() -> set[threading.Thread]:
        perturb_([torch.zeros(16 * BLOCK)], [0], 1, 1.0, backend="torch")
        return {t for t in threading.enumerate() if t.name.startswith("zo_perturb")}

    first = with_threads(4, workers_after_call)
    assert len(first) == 3  # plus the calling thread: 4 workers
    assert with_threads(4, workers_after_call) == first
    assert len(with_threads(2, workers_after_call)) == 1
