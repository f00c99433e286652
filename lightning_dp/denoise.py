"""Random-matrix denoising of a private gradient matrix (Marchenko–Pastur threshold, Gavish–Donoho shrinkage).

The private gradient of a weight matrix under DP-SGD is ``G̃ = G + N``: the clipped, averaged gradient ``G`` plus
Gaussian noise whose per-entry std ``s = σ·C / (q·N)`` is *known* (``DPSGDStrategy.gradient_noise_std``). With
``m ≤ n`` (the function transposes internally otherwise), ``β = m/n`` and the singular values ``ỹ_i`` of ``G̃``:

* pure noise has all its singular values below the Marchenko–Pastur bulk edge ``s(√m + √n)`` (asymptotically);
* a signal singular value is detectable only above that edge (BBP transition), where it appears inflated;
* every ``ỹ_i ≤ κ·s(√m + √n)`` (``κ ≥ 1``) is set to zero, every larger one is replaced by its Frobenius-optimal
  value for known noise (Gavish & Donoho 2017): with ``y = ỹ / (s√n)``,
  ``η(y) = √((y² − β − 1)² − 4β) / y``, and the denoised value is ``s√n · η(y)``;
* optionally the result is rescaled to a target Frobenius norm (``norm_correction``).

This is post-processing of a DP release: it reads only the released gradient and the public noise std, so the
privacy guarantee (ε, δ) is unchanged.

Cost: one SVD per matrix. ``svd="full"`` is ``torch.linalg.svd`` (``O(m²n)``); ``svd="lowrank"`` is a randomized
range finder with power iterations (Halko, Martinsson & Tropp 2011, the algorithm of ``torch.svd_lowrank``) for the
leading ``k + oversample`` singular triplets (``O(mn(k + p))`` per pass), enlarged until the singular values it
did not compute are certainly below the threshold. It draws its test matrix from a private generator seeded by
``seed`` (``torch.svd_lowrank`` draws from the global RNG, which would change the user's random stream and could
differ between ranks); the same inputs and seed give the same result on every rank. ``"auto"`` uses the low-rank
path when ``k + oversample`` is below a quarter of ``min(m, n)``. Arithmetic is in fp32 (fp64 inputs stay fp64);
the result has the input's dtype, shape and device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from lightning_dp.mechanisms.dpsgd import _is_conv1d

__all__ = ["DenoiseResult", "denoise_matrix", "mp_edge", "optimal_shrinkage", "rmt_denoise", "weight_matrices"]

NORM_CORRECTIONS = (None, "observed", "signal")
SVD_METHODS = ("auto", "full", "lowrank")


@dataclass
class DenoiseResult:
    """What :func:`denoise_matrix` returns."""

    matrix: Tensor  # the denoised matrix: same shape, dtype and device as the input
    rank: int  # number of singular values above the threshold (kept, after shrinkage)
    singular_values: Tensor  # the kept singular values after shrinkage (before norm correction), fp32/fp64, [rank]
    threshold: float  # κ·s(√m + √n)
    method: str  # "full", "lowrank" or "identity" (noise_std == 0)
    top_value: float  # the largest singular value of the input (how close the strongest direction is to the edge)


def mp_edge(m: int, n: int, noise_std: float) -> float:
    """Upper edge ``s(√m + √n)`` of the Marchenko–Pastur bulk: the largest singular value of an ``m × n`` matrix of
    i.i.d. ``N(0, s²)`` entries, asymptotically."""
    return float(noise_std) * (math.sqrt(m) + math.sqrt(n))


def optimal_shrinkage(y: Tensor, beta: float) -> Tensor:
    """Gavish–Donoho Frobenius-optimal shrinker for known noise, on singular values normalized by ``s√n``:
    ``η(y) = √((y² − β − 1)² − 4β) / y`` for ``y > 1 + √β``, else 0 (``0 < β = m/n ≤ 1``)."""
    if not 0 < beta <= 1:
        raise ValueError(f"beta = m/n must be in (0, 1], got {beta}")
    y = torch.as_tensor(y)
    edge = 1.0 + math.sqrt(beta)
    inside = (y * y - beta - 1.0) ** 2 - 4.0 * beta
    safe_y = torch.where(y > edge, y, torch.ones_like(y))
    return torch.where(y > edge, inside.clamp_min(0).sqrt() / safe_y, torch.zeros_like(y))


def _randomized_svd(a: Tensor, q: int, niter: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``q`` singular triplets of ``a`` ``[m, n]`` (``m ≤ n``) by a randomized range finder with ``niter``
    power iterations, each re-orthonormalized (as ``torch.svd_lowrank``), from a private generator."""
    omega = torch.randn(a.shape[1], q, generator=generator, device=a.device, dtype=a.dtype)
    basis = torch.linalg.qr(a @ omega).Q  # [m, q]
    for _ in range(niter):
        basis = torch.linalg.qr(a.mT @ basis).Q  # [n, q]
        basis = torch.linalg.qr(a @ basis).Q  # [m, q]
    u_small, values, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)  # [q, n]
    return basis @ u_small, values, vh


