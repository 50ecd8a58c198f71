"""Matrix-vector products for CPU decoding that read weights at the memory's speed (numba).

Decoding a few sequences multiplies a handful of rows by every weight matrix,
so the time is the time to read the weights. torch's CPU `F.linear` (MKL)
reads a (N, K) fp32 weight at 4-10 GB/s for one row on a 2-core
machine, where the memory gives ~20 GB/s; the kernels here, compiled by numba
(one row of W per task, across every core, SIMD over K), read at 17-21 GB/s
(BENCHMARKS.md). Weights stay where torch keeps them; the kernels
see them through zero-copy NumPy views.

`RowKernelLinear` (fp32 weights), `BF16WeightLinear` (bf16 weights, fp32
products) and the "numba" kernel of nabla.model.quantize (int8, int4) run up to
MAX_ROWS rows per call (decode steps); layers that share an input (q, k, v;
w1, w3) take one call (`project`). More rows (prefill) go to torch's matrix
products, which are compute-bound and good at it. Compiled code is cached on
disk after the first use.

Where numba is not installed everything falls back to torch.

Leaves out: deciding where the kernels run (nabla.device.row_kernels, applied
by nabla.model.prepare), the quantized layers (nabla.model.quantize), GPUs.
"""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_jit = None  # nabla.model.cpu_kernels_jit once loaded
_AVAILABLE = importlib.util.find_spec("numba") is not None

MAX_ROWS = 16
# Below this many weights a layer stays on torch: a kernel launch costs ~60 us from Python
# (measured here), more than torch spends on a matrix that small.
MIN_WEIGHTS = 1 << 16
# Models whose linear layers hold fewer bytes than this decode from the cache, not the
# memory, and do not pay numba's start-up (~1 s) for it (the built-in story model, 17 MB).
MIN_MODEL_BYTES = 32 << 20


def _norms_too(model: nn.Module) -> None:
    """Let the model's RMSNorm layers run the rms_norm kernel too (nabla.model.llama.RMSNorm.row_kernel)."""
    for mod in model.modules():
        if hasattr(mod, "row_kernel"):
            mod.row_kernel = True


def _has_vnni() -> bool:
    if not _AVAILABLE:
        return False
    from nabla.model.cpu_kernels_simd import KINDS

    return "vnni512" in KINDS


I8_VNNI = _has_vnni()
"""Whether int8 rows run in VNNI integer instructions (rows_i8_multi)."""


def _kernels():
    global _jit
    if _jit is None:
        from nabla.model import cpu_kernels_jit

        _jit = cpu_kernels_jit
    return _jit


# numba's fallback thread pool (workqueue, where no OpenMP/TBB is found) aborts the
# process if two threads launch parallel kernels at once; one launch at a time.
_launch = threading.Lock()


_threads = threading.local()  # .torch: torch's thread count when numba's was last set, in this thread


def _set_threads() -> None:
    """numba's thread count = torch's (numba's setting is per calling thread, hence the thread-local)."""
    now = torch.get_num_threads()
    if getattr(_threads, "torch", None) != now:
        import numba

        numba.set_num_threads(min(now, numba.config.NUMBA_NUM_THREADS))
        _threads.torch = now


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
    return _launch_rows(_kernels()._rows_f32, x, [w.shape[0] for w in weights], tuple(_np(w) for w in weights),
                        several=True)


