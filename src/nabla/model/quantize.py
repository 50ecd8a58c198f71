"""Weight-only quantization of the linear layers, applied after loading.

int8: one scale per output channel, symmetric, w ~ q * s with q in [-127, 127].
int4: llama.cpp's Q4_0, bit for bit: one fp16 scale per block of 32 input
channels, w ~ (q - 8) * d with q in [0, 15], two values packed per byte (in the
order nabla's CPU kernel reads them, `pack_int4`). A layer may also hold
llama.cpp's Q4_1 blocks (an fp16 minimum per block, w = d * q + m) or its Q4_K
super-blocks (6-bit scales and minimums per block of 32 under an fp16 d and
dmin per 256), the same nibbles: that is how a GGUF file's Q4_1 and Q4_K tensors
load, as they are (Int4Linear.format; nabla.checkpoint.gguf_quantized). nabla's
own quantizer makes Q4_0. Fewer bytes per weight means fewer bytes read per decoded
token, which is what bounds decoding speed.

`quantize_model(model, "int8" | "int4")` swaps every `nn.Linear` of the blocks
and the output head for an `Int8Linear` / `Int4Linear` under the same name
(`layers.0.attention.wq` stays `wq`); the token embedding (one row read per
token) and the norms stay as they are. Under int4 the output head, and any
layer whose input width is not a multiple of the group, use int8: the head is
where quantization error shows most.

Which kernel computes the product is nabla.device's choice (`quantized_kernel`),
measured on the machine it targets; every kernel takes the same stored
weights:

- "numba" (CPUs with numba): nabla.model.cpu_kernels' kernels for
  decode-sized calls, reading the int8 / int4 bytes at the memory's speed:
  int8 is weight-only (exact up to the weight quantization); int4 quantizes
  x to int8 per block and multiplies in integers, as llama.cpp's Q4_0 x Q8_0
  (nabla.model.cpu_kernels_simd). Larger calls (prefill) take "fbgemm" for
  int8 where torch has it and rebuild the weight for int4.
- "fbgemm" (int8, x86 CPUs): torch's FBGEMM dynamic int8 linear; the input is
  also quantized, per call, to 8 bits. The fastest here by far at batch > 1.
- "int8pack" / "int4pack": torch's weight-only kernels
  (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`); exact up to the
  weight quantization. int4pack serves decode (a few rows); prefill rebuilds
  the weight in the compute dtype once per call instead, which is faster.
- "dequant": rebuild the weight in the compute dtype and call F.linear
  (any device; the reference the others are tested against).

`quantize_state` makes the same tensors from a plain state dict, which is what
`nabla convert --quantize` saves (with a quantization.json beside params.json)
and `Llama.build` loads back without quantizing again.

Leaves out: activation outliers handling (SmoothQuant, GPTQ/AWQ calibration).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nabla.errors import ConfigError
from nabla.model import cpu_kernels

MODES = ("int8", "int4")
PLAIN = (nn.Linear, cpu_kernels.RowKernelLinear, cpu_kernels.BF16WeightLinear)  # what quantize_model replaces
KERNELS = ("numba", "fbgemm", "int8pack", "int4pack", "dequant")
GROUP_SIZE = 32
INT4_LAYOUT = "q4_0/chunks-of-16"
"""quantization.json's name for how int4 weights are stored (pack_int4): Q4_0 blocks, 16 to a chunk."""
# Above this many rows (prefill) torch's int4pack CPU kernel is slower than
# rebuilding the fp32 weight once and calling F.linear (measured, BENCHMARKS.md).
INT4PACK_MAX_ROWS = 4
# At or below this many rows (decode) FBGEMM's dynamic linear runs on one
# thread: on 2 cores its threaded path made 110M int8 decode 6x slower
# (0.63 vs 3.96 tok/s, same process, alternating; BENCHMARKS.md).
FBGEMM_SERIAL_ROWS = 16


