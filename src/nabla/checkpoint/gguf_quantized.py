"""A GGUF file's linear layers straight into nabla's quantized layers, never through fp32 at once.

`quantized_state(ckpt)` gives the state dict `quantize_model` would lay out for
the file's own mode (int4 for a file of mostly 4-bit blocks, int8 for 8-bit and
others; GGUFCheckpoint.load_quantize), tensor by tensor:

    Q4_0 under int4   -> kept: the same fp16 scales and nibbles, rearranged (pack_int4)
    Q4_1 under int4   -> kept the same way, with the blocks' fp16 minimums (Int4Linear.mins:
                         w = d * q + m)
    Q4_K under int4   -> kept too: the nibbles rearranged, the 6-bit scales and minimums
                         unpacked to a byte each, d and dmin as they are (requantizing Q4_K to
                         Q4_0 instead adds more error than Q4_K has: 8.3% against 7.1% RMS of
                         the weights, measured)
    the other types   -> dequantized with the gguf package, then int8 (one scale per output
                         channel), also in a mostly 4-bit file (Q4_K_M's Q6_K layers); under an
                         asked-for int4, Q4_0 blocks
    the output head   -> int4 where it is 4-bit (kept), else int8 as quantize_model makes it
                         (from the embedding when tied)

Everything else (embedding, norms, biases) is the file's float state. Llama.build
uses it when no other quantization is asked for, so a Q4_0 model runs its very
blocks, and loading peaks at one layer in fp32, not the whole model.

4-bit blocks take the same row reordering (q/k of the NEOX-rope families) and
splitting (Phi-3's fused tensors) as the float weights (gguf_families.from_gguf):
blocks never cross rows.

Leaves out: keeping Q8_0, Q5_* and Q6_K blocks as they are (nabla has kernels for
4-bit blocks and per-channel int8 only).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from nabla.checkpoint.gguf_families import from_gguf
from nabla.checkpoint.gguf_read import MODE_OF, GGUFCheckpoint
from nabla.checkpoint.shards import Entry, LazyState
from nabla.model.args import ModelArgs
from nabla.model.quantize import GROUP_SIZE, int4_from_q4_0, pack_int4, quantize_int4, quantize_int8, quantized_weights


def quantized_state(ckpt: GGUFCheckpoint, mode: str | None = None) -> tuple[LazyState, ModelArgs, dict] | None:
    """(state, args, quantized) for Llama.build, or None where the names do not map onto nabla's layers.

    `mode` ("int4" / "int8") puts every linear layer in that width (the head stays int8, or int4 where
    the file's head is Q4_0); None follows the file: its GGUFCheckpoint.load_quantize, with the layers
    stored in other types than Q4_0 int8 in a Q4_0 file. `quantized` is what
    nabla.model.prepare.materialize lays out: {"mode", "group_size", "head": "int4" or "int8",
    "int8_layers": the layers kept in int8 under int4}."""
    import gguf

    asked = mode is not None  # "int4" / "int8" for every layer; else the file's own mode, layer by layer
    mode = mode or ckpt.load_quantize
    if mode is None:
        return None
    reader = ckpt.reader or gguf.GGUFReader(ckpt.path)
    arch = ckpt.metadata["general.architecture"]
    raw = {}  # Meta name -> (its 4-bit GGUF type, what makes its raw block bytes: rows reordered or split
    #           as the floats')
    eight = set()  # Meta names of layers stored above 4 bits in a 4-bit file (Q4_K_M's Q6_K ffn_down, ...)
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        parts = from_gguf(t.name, shape, ckpt.args, arch) or []
        if MODE_OF.get(t.tensor_type.name) != "int4" and not asked:
            eight.update(name for name, _, _ in parts)
        if t.tensor_type.name in BLOCKS:
            for name, _, make in parts:
                raw[name] = (t.tensor_type.name, lambda t=t, make=make: make(torch.from_numpy(np.array(t.data))))
    floats = ckpt.load_state()
    targets = quantized_weights(ckpt.args)
    if not targets <= set(floats):
        return None  # names nabla does not split this way: let the caller quantize the float state
    entries: dict[str, Entry] = {}
    pending: dict[str, list] = {}  # name -> [(weight, scales, ...), parts not yet taken]
    formats: dict[str, str] = {}  # the int4 layers kept in Q4_1 / Q4_K (quantize_model's int4_formats)

    def part(name: str, which: int, make, count: int):
        def get():
            if name not in pending:
                pending[name] = [make(), set(range(count))]
            made, left = pending[name]
            left.discard(which)
            if not left:
                del pending[name]  # both taken: hold nothing longer than the copy
            return made[which]
        return get

    def blocks(name, shape):
        kind, make = raw[name]
        return lambda: BLOCKS[kind](make().contiguous(), shape)

    def requantized(name, quantize):
        return lambda: quantize(floats[name].float())

    def add(name: str, shape, make, width: str) -> None:
        """The layer `name` made by `make`: int8 rows (weight, scales), or int4 blocks in the format the
        file's tensor keeps (weight, scales, and Q4_1's mins, Q4_K's mins and super_scales)."""
        base = name[: -len("weight")]
        if width == "int4":
            N, G = shape[0], shape[1] // GROUP_SIZE
            shapes = [((N, shape[1] // 2), torch.uint8)] + {
                "Q4_0": [((N, G), torch.float16)],
                "Q4_1": [((N, G), torch.float16)] * 2,
                "Q4_K": [((N, G), torch.uint8)] * 2 + [((N, G // 4), torch.float16)]}[kept_format(name)]
        else:
            shapes = [(shape, torch.int8), ((shape[0],), torch.float32)]
        if width == "int4" and kept_format(name) != "Q4_0":
            formats[name] = kept_format(name)
        keys = (name, base + "scales", base + "mins", base + "super_scales")
        for which, (key, (part_shape, dtype)) in enumerate(zip(keys, shapes)):
            entries[key] = Entry(part(name, which, make, len(shapes)), part_shape, dtype)

    def kept_format(name: str) -> str:
        """The int4 format of a layer: its file's 4-bit type where it has one (kept), else Q4_0."""
        return raw[name][0] if name in raw else "Q4_0"

    for name, shape in ckpt.shapes.items():
        if name in targets and mode == "int4" and shape[1] % GROUP_SIZE == 0 and name not in eight:
            add(name, shape, blocks(name, shape) if name in raw else requantized(name, _int4), "int4")
        elif name in targets:
            add(name, shape, requantized(name, quantize_int8), "int8")
        elif name != "output.weight":
            entries[name] = floats._entries[name]
    head = "output.weight" if "output.weight" in floats else "tok_embeddings.weight"
    shape = ckpt.shapes[head]
    # A 4-bit head as the file has it (llama.cpp's own quantizer uses Q6_K there), else int8.
    head_mode = "int4" if mode == "int4" and head in raw and shape[1] % GROUP_SIZE == 0 else "int8"
    if head_mode == "int4":
        raw["output.weight"] = raw[head]  # its format, under the head's name
    add("output.weight", shape, blocks(head, shape) if head_mode == "int4" else requantized(head, quantize_int8),
        head_mode)
    args = replace(ckpt.args, tie_word_embeddings=False)  # the quantized head is a copy of its own
    int8_layers = sorted(eight & targets) if mode == "int4" else []
    return LazyState(entries), args, {"mode": mode, "group_size": GROUP_SIZE, "head": head_mode,
                                      "int8_layers": int8_layers, "int4_formats": formats}


def q4_1_blocks(raw: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """(packed, scales, mins) of Int4Linear from a GGUF Q4_1 tensor's bytes (20 per block of 32: fp16 d,
    fp16 m, then 16 bytes of nibbles, w = d * q + m): the same numbers, rearranged."""
    N, K = shape
    blocks = raw.reshape(N, K // 32, 20)
    d, m = (blocks[..., i:i + 2].contiguous().view(torch.float16).reshape(N, K // 32) for i in (0, 2))
    q = torch.cat((blocks[..., 4:] & 15, blocks[..., 4:] >> 4), dim=-1).reshape(N, K)
    return pack_int4(q), d, m


def q4_k_blocks(raw: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """(packed, scales, mins, super_scales) of a Q4_K Int4Linear from a GGUF Q4_K tensor's bytes:
    super-blocks of 256 weights (144 bytes: fp16 d, fp16 dmin, twelve bytes of 6-bit scales and
    minimums for its eight blocks of 32, 128 bytes of nibbles), w = d * sc * q - dmin * mn. The same
    numbers: the 6-bit fields unpacked to a byte each, the nibbles in pack_int4's order."""
    import gguf

    N, K = shape
    sb = raw.reshape(N * (K // 256), 144).numpy()
    sc, mn = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(sb[:, 4:16]))  # gguf's own unpacking
    # 128 bytes as four groups of 32: the low nibbles are block 2g, the high ones block 2g + 1
    qs = sb[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = torch.from_numpy((qs & 15).reshape(N, K))
    supers = torch.from_numpy(np.ascontiguousarray(sb[:, :4]).view(np.float16).reshape(N, K // 128))  # d, dmin
    as_rows = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8).reshape(N, K // 32))  # noqa: E731
    return pack_int4(q), as_rows(sc), as_rows(mn), supers


BLOCKS = {"Q4_0": int4_from_q4_0, "Q4_1": q4_1_blocks, "Q4_K": q4_k_blocks}
"""The 4-bit GGUF types kept in 4 bits under int4, and how each becomes Int4Linear's blocks (packed, scales,
and Q4_1's mins, Q4_K's mins and super_scales)."""


def _int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scales = quantize_int4(w)
    return pack_int4(q), scales