def rows_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a few rows of fp32 x and an fp32 weight (N, K)."""
    return rows_f32_multi(x, [weight])[0]


def rows_i8_multi(x: torch.Tensor, qweights: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """[x @ (q * s[:, None]).T for q, s ...] for int8 weights (N, K) and fp32 row scales (N,), in one pass.

    On CPUs with AVX-512 VNNI (and K a multiple of 32) x is quantized to int8 per block of 32 and
    the products are integer dot products, as llama.cpp's q8_0 x q8_0; elsewhere the weights are
    widened to fp32 and x stays as it is."""
    K = x.shape[-1]
    if I8_VNNI and K % 32 == 0:
        X = x.reshape(-1, K).contiguous()
        B = X.shape[0]
        Ys = [torch.empty(B, q.shape[0], dtype=torch.float32) for q in qweights]
        with _launch:
            _set_threads()
            XU, DXE = _u8_buffers(B, K)
            _kernels()._rows_i8_vnni(tuple(_np(q) for q in qweights), tuple(_np(s) for s in scales), X.numpy(),
                                     XU, DXE, tuple(y.numpy() for y in Ys))
        return [y.view(*x.shape[:-1], y.shape[1]) for y in Ys]
    return _launch_rows(_kernels()._rows_i8, x, [q.shape[0] for q in qweights], tuple(_np(q) for q in qweights),
                        tuple(_np(s) for s in scales), several=True)


def _u8_buffers(B: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    key = ("u8", B, K)
    if key not in _buffers:
        _buffers[key] = (np.zeros((B, K), dtype=np.uint8), np.zeros((B, K // 4), dtype=np.float32))
    return _buffers[key]


def rows_i8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return rows_i8_multi(x, [qweight], [scale])[0]


def q4_arrays(packed: torch.Tensor, scales: torch.Tensor,
              mins: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The NumPy views rows_q4_multi reads (zero-copy; a layer keeps them to skip making them per call):
    (P, S, M), M the fp16 bits of `mins` (Q4_1's w = d * q + m; S's shape), or of shape (0, 0) for Q4_0."""
    S = _np(scales.view(torch.int16)).view(np.uint16)
    if mins is None:
        return _np(packed), S, np.empty((0, 0), dtype=np.uint16)
    if tuple(mins.shape) != tuple(scales.shape) or mins.dtype != torch.float16:
        raise ValueError(f"mins must be fp16 of the scales' shape {tuple(scales.shape)}, "
                         f"not {mins.dtype} {tuple(mins.shape)}")
    return _np(packed), S, _np(mins.view(torch.int16)).view(np.uint16)


