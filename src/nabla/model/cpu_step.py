"""A decode step (or a short prefill) of a plain Llama on the CPU in one numba call per layer.

A decode step of a 110M model in torch runs some 300 small operators around its 50 matrix
products; on a 2-core CPU their dispatch took 4 of the step's 7 ms (int4, measured with
torch.profiler, BENCHMARKS.md), where llama.cpp's whole step took 3. Here each layer is one
compiled function (nabla.model.cpu_step_jit) that calls the product kernels of
nabla.model.cpu_kernels_jit directly, and does the norms, the rotation, the cache write,
attention and SwiGLU in plain loops between them.

It takes a model whose layers already run those kernels (fp32 row kernels, int8 or int4 "numba"
layers; `Transformer.norm.row_kernel` says nabla.model.cpu_kernels chose them) and whose layers
are Llama's: Llama, Mistral and Qwen2-style q/k/v biases; no per-head norms, soft caps, (1 + w)
norms, post-norms, GeGLU or length-dependent rotations (those keep the torch path, as do LoRA
layers, which are other modules). A call takes it when it has at most cpu_kernels.MAX_ROWS rows
and runs outside autograd, with each sequence at its own position and cache row or not (the
server's batches, `start_pos` a tensor and `rows`); the model then computes what its torch layers
compute, up to float32 rounding.

Leaves out: the compiled functions (cpu_step_jit), the product kernels (cpu_kernels_jit), GPUs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nabla.model import cpu_kernels
from nabla.model.rope import LENGTH_DEPENDENT


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


_EMPTY = {"f32": (np.empty((0, 0), np.float32),), "i8": (np.empty((0, 0), np.int8), np.empty(0, np.float32)),
          "q4": (np.empty((0, 0), np.uint8), np.empty((0, 0), np.uint16), np.empty((0, 0), np.uint16)),
          "q4k": (np.empty((0, 0), np.uint8), np.empty((0, 0), np.uint8), np.empty((0, 0), np.uint8),
                  np.empty((0, 0), np.uint16))}
_EMPTY["i8_vnni"] = _EMPTY["i8"]
"""A weight of no rows in each format's arrays (cpu_step_jit.FORMATS)."""


def _format(lin: nn.Module):
    """(format, its arrays) of a linear layer the kernels run (cpu_step_jit.FORMATS: the fp32 weight; the
    int8 weight and row scales; int4 blocks, scales and minimums, or an empty array (Q4_0); Q4_K blocks,
    scales, minimums and super-block scales), or None."""
    from nabla.model.quantize import Int4Linear, Int8Linear

    w = lin.weight
    if type(lin) in (nn.Linear, cpu_kernels.RowKernelLinear) and w.dtype == torch.float32:
        return "f32", (_np(w),)
    if type(lin) is Int8Linear and lin.kernel == "numba":
        vnni = cpu_kernels.I8_VNNI and lin.in_features % 32 == 0
        return ("i8_vnni" if vnni else "i8"), (_np(w), _np(lin.scales))
    if type(lin) is Int4Linear and lin.kernel == "numba" and lin.group_size == 32:
        return ("q4k" if lin.format == "Q4_K" else "q4"), lin.q4_arrays()
    return None


def _group(*linears: nn.Module):
    """The product group of (up to three) linears sharing an input (cpu_step_jit._products), or None
    unless the kernels run each: per format (cpu_step_jit.FORMATS), () where none of them is in it, else
    its arrays for three weights, those in other formats (a GGUF Q4_K_M file's q and k are Q4_K, its v
    in some layers 8-bit) and the padding of fewer than three given as weights of no rows. Three
    always, so that each kernel is compiled for one tuple length only (the first run compiled twelve
    kernels, 37 s, where four do)."""
    from nabla.model import cpu_step_jit as sj

    formats = [_format(lin) for lin in linears]
    if any(f is None for f in formats):
        return None
    formats += [(None, ())] * (3 - len(formats))
    present = {f for f, _ in formats}
    return tuple(tuple(zip(*(arrays if f == fmt else _EMPTY[fmt] for f, arrays in formats)))
                 if fmt in present else () for fmt in sj.FORMATS)


def _bias(lin: nn.Module) -> np.ndarray:
    b = getattr(lin, "bias", None)
    if b is None:
        return np.zeros(lin.out_features, dtype=np.float32)
    return _np(b.float())  # a view of an fp32 bias: changes to it in place are seen