# ---------------------------------------------------------------- the maths
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scales float32 (N,)) with w ~ q * scales[:, None]; error <= scale/2."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[:, None]


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K) in 0..15, scales float16 (N, K/g)) with w ~ (q - 8) * scale, llama.cpp's Q4_0.

    Per block of g weights, as llama.cpp's quantize_row_q4_0 (bit for bit, tested against
    the gguf package): d = (the weight of largest magnitude) / -8, q = min(15, trunc(w / d + 8.5)),
    d stored in fp16. The error is at most about half a step, |d| / 2.
    """
    N, K = w.shape
    if K % group_size or group_size % 2:
        raise ConfigError(f"int4 needs the input width ({K}) to be a multiple of the group size ({group_size}), "
                          "and an even group size")
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    idx = wg.abs().argmax(dim=-1, keepdim=True)  # the first of equal magnitudes, as llama.cpp's loop
    d = wg.gather(-1, idx) / -8
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = (wg * inv + 8.5).trunc().clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), d.squeeze(-1).to(torch.float16)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> torch.Tensor:
    """(q - 8) * d per block (Q4_0), or d * q + m with `mins` (Q4_1), in float32."""
    N, K = q.shape
    g = K // scales.shape[1]
    if mins is None:
        w = (q.float().reshape(N, -1, g) - 8) * scales.float()[..., None]
    else:
        w = q.float().reshape(N, -1, g) * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(N, K)


def pack_int4(q: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """(N, K) values in 0..15 -> (N, K/2) bytes, laid out for the CPU kernel.

    Within a block of 32, byte j (j < 16) holds weight j in its low nibble and weight
    16 + j in its high one, as llama.cpp's Q4_0 block does. A row's blocks go in chunks of 16,
    and within a chunk byte j of block kk sits at 64 (j // 4) + 4 kk + j % 4: one 64-byte load
    then holds four bytes of each of 16 blocks (nabla.model.cpu_kernels_simd). A last chunk of
    m < 16 blocks keeps the same order in four groups of 4m bytes.
    """
    N, K = q.shape
    if group_size != GROUP_SIZE:
        raise ConfigError(f"int4 blocks hold {GROUP_SIZE} weights (llama.cpp's Q4_0), not {group_size}")
    G = K // 32
    qg = q.reshape(N, G, 32)
    blocks = qg[..., :16] | (qg[..., 16:] << 4)  # (N, G, 16): llama.cpp's byte order
    full, m = divmod(G, 16)
    head = blocks[:, : 16 * full].reshape(N, full, 16, 4, 4).transpose(2, 3).reshape(N, -1)
    tail = blocks[:, 16 * full:].reshape(N, m, 4, 4).transpose(1, 2).reshape(N, -1)
    return torch.cat((head, tail), dim=1).contiguous()


def unpack_int4(packed: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """pack_int4's inverse: (N, K/2) bytes -> (N, K) values in 0..15."""
    N, H = packed.shape
    G = H // 16
    full, m = divmod(G, 16)
    head = packed[:, : 256 * full].reshape(N, full, 4, 16, 4).transpose(2, 3).reshape(N, 16 * full, 16)
    tail = packed[:, 256 * full:].reshape(N, 4, m, 4).transpose(1, 2).reshape(N, m, 16)
    blocks = torch.cat((head, tail), dim=1)
    return torch.cat((blocks & 15, blocks >> 4), dim=-1).reshape(N, 2 * H)


def int4_from_q4_0(raw: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, scales) of Int4Linear from a GGUF Q4_0 tensor's bytes (18 per block of 32:
    fp16 d, then 16 bytes of nibbles): the same numbers, rearranged, nothing requantized."""
    N, K = shape
    G = K // 32
    blocks = raw.reshape(N, G, 18)
    scales = blocks[..., :2].contiguous().view(torch.float16).reshape(N, G)
    q = torch.cat((blocks[..., 2:] & 15, blocks[..., 2:] >> 4), dim=-1).reshape(N, K)
    return pack_int4(q), scales


# ------------------------------------------------------------------ modules
class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 per-channel (buffers `weight`, `scales`)."""

    def __init__(self, weight: torch.Tensor, kernel: str = "dequant", bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        q, scales = quantize_int8(weight)
        self.register_buffer("weight", q.to(weight.device))
        self.register_buffer("scales", scales.to(weight.device))
        self.kernel = kernel
        self._packed = None  # FBGEMM's prepacked weight, built on first use

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._product(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # biases stay in float (Qwen2's q/k/v)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        if kernel == "numba":
            if cpu_kernels.int8_any_rows(x) or (cpu_kernels.usable(x) and
                                                self.weight.numel() >= cpu_kernels.MIN_WEIGHTS):
                return cpu_kernels.rows_i8(x, self.weight, self.scales)
            kernel = "fbgemm" if _has_fbgemm() else "dequant"  # prefill, or a small layer
        if kernel == "fbgemm":
            if self._packed is None:
                self._packed = _fbgemm_prepack(self.weight, self.scales)
            x2 = x.reshape(-1, self.in_features).float()
            threads = torch.get_num_threads()
            serial = threads > 1 and x2.shape[0] <= FBGEMM_SERIAL_ROWS
            if serial:
                torch.set_num_threads(1)
            try:
                # reduce_range=True: 7-bit inputs, so AVX2's 16-bit pair sums cannot saturate.
                y = torch.ops.quantized.linear_dynamic(x2, self._packed, True)
            finally:
                if serial:
                    torch.set_num_threads(threads)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        if kernel == "int8pack":
            x2 = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(x.dtype))
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, kernel={self.kernel}"


class Int4Linear(nn.Module):
    """y = x W^T with W in 4-bit blocks: buffers `weight` (packed (N, K/2) as `pack_int4` lays it out),
    `scales`, and for Q4_1 `mins`, for Q4_K `mins` and `super_scales` (what each holds: `format`)."""

    def __init__(self, weight: torch.Tensor | None, kernel: str = "dequant", group_size: int = GROUP_SIZE,
                 bias: torch.Tensor | None = None, blocks: tuple[torch.Tensor, ...] | None = None):
        super().__init__()
        mins = supers = None
        if blocks is None:
            q, scales = quantize_int4(weight, group_size)
            packed = pack_int4(q, group_size).to(weight.device)
            scales = scales.to(weight.device)
        else:  # already quantized, e.g. a GGUF file's blocks (see `format`)
            packed, scales, mins, supers = (*blocks, None, None)[:4]
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.group_size = group_size
        self.register_buffer("weight", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)  # None: not in the state dict
        self.register_buffer("super_scales", supers)
        self.kernel = kernel
        self._packed = None  # (torch's int4pack layout, scales_and_zeros), built on first use
        self._arrays = None  # (weight, scales, mins, super_scales, their NumPy views) for the numba kernel

    @property
    def format(self) -> str:
        """The blocks held, as llama.cpp names them (q: the 4-bit values, 0..15; per block of 32):
        "Q4_0": `scales` fp16 d, w = (q - 8) * d;
        "Q4_1": `scales` fp16 d and `mins` fp16 m, w = d * q + m;
        "Q4_K": `scales` and `mins` uint8 (6-bit sc and mn), and per 256 weights `super_scales` fp16
        (d, dmin) side by side: w = d * sc * q - dmin * mn."""
        return "Q4_K" if self.super_scales is not None else "Q4_1" if self.mins is not None else "Q4_0"

    def block_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d, m) per block of 32 in float32, w = d * q + m, or (d, None) for Q4_0's w = (q - 8) * d. Q4_K's
        d * sc and dmin * mn are exact in float32, as llama.cpp computes them."""
        if self.super_scales is None:
            return self.scales.float(), None if self.mins is None else self.mins.float()
        d, dmin = (self.super_scales[:, i::2].float().repeat_interleave(8, dim=1) for i in (0, 1))  # per block
        return d * self.scales.float(), -(dmin * self.mins.float())

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.weight, self.group_size), *self.block_scales())

    def lay_out(self, fmt: str) -> None:
        """Empty buffers in `fmt`'s shapes and types (Q4_0 as made), for a stored state to load into."""
        N, G = self.out_features, self.in_features // self.group_size
        empty = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device=self.weight.device)  # noqa: E731
        if fmt == "Q4_1":
            self.mins = empty(N, G, dtype=torch.float16)
        elif fmt == "Q4_K":
            self.scales, self.mins = empty(N, G, dtype=torch.uint8), empty(N, G, dtype=torch.uint8)
            self.super_scales = empty(N, G // 4, dtype=torch.float16)
        elif fmt != "Q4_0":
            raise ConfigError(f"unknown int4 block format {fmt!r}: Q4_0, Q4_1 or Q4_K")
        self._packed = self._arrays = None

    def q4_arrays(self):
        """The zero-copy NumPy views of the weight the CPU kernel reads (cpu_kernels.q4_arrays, or for Q4_K
        q4k_arrays), made once per weight tensor."""
        held = (self.weight, self.scales, self.mins, self.super_scales)
        if self._arrays is None or any(a is not b for a, b in zip(self._arrays[:4], held)):
            views = cpu_kernels.q4k_arrays(*held) if held[3] is not None else cpu_kernels.q4_arrays(*held[:3])
            self._arrays = (*held, views)
        return self._arrays[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._product(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "numba" and cpu_kernels.usable(x):  # small layers too: int4 has no other fast path
            rows = cpu_kernels.rows_q4k_multi if self.super_scales is not None else cpu_kernels.rows_q4_multi
            return rows(x, [self.q4_arrays()])[0]
        if self.kernel == "int4pack" and x.numel() <= INT4PACK_MAX_ROWS * self.in_features:
            if self._packed is None:
                q = unpack_int4(self.weight, self.group_size).to(torch.int32)
                # torch's layout reads w = (q - 8) * scale + zero: Q4_0's zero is 0, the others' m + 8 d.
                d, m = self.block_scales()
                s = d.t()
                zero = torch.zeros_like(s) if m is None else m.t() + 8 * s
                sz = torch.stack((s, zero), dim=-1).contiguous()
                self._packed = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz)
            packed, sz = self._packed
            x2 = x.reshape(-1, self.in_features).float()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
            return y.view(*x.shape[:-1], self.out_features).type_as(x)
        return F.linear(x, self.dequantize().to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 ({self.format}) group {self.group_size}, kernel={self.kernel}")


def _has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


def _fbgemm_prepack(q: torch.Tensor, scales: torch.Tensor):
    with warnings.catch_warnings():  # torch marks its quantized tensor type deprecated; the op is the fast one
        warnings.simplefilter("ignore")
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q.cpu(), scales.cpu().double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


# -------------------------------------------------------------- whole model
def quantize_model(model: nn.Module, mode: str, kernel: str | None = None,
                   group_size: int = GROUP_SIZE, device: torch.device | None = None,
                   head: str = "int8", int8_layers=(), int4_formats=None) -> nn.Module:
    """Swap the model's linear layers for quantized ones in place; returns the model.

    `kernel` None asks nabla.device for the fastest measured kernel on
    `device` (default: the model's). On a model on the meta device this only
    lays out the quantized buffers, for a saved quantized state to load into.
    `head` "int4" makes the output head int4 too; `int8_layers` (Meta weight
    names) stay int8 under int4 (a GGUF file's layers stored above 4 bits); `int4_formats` ({Meta weight
    name ("output.weight" for the head): "Q4_1" or "Q4_K"}) lays those int4 layers out in that format
    (Int4Linear.format), for a GGUF file's blocks to load into.
    """
    from nabla import device as devices

    if mode not in MODES:
        raise ConfigError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")
    if kernel is not None and kernel not in KERNELS:
        raise ConfigError(f"unknown quantized kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    dev = device or model.tok_embeddings.weight.device
    k8 = kernel if kernel in ("numba", "fbgemm", "int8pack", "dequant") else devices.quantized_kernel(dev, "int8")
    k4 = kernel if kernel in ("numba", "int4pack", "dequant") else devices.quantized_kernel(dev, "int4")
    eight, formats = set(int8_layers), dict(int4_formats or {})
    targets = [(layer, part, name) for layer in range(len(model.layers))
               for part, names in (("attention", ("wq", "wk", "wv", "wo")), ("feed_forward", ("w1", "w2", "w3")))
               for name in names]
    with torch.no_grad():
        for layer, part, name in targets:
            parent = getattr(model.layers[layer], part)
            lin = getattr(parent, name)
            if type(lin) not in PLAIN:
                continue  # already quantized, or a layer type this module does not know
            w = lin.weight
            if mode == "int4" and w.shape[1] % group_size == 0 and \
                    f"layers.{layer}.{part}.{name}.weight" not in eight:
                new = Int4Linear(w, k4, group_size, bias=lin.bias)
                new.lay_out(formats.get(f"layers.{layer}.{part}.{name}.weight", "Q4_0"))
            else:
                new = Int8Linear(w, k8, bias=lin.bias)
            setattr(parent, name, new)
            del lin, w
        if type(model.output) in PLAIN:  # int8 unless told (a GGUF file whose head is Q4_0)
            w = model.output.weight
            model.output = Int4Linear(w, k4, group_size) if head == "int4" else Int8Linear(w, k8)
            if head == "int4":
                model.output.lay_out(formats.get("output.weight", "Q4_0"))
    if "numba" in (k8, k4):
        cpu_kernels._norms_too(model)
    model.quantization = mode
    return model


def quantized_weights(args) -> set[str]:
    """The Meta names of the linear weights quantize_model replaces (the output head aside)."""
    parts = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    return {f"layers.{i}.{p}.weight" for i in range(args.n_layers) for p in parts}


def quantize_state(state, args, mode: str, group_size: int = GROUP_SIZE) -> dict[str, torch.Tensor]:
    """The state dict `quantize_model(mode)` would give a model holding `state` (Meta names).

    Quantized layers hold `weight` (int8, or packed int4) and `scales`; a head tied to the
    embedding gets its own int8 `output.weight`.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")
    layers = quantized_weights(args)
    out: dict[str, torch.Tensor] = {}
    keys = list(state.keys())
    if "output.weight" not in keys:
        keys.append("output.weight")  # tied: the head becomes a quantized copy of the embedding
    for key in keys:
        t = state[key] if key in state else state["tok_embeddings.weight"]
        if key not in layers and key != "output.weight":
            out[key] = t
            continue
        base = key[: -len("weight")]
        if mode == "int4" and key in layers and t.shape[1] % group_size == 0:
            q, scales = quantize_int4(t, group_size)
            out[key], out[base + "scales"] = pack_int4(q, group_size), scales
        else:
            out[key], out[base + "scales"] = quantize_int8(t)
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every tensor once, the embedding one row."""
    emb = model.tok_embeddings.weight
    total = emb[0].numel() * emb.element_size()
    if getattr(model.output, "weight", None) is emb:  # tied head: the whole matrix is read
        total += emb.numel() * emb.element_size()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is emb or name == "rope" or ".cache." in name:
            continue
        total += t.numel() * t.element_size()
    return total
