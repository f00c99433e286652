"""Seeded in-place zeroth-order perturbation: ``p <- decay * p + scale * z (+ scale2 * z2)``.

``z`` is a standard-normal direction that is never stored: it is regenerated from ``(seed, offset)``
every time it is needed, so a ZO step costs no parameter-sized buffer.

Every tensor ``k`` of a parameter list gets a fixed *offset base* ``offsets[k]`` (see :func:`offsets_for`),
and element ``i`` of tensor ``k`` always draws the value at position ``offsets[k] + i`` of the stream named by
``seed``. The value therefore depends only on ``(seed, offset base, element index)``, never on the order in
which tensors are visited, on other tensors, or on how the work is split.

Reference path (plain torch, any device without Triton): the offset space is cut into blocks of
:data:`BLOCK` elements; block ``b`` of stream ``seed`` is drawn by a private ``torch.Generator`` seeded with
``mix(seed, b)`` and processed in bounded chunks (one block buffer per stream, never a parameter-sized one).
Offsets from :func:`offsets_for` are block-aligned, so a tensor never shares a block with another.

The arithmetic is fp32; fp16/bf16 tensors are read into fp32, updated and rounded to nearest-even on store.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BLOCK", "offsets_for", "perturb_", "normal_stream", "mix_seed"]

BLOCK = 1 << 16
"""Granularity of the reference stream (elements). Offsets from :func:`offsets_for` are multiples of it."""

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """SplitMix64-style mixing of integers into one 63-bit seed (stable across runs, platforms and ranks)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def offsets_for(tensors: Sequence[Tensor]) -> list[int]:
    """Block-aligned offset bases for a fixed list of tensors (cumulative, each rounded up to :data:`BLOCK`)."""
    offsets, base = [], 0
    for t in tensors:
        offsets.append(base)
        base += -(-t.numel() // BLOCK) * BLOCK
    return offsets


def _per_tensor(value: float | Sequence[float] | None, n: int, name: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"`{name}` has {len(values)} entries for {n} tensors")
    return values


def _check_tensors(tensors: Sequence[Tensor], offsets: Sequence[int]) -> None:
    if len(offsets) != len(tensors):
        raise ValueError(f"got {len(offsets)} offsets for {len(tensors)} tensors")
    for k, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(
                f"tensor {k} (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous: in-place seeded "
                "perturbation needs contiguous parameters (call `.data = p.data.contiguous()` once before training)"
            )
        if not t.is_floating_point():
            raise ValueError(f"tensor {k} has dtype {t.dtype}: only floating-point tensors can be perturbed")


def _block_normal(gen: torch.Generator, seed: int, block: int, n: int, out: Tensor) -> Tensor:
    gen.manual_seed(mix_seed(seed, block))
    return torch.randn(n, generator=gen, out=out[:n])


def _perturb_reference(
    tensors: Sequence[Tensor],
    offsets: Sequence[int],
    seed: int,
    scales: list[float],
    seed2: int | None,
    scales2: list[float] | None,
    decays: list[float] | None,
) -> None:
    by_device: dict[torch.device, tuple[torch.Generator, Tensor, Tensor | None]] = {}
    for k, t in enumerate(tensors):
        if offsets[k] % BLOCK:
            raise ValueError(f"offset {offsets[k]} of tensor {k} is not a multiple of BLOCK={BLOCK}")
        dev = t.device
        if dev not in by_device:
            # generators live on the CPU (portable, deterministic); one block buffer per stream
            by_device[dev] = (
                torch.Generator(device="cpu"),
                torch.empty(BLOCK, dtype=torch.float32),
                torch.empty(BLOCK, dtype=torch.float32) if seed2 is not None else None,
            )
        gen, buf, buf2 = by_device[dev]
        flat = t.view(-1)
        first_block = offsets[k] // BLOCK
        decay = decays[k] if decays is not None else 1.0
        for j, start in enumerate(range(0, flat.numel(), BLOCK)):
            n = min(BLOCK, flat.numel() - start)
            z = _block_normal(gen, seed, first_block + j, n, buf).to(dev, non_blocking=True)
            z2 = None
            if seed2 is not None and scales2 is not None and scales2[k] != 0.0:
                z2 = _block_normal(gen, seed2, first_block + j, n, buf2).to(dev, non_blocking=True)
            chunk = flat[start : start + n]
            work = chunk if chunk.dtype == torch.float32 else chunk.float()
            if decay != 1.0:
                work.mul_(decay)
            if scales[k] != 0.0:
                work.add_(z, alpha=scales[k])
            if z2 is not None:
                work.add_(z2, alpha=scales2[k])
            if work is not chunk:
                chunk.copy_(work)  # fp32 -> bf16/fp16 rounds to nearest-even


@torch.no_grad()
def perturb_(
    tensors: Sequence[Tensor],
    offsets: Sequence[int],
    seed: int,
    scale: float | Sequence[float],
    *,
    seed2: int | None = None,
    scale2: float | Sequence[float] | None = None,
    decay: float | Sequence[float] | None = None,
) -> None:
    """In place, for every tensor ``p_k`` with offset base ``o_k`` and element ``i``::

        p_k[i] <- decay_k * p_k[i] + scale_k * z(seed, o_k + i) [+ scale2_k * z(seed2, o_k + i)]

    ``scale``, ``scale2`` and ``decay`` are one float for all tensors or one per tensor. ``seed2``/``scale2`` fuse a
    second direction into the same read/write (restore + update + next perturbation in one pass).
    """
    tensors = list(tensors)
    _check_tensors(tensors, offsets)
    n = len(tensors)
    scales = _per_tensor(scale, n, "scale")
    scales2 = _per_tensor(scale2, n, "scale2") if seed2 is not None else None
    if seed2 is not None and scales2 is None:
        raise ValueError("`seed2` needs `scale2`")
    decays = _per_tensor(decay, n, "decay")
    _perturb_reference(tensors, offsets, int(seed), scales, seed2, scales2, decays)


def normal_stream(seed: int, offset: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """Materialize ``z(seed, offset + i)`` for ``i < numel`` as fp32 (for tests and diagnostics, not the hot path)."""
    out = torch.zeros(numel, dtype=torch.float32, device=device)
    perturb_([out], [offset], seed, 1.0)
    return out
