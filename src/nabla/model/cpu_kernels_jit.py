"""The numba kernels of nabla.model.cpu_kernels (compiled on first use, cached on disk).

Imported only when a layer first runs one, so that importing nabla, and small
models that never use them, do not pay for numba's start-up.

Leaves out: the torch side (layers, fallbacks, threading; nabla.model.cpu_kernels).
"""

import types

import numpy as np
from numba import njit, prange

from nabla.model import cpu_kernels_simd as simd

_F32_WT, _F32_XT = simd.F32_TILE
_f32_tile = simd.f32_dot_for(_F32_WT, _F32_XT)  # a block of w rows times a tile of x rows
_f32_tile_1 = simd.f32_dot_for(_F32_WT, 1)  # the same w rows times one x row (x's last rows)
_F32_RUN = 4 * _F32_WT  # rows per prange task (numba gives each thread one contiguous range of tasks)


@njit(fastmath=True, cache=True, nogil=True)
def _f32_rows_plain(W, n, m, X, Y):  # pragma: no cover - compiled
    # Y[:, n:n + m] = X @ W[n:n + m].T one (w row, x row) pair at a time.
    for j in range(n, n + m):
        for b in range(X.shape[0]):
            acc = np.float32(0.0)
            for k in range(W.shape[1]):
                acc += W[j, k] * X[b, k]
            Y[b, j] = acc


