"""Per-example norms and the fused clip-and-noise op (`custom_kernels.clip_noise`): the Triton kernels (run on the CPU
by the Triton interpreter, TRITON_INTERPRET=1 from conftest) against the plain-torch reference and against float64."""

import math

import pytest
import torch

from custom_kernels import clip_and_noise_, clip_coefficients, factor_sq_norms, normal_stream, per_example_sq_norms
from custom_kernels.clip_noise import (
    factor_workspace_numel,
    gram,
    gram_dot,
    gram_panels,
    scale_examples,
    symmetric_panels,
)

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _clean_sum(coeffs, grads=None, factors=None):
    """Σ_i c_i ∇_i in float64, and Σ_i |c_i ∇_i| (the scale of the fp32 summation error)."""
    if grads is not None:
        per = grads.double().reshape(grads.shape[0], -1) * coeffs.double()[:, None]
    else:
        a, g = factors
        if a.dim() == 2:
            a, g = a[:, None], g[:, None]
        per = torch.einsum("btp,btd->bpd", g.double(), a.double()).reshape(a.shape[0], -1) * coeffs.double()[:, None]
    return per.sum(0), per.abs().sum(0)


def _assert_fp32_close(out, exact, scale, terms):
    # each of `terms` fp32 roundings contributes at most 2**-24 relative to the running sum of magnitudes
    assert ((out.double() - exact).abs() <= terms * 2**-23 * scale + 1e-30).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_example_sq_norms(dtype):
    grads = torch.randn(6, 3, 1000).to(dtype)
    got = per_example_sq_norms(grads)
    assert got.dtype == torch.float32 and got.shape == (6,)
    exact = grads.double().reshape(6, -1).square().sum(1)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)


# Gram in one panel (T < 64: odd, even, 1), in 2, 3 (uneven) and 8 panels; explicit; 2-D
@pytest.mark.parametrize("shape", [(4, 3, 40, 50), (4, 8, 40, 50), (4, 1, 40, 50), (3, 64, 70, 70), (3, 100, 110, 100),
                                   (2, 300, 400, 300), (4, 30, 3, 2), (4, None, 40, 50)])
def test_factor_sq_norms_match_explicit_per_example_gradients(shape):
    b, t, d, p = shape
    a = torch.randn(b, d) if t is None else torch.randn(b, t, d)
    g = torch.randn(b, p) if t is None else torch.randn(b, t, p)
    a3, g3 = (a[:, None], g[:, None]) if t is None else (a, g)
    explicit = torch.einsum("btp,btd->bpd", g3.double(), a3.double()).square().sum((1, 2))
    torch.testing.assert_close(factor_sq_norms(a, g).double(), explicit, rtol=1e-5, atol=0)


