"""Triton kernels of :mod:`custom_kernels` (private; importing this module imports triton).

The public entry points (:func:`custom_kernels.perturb_`, :func:`custom_kernels.clip_and_noise_`) import this module
lazily, only when the Triton path is taken, so ``import custom_kernels`` works where triton is absent.

Random stream ``z(seed, j)``, shared by every kernel here
----------------------------------------------------------
For an element index ``j >= 0`` (64-bit)::

    c = j // 4                                          # Philox counter (low and high 32-bit words)
    w0, w1, w2, w3 = Philox4x32-10(key=seed, counter=(c_lo, c_hi, 0, 0))
    z0, z1 = BoxMuller(u(w0), u(w1));  z2, z3 = BoxMuller(u(w2), u(w3))
    z(seed, j) = z_{j % 4}

which is exactly ``tl.randn4x(seed, j // 4)[j % 4]`` (``u`` and ``BoxMuller`` are Triton's own
``uint_to_uniform_float`` and ``pair_uniform_to_normal``; the key is the seed's low and high 32-bit words).
One Philox call yields four normals, so the kernels spend a quarter of the integer work of ``tl.randn``.
``z`` depends on ``(seed, j)`` only: never on the tile size, the launch grid or the order of the tensors.
The integer stream is bit-identical everywhere; the floats come from ``log``/``cos``/``sin``/``sqrt``, so the
interpreter (numpy) and a GPU (libdevice) may differ in the last bits.

Rademacher stream ``r(seed, j)`` (``perturb_kernel`` with ``RADEMACHER``): ``-1.0`` where the top bit of
``tl.randint4x(seed, j // 4)[j % 4]`` (the Philox word that feeds ``z(seed, j)``) is set, ``+1.0`` otherwise.

Storage formats (constexpr ``KIND``: 0 fp32, 1 fp16, 2 bf16): fp32 and fp16 are loaded and stored natively
(fp32 -> fp16 rounds to nearest-even both on the GPU and in the interpreter). bf16 is read and written as raw
16-bit patterns and rounded to nearest-even by hand, because the interpreter truncates fp32 -> bf16.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lane(lane, x0, x1, x2, x3):
    """``x_lane`` elementwise (``lane`` in 0..3): picks one of the four outputs of a Philox call."""
    return tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))


@triton.jit
def _normal_at(seed, j):
    """``z(seed, j)`` for an arbitrary block of int64 element indices ``j`` (computes 4 normals per element)."""
    n0, n1, n2, n3 = tl.randn4x(seed, j >> 2)
    return _lane(j & 3, n0, n1, n2, n3)


@triton.jit
def _normal_block(seed, start, TILE: tl.constexpr, ALIGNED4: tl.constexpr):
    """``z(seed, start + 4 * r + l)`` at ``[r, l]`` of a ``[TILE // 4, 4]`` block (``start`` an int64 scalar).

    With ``ALIGNED4`` (``start % 4 == 0``) one Philox call feeds the four elements of a row. The 2-D shape keeps the
    per-row normals in a slice of the block's own layout, so no register shuffle is needed on a GPU.
    """
    r = tl.arange(0, TILE // 4)
    lane = tl.arange(0, 4)[None, :]
    if ALIGNED4:
        n0, n1, n2, n3 = tl.randn4x(seed, (start >> 2) + r)
        z = _lane(lane, n0[:, None], n1[:, None], n2[:, None], n3[:, None])
    else:
        z = _normal_at(seed, start + 4 * r[:, None] + lane)
    return z


@triton.jit
def _sign_block(seed, start, TILE: tl.constexpr, ALIGNED4: tl.constexpr):
    """Rademacher ``r(seed, start + 4 * q + l)`` at ``[q, l]`` of a ``[TILE // 4, 4]`` block: ``-1.0`` where the top
    bit of ``tl.randint4x(seed, j // 4)[j % 4]`` is set, ``+1.0`` otherwise (the same Philox words as the normals)."""
    r = tl.arange(0, TILE // 4)
    lane = tl.arange(0, 4)[None, :]
    if ALIGNED4:
        w0, w1, w2, w3 = tl.randint4x(seed, (start >> 2) + r)
        w = _lane(lane, w0[:, None], w1[:, None], w2[:, None], w3[:, None])
    else:
        j = start + 4 * r[:, None] + lane
        w0, w1, w2, w3 = tl.randint4x(seed, j >> 2)
        w = _lane(j & 3, w0, w1, w2, w3)
    return 1.0 - 2.0 * (w.to(tl.uint32) >> 31).to(tl.float32)


@triton.jit
def _direction_block(seed, start, TILE: tl.constexpr, ALIGNED4: tl.constexpr, RADEMACHER: tl.constexpr):
    if RADEMACHER:
        z = _sign_block(seed, start, TILE, ALIGNED4)
    else:
        z = _normal_block(seed, start, TILE, ALIGNED4)
    return z


@triton.jit
def _load_f32(ptrs, mask, KIND: tl.constexpr):
    if KIND == 2:  # bf16 bit pattern (uint16): widening is exact
        x = (tl.load(ptrs, mask=mask).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptrs, mask=mask).to(tl.float32)
    return x


@triton.jit
def _store_f32(ptrs, x, mask, KIND: tl.constexpr):
    if KIND == 2:  # fp32 -> bf16, round to nearest-even on the bit pattern; NaN -> canonical quiet NaN
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)  # NaN
        tl.store(ptrs, r.to(tl.uint16), mask=mask)
    elif KIND == 1:
        tl.store(ptrs, x.to(tl.float16), mask=mask)
    else:
        tl.store(ptrs, x, mask=mask)


@triton.jit
def _perturb_tile(
    ptr, idx_ptr, start, numel, base, seed, scale, seed2, scale2, decay,
    KIND: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_Z2: tl.constexpr, ALIGNED4: tl.constexpr,
    TILE: tl.constexpr, MASKED: tl.constexpr, INDEXED: tl.constexpr, RADEMACHER: tl.constexpr,
):  # fmt: skip
    idx = start + 4 * tl.arange(0, TILE // 4)[:, None] + tl.arange(0, 4)[None, :]  # [TILE // 4, 4]
    if MASKED:
        mask = idx < numel
    else:
        mask = None
    if INDEXED:  # compact coordinate list: position j of the list updates element idx_ptr[j] of the tensor
        pos = tl.load(idx_ptr + idx, mask=mask).to(tl.int64)
    else:
        pos = idx
    x = _load_f32(ptr + pos, mask, KIND)
    if HAS_DECAY:
        x = x * decay
    x = x + scale * _direction_block(seed, base + start, TILE, ALIGNED4, RADEMACHER)
    if HAS_Z2:
        x = x + scale2 * _direction_block(seed2, base + start, TILE, ALIGNED4, RADEMACHER)
    _store_f32(ptr + pos, x, mask, KIND)


@triton.jit(do_not_specialize=["seed", "seed2"])
def perturb_kernel(
    meta_i, meta_f, n_tensors, seed, seed2,
    KIND: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_Z2: tl.constexpr, ALIGNED16: tl.constexpr,
    ALIGNED4: tl.constexpr, TILE: tl.constexpr, SEARCH_STEPS: tl.constexpr, INDEXED: tl.constexpr,
    INDEX64: tl.constexpr, RADEMACHER: tl.constexpr,
):  # fmt: skip
    """One program per TILE-element tile of a group of tensors (same device, storage kind and indexing).

    ``meta_i[k] = (address, n, offset base, first tile, index address)`` (int64), ``meta_f[k] = (scale, scale2,
    decay)`` (fp32). Program ``pid`` finds its tensor by binary search over the first-tile column, then updates one
    tile in place: ``p[e_i] <- decay * p[e_i] + scale * z(seed, base + i) [+ scale2 * z(seed2, base + i)]`` for
    ``i < n`` (fp32 math, one read, one write), where ``e_i = i`` (dense: ``n`` is the tensor's numel) or, with
    ``INDEXED``, ``e_i = index[i]`` from the tensor's compact list of ``n`` flat indices (int32, or int64 with
    ``INDEX64``): only those coordinates are read, perturbed and written, and ``z`` is drawn for them only.
    """
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0
    hi = lo + n_tensors
    for _ in tl.static_range(SEARCH_STEPS):  # largest k with first_tile[k] <= pid
        mid = (lo + hi) // 2
        go = tl.load(meta_i + mid * 5 + 3) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    k = lo
    addr = tl.load(meta_i + k * 5)
    numel = tl.load(meta_i + k * 5 + 1)
    base = tl.load(meta_i + k * 5 + 2)
    start = (pid - tl.load(meta_i + k * 5 + 3)) * TILE
    scale = tl.load(meta_f + k * 3)
    scale2 = tl.load(meta_f + k * 3 + 1)
    decay = tl.load(meta_f + k * 3 + 2)
    if KIND == 2:
        ptr = addr.to(tl.pointer_type(tl.uint16))
    elif KIND == 1:
        ptr = addr.to(tl.pointer_type(tl.float16))
    else:
        ptr = addr.to(tl.pointer_type(tl.float32))
    if INDEXED:
        idx_addr = tl.load(meta_i + k * 5 + 4)
        if INDEX64:
            idx_ptr = idx_addr.to(tl.pointer_type(tl.int64))
        else:
            idx_ptr = idx_addr.to(tl.pointer_type(tl.int32))
    else:
        idx_ptr = ptr  # unused
    if ALIGNED16:
        ptr = tl.multiple_of(ptr, 16)
    if start + TILE <= numel:  # full tile: no mask, vectorized accesses
        _perturb_tile(ptr, idx_ptr, start, numel, base, seed, scale, seed2, scale2, decay,
                      KIND, HAS_DECAY, HAS_Z2, ALIGNED4, TILE, False, INDEXED, RADEMACHER)  # fmt: skip
    else:
        _perturb_tile(ptr, idx_ptr, start, numel, base, seed, scale, seed2, scale2, decay,
                      KIND, HAS_DECAY, HAS_Z2, ALIGNED4, TILE, True, INDEXED, RADEMACHER)  # fmt: skip


@triton.jit(do_not_specialize=["seed", "offset"])
def clip_noise_rows_kernel(
    out_ptr, g_ptr, c_ptr, B, P, stride_b, noise_std, seed, offset,
    ACCUMULATE: tl.constexpr, HAS_NOISE: tl.constexpr, ALIGNED4: tl.constexpr, TILE: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """``out[j] <- [out[j] +] sum_b c[b] * g[b, j] + noise_std * z(seed, offset + j)`` for one TILE of columns."""
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * TILE + tl.arange(0, TILE)
    cmask = cols < P
    acc = tl.zeros([TILE], dtype=tl.float32)
    b0 = pid * 0
    while b0 < B:  # `while`, not `for`: runtime loop bounds break the triton 3.6 interpreter under numpy >= 2.4
        rows = b0 + tl.arange(0, ROWS)
        rmask = rows < B
        c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
        g = tl.load(
            g_ptr + rows.to(tl.int64)[:, None] * stride_b + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(g * c[:, None], axis=0)
        b0 += ROWS
    if HAS_NOISE:
        acc += noise_std * tl.reshape(_normal_block(seed, offset + pid * TILE, TILE, ALIGNED4), [TILE])
    if ACCUMULATE:
        acc += tl.load(out_ptr + cols, mask=cmask, other=0.0)
    tl.store(out_ptr + cols, acc, mask=cmask)


@triton.jit(do_not_specialize=["seed", "offset"])
def clip_noise_factors_kernel(
    out_ptr, a_ptr, g_ptr, c_ptr, B, T, P, D, stride_ab, stride_at, stride_gb, stride_gt, noise_std, seed, offset,
    ACCUMULATE: tl.constexpr, HAS_NOISE: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    """``out[m * D + n] <- [out +] sum_b c[b] * (g_b^T a_b)[m, n] + noise_std * z(seed, offset + m * D + n)``.

    ``a`` is ``[B, T, D]``, ``g`` is ``[B, T, P]``; one program computes a ``BM x BN`` tile of the ``[P, D]``
    result. Each example's ``g_b^T a_b`` is accumulated in fp32 by ``tl.dot`` and then scaled by ``c[b]`` in fp32.
    """
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    mmask = rm < P
    nmask = rn < D
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    b = tl.program_id(0).to(tl.int64) * 0
    while b < B:  # `while` loops: see clip_noise_rows_kernel
        a_row = a_ptr + b * stride_ab
        g_row = g_ptr + b * stride_gb
        acc_b = tl.zeros([BM, BN], dtype=tl.float32)
        t0 = b * 0
        while t0 < T:
            ts = t0 + tl.arange(0, BT)
            tmask = ts < T
            gt = tl.load(g_row + ts[None, :] * stride_gt + rm[:, None], mask=mmask[:, None] & tmask[None, :], other=0.0)
            at = tl.load(a_row + ts[:, None] * stride_at + rn[None, :], mask=tmask[:, None] & nmask[None, :], other=0.0)
            if UPCAST:
                gt = gt.to(tl.float32)
                at = at.to(tl.float32)
            acc_b = tl.dot(gt, at, acc_b, input_precision="ieee")
            t0 += BT
        acc += tl.load(c_ptr + b) * acc_b
        b += 1
    flat = rm[:, None] * D + rn[None, :]
    mask = mmask[:, None] & nmask[None, :]
    if HAS_NOISE:
        acc += noise_std * _normal_at(seed, offset + flat)
    if ACCUMULATE:
        acc += tl.load(out_ptr + flat, mask=mask, other=0.0)
    tl.store(out_ptr + flat, acc, mask=mask)