def denoise_matrix(
    grad: Tensor,
    noise_std: float,
    kappa: float = 1.0,
    norm_correction: str | None = None,
    svd: str = "auto",
    rank_hint: int = 8,
    oversample: int = 8,
    niter: int = 2,
    seed: int = 0,
) -> DenoiseResult:
    """Denoise one noisy matrix ``grad = G + N`` whose noise entries are i.i.d. ``N(0, noise_std²)``.

    Args:
        grad: a 2-D tensor of any float dtype (``m × n`` with ``m ≤ n`` or not).
        noise_std: ``s``, the per-entry std of the noise in ``grad`` (for ``DPSGDStrategy``: its
            ``gradient_noise_std``). ``0`` returns ``grad`` unchanged (a copy): there is no noise to remove.
        kappa: ``κ ≥ 1``; singular values ``≤ κ·s(√m + √n)`` are removed. ``1`` is the bulk edge, where the
            optimal shrinker reaches zero continuously; larger values remove more.
        norm_correction: ``None`` (default: the Frobenius-optimal estimate as it is), ``"observed"`` (rescale to
            ``‖grad‖_F``, keeping the update's magnitude) or ``"signal"`` (rescale to the unbiased estimate of the
            signal's norm ``√max(‖grad‖²_F − m·n·s², 0)``). A matrix with nothing above the threshold stays zero.
        svd: ``"full"``, ``"lowrank"`` (randomized, see the module docstring) or ``"auto"``.
        rank_hint: first guess of the number of surviving singular values for the low-rank path (it grows as
            needed, so a wrong guess costs time, not accuracy).
        oversample: extra singular triplets computed by the low-rank path.
        niter: power iterations of the low-rank path.
        seed: seed of the low-rank path's private generator.
    """
    if not isinstance(grad, Tensor) or grad.dim() != 2 or not grad.is_floating_point():
        raise ValueError(f"grad must be a 2-D floating-point tensor, got {getattr(grad, 'shape', type(grad))}")
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    if not (math.isfinite(kappa) and kappa >= 1):
        raise ValueError(f"kappa must be >= 1 (1 = the Marchenko–Pastur bulk edge), got {kappa!r}")
    if norm_correction not in NORM_CORRECTIONS:
        raise ValueError(f"norm_correction must be one of {NORM_CORRECTIONS}, got {norm_correction!r}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    if rank_hint < 1 or oversample < 0 or niter < 0:
        raise ValueError("rank_hint must be >= 1, oversample and niter >= 0")

    work_dtype = torch.promote_types(grad.dtype, torch.float32)
    a = grad.detach().to(work_dtype)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("grad has non-finite entries (inf or nan): nothing can be denoised")
    transposed = a.shape[0] > a.shape[1]
    if transposed:
        a = a.mT
    m, n = a.shape
    threshold = kappa * mp_edge(m, n, noise_std)
    if noise_std == 0:
        empty = torch.empty(0, dtype=work_dtype)
        return DenoiseResult(grad.detach().clone(), min(m, n), empty, threshold, "identity", math.nan)

    method = svd
    if method == "auto":
        method = "lowrank" if 4 * (rank_hint + oversample) < m else "full"
    if method == "full":
        u, values, vh = torch.linalg.svd(a, full_matrices=False)
    else:
        generator = torch.Generator(device=a.device).manual_seed(int(seed))
        k = min(rank_hint, m)
        while True:
            q = min(k + oversample, m)
            u, values, vh = _randomized_svd(a, q, niter, generator)
            # stop once fewer than k computed values exceed the threshold: the oversampled rest lies below it
            if q == m or int((values > threshold).sum()) < min(k, q):
                break
            k = 2 * k

    keep = values > threshold
    rank = int(keep.sum())
    scale = noise_std * math.sqrt(n)
    shrunk = scale * optimal_shrinkage(values[keep] / scale, m / n)
    out = (u[:, keep] * shrunk) @ vh[keep]
    if norm_correction is not None and rank > 0:
        observed_sq = float(a.square().sum())
        target_sq = observed_sq if norm_correction == "observed" else max(observed_sq - m * n * noise_std**2, 0.0)
        current = float(shrunk.square().sum().sqrt())
        if current > 0:
            out = out * (math.sqrt(target_sq) / current)
    if transposed:
        out = out.mT
    return DenoiseResult(out.to(grad.dtype).contiguous(), rank, shrunk, threshold, method, float(values[0]))


def rmt_denoise(
    grad: Tensor,
    noise_std: float,
    kappa: float = 1.0,
    norm_correction: str | None = None,
    **kwargs,
) -> Tensor:
    """The denoised matrix of :func:`denoise_matrix` (same shape, dtype and device as ``grad``); see there for the
    arguments (``svd``, ``rank_hint``, ``oversample``, ``niter``, ``seed``)."""
    return denoise_matrix(grad, noise_std, kappa=kappa, norm_correction=norm_correction, **kwargs).matrix


def weight_matrices(
    model: nn.Module,
    layers: str | Sequence[str] | None = None,
    embeddings: bool = False,
    min_dim: int = 1,
    trainable_only: bool = True,
) -> list[tuple[str, nn.Parameter]]:
    """The weight matrices of linear layers in ``model``, as ``(module name, weight)`` pairs in module order.

    Linear layers are ``nn.Linear`` (``W`` is ``[out, in]``) and transformers ``Conv1D`` (GPT-2; ``W`` stored
    ``[in, out]``: the singular values, hence the denoising, are the same either way). ``nn.Embedding`` weights are
    included only with ``embeddings=True`` (a ``[V, d]`` table whose gradient is row-sparse, not a linear map's
    gradient; and the largest matrix of most models). Biases, norms and other parameters are never included.

    Args:
        layers: ``fnmatch`` patterns (``"*.attention.*"``, ``"*intermediate.dense"``) matched against the module's
            qualified name; a module is kept if any pattern matches. ``None``: every linear layer. A pattern that
            matches none of the candidate modules is an error (a typo would otherwise silently select nothing).
        min_dim: keep only matrices with ``min(m, n) >= min_dim``.
        trainable_only: skip weights with ``requires_grad=False`` (frozen weights have no gradient to denoise).
    """
    patterns = [layers] if isinstance(layers, str) else list(layers) if layers is not None else None
    kinds: tuple[type, ...] = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    candidates = []
    for name, module in model.named_modules():
        if not (isinstance(module, kinds) or _is_conv1d(module)):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2:
            candidates.append((name, weight))
    if patterns is not None:
        unmatched = [pat for pat in patterns if not any(fnmatchcase(name, pat) for name, _ in candidates)]
        if unmatched:
            raise ValueError(
                f"layers={unmatched} match no linear layer of the model; linear layers are named e.g. "
                f"{[name for name, _ in candidates[:4]]}"
            )
        candidates = [(name, w) for name, w in candidates if any(fnmatchcase(name, pat) for pat in patterns)]
    selected, seen = [], set()
    for name, weight in candidates:
        if id(weight) in seen or (trainable_only and not weight.requires_grad) or min(weight.shape) < min_dim:
            continue
        seen.add(id(weight))
        selected.append((name, weight))
    return selected
