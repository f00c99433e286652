"""Seeded in-place zeroth-order perturbation: ``p <- decay * p + scale * z (+ scale2 * z2)``.

``z`` is a standard-normal direction (or, with ``distribution="rademacher"``, a direction of independent uniform
signs ±1) that is never stored: it is regenerated from ``(seed, offset)`` every time it is needed, so a ZO step costs
no parameter-sized buffer.

Every tensor ``k`` of a parameter list gets a fixed *offset base* ``offsets[k]`` (see :func:`offsets_for`),
and element ``i`` of tensor ``k`` always draws the value at position ``offsets[k] + i`` of the stream named by
``seed``. The value therefore depends only on ``(seed, offset base, element index)``, never on the order in
which tensors are visited, on other tensors, or on how the work is split.

There are two implementations, each with its own stream (same distribution, different values):

* Reference path (plain torch, any device): the offset space is cut into blocks of :data:`BLOCK` elements;
  block ``b`` of stream ``seed`` is drawn by ``torch.randn`` from a private ``torch.Generator`` seeded with
  ``mix_seed(seed, b)``. Offsets must be multiples of :data:`BLOCK` (those from :func:`offsets_for` are), so a tensor
  never shares a block with another. The blocks of a call are spread over ``torch.get_num_threads()`` workers (a
  small persistent thread pool plus the calling thread; ``torch.randn`` and the update release the GIL), each with
  its own generator and one block buffer per stream (never a parameter-sized buffer). A block's values depend only
  on ``(seed, b)`` and blocks update disjoint elements, so the number of threads changes no value. On the CPU the
  pass is bound by the generator: ``torch.rand`` (the mt19937 engine alone) costs as much as ``torch.randn``
  (``Tensor.normal_`` with a generator draws the same values at the same cost), and Box-Muller from ``torch.rand``
  or numpy's generators cost 2-4x more, so the stream stays ``torch.randn``.
* Triton path (CUDA; on the CPU under ``TRITON_INTERPRET=1``): ``z(seed, j) = tl.randn4x(seed, j // 4)[j % 4]``,
  counter-based Philox4x32-10 keyed by ``seed mod 2**64`` with 64-bit counters (see
  ``custom_kernels/_triton_kernels.py``). Any offset ``>= 0`` works. All tensors of one device and dtype are
  updated by one grouped launch; each element is read once and written once, both streams of a fused call included.

Rademacher streams (``distribution="rademacher"``), same addressing: on the reference path, element ``i`` of block
``b`` is ``-1`` where bit ``i % 32`` of the ``(i // 32)``-th word of ``random_(0, 2**32)`` (int64, from the
generator seeded with ``mix_seed(seed, b)``) is set and ``+1`` otherwise (2,048 draws per block instead of 65,536
normals); on the Triton path ``r(seed, j) = -1`` where the top bit of ``tl.randint4x(seed, j // 4)[j % 4]`` is set.

Sparse (masked) tensors: with ``indices[k]``, a 1-D int32 (or int64) tensor of ``n_k`` distinct flat indices into
tensor ``k``, only those coordinates are read, perturbed and written, and ``z`` is generated for them only:
position ``j`` of the list draws ``z(seed, offsets[k] + j)`` and updates element ``indices[k][j]`` (the compact
coordinate space of ``n_k`` elements takes the place of the tensor's ``numel`` everywhere, offsets included; see
:func:`offsets_for`). Every other element of the tensor is never touched: it stays bit-identical. Both paths
gather/scatter through the list (the reference in bounded chunks of :data:`BLOCK` positions); the cost of a pass
is proportional to ``n_k``, not to the tensor's size.

Both streams are functions of ``(seed, offset base + element index)`` only. A run must use one path for a given
tensor throughout a ZO step (``backend="auto"`` does: the choice depends only on device and dtype).

``backend="auto"`` picks Triton for CUDA tensors in fp32/fp16/bf16 when triton is importable, the reference
otherwise; ``"triton"`` forces the kernel (on the CPU only under ``TRITON_INTERPRET=1``; a clear error elsewhere);
``"torch"`` forces the reference. triton is imported only when the Triton path is taken.

The arithmetic is fp32 on both paths; fp16/bf16 tensors are read into fp32, updated and rounded to nearest-even on
store (by hand for bf16 in the kernel, since the Triton interpreter truncates). With ``decay`` the update is
``(decay * p) + scale * z`` evaluated in that order; the kernel may contract it to an FMA on a GPU, so the two
paths agree with the formula to fp32 rounding.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Literal

import torch
from torch import Tensor

from custom_kernels._backend import Backend, interpreting, triton_kernels, use_triton

__all__ = ["BLOCK", "DISTRIBUTIONS", "Distribution", "mix_seed", "normal_stream", "offsets_for", "perturb_"]

BLOCK = 1 << 16
"""Granularity of the reference stream (elements). Offsets from :func:`offsets_for` are multiples of it."""

_PIECE = 1 << 15  # elements per arithmetic op: ATen's intra-op grain size, so no op opens an OpenMP region
_MASK64 = (1 << 64) - 1
_MAX_INDEX = 1 << 63  # offsets and element indices are int64 in the kernel

Distribution = Literal["gaussian", "rademacher"]
DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "rademacher")
"""Distributions of the direction ``z``: standard normal, or Rademacher (independent uniform signs, ``±1``)."""

_TRITON_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # storage kind of the kernel
_TILE_GPU = 4096  # elements per program on a GPU (16 per thread with 8 warps)
_TILE_INTERPRETER = 1 << 16  # the interpreter is slow per operation, not per element: use few, large tiles


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


def offsets_for(tensors: Sequence[Tensor], indices: Sequence[Tensor | None] | None = None) -> list[int]:
    """Block-aligned offset bases for a fixed list of tensors (cumulative, each rounded up to :data:`BLOCK`).

    With ``indices``, a tensor ``k`` whose ``indices[k]`` is not ``None`` occupies ``indices[k].numel()`` positions
    of the stream (its compact coordinate list) instead of ``numel()``.
    """
    offsets, base = [], 0
    for k, t in enumerate(tensors):
        offsets.append(base)
        n = t.numel() if indices is None or indices[k] is None else indices[k].numel()
        base += -(-n // BLOCK) * BLOCK
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


_INDEX_DTYPES = (torch.int32, torch.int64)


def _count(t: Tensor, index: Tensor | None) -> int:
    """Number of coordinates of ``t`` a call updates: its numel, or the length of its compact index list."""
    return t.numel() if index is None else index.numel()


def _check_indices(tensors: Sequence[Tensor], indices: Sequence[Tensor | None] | None) -> list[Tensor | None]:
    if indices is None:
        return [None] * len(tensors)
    indices = list(indices)
    if len(indices) != len(tensors):
        raise ValueError(f"got {len(indices)} index lists for {len(tensors)} tensors")
    for k, (t, idx) in enumerate(zip(tensors, indices)):
        if idx is None:
            continue
        if idx.dtype not in _INDEX_DTYPES or idx.ndim != 1:
            raise ValueError(
                f"indices[{k}] must be a 1-D int32 or int64 tensor, got {idx.dtype} of shape {tuple(idx.shape)}"
            )
        if idx.device != t.device:
            raise ValueError(f"indices[{k}] is on {idx.device}, its tensor on {t.device}")
        if not idx.is_contiguous():
            raise ValueError(f"indices[{k}] is not contiguous")
        if idx.dtype == torch.int32 and t.numel() > 2**31 - 1:
            raise ValueError(f"tensor {k} has {t.numel()} elements: its flat indices need int64")
    return indices


def _check_tensors(tensors: Sequence[Tensor], offsets: Sequence[int], indices: Sequence[Tensor | None]) -> None:
    if len(offsets) != len(tensors):
        raise ValueError(f"got {len(offsets)} offsets for {len(tensors)} tensors")
    for k, t in enumerate(tensors):
        if int(offsets[k]) < 0 or int(offsets[k]) + _count(t, indices[k]) > _MAX_INDEX:
            raise ValueError(f"offset {offsets[k]} of tensor {k} is outside [0, 2**63 - numel)")
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


_BYTE_SHIFTS = torch.tensor([0, 8, 16, 24])  # the four bytes of a 32-bit word, lowest first
_SIGN_TABLE = (1 - 2 * ((torch.arange(256)[:, None] >> torch.arange(8)) & 1)).float()  # byte -> its 8 bits as ±1


def _block_rademacher(gen: torch.Generator, seed: int, block: int, n: int, out: Tensor, words: Tensor) -> Tensor:
    """Block ``block`` of the Rademacher reference stream: ``ceil(n / 32)`` 32-bit words ``w`` drawn by
    ``random_(0, 2**32)`` from a generator seeded with ``mix_seed(seed, block)``; element ``i`` is ``-1`` where bit
    ``i % 32`` of ``w[i // 32]`` is set, ``+1`` otherwise (each byte of a word looked up in a 256 x 8 table)."""
    gen.manual_seed(mix_seed(seed, block))
    count = -(-n // 32)
    w = words[:count].random_(0, 1 << 32, generator=gen)
    index = torch.bitwise_right_shift(w[:, None], _BYTE_SHIFTS).bitwise_and_(255).view(-1)  # 4 bytes per word
    signs = out[: 32 * count].view(4 * count, 8)
    step = _PIECE // 8
    for lo in range(0, index.numel(), step):  # pieces below ATen's grain size: every op stays on this thread
        torch.index_select(_SIGN_TABLE, 0, index[lo : lo + step], out=signs[lo : lo + step])
    return out[:n]


class _Worker(threading.local):
    """Per-thread state of the reference path: a private CPU generator, one block buffer per stream and, for
    Rademacher directions, one word buffer per stream."""

    def __init__(self) -> None:
        self.gen = torch.Generator(device="cpu")
        self.bufs = (torch.empty(BLOCK, dtype=torch.float32), torch.empty(BLOCK, dtype=torch.float32))
        self.words = (torch.empty(BLOCK // 32, dtype=torch.int64), torch.empty(BLOCK // 32, dtype=torch.int64))

    def direction(self, stream: int, seed: int, block: int, n: int, rademacher: bool) -> Tensor:
        if rademacher:
            return _block_rademacher(self.gen, seed, block, n, self.bufs[stream], self.words[stream])
        return _block_normal(self.gen, seed, block, n, self.bufs[stream])


_worker = _Worker()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """The persistent pool of ``workers - 1`` threads (the calling thread is the last worker), rebuilt when
    ``torch.get_num_threads()`` changes."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="zo_perturb")
            _pool_size = workers
        return _pool


@torch.no_grad()  # grad mode is per thread: a worker needs its own
def _update_block(task: tuple, seed: int, seed2: int | None, rademacher: bool) -> None:
    """Generate block ``task`` of the stream(s) and apply it to its slice (or compact coordinates) of one tensor."""
    t, index, start, n, block, scale, scale2, decay = task
    dev, flat = t.device, t.view(-1)
    z = _worker.direction(0, seed, block, n, rademacher).to(dev, non_blocking=True) if scale != 0.0 else None
    z2 = _worker.direction(1, seed2, block, n, rademacher).to(dev, non_blocking=True) if scale2 else None
    for lo in range(0, n, _PIECE):  # pieces below ATen's grain size: every op stays on this thread
        hi = min(n, lo + _PIECE)
        if index is None:
            chunk = flat[start + lo : start + hi]
            work = chunk if chunk.dtype == torch.float32 else chunk.float()
        else:  # gather the piece's coordinates (a copy), update, scatter back below
            where = index[start + lo : start + hi].long()
            chunk = None
            work = flat.index_select(0, where).float()
        if decay != 1.0:
            work.mul_(decay)
        if z is not None:
            work.add_(z[lo:hi], alpha=scale)
        if z2 is not None:
            work.add_(z2[lo:hi], alpha=scale2)
        if index is not None:
            flat.index_copy_(0, where, work.to(flat.dtype))  # fp32 -> bf16/fp16 rounds to nearest-even
        elif work is not chunk:
            chunk.copy_(work)  # fp32 -> bf16/fp16 rounds to nearest-even


def _perturb_reference(
    tensors: Sequence[Tensor],
    offsets: Sequence[int],
    seed: int,
    scales: list[float],
    seed2: int | None,
    scales2: list[float] | None,
    decays: list[float] | None,
    *,
    indices: Sequence[Tensor | None] | None = None,
    distribution: Distribution = "gaussian",
) -> None:
    """Reference path: one task per (tensor, block); the tasks are spread over ``torch.get_num_threads()`` workers
    (a persistent pool plus the calling thread), each with its own generator and block buffers. A block's values
    depend only on ``(seed, block)`` and the blocks of a call update disjoint elements, so neither the number of
    workers nor the order in which they take the tasks changes a single value."""
    rademacher = distribution == "rademacher"
    tasks = []
    for k in range(len(tensors)):  # all checks before any tensor is touched
        if offsets[k] % BLOCK:
            raise ValueError(f"offset {offsets[k]} of tensor {k} is not a multiple of BLOCK={BLOCK}")
    for k, t in enumerate(tensors):
        index = indices[k] if indices is not None else None
        count = _count(t, index)
        scale2 = scales2[k] if seed2 is not None and scales2 is not None else 0.0
        decay = decays[k] if decays is not None else 1.0
        first_block = offsets[k] // BLOCK
        for j, start in enumerate(range(0, count, BLOCK)):
            tasks.append((t, index, start, min(BLOCK, count - start), first_block + j, scales[k], scale2, decay))
    # a worker per block of work at most: below that, handing tasks to threads costs more than it saves
    work = sum(task[3] for task in tasks)
    workers = min(max(1, torch.get_num_threads()), len(tasks), -(-work // BLOCK))
    if workers <= 1:
        for task in tasks:
            _update_block(task, seed, seed2, rademacher)
        return
    queue = iter(tasks)
    lock = threading.Lock()

    def drain() -> None:  # take the next task until none is left (dynamic: a slowed-down thread takes fewer)
        while True:
            with lock:
                task = next(queue, None)
            if task is None:
                return
            _update_block(task, seed, seed2, rademacher)

    pending = [_thread_pool(workers).submit(drain) for _ in range(workers - 1)]
    try:
        drain()
    finally:
        for future in pending:
            future.result()  # waits for every thread (and raises its error) before the call returns


def _signed64(seed: int) -> int:
    """``seed mod 2**64`` as a signed 64-bit integer (the kernel reinterprets it as the unsigned Philox key)."""
    s = int(seed) & _MASK64
    return s - (1 << 64) if s >= 1 << 63 else s


def _perturb_triton(
    tensors: Sequence[Tensor],
    offsets: Sequence[int],
    seed: int,
    scales: list[float],
    seed2: int | None,
    scales2: list[float] | None,
    decays: list[float] | None,
    *,
    tile: int | None = None,
    indices: Sequence[Tensor | None] | None = None,
    distribution: Distribution = "gaussian",
) -> None:
    """Triton path: one grouped launch per (device, dtype, index kind). ``tile`` (a power of two >= 16) overrides the
    tile size (tests use it to show that ``z`` does not depend on it)."""
    kernels = triton_kernels()
    indices = list(indices) if indices is not None else [None] * len(tensors)
    counts = [_count(t, idx) for t, idx in zip(tensors, indices)]
    if tile is None and interpreting(kernels):  # few, large tiles; no larger than the largest tensor needs
        tile = min(_TILE_INTERPRETER, max(16, 1 << (max(counts) - 1).bit_length()))
    tile = tile or _TILE_GPU
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype | None], list[int]] = {}
    for k, t in enumerate(tensors):
        if counts[k]:
            kind = indices[k].dtype if indices[k] is not None else None
            groups.setdefault((t.device, t.dtype, kind), []).append(k)
    for (device, dtype, index_dtype), ks in groups.items():
        rows_i, rows_f, n_tiles = [], [], 0
        for k in ks:
            index_addr = indices[k].data_ptr() if indices[k] is not None else 0
            rows_i.append((tensors[k].data_ptr(), counts[k], int(offsets[k]), n_tiles, index_addr))
            rows_f.append((scales[k], scales2[k] if scales2 is not None else 0.0, decays[k] if decays else 1.0))
            n_tiles += -(-counts[k] // tile)
        # small metadata tables: (address, count, offset base, first tile, index address) and (scale, scale2, decay)
        meta_i = torch.tensor(rows_i, dtype=torch.int64).to(device, non_blocking=True)
        meta_f = torch.tensor(rows_f, dtype=torch.float32).to(device, non_blocking=True)
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            kernels.perturb_kernel[(n_tiles,)](
                meta_i,
                meta_f,
                len(ks),
                _signed64(seed),
                _signed64(seed2 if seed2 is not None else 0),
                KIND=_TRITON_DTYPES[dtype],
                HAS_DECAY=decays is not None,
                HAS_Z2=seed2 is not None,
                ALIGNED16=index_dtype is None and all(row[0] % 16 == 0 for row in rows_i),
                ALIGNED4=all(row[2] % 4 == 0 for row in rows_i),
                TILE=tile,
                SEARCH_STEPS=(len(ks) - 1).bit_length(),
                INDEXED=index_dtype is not None,
                INDEX64=index_dtype == torch.int64,
                RADEMACHER=distribution == "rademacher",
                num_warps=8,
                enable_fp_fusion=False,  # no FMA contraction: the kernel rounds like the formula (and like numpy)
            )


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
    indices: Sequence[Tensor | None] | None = None,
    distribution: Distribution = "gaussian",
    backend: Backend = "auto",
) -> None:
    """In place, for every tensor ``p_k`` with offset base ``o_k`` and element ``i``::

        p_k[i] <- decay_k * p_k[i] + scale_k * z(seed, o_k + i) [+ scale2_k * z(seed2, o_k + i)]

    or, for a tensor with a compact coordinate list ``indices[k]`` (1-D int32/int64, distinct flat indices; not
    re-checked here), for every position ``j`` of the list and ``e = indices[k][j]``::

        p_k.view(-1)[e] <- decay_k * p_k.view(-1)[e] + scale_k * z(seed, o_k + j) [+ scale2_k * z(seed2, o_k + j)]

    leaving every other element untouched (module docstring).

    ``scale``, ``scale2`` and ``decay`` are one float for all tensors or one per tensor. ``seed2``/``scale2`` fuse a
    second direction into the same read/write (restore + update + next perturbation in one pass).
    Tensors must be contiguous and floating point. ``distribution`` is that of z (``"gaussian"`` or ``"rademacher"``,
    module docstring). ``backend`` picks the implementation (module docstring); the Triton kernel handles fp32, fp16
    and bf16.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"`distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}")
    tensors = list(tensors)
    indices = _check_indices(tensors, indices)
    _check_tensors(tensors, offsets, indices)
    n = len(tensors)
    scales = _per_tensor(scale, n, "scale")
    scales2 = _per_tensor(scale2, n, "scale2") if seed2 is not None else None
    if seed2 is not None and scales2 is None:
        raise ValueError("`seed2` needs `scale2`")
    decays = _per_tensor(decay, n, "decay")
    on_triton = [
        use_triton(
            backend,
            t.device,
            t.dtype in _TRITON_DTYPES,
            f"tensor {k} has dtype {t.dtype}; the Triton kernel handles float32, float16 and bfloat16",
        )
        for k, t in enumerate(tensors)
    ]
    for path, run in ((False, _perturb_reference), (True, _perturb_triton)):
        ks = [k for k in range(n) if on_triton[k] == path]
        if ks:
            run(
                [tensors[k] for k in ks],
                [offsets[k] for k in ks],
                int(seed),
                [scales[k] for k in ks],
                seed2,
                [scales2[k] for k in ks] if scales2 is not None else None,
                [decays[k] for k in ks] if decays is not None else None,
                indices=[indices[k] for k in ks],
                distribution=distribution,
            )


def normal_stream(
    seed: int,
    offset: int,
    numel: int,
    device: torch.device | str = "cpu",
    *,
    distribution: Distribution = "gaussian",
    backend: Backend = "auto",
) -> Tensor:
    """Materialize ``z(seed, offset + i)`` for ``i < numel`` as fp32 (for tests and diagnostics, not the hot path).

    ``backend`` and ``distribution`` select the stream exactly as :func:`perturb_` would for an fp32 tensor on
    ``device``.
    """
    out = torch.zeros(numel, dtype=torch.float32, device=device)
    perturb_([out], [offset], seed, 1.0, distribution=distribution, backend=backend)
    return out