def rows_q4_multi(x: torch.Tensor, weights: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[torch.Tensor]:
    """[x @ W.T for W in weights] for a few rows of fp32 x and weights in nabla's int4 blocks (Q4_0, or
    Q4_1's w = d * q + m where M is not empty; nabla.model.quantize; each given by q4_arrays), in one pass.

    As llama.cpp does, x is quantized to int8 per block of 32 (max |x| / 127), once for all the
    weights, and each block's product is an integer dot product scaled once
    (nabla.model.cpu_kernels_simd).
    """
    return _launch_4bit(_kernels()._rows_q4, x, weights)


def _launch_4bit(kernel, x: torch.Tensor, weights: list[tuple[np.ndarray, ...]]) -> list[torch.Tensor]:
    """kernel (cpu_kernels_jit._rows_q4 or _rows_q4k) over the weights' arrays, field by field, with x and
    its shared quantized buffers."""
    K = x.shape[-1]
    X = x.reshape(-1, K).contiguous()
    B = X.shape[0]
    Ys = [torch.empty(B, w[0].shape[0], dtype=torch.float32) for w in weights]
    with _launch:  # the quantized-x buffers are shared: one launch at a time
        _set_threads()
        kernel(*(tuple(w[i] for w in weights) for i in range(len(weights[0]))), X.numpy(),
               *_x_buffers(B, K // 32), tuple(y.numpy() for y in Ys))
    return [y.view(*x.shape[:-1], y.shape[1]) for y in Ys]


def q4k_arrays(packed: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor,
               dd: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The NumPy views rows_q4k_multi reads for one weight in llama.cpp's Q4_K (zero-copy):
    (P, SC, MN, DD). packed: uint8 (N, K/2), the nibbles in pack_int4's layout; sc, mn: uint8 (N, K/32),
    each block's 6-bit scale and min; dd: (N, K/128) fp16 (or its bits as int16 / uint16), per super-block
    of 256 weights d, then dmin. w = d * sc * q - dmin * mn. K must be a multiple of 256."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be 2-D uint8, not {packed.dtype} {tuple(packed.shape)}")
    N, K = packed.shape[0], 2 * packed.shape[1]
    if K % 256:
        raise ValueError(f"Q4_K rows hold whole super-blocks of 256 weights, not {K}")
    for name, t in (("sc", sc), ("mn", mn)):
        if tuple(t.shape) != (N, K // 32) or t.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8 of shape {(N, K // 32)}, not {t.dtype} {tuple(t.shape)}")
    if tuple(dd.shape) != (N, K // 128) or dd.dtype not in (torch.float16, torch.int16, torch.uint16):
        raise ValueError(f"dd must be fp16 (or its bits) of shape {(N, K // 128)}, not {dd.dtype} {tuple(dd.shape)}")
    DD = _np(dd if dd.dtype == torch.uint16 else dd.view(torch.int16))
    return _np(packed), _np(sc), _np(mn), DD.view(np.uint16)


def rows_q4k_multi(x: torch.Tensor,
                   weights: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> list[torch.Tensor]:
    """[x @ W.T for W in weights] for a few rows of fp32 x and weights in llama.cpp's Q4_K (each given by
    q4k_arrays), in one pass; x quantized per block of 32 as in rows_q4_multi."""
    return _launch_4bit(_kernels()._rows_q4k, x, weights)


_buffers: dict[tuple, tuple[np.ndarray, ...]] = {}


def new_x_buffers(B: int, G: int) -> tuple[np.ndarray, ...]:
    """(XL, XH, DX, XS): the int4 kernel's quantized x for B rows of G blocks, zeros, padded to whole
    chunks of 16 blocks (the padding stays zero: only the real blocks are written)."""
    padded = -(-G // 16) * 16
    return (np.zeros((B, 16 * padded), dtype=np.int8), np.zeros((B, 16 * padded), dtype=np.int8),
            np.zeros((B, padded), dtype=np.float32), np.zeros((B, padded), dtype=np.int32))


def _x_buffers(B: int, G: int) -> tuple[np.ndarray, ...]:
    """new_x_buffers(B, G), kept between calls."""
    key = (B, G)
    if key not in _buffers:
        _buffers[key] = new_x_buffers(B, G)
    return _buffers[key]


def rows_q4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
            mins: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T for a few rows of fp32 x and one weight in nabla's int4 blocks (see rows_q4_multi)."""
    return rows_q4_multi(x, [q4_arrays(packed, scales, mins)])[0]


def rows_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a few rows of fp32 x and a bf16 weight (N, K), products in fp32."""
    return _launch_rows(_kernels()._rows_bf16, x, [weight.shape[0]], _np(weight.view(torch.int16)))[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of a few fp32 rows (torch's CPU reductions cost ~30 us each on such small inputs)."""
    D = x.shape[-1]
    X = x.reshape(-1, D).contiguous()
    Y = torch.empty_like(X)
    _kernels()._rms_norm(X.numpy(), _np(weight), eps, Y.numpy())
    return Y.view(x.shape)


def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """[lin(x) for lin in linears]: one kernel call when they all run these kernels and the call is small."""
    if len(linears) > 1 and usable(x):
        if all(type(lin) is RowKernelLinear and lin.bias is None for lin in linears):
            return rows_f32_multi(x, [lin.weight for lin in linears])
        if all(getattr(lin, "kernel", None) == "numba" and lin.weight.dtype == torch.int8
               and lin.weight.numel() >= MIN_WEIGHTS for lin in linears):
            ys = rows_i8_multi(x, [lin.weight for lin in linears], [lin.scales for lin in linears])
            return [y if lin.bias is None else y + lin.bias for y, lin in zip(ys, linears)]
        if all(getattr(lin, "kernel", None) == "numba" and hasattr(lin, "q4_arrays") for lin in linears) \
                and len({lin.format == "Q4_K" for lin in linears}) == 1:
            rows = rows_q4k_multi if linears[0].format == "Q4_K" else rows_q4_multi
            ys = rows(x, [lin.q4_arrays() for lin in linears])
            return [y if lin.bias is None else y + lin.bias for y, lin in zip(ys, linears)]
    return [lin(x) for lin in linears]


def usable(x: torch.Tensor, any_rows: bool = False) -> bool:
    """Whether the kernels take this call: fp32 input on the CPU, outside autograd, a few rows (or any
    number, `any_rows`)."""
    return (_AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() > 0
            and not torch.is_grad_enabled() and (any_rows or x.numel() <= MAX_ROWS * x.shape[-1]))


def int8_any_rows(x: torch.Tensor) -> bool:
    """Whether int8 rows of any count (prefill too) run rows_i8: on CPUs with VNNI, where they are
    llama.cpp's q8_0 product (x in int8 per block of 32). Elsewhere prefill takes FBGEMM, whose x is one
    7-bit scale for the whole input."""
    return I8_VNNI and x.shape[-1] % 32 == 0 and usable(x, any_rows=True)


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
    if n and _AVAILABLE:
        _norms_too(model)
    return n


def use_row_kernels(model: nn.Module) -> int:
    """Make every plain fp32 nn.Linear of `model` with at least MIN_WEIGHTS weights a RowKernelLinear
    (in place), if the model is big enough to be read from memory (MIN_MODEL_BYTES); returns how many."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
               and m.weight.device.type == "cpu"]
    if not _AVAILABLE or sum(m.weight.numel() * 4 for m in linears) < MIN_MODEL_BYTES:
        return 0
    n = 0
    for mod in linears:
        if mod.weight.numel() >= MIN_WEIGHTS:
            mod.__class__ = RowKernelLinear  # same object, parameters and hooks; only forward changes
            n += 1
    if n:
        _norms_too(model)
    return n