def _plain(model) -> bool:
    a = model.args
    return (not a.qk_norm and not a.norm_unit_offset and not a.post_norms and a.hidden_act == "silu"
            and a.attn_logit_softcap is None and a.final_logit_softcap is None and not a.scale_embeddings
            and model.rope_kind not in LENGTH_DEPENDENT and a.head_dim % 2 == 0
            and a.n_heads % a.n_kv_heads == 0)


class CpuStep:
    """The compiled layers of one model, with the arrays they read; made by `for_model`."""

    def __init__(self, model, layers, head):
        self.model, self.layers, self.head = model, layers, head
        self.args = model.args
        self.embeddings, self.norm = _np(model.tok_embeddings.weight), _np(model.norm.weight)
        self._bufs: dict[int, tuple] = {}  # rows -> work buffers
        self._steps: dict[tuple, tuple] = {}  # (B, T, last_only) -> (rotary table, the calls; see _calls)

    @classmethod
    def for_model(cls, model) -> CpuStep | None:
        """The step for `model`, or None where its layers or architecture are not ones it runs."""
        if not cpu_kernels._AVAILABLE or not getattr(model.norm, "row_kernel", False) or not _plain(model):
            return None
        if model.tok_embeddings.weight.device.type != "cpu" or model.tok_embeddings.weight.dtype != torch.float32:
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules() if m is not model):
            return None  # a hook on a layer must see it run
        layers = []
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            groups = (_group(a.wq, a.wk, a.wv), _group(a.wo), _group(f.w1, f.w3), _group(f.w2))
            norms = (layer.attention_norm.weight, layer.ffn_norm.weight)
            if any(g is None for g in groups) or a.cache is None or any(w.dtype != torch.float32 for w in norms):
                return None
            if getattr(f.w1, "bias", None) is not None or getattr(a.wo, "bias", None) is not None:
                return None
            layers.append((
                a.window or 0, float(a.scale if a.scale is not None else a.head_dim ** -0.5),
                _np(norms[0]), _np(norms[1]), groups[0], tuple(_bias(x) for x in (a.wq, a.wk, a.wv)),
                *groups[1:], _np(a.cache.k), _np(a.cache.v)))
        head = _group(model.output)
        if head is None or model.norm.weight.dtype != torch.float32:
            return None
        return cls(model, layers, head)

    def positions(self, tokens: torch.Tensor, start_pos, rows):
        """(starts, cache rows) as int64 arrays (B,) where this call (tokens (B, T) at `start_pos`, an int
        or a tensor, in cache `rows` or 0..B-1) runs here, else None."""
        B, T = tokens.shape
        m = self.model
        if B * T > cpu_kernels.MAX_ROWS or tokens.device.type != "cpu" or torch.is_grad_enabled() or m.training \
                or tokens.dtype != torch.long or tokens.numel() == 0:
            return None
        if isinstance(start_pos, int):
            starts = np.full(B, start_pos, dtype=np.int64)
        elif isinstance(start_pos, torch.Tensor) and start_pos.device.type == "cpu" and start_pos.numel() in (1, B) \
                and not start_pos.is_floating_point():
            starts = np.ascontiguousarray(start_pos.reshape(-1).expand(B).numpy(), dtype=np.int64)
        else:
            return None
        if rows is None:
            slots = np.arange(B, dtype=np.int64)
        elif rows.device.type == "cpu" and rows.shape == (B,) and not rows.is_floating_point():
            slots = np.ascontiguousarray(rows.numpy(), dtype=np.int64)
        else:
            return None
        cache = self.layers[0][-1]  # (rows, kv heads, length, head dim)
        if starts.min() < 0 or starts.max() + T > min(cache.shape[2], m.rope.shape[0]) \
                or slots.min() < 0 or slots.max() >= cache.shape[0]:
            return None  # the torch layers say what is wrong
        ids = tokens.numpy()
        if ids.min() < 0 or ids.max() >= self.embeddings.shape[0]:
            return None
        return starts, slots

    def __call__(self, tokens: torch.Tensor, starts: np.ndarray, slots: np.ndarray, last_only: bool) -> torch.Tensor:
        """Logits (B, T or 1, vocab) in float32, as Transformer.forward."""
        from nabla.model import cpu_step_jit as sj  # numba: imported once a model takes the step

        B, T = tokens.shape
        logits = torch.empty(B if last_only else B * T, self.args.vocab_size, dtype=torch.float32)
        with cpu_kernels._launch:  # the buffers are shared (the kernels' too): one step at a time
            h, where, calls, final = self._calls(B, T, last_only)
            np.take(self.embeddings, tokens.numpy().reshape(-1), axis=0, out=h)  # the hidden rows
            where[0][:], where[1][:] = starts, slots
            cpu_kernels._set_threads()
            for args in calls:
                sj.layer(*args)
            last, *rest = final
            if last is not h:
                last[:] = h[T - 1::T]
            sj.head(last, *rest[:4], logits.numpy(), *rest[4:])
        return logits.view(B, 1 if last_only else T, self.args.vocab_size)

    def _calls(self, B: int, T: int, last_only: bool):
        """(hidden rows, (starts, cache rows), each layer's arguments, the head's) for calls of B x T tokens,
        made once: a step then fills the first two and runs the rest."""
        key = (B, T, last_only)
        if key in self._steps and self._steps[key][0] is self.model.rope:
            return self._steps[key][1]
        R, a = B * T, self.args
        rope = self.model.rope  # init_rope may make a new table: the calls are remade then
        bufs, sd, sh = self._buffers(R)
        h = np.zeros((R, a.dim), dtype=np.float32)
        where = (np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64))
        eps = float(a.norm_eps)
        calls = tuple((h, bufs, sd, sh, T, *where, eps, *x[:2], _np(rope), *x[2:]) for x in self.layers)
        last = h if not last_only or T == 1 else np.zeros((B, a.dim), dtype=np.float32)
        head_bufs, head_scratch, _ = self._buffers(last.shape[0])
        final = (last, np.empty_like(last), eps, self.norm, self.head, head_bufs[-1], head_scratch)
        self._steps[key] = (rope, (h, where, calls, final))
        return self._steps[key][1]

    def _buffers(self, R: int):
        if R not in self._bufs:
            a = self.args
            q_w, kv_w = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
            widths = (a.dim, q_w, kv_w, kv_w, q_w, a.dim, a.hidden_dim, a.hidden_dim)
            bufs = tuple(np.zeros((R, n), dtype=np.float32) for n in widths) + (
                np.zeros((1, a.hidden_dim), dtype=np.float32), np.zeros((1, a.hidden_dim), dtype=np.int32),
                np.zeros((R, 0), dtype=np.float32))
            self._bufs[R] = (bufs, self._scratch(R, a.dim), self._scratch(R, a.hidden_dim))
        return self._bufs[R]

    def _scratch(self, R: int, K: int):
        """x's quantized buffers for R rows of inputs K wide: (int4 kernels' blocks, int8 VNNI's bytes)."""
        u8 = (np.zeros((R, K), dtype=np.uint8), np.zeros((R, K // 4), dtype=np.float32))
        return cpu_kernels.new_x_buffers(R, K // 32), u8


def run(model, tokens: torch.Tensor, start_pos, rows, last_only: bool) -> torch.Tensor | None:
    """The logits of this pass of `model` computed here, or None where it does not run here. The model's
    CpuStep is made on first use and again whenever its layers or cache changed (kept as
    `model.cpu_step`: (key, step or None))."""
    key = _key(model)
    if model.cpu_step is None or model.cpu_step[0] != key:
        model.cpu_step = (key, CpuStep.for_model(model))
    step = model.cpu_step[1]
    where = step.positions(tokens, start_pos, rows) if step is not None else None
    return None if where is None else step(tokens, *where, last_only)


def _key(model) -> tuple:
    """What the step's arrays were taken from; a change (layers swapped or wrapped, weights or the cache
    reallocated) remakes it."""
    first, last = model.layers[0], model.layers[-1]
    cache = first.attention.cache
    return (_id(model.output), _id(first.attention.wq), _id(last.feed_forward.w2),
            cache.k.data_ptr() if cache is not None else None)


def _id(lin: nn.Module) -> tuple:
    w = getattr(lin, "weight", None)
    return type(lin), w.data_ptr() if isinstance(w, torch.Tensor) else None
