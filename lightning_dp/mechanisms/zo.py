"""DPZero: private zeroth-order optimization (Zhang et al., arXiv 2310.09639), on plain tensors.

One step at parameters θ with direction z (public, regenerated from a seed, never stored)::

    s_i   = (ℓ_i(θ + λz) − ℓ_i(θ − λz)) / (2λ)          per-example finite difference (a scalar)
    ĝ     = (Σ_i clip_C(s_i) + σ·C·ξ) / E[B]             ξ ~ N(0, 1), added once across all ranks
    θ    <- (1 − η·wd)·θ − η·ĝ·z

``clip_C(s) = s·min(1, C/|s|)`` bounds each example's contribution to the released scalar by C, so the release is
the sampled Gaussian mechanism with noise multiplier σ. The only privatized quantity is one scalar per step; the
direction z is data-independent and public.

This module has no Lightning import: :class:`SeededDirections` owns the in-place perturbation of a fixed list of
parameters, :func:`privatize_projected_gradient` owns the clipped, noised, all-reduced scalar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from custom_kernels.zo_perturb import mix_seed, offsets_for, perturb_
from lightning_dp.mechanisms.collective import Collective
from lightning_dp.mechanisms.noise import GaussianNoise

__all__ = ["SeededDirections", "ZOStepResult", "clip_differences", "privatize_projected_gradient"]

_DIRECTION_DOMAIN = 0x2E80


class SeededDirections:
    """The ZO direction z over a fixed, ordered list of parameters, applied in place.

    z for step t is a function of ``(base_seed, t)`` only (counter-based: identical on every rank and after a
    resume). The object remembers the perturbation currently applied to the parameters (``pending``: seed ->
    scale), so it can always be removed (:meth:`restore`) and the update can fuse the removal with the step.
    """

    def __init__(self, params: Sequence[Tensor], base_seed: int) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("no trainable parameters to optimize")
        self.offsets = offsets_for(self.params)
        self.base_seed = int(base_seed)
        self.pending: dict[int, float] = {}
        self.passes = 0  # read+write passes over the parameters so far (diagnostics)

    def seed_for(self, step: int) -> int:
        return mix_seed(_DIRECTION_DOMAIN, self.base_seed, step)

    def perturb(self, seed: int, scale: float) -> None:
        """θ <- θ + scale·z(seed)."""
        perturb_(self.params, self.offsets, seed, scale)
        self.passes += 1
        self._track(seed, scale)

    def _track(self, seed: int, scale: float) -> None:
        total = self.pending.get(seed, 0.0) + scale
        if total == 0.0:
            self.pending.pop(seed, None)
        else:
            self.pending[seed] = total

    def move_to(self, seed: int, scale: float) -> None:
        """Bring the applied perturbation to exactly ``scale·z(seed)`` (removing any other pending one)."""
        for other in [s for s in self.pending if s != seed]:
            self.perturb(other, -self.pending[other])
        delta = scale - self.pending.get(seed, 0.0)
        if delta != 0.0:
            self.perturb(seed, delta)

    def restore(self) -> None:
        """Remove every pending perturbation: the parameters are the clean θ again."""
        for seed in list(self.pending):
            self.perturb(seed, -self.pending[seed])

    def update(
        self,
        seed: int,
        projected_grad: float,
        lrs: Sequence[float],
        weight_decays: Sequence[float] | None = None,
        next_seed: int | None = None,
        next_scale: float = 0.0,
    ) -> None:
        """One fused pass: remove the pending ``p·z(seed)``, apply ``θ <- (1 − η_k·wd_k)·θ − η_k·ĝ·z(seed)``
        per tensor k, and (optionally) add ``next_scale·z(next_seed)`` for the next step's first probe."""
        others = [s for s in self.pending if s != seed]
        for other in others:
            self.perturb(other, -self.pending[other])
        p = self.pending.pop(seed, 0.0)
        wds = weight_decays if weight_decays is not None else [0.0] * len(self.params)
        decays = [1.0 - lr * wd for lr, wd in zip(lrs, wds)]
        scales = [-d * p - lr * projected_grad for d, lr in zip(decays, lrs)]
        use_decay = any(d != 1.0 for d in decays)
        if next_seed is not None and next_scale != 0.0:
            perturb_(
                self.params, self.offsets, seed, scales, seed2=next_seed, scale2=next_scale,
                decay=decays if use_decay else None,
            )
            self.pending = {next_seed: next_scale}
        else:
            perturb_(self.params, self.offsets, seed, scales, decay=decays if use_decay else None)
            self.pending = {}
        self.passes += 1


def clip_differences(loss_plus: Tensor, loss_minus: Tensor, zo_eps: float, clip: float) -> Tensor:
    """Per-example finite differences ``(ℓ⁺ − ℓ⁻)/(2λ)``, clipped to ``[−C, C]`` (computed in float64)."""
    if loss_plus.shape != loss_minus.shape or loss_plus.ndim != 1:
        raise ValueError(f"per-example losses must both have shape [B], got {tuple(loss_plus.shape)} and {tuple(loss_minus.shape)}")
    diffs = (loss_plus.detach().double() - loss_minus.detach().double()) / (2.0 * zo_eps)
    diffs = torch.nan_to_num(diffs, nan=0.0, posinf=clip, neginf=-clip)
    return diffs.clamp(-clip, clip)


@dataclass(frozen=True)
class ZOStepResult:
    """What one private ZO step released (``projected_grad``) and, for diagnostics and tests, its parts."""

    projected_grad: float
    clipped_sum: float
    noise: float
    num_examples: int


def privatize_projected_gradient(
    clipped: Tensor | None,
    noise_std: float,
    expected_batch_size: float,
    collective: Collective,
    noise: GaussianNoise | None,
    device: torch.device | str = "cpu",
) -> ZOStepResult:
    """Sum the clipped differences of all ranks, add ``N(0, noise_std²)`` exactly once (on rank 0, before the
    all-reduce, so every rank receives the same noisy sum), and divide by the expected batch size.

    ``clipped`` is this rank's ``[b]`` tensor of clipped differences (``None`` for an empty batch). One all-reduce
    of three float64 scalars per step.
    """
    if expected_batch_size <= 0:
        raise ValueError(f"expected batch size must be > 0, got {expected_batch_size}")
    local_sum = clipped.sum().to(device) if clipped is not None else torch.zeros((), dtype=torch.float64, device=device)
    count = float(clipped.numel()) if clipped is not None else 0.0
    draw = 0.0
    if collective.rank == 0 and noise_std > 0:
        if noise is None:
            raise ValueError("noise_std > 0 but no noise source was given")
        draw = noise.scalar(noise_std)
    packed = torch.stack(
        [
            local_sum.double(),
            torch.tensor(count, dtype=torch.float64, device=device),
            torch.tensor(draw, dtype=torch.float64, device=device),
        ]
    )
    packed = collective.all_reduce_sum(packed)
    clipped_sum, total_count, total_noise = (float(v) for v in packed.tolist())
    return ZOStepResult(
        projected_grad=(clipped_sum + total_noise) / expected_batch_size,
        clipped_sum=clipped_sum,
        noise=total_noise,
        num_examples=int(round(total_count)),
    )
