"""Memory-bound hot paths of lightning_dp: seeded in-place ZO perturbation and fused clip-and-noise.

Each kernel has a plain-torch reference of identical semantics; dispatch picks the implementation from the
tensors' device (CUDA -> Triton, CPU -> reference; ``backend=`` overrides, see the individual modules).
Importing this package never imports triton; the Triton path imports it on first use.
"""

from custom_kernels.clip_noise import clip_and_noise_, clip_coefficients, factor_sq_norms, per_example_sq_norms
from custom_kernels.zo_perturb import BLOCK, mix_seed, normal_stream, offsets_for, perturb_

__all__ = [
    "BLOCK",
    "clip_and_noise_",
    "clip_coefficients",
    "factor_sq_norms",
    "mix_seed",
    "normal_stream",
    "offsets_for",
    "per_example_sq_norms",
    "perturb_",
]