@njit(fastmath=True, cache=True, nogil=True)
def _f32_block(W, n, m, X, Y):  # pragma: no cover - compiled
    # Y[:, n:n + m] = X @ W[n:n + m].T for m (<= _F32_WT) rows of W, all rows of X: blocks of _F32_WT
    # w rows times _F32_XT x rows, one accumulator each, so a w load serves several x rows and an x
    # load several w rows (one product per pair is load-bound at 2 loads per multiply-add: 8 and 16
    # rows took ~5x and ~8x one row). A last m < _F32_WT rows: one pair at a time.
    if m < _F32_WT:
        _f32_rows_plain(W, n, m, X, Y)
        return
    B = X.shape[0]
    b = 0
    while b + _F32_XT <= B:
        _f32_tile(W, n, X, b, Y)
        b += _F32_XT
    while b < B:
        _f32_tile_1(W, n, X, b, Y)
        b += 1


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_f32(Ws, X, Ys):  # pragma: no cover - compiled
    # Ys[i] = X @ Ws[i].T for one or several weights that read the same X (q, k, v; or w1, w3), in
    # one parallel loop over all their rows. Few rows of x: a task per row, one (w row, x row)
    # product at a time in numba's loop over k (for one row that reads at the memory's speed;
    # nabla_f32_dot's 1 x 1 form was 10-35% slower, and the same loop in runs of rows or behind a
    # block function 3-8%, measured). Else runs of _F32_RUN rows in blocks of _f32_block. Measured
    # on one core (Zen 5), blocks over one product at a time: 8 rows 1.9-2.3x, 16 rows 2.1-2.7x,
    # 4-5 rows 1.5-1.8x at K = 2048 and 5632 but 0.8x at K = 768 (4 x 4 blocks).
    B, K = X.shape
    ends = np.zeros(len(Ws), dtype=np.int64)
    total = 0
    plain = X.strides[1] != 4 or B < _F32_XT or (B < 8 and K <= 1024)
    for i in range(len(Ws)):
        total += Ws[i].shape[0]
        ends[i] = total
        if Ws[i].shape[0] > 0:  # (a weight of no rows, as cpu_step pads groups with, has strides 0)
            plain = plain or Ws[i].strides[1] != 4 or Ys[i].strides[1] != 4  # not contiguous: the plain loop
    if plain:
        for r in prange(total):
            i = 0
            while r >= ends[i]:
                i += 1
            W, Y = Ws[i], Ys[i]
            n = r - (ends[i] - W.shape[0])
            for b in range(B):
                acc = np.float32(0.0)
                for k in range(K):
                    acc += W[n, k] * X[b, k]
                Y[b, n] = acc
        return
    for t in prange((total + _F32_RUN - 1) // _F32_RUN):
        r, hi = t * _F32_RUN, min(total, (t + 1) * _F32_RUN)
        i = 0
        while r < hi:
            while r >= ends[i]:
                i += 1
            W, Y = Ws[i], Ys[i]
            n = r - (ends[i] - W.shape[0])
            m = min(_F32_WT, min(hi, ends[i]) - r)
            _f32_block(W, n, m, X, Y)
            r += m


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_i8(Ws, scales, X, Ys):  # pragma: no cover - compiled
    # As _rows_f32, with int8 weights and one scale per row. (The row bookkeeping is written out
    # in both: moved into a shared njit helper it made int8 decode ~10% slower, measured.)
    B = X.shape[0]
    ends = np.zeros(len(Ws), dtype=np.int64)
    total = 0
    for i in range(len(Ws)):
        total += Ws[i].shape[0]
        ends[i] = total
    for r in prange(total):
        i = 0
        while r >= ends[i]:
            i += 1
        W, S, Y = Ws[i], scales[i], Ys[i]
        n = r - (ends[i] - W.shape[0])
        K = W.shape[1]
        for b in range(B):
            acc = np.float32(0.0)
            for k in range(K):
                acc += np.float32(W[n, k]) * X[b, k]
            Y[b, n] = acc * S[n]

@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_bf16(W, X, Y):  # pragma: no cover - compiled
    # W (N, K): bf16 bit patterns (as int16); a bf16 is the top half of an fp32.
    N, K = W.shape
    B = X.shape[0]
    for n in prange(N):
        row = np.empty(K, dtype=np.uint32)
        for k in range(K):
            row[k] = (np.uint32(W[n, k]) & np.uint32(0xFFFF)) << np.uint32(16)
        f = row.view(np.float32)
        for b in range(B):
            acc = np.float32(0.0)
            for k in range(K):
                acc += f[k] * X[b, k]
            Y[b, n] = acc

@njit(fastmath=True, cache=True, nogil=True)
def _rms_norm(X, w, eps, Y):  # pragma: no cover - compiled
    B, D = X.shape
    for b in range(B):
        ss = np.float32(0.0)
        for d in range(D):
            ss += X[b, d] * X[b, d]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        for d in range(D):
            Y[b, d] = X[b, d] * r * w[d]

@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _block_scale(X, b, k):  # pragma: no cover - compiled
    # llama.cpp's q8_0 scale of x row b's block k of 32: d = max|x| / 127, and 1 / d (0 for a zero block).
    amax = np.float32(0.0)
    for i in range(32 * k, 32 * k + 32):
        a = abs(X[b, i])
        if a > amax:
            amax = a
    d = amax / np.float32(127.0)
    return d, (np.float32(1.0) / d if d > 0 else np.float32(0.0))


@njit(fastmath=True, cache=True, nogil=True)
def _quantize_blocks(X, XL, XH, DX, XS):  # pragma: no cover - compiled
    # Each row of X (B, K) in blocks of 32, as llama.cpp's q8_0 does for the activations:
    # d = max|x| / 127, q = round(x / d) in [-127, 127]; DX[b, k] = d, XS[b, k] = the block's sum
    # of q. The int8 values are laid out as the weight bytes they meet (nabla.model.quantize.
    # pack_int4): byte j of block k = 16c + kk at 256c + 64(j // 4) + 4kk + j % 4, XL holding
    # x[32k + j] (the low nibbles' partners), XH x[32k + 16 + j]. XL, XH, DX, XS come zeroed,
    # padded to whole chunks of 16 blocks.
    B, K = X.shape
    for b in range(B):
        for k in range(K // 32):
            d, inv = _block_scale(X, b, k)
            base = 256 * (k // 16) + 4 * (k % 16)
            total = 0
            for j in range(16):
                lo = np.int8(np.rint(X[b, 32 * k + j] * inv))
                hi = np.int8(np.rint(X[b, 32 * k + 16 + j] * inv))
                at = base + 64 * (j // 4) + j % 4
                XL[b, at] = lo
                XH[b, at] = hi
                total += np.int32(lo) + np.int32(hi)
            XS[b, k] = total
            DX[b, k] = d


@njit(fastmath=True, cache=True, nogil=True)
def _block_dot_portable(P, S, M, asym, XL, XH, DX, XS, n):  # pragma: no cover - compiled
    # block_dot for CPUs without AVX2 / AVX-512 VNNI: the same sums in plain loops. asym: M holds
    # each block's m (fp16 bits; Q4_1's w = d * q + m), else Q4_0's w = (q - 8) * d (M unread).
    acc = np.float32(0.0)
    for c in range(n):
        for kk in range(16):
            isum = np.int32(0)
            for t in range(4):
                o = 256 * c + 64 * t + 4 * kk
                for jj in range(4):
                    p = P[o + jj]
                    isum += np.int32(np.int16(p & 15) * np.int16(XL[o + jj]) + np.int16(p >> 4) * np.int16(XH[o + jj]))
            k = 16 * c + kk
            if asym:
                acc += np.float32(isum) * _F16[S[k]] * DX[k] + np.float32(XS[k]) * _F16[M[k]] * DX[k]
            else:
                acc += np.float32(isum - 8 * XS[k]) * _F16[S[k]] * DX[k]
    return acc


@njit(fastmath=True, cache=True, nogil=True)
def _block_tail_portable(P, S, M, asym, XL, XH, DX, XS, m):  # pragma: no cover - compiled
    # The last chunk of m < 16 blocks: four groups of 4m bytes (x's side padded to 16 blocks).
    acc = np.float32(0.0)
    for kk in range(m):
        isum = np.int32(0)
        for t in range(4):
            for jj in range(4):
                p = P[4 * m * t + 4 * kk + jj]
                o = 64 * t + 4 * kk + jj
                isum += np.int32(np.int16(p & 15) * np.int16(XL[o]) + np.int16(p >> 4) * np.int16(XH[o]))
        if asym:
            acc += np.float32(isum) * _F16[S[kk]] * DX[kk] + np.float32(XS[kk]) * _F16[M[kk]] * DX[kk]
        else:
            acc += np.float32(isum - 8 * XS[kk]) * _F16[S[kk]] * DX[kk]
    return acc


_F16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # fp16 bits -> value


def rows_q4_kernel(kind: str | None, cache: bool = False):
    """_rows_q4 in `kind`'s instructions (cpu_kernels_simd.KINDS), or the portable loop (None); `cache`: on
    disk (the module-level _rows_q4 only: a function built with other globals is compiled afresh)."""
    if kind is None:
        return njit(parallel=True, fastmath=True, cache=cache, nogil=True)(_rows_q4_portable)
    if kind == _KIND:
        fn = _rows_q4_vector
    else:  # the same code, its IR calls in another instruction set
        fn = types.FunctionType(_rows_q4_vector.__code__, {
            **globals(), "_q4_rows_1": simd.q4_rows_for(kind, 1), "_q4_rows_tile": simd.q4_rows_for(kind, simd.Q4_TILE),
            "_q4m_rows_1": simd.q4_rows_for(kind, 1, mins=True),
            "_q4m_rows_tile": simd.q4_rows_for(kind, simd.Q4_TILE, mins=True)}, "_rows_q4_vector")
    return njit(parallel=True, fastmath=True, cache=cache, nogil=True)(fn)


Q4_ROWS = 32
"""Weight rows per task of _rows_q4's parallel loop (one IR call each per tile of x rows)."""

_KIND = simd.KINDS[0] if simd.KINDS else None
if _KIND:  # module-level globals, not a closure's: numba then caches _rows_q4 on disk (~2 s per process)
    _q4_rows_1, _q4_rows_tile = simd.q4_rows_for(_KIND, 1), simd.q4_rows_for(_KIND, simd.Q4_TILE)
    _q4m_rows_1 = simd.q4_rows_for(_KIND, 1, mins=True)  # Q4_1's w = d * q + m
    _q4m_rows_tile = simd.q4_rows_for(_KIND, simd.Q4_TILE, mins=True)


@njit(fastmath=True, cache=True, nogil=True)
def _q4_prologue(Ps, X, XL, XH, DX, XS, per_task, vector):  # pragma: no cover - compiled
    # What the 4-bit kernels do before their parallel loop: x quantized into XL, XH, DX, XS (`vector`
    # and its rows contiguous: in whole vectors, ~4x faster, measured); (whole chunks of 16 blocks,
    # blocks in the short last one, each weight's end in tasks of `per_task` rows, the tasks). The
    # block count is x's, not a weight's: a weight may be padding of no rows (cpu_step_jit._products).
    if vector and X.strides[1] == 4:
        for b in range(X.shape[0]):
            simd.q8_blocks(X, b, XL, XH, DX, XS)
    else:
        _quantize_blocks(X, XL, XH, DX, XS)
    G = X.shape[1] // 32
    ends = np.zeros(len(Ps), dtype=np.int64)
    total = 0
    for i in range(len(Ps)):
        total += (Ps[i].shape[0] + per_task - 1) // per_task
        ends[i] = total
    return G // 16, G % 16, ends, total


def _rows_q4_vector(Ps, Ss, Ms, X, XL, XH, DX, XS, Ys):  # pragma: no cover - compiled
    # Ys[i] = X Ws[i]^T for one or several weights that read the same X (q, k, v; or w1, w3),
    # in one parallel loop over blocks of Q4_ROWS rows of all of them. W in nabla's 4-bit blocks
    # (llama.cpp's Q4_0 arithmetic, w = (q - 8) * d with an fp16 d per 32 weights; S holds d's
    # bits), P (N, K/2) in pack_int4's layout; or, where Ms[i] is not of shape (0, 0) but S's,
    # Q4_1's w = d * q + m (Ms[i]: m's fp16 bits; weights of both kinds may share a call).
    # X (B, K) is first quantized by _quantize_blocks into XL, XH, DX, XS. Each block of rows is
    # one call into cpu_kernels_simd per Q4_TILE rows of x (each weight chunk unpacked once for all
    # of them), then one per row of x left over.
    full, m, ends, total = _q4_prologue(Ps, X, XL, XH, DX, XS, Q4_ROWS, True)
    B = XL.shape[0]
    R = Q4_ROWS
    tile = simd.Q4_TILE
    for task in prange(total):
        i = 0
        while task >= ends[i]:
            i += 1
        N = Ps[i].shape[0]
        n0 = (task - ends[i]) * R + ((N + R - 1) // R) * R
        n1 = min(n0 + R, N)
        b = 0
        if Ms[i].shape[0] != 0:
            while b + tile <= B:
                _q4m_rows_tile(Ps[i], Ss[i], Ms[i], n0, n1, XL, XH, DX, XS, b, Ys[i], full, m)
                b += tile
            while b < B:
                _q4m_rows_1(Ps[i], Ss[i], Ms[i], n0, n1, XL, XH, DX, XS, b, Ys[i], full, m)
                b += 1
        else:
            while b + tile <= B:
                _q4_rows_tile(Ps[i], Ss[i], n0, n1, XL, XH, DX, XS, b, Ys[i], full, m)
                b += tile
            while b < B:
                _q4_rows_1(Ps[i], Ss[i], n0, n1, XL, XH, DX, XS, b, Ys[i], full, m)
                b += 1


def _rows_q4_portable(Ps, Ss, Ms, X, XL, XH, DX, XS, Ys):  # pragma: no cover - compiled
    # _rows_q4 for CPUs without AVX2 / AVX-512 VNNI: one task per weight row, the block sums in
    # plain loops; rows whose block count is not a multiple of 16 end in a shorter chunk (four
    # 4m-byte groups back to back). Ms as in _rows_q4_vector.
    full, m, ends, total = _q4_prologue(Ps, X, XL, XH, DX, XS, 1, False)
    B = XL.shape[0]
    for r in prange(total):
        i = 0
        while r >= ends[i]:
            i += 1
        n = r - (ends[i] - Ps[i].shape[0])
        row = Ps[i][n]
        srow = Ss[i][n]
        asym = Ms[i].shape[0] != 0
        mrow = Ms[i][n] if asym else srow  # (unread when not asym)
        Y = Ys[i]
        for b in range(B):
            acc = _block_dot_portable(row, srow, mrow, asym, XL[b], XH[b], DX[b], XS[b], full)
            if m:
                acc += _block_tail_portable(row[256 * full:], srow[16 * full:], mrow[16 * full:], asym,
                                            XL[b, 256 * full:], XH[b, 256 * full:], DX[b, 16 * full:],
                                            XS[b, 16 * full:], m)
            Y[b, n] = acc


_rows_q4 = rows_q4_kernel(_KIND, cache=True)


@njit(fastmath=True, cache=True, nogil=True)
def _q4k_row_portable(P, SC, MN, DD, XL, XH, DX, XS, full, m):  # pragma: no cover - compiled
    # One Q4_K weight row times one quantized x row in plain loops: per block, as llama.cpp,
    # scale = d * sc and minimum = dmin * mn in fp32 (d, dmin of the block's super-block of 8),
    # int dot * scale * dx - minimum * dx * xs. Whole chunks of 16 blocks, then m (< 16) blocks in
    # four 4m-byte groups back to back.
    acc = np.float32(0.0)
    for k in range(16 * full + m):
        c, kk = k // 16, k % 16
        rows = 16 if c < full else m  # blocks in this chunk: its groups are 4 * rows bytes apart
        isum = np.int32(0)
        for t in range(4):
            o = 256 * c + 4 * rows * t + 4 * kk
            ox = 256 * c + 64 * t + 4 * kk
            for jj in range(4):
                p = P[o + jj]
                isum += np.int32(np.int16(p & 15) * np.int16(XL[ox + jj]) + np.int16(p >> 4) * np.int16(XH[ox + jj]))
        scale = _F16[DD[2 * (k // 8)]] * np.float32(SC[k])
        minimum = _F16[DD[2 * (k // 8) + 1]] * np.float32(MN[k])
        acc += np.float32(isum) * scale * DX[k] - minimum * DX[k] * np.float32(XS[k])
    return acc


def rows_q4k_kernel(kind: str | None, cache: bool = False):
    """_rows_q4k in `kind`'s instructions (cpu_kernels_simd.KINDS), or the portable loop (None); `cache`: on
    disk (the module-level _rows_q4k only), as rows_q4_kernel."""
    if kind is None:
        return njit(parallel=True, fastmath=True, cache=cache, nogil=True)(_rows_q4k_portable)
    if kind == _KIND:
        fn = _rows_q4k_vector
    else:
        fn = types.FunctionType(_rows_q4k_vector.__code__, {
            **globals(), "_q4k_rows_1": simd.q4k_rows_for(kind, 1),
            "_q4k_rows_tile": simd.q4k_rows_for(kind, simd.Q4_TILE)}, "_rows_q4k_vector")
    return njit(parallel=True, fastmath=True, cache=cache, nogil=True)(fn)


if _KIND:
    _q4k_rows_1, _q4k_rows_tile = simd.q4k_rows_for(_KIND, 1), simd.q4k_rows_for(_KIND, simd.Q4_TILE)


def _rows_q4k_vector(Ps, SCs, MNs, DDs, X, XL, XH, DX, XS, Ys):  # pragma: no cover - compiled
    # _rows_q4_vector for llama.cpp's Q4_K (w = d * sc * q - dmin * mn; cpu_kernels.q4k_arrays): the same
    # x quantization, tasks of Q4_ROWS rows of all the weights, tiles of x rows. A weight of no rows
    # (padding, shape (0, 0)) has no tasks.
    full, m, ends, total = _q4_prologue(Ps, X, XL, XH, DX, XS, Q4_ROWS, True)
    B = XL.shape[0]
    R = Q4_ROWS
    tile = simd.Q4_TILE
    for task in prange(total):
        i = 0
        while task >= ends[i]:
            i += 1
        N = Ps[i].shape[0]
        n0 = (task - ends[i]) * R + ((N + R - 1) // R) * R
        n1 = min(n0 + R, N)
        b = 0
        while b + tile <= B:
            _q4k_rows_tile(Ps[i], SCs[i], MNs[i], DDs[i], n0, n1, XL, XH, DX, XS, b, Ys[i], full, m)
            b += tile
        while b < B:
            _q4k_rows_1(Ps[i], SCs[i], MNs[i], DDs[i], n0, n1, XL, XH, DX, XS, b, Ys[i], full, m)
            b += 1


def _rows_q4k_portable(Ps, SCs, MNs, DDs, X, XL, XH, DX, XS, Ys):  # pragma: no cover - compiled
    # _rows_q4k for CPUs without AVX2 / AVX-512 VNNI: one task per weight row (_q4k_row_portable).
    full, m, ends, total = _q4_prologue(Ps, X, XL, XH, DX, XS, 1, False)
    B = XL.shape[0]
    for r in prange(total):
        i = 0
        while r >= ends[i]:
            i += 1
        n = r - (ends[i] - Ps[i].shape[0])
        Y = Ys[i]
        for b in range(B):
            Y[b, n] = _q4k_row_portable(Ps[i][n], SCs[i][n], MNs[i][n], DDs[i][n], XL[b], XH[b], DX[b], XS[b],
                                        full, m)


_rows_q4k = rows_q4k_kernel(_KIND, cache=True)


_q8_u8_row = simd.q8_u8_row_for()
_q8_u8_row_compact = simd.q8_u8_row_for(compact=True)


@njit(fastmath=True, cache=True, nogil=True)
def _quantize_u8(X, XU, DXE, compact=False):  # pragma: no cover - compiled
    # Each row of X (B, K) in blocks of 32 as llama.cpp's q8_0: d = max|x| / 127, q = round(x / d),
    # stored as q + 128 (u8) for vpdpbusd; DXE[b, i] = the scale of the block byte 4i is in, or,
    # `compact`, DXE[b, k] = block k's (the first K // 32 columns of DXE's K // 4). Rows stored
    # contiguously take cpu_kernels_simd's vector form (the same numbers, ~5x faster, measured).
    B, K = X.shape
    if X.strides[1] == 4 and XU.strides[1] == 1 and DXE.strides[1] == 4:
        for b in range(B):
            if compact:
                _q8_u8_row_compact(X, XU, DXE, b)
            else:
                _q8_u8_row(X, XU, DXE, b)
        return
    for b in range(B):
        for k in range(K // 32):
            d, inv = _block_scale(X, b, k)
            for i in range(32 * k, 32 * k + 32):
                XU[b, i] = np.uint8(np.int32(np.rint(X[b, i] * inv)) + 128)
            if compact:
                DXE[b, k] = d
            else:
                for i in range(8 * k, 8 * k + 8):
                    DXE[b, i] = d


_i8_dot_1 = simd.i8_dot_for(1)
_i8_dot_tile = simd.i8_dot_for(simd.I8_TILE)
_i8_dot_1c = simd.i8_dot_for(1, compact=True)
_i8_dot_tile_c = simd.i8_dot_for(simd.I8_TILE, compact=True)
_I8_RUN = 32
# x's side (xu and the scales) from this many values on, rows longer than 1024: the scales once per
# block (compact), not once per 4 bytes. Measured on one core: 8-16 rows at K >= 2048 1.2-1.3x
# faster, but 1 row and 8 rows at K = 768 ~10% slower and 16 rows at K = 768 0.94-1.0x (the shuffle
# per load, where x's side fits the L1 cache anyway).
_I8_COMPACT_FROM = 8192


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_i8_vnni(Ws, scales, X, XU, DXE, Ys):  # pragma: no cover - compiled
    # As _rows_i8, with x quantized to int8 per block of 32 (llama.cpp's q8_0) and the products in
    # AVX-512 VNNI integer instructions (cpu_kernels_simd), I8_TILE rows of x per weight load; K a
    # multiple of 32. One prange task per _I8_RUN rows (of all weights in turn; numba hands each
    # thread one contiguous range of tasks): one task per row allocated `out` per row, ~25% of the
    # time at K = 768 (measured). (numba.get_num_threads() in here would keep it from being cached.)
    # One row of x: each run in one call of simd.i8_rows (1-4% faster than a call per row at two
    # threads, measured; the same numbers).
    B, K = X.shape
    tile = simd.I8_TILE
    compact = B >= tile and K > 1024 and B * K > _I8_COMPACT_FROM
    _quantize_u8(X, XU, DXE, compact)
    ends = np.zeros(len(Ws), dtype=np.int64)
    total = 0
    runs = B == 1  # one row of x: a run of weight rows per call (simd.i8_rows), where rows are contiguous
    for i in range(len(Ws)):
        total += Ws[i].shape[0]
        ends[i] = total
        if Ws[i].shape[0] > 0:  # (a weight of no rows has strides 0)
            runs = runs and Ys[i].strides[1] == 4 and scales[i].strides[0] == 4
    if runs:
        for t in prange((total + _I8_RUN - 1) // _I8_RUN):
            r, hi = t * _I8_RUN, min(total, (t + 1) * _I8_RUN)
            i = 0
            while r < hi:
                while r >= ends[i]:
                    i += 1
                n = r - (ends[i] - Ws[i].shape[0])
                m = min(hi, ends[i]) - r
                simd.i8_rows(Ws[i], scales[i], n, m, XU, DXE, Ys[i])
                r += m
        return
    for t in prange((total + _I8_RUN - 1) // _I8_RUN):
        out = np.empty(tile, dtype=np.float32)
        i = 0
        for r in range(t * _I8_RUN, min(total, (t + 1) * _I8_RUN)):
            while r >= ends[i]:
                i += 1
            W, S, Y = Ws[i], scales[i], Ys[i]
            n = r - (ends[i] - W.shape[0])
            b = 0
            while b + tile <= B:
                if compact:
                    _i8_dot_tile_c(W[n], XU, DXE, b, K, out)
                else:
                    _i8_dot_tile(W[n], XU, DXE, b, K, out)
                for j in range(tile):
                    Y[b + j, n] = out[j] * S[n]
                b += tile
            while b < B:
                if compact:
                    _i8_dot_1c(W[n], XU, DXE, b, K, out)
                else:
                    _i8_dot_1(W[n], XU, DXE, b, K, out)
                Y[b, n] = out[0] * S[n]
                b += 1


def drop_stale_cache(namespace: dict, *deps: str) -> None:
    """Flush the disk cache of the cached numba functions in `namespace` (a module's globals) when a file
    in `deps` changed since it was filled. numba reuses a function's cache while the function's own
    file is unchanged, yet the cache holds the compiled code of what it calls from other files (the
    IR of cpu_kernels_simd, the kernels here): an edit there alone would leave it stale."""
    import os

    from numba.core.registry import CPUDispatcher

    funcs = [f for f in namespace.values() if isinstance(f, CPUDispatcher) and f._cache.cache_path]
    if not funcs:
        return
    try:
        stamp = ";".join(f"{os.path.basename(d)}:{os.stat(d).st_mtime_ns}:{os.stat(d).st_size}" for d in deps)
        mark = os.path.join(funcs[0]._cache.cache_path, os.path.basename(namespace["__file__"]) + ".deps")
        if os.path.exists(mark):
            with open(mark) as f:
                if f.read() == stamp:
                    return
        for f in funcs:
            f._cache.flush()
        with open(mark, "w") as f:
            f.write(stamp)
    except (OSError, AttributeError):  # a read-only or odd cache: numba's own checks stand
        pass


drop_stale_cache(globals(), simd.__file__)
