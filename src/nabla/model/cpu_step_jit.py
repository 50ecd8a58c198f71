"""The numba side of nabla.model.cpu_step: one transformer layer, and the final norm and head, each
compiled into one function that calls the product kernels of nabla.model.cpu_kernels_jit.

Each product group (q/k/v, wo, w1/w3, w2, the head) carries its weight format, and one compiled
function serves every combination (and so is cached on disk: numba keeps no closures there; a
change to cpu_kernels_jit's kernels needs this module's cache cleared too, as numba tracks only a
function's own file). Everything between the
products (RMSNorm, biases, the rotation, the cache write, attention, SwiGLU, the residual adds)
runs here in plain loops, where torch spends a few microseconds of dispatch on each.

Leaves out: deciding which models and calls take this path, and the buffers (cpu_step).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from nabla.model import cpu_kernels_jit as kj


@njit(fastmath=True, cache=True, nogil=True)
def _rotate_and_cache(Q, K, V, QB, KB, VB, T, starts, slots, rope, KC, VC):  # pragma: no cover - compiled
    # Add the biases, rotate q and k (pairs (2i, 2i + 1) of each head by rope[pos, i] = (cos, sin)),
    # and write k and v at their positions of the cache (rows, kv heads, length, head dim). Row r of
    # Q/K/V is sequence b = r // T, at position starts[b] + r % T of cache row slots[b].
    R = Q.shape[0]
    hd = KC.shape[3]
    half = hd // 2
    n_kv = KC.shape[1]
    n_q = Q.shape[1] // hd
    for r in range(R):
        b = slots[r // T]
        p = starts[r // T] + r % T
        for c in range(Q.shape[1]):
            Q[r, c] += QB[c]
        for c in range(K.shape[1]):
            K[r, c] += KB[c]
            V[r, c] += VB[c]
        for h in range(n_q):
            o = h * hd
            for i in range(half):
                cos, sin = rope[p, i, 0], rope[p, i, 1]
                x0, x1 = Q[r, o + 2 * i], Q[r, o + 2 * i + 1]
                Q[r, o + 2 * i] = x0 * cos - x1 * sin
                Q[r, o + 2 * i + 1] = x0 * sin + x1 * cos
        for g in range(n_kv):
            o = g * hd
            for i in range(half):
                cos, sin = rope[p, i, 0], rope[p, i, 1]
                x0, x1 = K[r, o + 2 * i], K[r, o + 2 * i + 1]
                KC[b, g, p, 2 * i] = x0 * cos - x1 * sin
                KC[b, g, p, 2 * i + 1] = x0 * sin + x1 * cos
            for d in range(hd):
                VC[b, g, p, d] = V[r, o + d]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _attend(Q, KC, VC, Y, T, starts, slots, window, scale):  # pragma: no cover - compiled
    # Y[r, head] = softmax(q k^T * scale) v over the cached positions the query at row r may see
    # (sequence r // T, in cache row slots[r // T]): those up to its own, and with a window (> 0)
    # only the last `window` of them. One task per (sequence, head); query heads share key/value
    # heads in groups (GQA). The loops run over 1-D row views (q, a key, a value, y): indexed from
    # 0 by range variables, they carry no negative-index checks and vectorise (6x faster than
    # indexing the 4-D cache at 1000 positions, measured; the same sums).
    R = Q.shape[0]
    hd = KC.shape[3]
    n_kv = KC.shape[1]
    n_q = Q.shape[1] // hd
    group = n_q // n_kv
    B = R // T
    for task in prange(B * n_q):
        s = task // n_q
        h = task % n_q
        keys = KC[slots[s], h // group]
        values = VC[slots[s], h // group]
        scores = np.empty(starts[s] + T, dtype=np.float32)
        acc = np.empty(hd, dtype=np.float32)
        for t in range(T):
            q = Q[s * T + t, h * hd:(h + 1) * hd]
            p = starts[s] + t
            lo = 0 if window <= 0 else max(0, p - window + 1)
            top = np.float32(-np.inf)
            for j in range(lo, p + 1):
                k = keys[j]
                e = np.float32(0.0)
                for d in range(hd):
                    e += q[d] * k[d]
                e *= scale
                scores[j] = e
                top = max(top, e)
            total = np.float32(0.0)
            for j in range(lo, p + 1):
                e = np.exp(scores[j] - top)
                scores[j] = e
                total += e
            acc[:] = 0.0
            for j in range(lo, p + 1):
                w = scores[j]
                v = values[j]
                for d in range(hd):
                    acc[d] += w * v[d]
            inv = np.float32(1.0) / total
            y = Y[s * T + t, h * hd:(h + 1) * hd]
            for d in range(hd):
                y[d] = acc[d] * inv


@njit(fastmath=True, cache=True, nogil=True)
def _add(H, Z):  # pragma: no cover - compiled
    R, D = H.shape
    for r in range(R):
        for d in range(D):
            H[r, d] += Z[r, d]


_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.4426950408889634), np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXACT = {"nnan", "ninf", "nsz", "arcp", "contract"}  # fastmath without reassociation: exp's split stays exact


@njit(fastmath=_EXACT, cache=True, nogil=True)
def _swiglu(G, U, P, E):  # pragma: no cover - compiled
    # G = silu(G) * U = G / (1 + exp(-G)) * U, in place. exp(x) = 2^n e^f with n = round(x log2 e)
    # and |f| <= ln 2 / 2 (a degree-7 polynomial, within 2 ulp), in two loops the compiler turns
    # into vector code: the scalar exp of libm took 8 of a 110M layer's ~250 us (measured).
    # P (float32) and E (int32) are scratch rows as wide as G.
    R, N = G.shape
    Pr = P[0]
    Er = E[0]
    scale = Er.view(np.float32)
    for r in range(R):
        g = G[r]
        for i in range(N):
            x = min(max(-g[i], np.float32(-87.0)), np.float32(88.0))
            n = np.floor(x * _LOG2E + np.float32(0.5))
            f = (x - n * _LN2_HI) - n * _LN2_LO
            p = np.float32(1.0 / 5040.0)
            p = p * f + np.float32(1.0 / 720.0)
            p = p * f + np.float32(1.0 / 120.0)
            p = p * f + np.float32(1.0 / 24.0)
            p = p * f + np.float32(1.0 / 6.0)
            p = p * f + np.float32(0.5)
            p = p * f + np.float32(1.0)
            Pr[i] = p * f + np.float32(1.0)
            Er[i] = (np.int32(n) + np.int32(127)) << np.int32(23)
        u = U[r]
        for i in range(N):
            g[i] = g[i] / (np.float32(1.0) + Pr[i] * scale[i]) * u[i]


FORMATS = ("f32", "i8", "i8_vnni", "q4", "q4k")
"""The weight formats, in the order of a product group's fields (see _products): fp32 weights; int8
with row scales (plain loops, or VNNI with x in int8 per block); int4 blocks (Q4_0, or Q4_1 with
minimums); Q4_K super-blocks."""


def _kernel(run):
    """A function of (fields, X, Ys, scratch) that numba compiles to `run` where the fields are a
    format's arrays, and to nothing where they are () (no weight of the group in that format)."""
    def call(fields, X, Ys, scratch):
        raise NotImplementedError  # only ever called from numba

    @overload(call, jit_options={"nogil": True})
    def _typed(fields, X, Ys, scratch):
        return run if len(fields) else (lambda fields, X, Ys, scratch: None)

    return call