@pytest.mark.parametrize("t", [0, 1, 31, 63, 64, 65, 97, 128, 129, 255, 256, 257, 700])
def test_gram_panels_give_the_full_gram_dot(t):
    """`gram` forms only the lower triangle of column panels; `gram_dot` of two of them (or of a Gram matrix and a
    symmetric mask cut by `symmetric_panels`) is the elementwise dot of the full matrices."""
    x, y = torch.randn(2, t, 5), torch.randn(2, t, 3)
    u, v = gram(x), gram(y)
    assert len(u) == len(v) == gram_panels(t) == max(1, min(8, t // 32))
    if t >= 128:  # 4 or more panels: at most ~5/8 of the full T x T product is formed
        assert sum(panel[0].numel() for panel in u) < 0.63 * t * t
    full_x, full_y = x.double() @ x.double().transpose(1, 2), y.double() @ y.double().transpose(1, 2)
    torch.testing.assert_close(gram_dot(u, v).double(), (full_x * full_y).sum((1, 2)), rtol=1e-5, atol=1e-8)
    mask = torch.rand(2, t, t) < 0.3
    mask = mask | mask.transpose(1, 2)
    torch.testing.assert_close(gram_dot(u, symmetric_panels(mask.float())).double(), (full_x * mask).sum((1, 2)),
                               rtol=1e-5, atol=1e-8)
    if t >= 64:
        with pytest.raises(ValueError, match="panels"):
            gram_dot(u, gram(torch.randn(2, t // 2, 3)))


def test_workspace_is_reused_and_never_the_input():
    """The torch path's scaled factor goes into the caller's workspace (same result as a temporary), a too-small one
    is not written, and `scale_examples` never returns (or writes) its input."""
    torch.manual_seed(0)
    a, g, c = torch.randn(5, 7, 6), torch.randn(5, 7, 9), torch.rand(5)
    ref = clip_and_noise_(torch.empty(54), (a, g), c, backend="torch")
    ws = torch.full((a.numel() + 3,), float("nan"))
    got = clip_and_noise_(torch.empty(54), (a, g), c, backend="torch", workspace=ws)
    assert torch.equal(got, ref) and not torch.isnan(ws[: a.numel()]).any()
    assert factor_workspace_numel(a, g, backend="torch") == a.numel()  # d = 6 <= p = 9: `a` is the scaled factor
    assert factor_workspace_numel(g, a, backend="torch") == a.numel()
    small = torch.full((a.numel() - 1,), 7.0)
    assert torch.equal(clip_and_noise_(torch.empty(54), (a, g), c, backend="torch", workspace=small), ref)
    assert torch.equal(small, torch.full_like(small, 7.0))
    before = a.clone()
    for w in (None, ws):
        out = scale_examples(a, c, w)
        assert out.data_ptr() != a.data_ptr()
        torch.testing.assert_close(out, a * c[:, None, None])
    assert torch.equal(a, before)
    with pytest.raises(ValueError, match="meta"):  # a workspace on another device is an error, not skipped
        clip_and_noise_(torch.empty(54), (a, g), c, backend="torch", workspace=torch.empty(100, device="meta"))
    with pytest.raises(ValueError, match="workspace"):
        clip_and_noise_(torch.empty(54), (a, g), c, backend="torch", workspace=torch.empty(100, dtype=torch.float64))


def test_clip_coefficients_bound_the_clipped_norms():
    sq = torch.tensor([0.0, 0.25, 4.0, 100.0])
    c = clip_coefficients(sq, max_norm=1.0)
    assert torch.equal(c[:2], torch.ones(2))
    assert (c * sq.sqrt() <= 1.0).all()
    torch.testing.assert_close(c[2:], torch.tensor([0.5, 0.1]), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_coefficients(sq, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_rows_kernel_matches_reference_without_noise(dtype, accumulate):
    b, p = 12, (1 << 16) + 5
    grads = torch.randn(b, p).to(dtype)
    coeffs = torch.rand(b)
    start = torch.randn(p)
    outs = {}
    for backend in BACKENDS:
        out = start.clone()
        assert clip_and_noise_(out, grads, coeffs, accumulate=accumulate, backend=backend) is out
        outs[backend] = out
    exact, scale = _clean_sum(coeffs, grads=grads)
    if accumulate:
        exact, scale = exact + start.double(), scale + start.double().abs()
    for out in outs.values():
        _assert_fp32_close(out, exact, scale, terms=b + 1)
    _assert_fp32_close(outs["triton"], outs["torch"].double(), 2 * scale, terms=b + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps", [1, 20, None])  # T = 1, a T that is not a multiple of the T block, 2-D inputs
def test_factor_kernel_matches_reference_without_noise(dtype, steps):
    b, d, p = 5, 70, 150
    shape_a = (b, d) if steps is None else (b, steps, d)
    shape_g = (b, p) if steps is None else (b, steps, p)
    a, g = torch.randn(shape_a).to(dtype), torch.randn(shape_g).to(dtype)
    coeffs = torch.rand(b)
    start = torch.randn(p, d)  # `out` may have the weight's shape; it is read as flat row-major
    exact, scale = _clean_sum(coeffs, factors=(a, g))
    for accumulate in (False, True):
        for backend in BACKENDS:
            out = start.clone()
            clip_and_noise_(out, (a, g), coeffs, accumulate=accumulate, backend=backend)
            want = exact + start.double().reshape(-1) if accumulate else exact
            bound = scale + start.double().reshape(-1).abs() * accumulate
            _assert_fp32_close(out.reshape(-1), want, bound, terms=b * (steps or 1) + 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["rows", "factors"])
def test_noise_has_the_requested_std(backend, form):
    """(out - clean sum) / noise_std is N(0, 1): std within 1% over >= 10**6 draws (2x or 0.5x would fail)."""
    noise_std = 0.37
    if form == "rows":
        grads, coeffs = torch.randn(3, 1 << 20), torch.rand(3)
        clean = _clean_sum(coeffs, grads=grads)[0]
    else:
        grads, coeffs = (torch.randn(2, 4, 1024), torch.randn(2, 4, 1024)), torch.rand(2)
        clean = _clean_sum(coeffs, factors=grads)[0]
    out = torch.empty(clean.numel())
    clip_and_noise_(out, grads, coeffs, noise_std, seed=123456789, offset=1 << 20, backend=backend)
    noise = (out.double() - clean) / noise_std
    n = noise.numel()
    assert n >= 10**6
    assert abs(noise.mean().item()) < 5 / math.sqrt(n)
    assert abs(noise.std().item() - 1) < 0.01
    assert abs((noise**4).mean().item() - 3) < 5 * math.sqrt(96 / n)


@pytest.mark.parametrize("form", ["rows", "factors"])
def test_kernel_noise_is_the_zo_stream(form):
    """The kernels' noise is noise_std * z(seed, offset + j), the stream of the perturbation kernel, also for an
    offset that is not a multiple of 4; different offsets give different noise; same inputs, same bits."""
    grads = torch.randn(4, 3000) if form == "rows" else (torch.randn(4, 2, 60), torch.randn(4, 2, 50))
    coeffs = torch.rand(4)
    clean = torch.empty(3000)
    clip_and_noise_(clean, grads, coeffs, backend="triton")
    noisy = {}
    for offset in (8, 13):
        noisy[offset] = torch.empty(3000)
        clip_and_noise_(noisy[offset], grads, coeffs, 0.5, seed=99, offset=offset, backend="triton")
        assert torch.equal(noisy[offset], clean + 0.5 * normal_stream(99, offset, 3000, backend="triton"))
        again = torch.empty(3000)
        clip_and_noise_(again, grads, coeffs, 0.5, seed=99, offset=offset, backend="triton")
        assert torch.equal(again, noisy[offset])
    assert ((noisy[8] - noisy[13]).abs() > 0).float().mean() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_and_global_rng(backend):
    """Reproducible from (seed, offset); never reads or advances the global RNG."""
    grads, coeffs = torch.randn(2, 5000), torch.ones(2)
    outs = []
    for offset in (0, 0, 5000):
        torch.manual_seed(offset + len(outs))  # a different global state each time: must not matter
        state = torch.get_rng_state()
        out = torch.empty(5000)
        clip_and_noise_(out, grads, coeffs, 1.0, seed=7, offset=offset, backend=backend)
        assert torch.equal(torch.get_rng_state(), state)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_reference_noise_is_one_stream_whether_written_or_added():
    """The plain-torch path draws the same noise when it writes it into `out` (a single chunk) and when it adds it to
    the earlier chunks' sum (`accumulate`), and the same as `std * randn` of the stream's generator."""
    from custom_kernels.clip_noise import noise_

    written, added = torch.empty(5000), torch.zeros(5000)
    noise_(written, 0.5, 7, 3000, overwrite=True)
    noise_(added, 0.5, 7, 3000, overwrite=False)
    assert torch.equal(written, added)
    grads, coeffs = torch.randn(2, 5000), torch.rand(2)
    fresh, earlier = torch.empty(5000), torch.zeros(5000)
    clip_and_noise_(fresh, grads, coeffs, 0.5, seed=7, offset=3000, backend="torch")
    clip_and_noise_(earlier, grads, coeffs, 0.5, seed=7, offset=3000, accumulate=True, backend="torch")
    torch.testing.assert_close(fresh, earlier, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fresh, coeffs @ grads + written, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_noise_only(backend):
    """An empty Poisson batch still gets its noise (and keeps the buffer when accumulating)."""
    out = torch.full((4096,), 2.0)
    clip_and_noise_(out, torch.empty(0, 4096), torch.empty(0), 0.5, seed=3, accumulate=True, backend=backend)
    noise = (out - 2.0) / 0.5
    assert 0.9 < noise.std().item() < 1.1
    out = torch.full((30 * 20,), 2.0)
    clip_and_noise_(out, (torch.empty(0, 5, 20), torch.empty(0, 5, 30)), torch.empty(0), backend=backend)
    assert torch.equal(out, torch.zeros(600))


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_errors(backend):
    grads, coeffs, out = torch.randn(4, 64), torch.ones(4), torch.empty(64)
    with pytest.raises(ValueError, match="not contiguous"):
        clip_and_noise_(out, torch.randn(64, 4).t(), coeffs, backend=backend)
    with pytest.raises(ValueError, match="not contiguous"):
        clip_and_noise_(torch.empty(128)[::2], grads, coeffs, backend=backend)
    with pytest.raises(ValueError, match="not contiguous"):
        clip_and_noise_(torch.empty(6), (torch.randn(3, 4, 2), torch.randn(3, 3, 4).transpose(1, 2)), torch.ones(3))
    with pytest.raises(ValueError, match="float32"):
        clip_and_noise_(out.half(), grads, coeffs, backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        clip_and_noise_(out, grads.double(), coeffs, backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        clip_and_noise_(out, grads.to(torch.int32), coeffs, backend=backend)
    with pytest.raises(ValueError, match="seed"):
        clip_and_noise_(out, grads, coeffs, 1.0, backend=backend)
    with pytest.raises(ValueError, match="elements"):
        clip_and_noise_(torch.empty(63), grads, coeffs, backend=backend)
    with pytest.raises(ValueError, match="coeffs"):
        clip_and_noise_(out, grads, torch.ones(5), backend=backend)
    with pytest.raises(ValueError, match="same dtype"):
        clip_and_noise_(torch.empty(6), (torch.randn(3, 2), torch.randn(3, 3).half()), torch.ones(3), backend=backend)
    with pytest.raises(ValueError, match="noise_std"):
        clip_and_noise_(out, grads, coeffs, -1.0, seed=1, backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        per_example_sq_norms(grads.double())
