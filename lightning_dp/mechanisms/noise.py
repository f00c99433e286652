"""Gaussian noise for DP releases, from a generator that belongs to the mechanism alone.

The generator is seeded from OS entropy (``secrets``), never from the ZO direction seed, the sampling seed, or the
user's global RNG, and its seed is never saved in checkpoints: knowing every other seed of a run does not reveal
the noise. (torch's generators are not cryptographically secure; for defence against floating-point attacks on
the sampler itself see the discussion in the README.)
"""

from __future__ import annotations

import secrets

import torch
from torch import Tensor

__all__ = ["GaussianNoise"]


class GaussianNoise:
    """Draws ``std * N(0, I)`` from a private generator (seeded from OS entropy unless ``seed`` is given for tests)."""

    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None) -> None:
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))

    def sample(self, shape: tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> Tensor:
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        noise = torch.randn(shape, generator=self._generator, device=self.device, dtype=dtype)
        return noise.mul_(std)

    def scalar(self, std: float) -> float:
        """One draw of N(0, std²) as a Python float (drawn in float64)."""
        return float(self.sample((1,), std, dtype=torch.float64).item())
