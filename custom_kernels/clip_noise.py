"""Per-example clipping and Gaussian noise for DP-SGD, written once into a flat fp32 gradient buffer.

The three steps of a private gradient, for a batch of ``B`` examples with per-example gradients ``∇_i``:

1. per-example squared norms ``||∇_i||^2`` (fp32 accumulation), summed by the caller over all layers:
   :func:`per_example_sq_norms` for per-example gradients given as a ``[B, P]`` tensor, and
   :func:`factor_sq_norms` for the book-keeping / ghost form of a linear layer, where ``∇_i = g_i^T a_i`` with
   activations ``a_i`` ``[T, d]`` and output gradients ``g_i`` ``[T, p]`` (Gram trick: the ``[p, d]`` gradient is
   never formed when ``T^2 <= p d``);
2. clip coefficients ``c_i = min(1, C / (||∇_i|| + eps))``: :func:`clip_coefficients`;
3. :func:`clip_and_noise_`: ``out <- [out +] Σ_i c_i ∇_i + noise_std * ξ`` in one pass, where ``∇_i`` is a row of a
   ``[B, P]`` tensor or the factor pair ``(a, g)``, and ``ξ ~ N(0, I)`` is generated from the caller's
   ``(seed, offset)``: never from a global RNG, which is never touched or reseeded.

Noise streams (same distribution, different values):

* Triton path: ``ξ_j = z(seed, offset + j)``, the counter-based Philox stream of :mod:`custom_kernels.zo_perturb`'s
  kernel (``tl.randn4x(seed, k // 4)[k % 4]`` at ``k = offset + j``), generated in registers, so disjoint
  ``[offset, offset + numel)`` ranges of one seed give independent noise (use the slice's position in the flat
  buffer as its offset).
* Reference path: ``torch.randn`` from a private ``torch.Generator`` on ``out``'s device seeded with
  ``mix_seed(seed, offset)`` (a function of ``(seed, offset, numel)``; use disjoint offsets for disjoint slices).

The noise seed should come from OS entropy (e.g. ``int.from_bytes(os.urandom(8), "little")``) and must not be the
ZO direction seed or a user-visible training seed.

Backends as in :mod:`custom_kernels.zo_perturb`: ``"auto"`` (Triton for CUDA tensors when triton is importable,
torch otherwise), ``"triton"`` (forced; on the CPU only under ``TRITON_INTERPRET=1``), ``"torch"``. With
``noise_std=0`` the two agree to fp32 rounding (they sum in different orders).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor

from custom_kernels._backend import Backend, interpreting, triton_kernels, use_triton
from custom_kernels.zo_perturb import _signed64, mix_seed

__all__ = ["clip_and_noise_", "clip_coefficients", "factor_sq_norms", "factor_workspace_numel", "gram", "gram_dot",
           "gram_panels", "noise_", "per_example_sq_norms", "scale_examples", "symmetric_panels", "uses_gram"]

_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_INDEX = 1 << 63


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in _GRAD_DTYPES:
        raise ValueError(f"`{name}` has dtype {t.dtype}; expected one of float32, float16, bfloat16")


def _check_contiguous(name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"`{name}` (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous; call `.contiguous()` first"
        )


def per_example_sq_norms(grads: Tensor) -> Tensor:
    """``||grads[i]||^2`` for each example ``i`` of ``grads`` ``[B, ...]`` (fp32 accumulation), as fp32 ``[B]``."""
    _check_float("grads", grads)
    if grads.dim() < 1:
        raise ValueError("`grads` must have a leading batch dimension")
    flat = grads.reshape(grads.shape[0], math.prod(grads.shape[1:]))
    return torch.linalg.vector_norm(flat, ord=2, dim=1, dtype=torch.float32).square()


_GRAM_PANEL = 32  # rows per panel of `gram`: narrower panels lose more to the GEMM's efficiency than they save
_GRAM_PANELS_MAX = 8


def gram_panels(t: int) -> int:
    """How many column panels :func:`gram` splits a length-``t`` Gram matrix into (1 for ``t < 64``)."""
    return max(1, min(_GRAM_PANELS_MAX, t // _GRAM_PANEL))


def _panels(t: int) -> list[tuple[int, int]]:
    """(first row, rows) of each of :func:`gram`'s pieces of a length-``t`` axis."""
    if t == 0:  # an empty sequence: one empty panel
        return [(0, 0)]
    s = -(-t // gram_panels(t))
    return [(j, s) for j in range(0, t, s)]


def gram(x: Tensor) -> tuple[Tensor, ...]:
    """Per-example Gram matrix ``x_i x_iᵀ`` of ``x`` ``[B, T, d]`` (fp32), as its lower triangle of column panels.

    ``T`` is cut into ``k =`` :func:`gram_panels` ``(T)`` pieces ``x₁ … x_k`` of ``s = ⌈T / k⌉`` rows (the last may be
    shorter); panel ``j`` is ``x_{≥j} x_jᵀ`` (the rows from piece ``j`` on, against piece ``j``), shape
    ``[B, T - j s, |x_j|]``, one batched GEMM each. The blocks above the diagonal are transposes of blocks below and
    are not formed: ``(k + 1) / 2k`` of the full product's multiply-adds (5/8 at ``k = 4``). Read it with
    :func:`gram_dot`; the panels depend only on ``T``, so two Gram matrices of the same ``T`` always line up.
    """
    x = x.float()
    return tuple(torch.bmm(x[:, j:], x[:, j:j + s].transpose(1, 2)) for j, s in _panels(x.shape[1]))


def gram_dot(u: tuple[Tensor, ...], v: tuple[Tensor, ...]) -> Tensor:
    """``Σ_{s,t} U_st V_st`` per example (fp32 ``[B]``) of two symmetric Gram matrices in :func:`gram`'s panels: each
    panel's product counts twice (it stands for itself and its transpose) except its diagonal block, once."""
    if len(u) != len(v) or any(pu.shape != pv.shape for pu, pv in zip(u, v)):
        raise ValueError(f"Gram matrices whose panels do not line up ({[tuple(x.shape) for x in u]} and "
                         f"{[tuple(x.shape) for x in v]}): not of the same batch and length T")
    if len(u) == 1:
        return (u[0] * v[0]).sum((1, 2))
    total = torch.zeros(u[0].shape[0], dtype=torch.float32, device=u[0].device)
    for pu, pv in zip(u, v):
        prod = pu * pv
        w = prod.shape[2]
        total += 2 * prod.sum((1, 2)) - prod[:, :w].sum((1, 2))
    return total


def symmetric_panels(m: Tensor) -> tuple[Tensor, ...]:
    """A symmetric ``[B, T, T]`` matrix cut into :func:`gram`'s panels (views, no copy), e.g. a mask to weight a
    Gram matrix with in :func:`gram_dot`."""
    return tuple(m[:, j:, j:j + s] for j, s in _panels(m.shape[1]))


def uses_gram(t: int, d: int, p: int) -> bool:
    """Whether :func:`factor_sq_norms` takes the Gram branch for ``[B, t, d]`` inputs and ``[B, t, p]`` outputs."""
    return t * t <= p * d


def factor_sq_norms(a: Tensor, g: Tensor, *, a_gram: tuple | None = None, g_gram: tuple | None = None) -> Tensor:
    """``||g_i^T a_i||_F^2`` per example, as fp32 ``[B]``, for a linear layer's per-example weight gradient.

    ``a`` are the layer's inputs ``[B, T, d]`` (or ``[B, d]``), ``g`` the gradients of its outputs ``[B, T, p]`` (or
    ``[B, p]``). 2-D inputs use ``||a_i||^2 ||g_i||^2``. 3-D inputs use the Gram trick
    ``Σ_{s,t} (a_s · a_t)(g_s · g_t)`` when ``T^2 <= p d`` (memory ``O(B T^2)``) and the explicit per-example
    gradient otherwise (memory ``O(B p d)``), whichever is smaller. Math in fp32.

    ``a_gram`` / ``g_gram``: :func:`gram` of ``a`` / ``g`` when the caller already has it (layers that share an
    input, e.g. an attention block's query, key and value projections, need its Gram matrix once); only used on
    the Gram branch.
    """
    _check_float("a", a)
    _check_float("g", g)
    if a.dim() != g.dim() or a.dim() not in (2, 3) or a.shape[:-1] != g.shape[:-1]:
        raise ValueError(f"`a` {tuple(a.shape)} and `g` {tuple(g.shape)} must be [B, T, d] and [B, T, p] (or 2-D)")
    a, g = a.float(), g.float()
    if a.dim() == 2:
        return a.square().sum(1) * g.square().sum(1)
    t, d, p = a.shape[1], a.shape[2], g.shape[2]
    if uses_gram(t, d, p):
        return gram_dot(gram(a) if a_gram is None else a_gram, gram(g) if g_gram is None else g_gram)
    return torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))


