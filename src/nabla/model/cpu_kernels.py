"""Matrix-vector products for CPU decoding that read weights at the memory's speed (numba).

Decoding a few sequences multiplies a handful of rows by every weight matrix,
so the time is the time to read the weights. torch's CPU `F.linear` (MKL)
reads a (N, K) fp32 weight at 4-10 GB/s for one row on this project's 2-core
machine, where the memory gives ~20 GB/s; the kernels here, compiled by numba
(one row of W per task, across every core, SIMD over K), read at 17-21 GB/s
(BENCHMARKS.md, issue 9). Weights stay where torch keeps them; the kernels
see them through zero-copy NumPy views.

`RowKernelLinear` (fp32 weights), `BF16WeightLinear` (bf16 weights, fp32
products) and the "numba" kernel of nabla.model.quantize (int8, int4) run up to
MAX_ROWS rows per call (decode steps); layers that share an input (q, k, v;
w1, w3) take one call (`project`). More rows (prefill) go to torch's matrix
products, which are compute-bound and good at it. Compiled code is cached on
disk after the first use.

Where numba is not installed everything falls back to torch.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this keeps nabla usable without it
    numba = None

MAX_ROWS = 16


def available() -> bool:
    return numba is not None


if numba is not None:

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
        # As _rows_f32, with int8 weights and one scale per row.
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


# numba's fallback thread pool (workqueue, where no OpenMP/TBB is found) aborts the
# process if two threads launch parallel kernels at once; one launch at a time.
_launch = threading.Lock()


def _set_threads() -> None:
    want = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)


def _launch_rows(kernel, x: torch.Tensor, widths: list[int], *weights, several: bool = False) -> list[torch.Tensor]:
    """Run a row kernel on the rows of x (..., K): outputs (..., n) for each n in `widths`."""
    X = x.reshape(-1, x.shape[-1]).contiguous()
    Ys = [torch.empty(X.shape[0], n, dtype=torch.float32) for n in widths]
    out = tuple(y.numpy() for y in Ys) if several else Ys[0].numpy()
    with _launch:
        _set_threads()
        kernel(*weights, X.numpy(), out)
    return [y.view(*x.shape[:-1], y.shape[1]) for y in Ys]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def rows_f32_multi(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """[x @ w.T for w in weights] for a few rows of fp32 x and fp32 weights (N, K), in one pass."""
    return _launch_rows(_rows_f32, x, [w.shape[0] for w in weights], tuple(_np(w) for w in weights),
                        several=True)


def rows_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a few rows of fp32 x and an fp32 weight (N, K)."""
    return rows_f32_multi(x, [weight])[0]


def rows_i8_multi(x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """[x @ (q * s[:, None]).T for q, s ...] for int8 weights (N, K) and fp32 row scales (N,), in one pass."""
    return _launch_rows(_rows_i8, x, [q.shape[0] for q in qweights], tuple(_np(q) for q in qweights),
                        tuple(_np(s) for s in scales), several=True)


def rows_i8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return rows_i8_multi(x, [qweight], [scale])[0]


def rows_i4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """x @ W.T for a few rows of fp32 x and W in nabla's int4 groups (nabla.model.quantize)."""
    return _launch_rows(_rows_i4, x, [packed.shape[0]], _np(packed), _np(scales), _np(mins))[0]


def rows_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a few rows of fp32 x and a bf16 weight (N, K), products in fp32."""
    return _launch_rows(_rows_bf16, x, [weight.shape[0]], _np(weight.view(torch.int16)))[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of a few fp32 rows (torch's CPU reductions cost ~30 us each on such small inputs)."""
    D = x.shape[-1]
    X = x.reshape(-1, D).contiguous()
    Y = torch.empty_like(X)
    _rms_norm(X.numpy(), _np(weight), eps, Y.numpy())
    return Y.view(x.shape)


def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """[lin(x) for lin in linears]: one kernel call when they all run these kernels and the call is small."""
    if len(linears) > 1 and usable(x):
        if all(type(lin) is RowKernelLinear and lin.bias is None for lin in linears):
            return rows_f32_multi(x, [lin.weight for lin in linears])
        if all(getattr(lin, "kernel", None) == "numba" and lin.weight.dtype == torch.int8 for lin in linears):
            return rows_i8_multi(x, [lin.weight for lin in linears], [lin.scales for lin in linears])
    return [lin(x) for lin in linears]


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels take this call: fp32 input on the CPU, outside autograd, a few rows."""
    return (numba is not None and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() > 0
            and not torch.is_grad_enabled() and x.numel() <= MAX_ROWS * x.shape[-1])


class RowKernelLinear(nn.Linear):
    """nn.Linear whose decode-sized calls run `rows_f32`; same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and self.weight.dtype == torch.float32 and usable(x):
            return rows_f32(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class BF16WeightLinear(nn.Linear):
    """nn.Linear with its weight stored in bf16 and products in fp32, for CPUs without bf16 arithmetic:
    half the bytes of fp32 to read, none of the slowness of bf16 matrix products there (nabla.device.
    bf16_weights_only). Decode-sized calls run `rows_bf16`; larger ones upcast the weight once per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and usable(x):
            return rows_bf16(x, self.weight)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def use_bf16_weights(model: nn.Module) -> int:
    """Store every plain linear weight of an fp32 `model` in bf16, products staying fp32 (in place).

    A head tied to the token embedding stays fp32 (the embedding is read a row at a time
    and kept in the compute dtype). Returns how many layers changed.
    """
    emb = getattr(getattr(model, "tok_embeddings", None), "weight", None)
    n = 0
    for mod in model.modules():
        if type(mod) in (nn.Linear, RowKernelLinear) and mod.weight.dtype == torch.float32 \
                and mod.weight is not emb:
            mod.weight.data = mod.weight.data.to(torch.bfloat16)
            mod.__class__ = BF16WeightLinear
            n += 1
    return n


def use_row_kernels(model: nn.Module) -> int:
    """Make every plain fp32 nn.Linear of `model` a RowKernelLinear (in place); returns how many."""
    if numba is None:
        return 0
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu":
            mod.__class__ = RowKernelLinear  # same object, parameters and hooks; only forward changes
            n += 1
    return n
