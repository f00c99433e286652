"""Memory-bound hot paths of lightning_dp: seeded in-place ZO perturbation and fused clip-and-noise.

Each kernel has a plain-torch reference of identical semantics; dispatch picks the implementation from the
tensors' device (see the individual modules).
"""

from custom_kernels.zo_perturb import BLOCK, mix_seed, normal_stream, offsets_for, perturb_

__all__ = ["BLOCK", "mix_seed", "normal_stream", "offsets_for", "perturb_"]