def clip_coefficients(sq_norms: Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
    """Clip coefficients ``c_i = min(1, max_norm / (sqrt(sq_norms_i) + eps))`` (fp32), so ``||c_i ∇_i|| <= max_norm``.

    ``sq_norms`` is the per-example squared norm over *all* clipped parameters (sum the per-layer values first).
    A non-finite ``sq_norms_i`` (NaN or inf) gives ``c_i = 0`` exactly. Note that ``0 · NaN = NaN``: the caller must
    also zero such an example's per-example gradient (or factors) before it enters the sum.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    sq = sq_norms.float()
    coeffs = (max_norm / (sq.sqrt() + eps)).clamp(max=1.0)
    return coeffs.masked_fill(~torch.isfinite(sq), 0.0)


def _reference(
    out: Tensor,
    grads: Tensor | None,
    factors: tuple[Tensor, Tensor] | None,
    coeffs: Tensor,
    noise_std: float,
    seed: int | None,
    offset: int,
    accumulate: bool,
    workspace: Tensor | None = None,
) -> None:
    noise_first = bool(noise_std) and not accumulate
    if noise_first:  # the noise straight into `out` (no temporary, one pass fewer); the clipped sum is added to it
        noise_(out, noise_std, seed, offset, overwrite=True)
    beta = 1.0 if accumulate or noise_first else 0.0
    if grads is not None:
        # out <- beta * out + coeffs @ grads, in one GEMV (no temporary of the sum)
        torch.addmv(out, grads.float().t(), coeffs, beta=beta, out=out)
    else:
        # out[p, d] <- beta * out + Σ_{b,t} c_b g[b,t,:]ᵀ a[b,t,:]: scale the smaller factor, then one GEMM over B·T
        a, g = factors
        d, p = a.shape[-1], g.shape[-1]
        if _scales_input(a, g):
            a, g = scale_examples(a, coeffs, workspace), g.float()
        else:
            a, g = a.float(), scale_examples(g, coeffs, workspace)
        torch.addmm(out.view(p, d), g.reshape(-1, p).t(), a.reshape(-1, d), beta=beta, out=out.view(p, d))
    if noise_std and not noise_first:
        noise_(out, noise_std, seed, offset, overwrite=False)


def _scales_input(a: Tensor, g: Tensor) -> bool:
    """Whether the torch path scales ``a`` (the smaller factor) rather than ``g``."""
    return a.shape[-1] <= g.shape[-1]


def factor_workspace_numel(a: Tensor, g: Tensor, backend: Backend = "auto") -> int:
    """Elements of the ``workspace`` that :func:`clip_and_noise_` uses for the factors ``(a, g)``: the size of the
    factor its torch path scales, or 0 where the Triton kernel runs (it scales in registers)."""
    if use_triton(backend, a.device, True, ""):
        return 0
    return (a if _scales_input(a, g) else g).numel()


def scale_examples(x: Tensor, coeffs: Tensor, workspace: Tensor | None) -> Tensor:
    """``coeffs_b · x[b]`` in fp32, written into the front of ``workspace`` when it is given and large enough (no
    allocation: the scaled factor of every layer of a step can share one scratch buffer), else a new tensor."""
    scale = coeffs.view(-1, *([1] * (x.dim() - 1)))
    if workspace is None or workspace.numel() < x.numel():
        return x.float() * scale
    return torch.mul(x, scale, out=workspace[: x.numel()].view(x.shape))


def noise_(out: Tensor, std: float, seed: int | None, offset: int, *, overwrite: bool) -> None:
    """``out <- std · ξ`` (``overwrite``) or ``out <- out + std · ξ``, with ``ξ`` the plain-torch noise stream of the
    slice at ``offset`` of the flat buffer: standard normals drawn in order from a private generator seeded with
    ``mix_seed(seed, offset)`` (``normal_`` in place gives the same values as ``std * randn``, without a
    temporary)."""
    gen = torch.Generator(device=out.device)
    gen.manual_seed(mix_seed(seed, offset))
    if overwrite:
        out.normal_(0.0, std, generator=gen)
    else:
        out.add_(torch.randn(out.numel(), generator=gen, device=out.device), alpha=std)


def _triton(
    out: Tensor,
    grads: Tensor | None,
    factors: tuple[Tensor, Tensor] | None,
    coeffs: Tensor,
    noise_std: float,
    seed: int | None,
    offset: int,
    accumulate: bool,
    workspace: Tensor | None = None,
) -> None:
    del workspace  # the kernels scale in registers
    kernels = triton_kernels()
    interp = interpreting(kernels)
    common = {
        "noise_std": float(noise_std),
        "seed": _signed64(seed if seed is not None else 0),
        "offset": int(offset),
        "ACCUMULATE": accumulate,
        "HAS_NOISE": noise_std != 0,
        "enable_fp_fusion": False,  # no FMA contraction: sums round like the formula
    }
    with torch.cuda.device(out.device) if out.device.type == "cuda" else nullcontext():
        if grads is not None:
            batch, numel = grads.shape
            tile = 1 << 16 if interp else 2048
            rows = min(16, _next_pow2(batch)) if interp else 4
            kernels.clip_noise_rows_kernel[(_cdiv(numel, tile),)](
                out, grads, coeffs, batch, numel, grads.stride(0),
                ALIGNED4=offset % 4 == 0, TILE=tile, ROWS=rows, num_warps=8, **common,
            )  # fmt: skip
        else:
            a, g = factors
            batch, steps, d = a.shape
            p = g.shape[2]
            bm, bn = (128, 128) if interp else (64, 64)
            bt = max(16, min(64, _next_pow2(steps))) if interp else 32
            kernels.clip_noise_factors_kernel[(_cdiv(p, bm), _cdiv(d, bn))](
                out, a, g, coeffs, batch, steps, p, d, a.stride(0), a.stride(1), g.stride(0), g.stride(1),
                UPCAST=interp or a.dtype == torch.float32, BM=bm, BN=bn, BT=bt, num_warps=4, **common,
            )  # fmt: skip


@torch.no_grad()
def clip_and_noise_(
    out: Tensor,
    grads: Tensor | tuple[Tensor, Tensor],
    coeffs: Tensor,
    noise_std: float = 0.0,
    seed: int | None = None,
    offset: int = 0,
    *,
    accumulate: bool = False,
    backend: Backend = "auto",
    workspace: Tensor | None = None,
) -> Tensor:
    """Clipped sum plus Gaussian noise, written once into ``out``; returns ``out``.

    ``out[j] <- [out[j] +] Σ_i coeffs[i] * ∇_i[j] + noise_std * ξ_j``

    Args:
        out: fp32, contiguous, ``P`` elements (e.g. a slice of the flat gradient buffer; any shape, read as flat).
        grads: per-example gradients ``[B, ...]`` with ``P`` elements per example (row ``i`` is ``∇_i`` flattened),
            or the book-keeping factors ``(a, g)`` of a linear layer: ``a`` ``[B, T, d]``, ``g`` ``[B, T, p]`` (or
            ``[B, d]``, ``[B, p]``), for which ``∇_i = g_i^T a_i`` is ``[p, d]`` flattened row-major (the layout of
            ``nn.Linear.weight``), ``P = p * d``. fp32, fp16 or bf16, contiguous; the sum is accumulated in fp32.
        coeffs: ``[B]`` clip coefficients (see :func:`clip_coefficients`); any weighting works, e.g. ``c_i / B``.
        noise_std: standard deviation of the added noise (``σ C``, scaled as the caller needs); 0 adds none.
        seed: the noise seed (required when ``noise_std > 0``); keep it secret, derive it from OS entropy.
        offset: position of ``out[0]`` in the noise stream; give disjoint slices disjoint ranges.
        accumulate: add into ``out`` (``True``) or overwrite it (``False``, default; ``out`` is then not read).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (module docstring).
        workspace: optional fp32 scratch on ``out``'s device for the torch path's scaled factor (``c_b`` times the
            smaller of ``a``, ``g``; ``B·T·min(d, p)`` elements): a caller writing many layers passes one buffer for
            all of them instead of allocating a factor-sized temporary per layer. Its contents are overwritten; a
            smaller one is not used. The Triton path ignores it.
    """
    if not isinstance(out, Tensor) or out.dtype != torch.float32:
        raise ValueError(f"`out` must be a float32 tensor, got {getattr(out, 'dtype', type(out))}")
    _check_contiguous("out", out)
    if noise_std < 0 or not math.isfinite(noise_std):
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std}")
    if noise_std > 0 and seed is None:
        raise ValueError("noise_std > 0 needs an explicit `seed` (from OS entropy); global RNGs are never used")
    if offset < 0 or offset + out.numel() > _MAX_INDEX:
        raise ValueError(f"offset {offset} is outside [0, 2**63 - numel)")

    if isinstance(grads, (tuple, list)):
        if len(grads) != 2:
            raise ValueError("book-keeping factors must be a pair (a, g)")
        a, g = grads
        for name, t in (("a", a), ("g", g)):
            _check_float(name, t)
            _check_contiguous(name, t)
        if a.dim() == 2 and g.dim() == 2:
            a, g = a.unsqueeze(1), g.unsqueeze(1)
        if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
            raise ValueError(f"`a` {tuple(a.shape)} and `g` {tuple(g.shape)} must be [B, T, d] and [B, T, p] (or 2-D)")
        if a.dtype != g.dtype:
            raise ValueError(f"`a` ({a.dtype}) and `g` ({g.dtype}) must have the same dtype")
        numel, batch, per_example, factors = g.shape[2] * a.shape[2], a.shape[0], None, (a, g)
        inputs = (a, g)
    else:
        _check_float("grads", grads)
        _check_contiguous("grads", grads)
        if grads.dim() < 2:
            raise ValueError(f"`grads` must be [B, P] (one row per example), got shape {tuple(grads.shape)}")
        per_example, factors = grads.reshape(grads.shape[0], math.prod(grads.shape[1:])), None
        batch, numel = per_example.shape
        inputs = (grads,)
    if workspace is not None and (workspace.dtype != torch.float32 or not workspace.is_contiguous()):
        raise ValueError("`workspace` must be a contiguous float32 tensor")
    if out.numel() != numel:
        raise ValueError(f"`out` has {out.numel()} elements, the per-example gradients have {numel}")
    if coeffs.dim() != 1 or coeffs.shape[0] != batch or not coeffs.is_floating_point():
        raise ValueError(
            f"`coeffs` must be a floating [B] = [{batch}] tensor, got {coeffs.dtype} {tuple(coeffs.shape)}"
        )
    for t in (*inputs, coeffs, *([] if workspace is None else [workspace])):
        if t.device != out.device:
            raise ValueError(f"all tensors must be on {out.device}, got one on {t.device}")
    coeffs = coeffs.float().contiguous()

    run = _triton if use_triton(backend, out.device, True, "") else _reference
    if numel:
        run(out.view(-1), per_example, factors, coeffs, noise_std, seed, offset, accumulate, workspace)
    return out
