"""The numba kernels of nabla.model.cpu_kernels (compiled on first use, cached on disk).

Imported only when a layer first runs one, so that importing nabla, and small
models that never use them, do not pay for numba's start-up.

Leaves out: the torch side (layers, fallbacks, threading; nabla.model.cpu_kernels).
"""

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_f32(Ws, X, Ys):  # pragma: no cover - compiled
    # Ys[i] = X @ Ws[i].T for one or several weights that read the same X (q, k, v; or
    # w1, w3), in one parallel loop over all their rows.
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
        W, Y = Ws[i], Ys[i]
        n = r - (ends[i] - W.shape[0])
        K = W.shape[1]
        for b in range(B):
            acc = np.float32(0.0)
            for k in range(K):
                acc += W[n, k] * X[b, k]
            Y[b, n] = acc

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

@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_i4(P, scales, mins, X, Y):  # pragma: no cover - compiled
    # P (N, K/2): two 4-bit q per byte, even column in the low nibble; w = q * s + m per group.
    # Each row of W is rebuilt in fp32, then dotted with x. (Measured: 10x slower per weight
    # than the int8 kernel; the nibble unpacking does not vectorise well. Left for later.)
    N, half = P.shape
    G = scales.shape[1]
    per = half // G  # bytes per group
    B = X.shape[0]
    K = 2 * half
    for n in prange(N):
        row = np.empty(K, dtype=np.float32)
        for g in range(G):
            s = scales[n, g]
            m = mins[n, g]
            for j in range(g * per, (g + 1) * per):
                p = np.int32(P[n, j])
                row[2 * j] = np.float32(p & 15) * s + m
                row[2 * j + 1] = np.float32(p >> 4) * s + m
        for b in range(B):
            acc = np.float32(0.0)
            for k in range(K):
                acc += row[k] * X[b, k]
            Y[b, n] = acc