def _f32(fields, X, Ys, scratch):  # pragma: no cover - compiled
    kj._rows_f32(fields[0], X, Ys)


def _i8(fields, X, Ys, scratch):  # pragma: no cover - compiled
    kj._rows_i8(fields[0], fields[1], X, Ys)


def _i8_vnni(fields, X, Ys, scratch):  # pragma: no cover - compiled
    kj._rows_i8_vnni(fields[0], fields[1], X, scratch[1][0], scratch[1][1], Ys)


def _q4(fields, X, Ys, scratch):  # pragma: no cover - compiled
    q = scratch[0]
    kj._rows_q4(fields[0], fields[1], fields[2], X, q[0], q[1], q[2], q[3], Ys)


def _q4k(fields, X, Ys, scratch):  # pragma: no cover - compiled
    q = scratch[0]
    kj._rows_q4k(fields[0], fields[1], fields[2], fields[3], X, q[0], q[1], q[2], q[3], Ys)


_run_f32, _run_i8, _run_i8_vnni, _run_q4, _run_q4k = (_kernel(run) for run in (_f32, _i8, _i8_vnni, _q4, _q4k))


@njit(nogil=True, cache=True)
def _products(group, X, Ys, scratch):  # pragma: no cover - compiled
    # Ys[i] = X Ws[i]^T for one group of up to three weights sharing X. group has one field per
    # format (FORMATS): () where no weight is in it, else that format's arrays for the three
    # weights, arrays of no rows for those in another format (a GGUF Q4_K_M file's q and k are
    # Q4_K, its v in some layers 8-bit): one kernel call per format present, and the call from
    # Python unboxes only the arrays of the formats present. scratch = (the int4 kernels' x blocks,
    # the int8 VNNI kernel's x bytes).
    _run_f32(group[0], X, Ys, scratch)
    _run_i8(group[1], X, Ys, scratch)
    _run_i8_vnni(group[2], X, Ys, scratch)
    _run_q4(group[3], X, Ys, scratch)
    _run_q4k(group[4], X, Ys, scratch)


@njit(nogil=True, cache=True)
def layer(H, bufs, sd, sh, T, starts, slots, eps, window, scale, rope, w_attn_norm, w_ffn_norm,
          qkv, qkv_bias, wo, w13, w2, KC, VC):  # pragma: no cover - compiled
    """H (R, dim) += attention(norm(H)), then H += feed_forward(norm(H)), in place. bufs: the work rows
    (XN, Q, K, V, Y, Z, G, U; P, E for SwiGLU; NONE, rows of no columns: the outputs of padding weights);
    sd, sh: x's quantized buffers for dim-wide and
    hidden-wide inputs; qkv, wo, w13, w2: product groups (see _products)."""
    XN, Q, K, V, Y, Z, G, U, P, E, NONE = bufs
    kj._rms_norm(H, w_attn_norm, eps, XN)
    _products(qkv, XN, (Q, K, V), sd)
    _rotate_and_cache(Q, K, V, qkv_bias[0], qkv_bias[1], qkv_bias[2], T, starts, slots, rope, KC, VC)
    _attend(Q, KC, VC, Y, T, starts, slots, window, scale)
    _products(wo, Y, (Z, NONE, NONE), sd)
    _add(H, Z)
    kj._rms_norm(H, w_ffn_norm, eps, XN)
    _products(w13, XN, (G, U, NONE), sd)
    _swiglu(G, U, P, E)
    _products(w2, G, (Z, NONE, NONE), sh)
    _add(H, Z)


@njit(nogil=True, cache=True)
def head(H, XN, eps, w_norm, group, out, none, sd):  # pragma: no cover - compiled
    """out = the final norm of H times the output head (a product group; `none`: rows of no columns, the
    outputs of its padding weights)."""
    kj._rms_norm(H, w_norm, eps, XN)
    _products(group, XN, (out, none, none), sd)


kj.drop_stale_cache(globals(), kj.__file__, kj.simd.__file__)
