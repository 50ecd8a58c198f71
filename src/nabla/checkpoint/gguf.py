"""GGUF, the single-file format llama.cpp reads, written with the `gguf` package.

`write_gguf` stores a Llama state dict (Meta names) as llama.cpp's "llama"
architecture: hyper-parameters as metadata, the SentencePiece vocabulary (or a
stand-in one for random weights), and every tensor in f32, f16, bf16, or the
block quantizations q8_0 (int8, one scale per 32 weights) and q4_0 (int4, one
scale per 32), which `gguf.quants` computes exactly as llama.cpp does. Norms
stay f32. Meta's q/k rows are what llama.cpp expects (it rotates adjacent
channel pairs, as Meta does), so nothing is permuted.

`nabla convert --to gguf` uses it to hand a model to llama.cpp (the built-in
model's f32 GGUF continues a prompt there exactly as nabla does, tested), and
`nabla bench --vs llama.cpp` to time llama.cpp on the very weights nabla runs.

Leaves out: tiktoken / Hugging Face BPE vocabularies (their merges), and
llama.cpp's k-quants.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import torch

from nabla.errors import ConfigError
from nabla.model.args import DEFAULT_CONTEXT, ModelArgs

GGUF_HINT = "writing GGUF needs the gguf package: `pip install gguf`"

TENSOR_NAMES = {  # Meta name (layer index as {}) -> llama.cpp name
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{}.attention_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.attention.wq.weight": "blk.{}.attn_q.weight",
    "layers.{}.attention.wk.weight": "blk.{}.attn_k.weight",
    "layers.{}.attention.wv.weight": "blk.{}.attn_v.weight",
    "layers.{}.attention.wo.weight": "blk.{}.attn_output.weight",
    "layers.{}.ffn_norm.weight": "blk.{}.ffn_norm.weight",
    "layers.{}.feed_forward.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.feed_forward.w2.weight": "blk.{}.ffn_down.weight",
    "layers.{}.feed_forward.w3.weight": "blk.{}.ffn_up.weight",
}
QTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError(GGUF_HINT) from None
    return gguf


def gguf_name(meta_name: str) -> str | None:
    """llama.cpp's name for a Meta tensor name (None for tensors llama.cpp does not store)."""
    m = re.match(r"layers\.(\d+)\.(.*)", meta_name)
    if m:
        name = TENSOR_NAMES.get("layers.{}." + m.group(2))
        return name.format(m.group(1)) if name else None
    return TENSOR_NAMES.get(meta_name)


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """(pieces, scores, token types, special ids) of a SentencePiece tokenizer, or a stand-in one.

    The stand-in (for random weights) is <unk>, <s>, </s>, the 256 byte tokens
    llama.cpp looks up, then placeholder pieces: enough to load and time a model.
    """
    sp = getattr(tokenizer, "sp", None)
    if tokenizer is not None and sp is None:
        raise ConfigError(f"GGUF export supports SentencePiece tokenizers (Llama 1 and 2) here, not "
                          f"{type(tokenizer).__name__}; convert with llama.cpp's convert_hf_to_gguf.py instead")
    if sp is not None:
        pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        scores = [float(sp.get_score(i)) for i in range(sp.vocab_size())]
        types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                 else UNUSED if sp.is_unused(i) else NORMAL for i in range(sp.vocab_size())]
        special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    else:
        if vocab_size < 259:
            raise ConfigError(f"a stand-in GGUF vocabulary needs at least 259 tokens, the model has {vocab_size}")
        pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
        pieces += [f"\u2581t{i}" for i in range(len(pieces), vocab_size)]
        types += [NORMAL] * (vocab_size - len(types))
        scores = [0.0] * 259 + [-float(i) for i in range(vocab_size - 259)]
        special = {"bos": 1, "eos": 2, "unk": 0}
    # The embedding may have more rows than the tokenizer has pieces: pad.
    for i in range(len(pieces), vocab_size):
        pieces.append(f"[PAD{i}]")
        scores.append(-1e9)
        types.append(UNUSED)
    return pieces, scores, types, special


def write_gguf(path: str | Path, state: dict[str, torch.Tensor], args: ModelArgs, tokenizer=None,
               qtype: str = "f32", name: str = "nabla", context_length: int | None = None,
               head_qtype: str | None = None) -> Path:
    """Write `state` (Meta names, one shard) as a llama.cpp GGUF file at `path`, atomically.

    `context_length` is the trained context recorded in the file (default DEFAULT_CONTEXT).
    `head_qtype` is the output head's type: by default q8_0 under q4_0 (nabla's int4 keeps its
    head in int8, and llama.cpp's own quantizer keeps it above 4 bits too), else `qtype`."""
    gguf = _gguf()
    if qtype not in QTYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}: use one of {', '.join(QTYPES)}")
    if args.rope_scaling is not None:
        raise ConfigError("GGUF export of Llama 3.1 rope scaling is not supported here yet")
    Q = gguf.GGMLQuantizationType
    if head_qtype is not None and head_qtype not in QTYPES:
        raise ConfigError(f"unknown GGUF type {head_qtype!r} for the head: use one of {', '.join(QTYPES)}")
    head_qtype = head_qtype or ("q8_0" if qtype == "q4_0" else qtype)
    blocks = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "f16": Q.F16, "bf16": Q.BF16, "f32": Q.F32}
    file_type = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}[qtype]  # llama_ftype
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        w.add_name(name)
        w.add_context_length(context_length or DEFAULT_CONTEXT)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.hidden_dim)
        w.add_rope_dimension_count(args.head_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.n_kv_heads)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_rope_freq_base(args.rope_theta)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type(file_type)
        pieces, scores, types, special = vocabulary(tokenizer, args.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(special["bos"])
        w.add_eos_token_id(special["eos"])
        w.add_unk_token_id(special["unk"])
        if args.tie_word_embeddings:
            state = {k: v for k, v in state.items() if k != "output.weight"}
        for key, t in state.items():
            out_name = gguf_name(key)
            if out_name is None:
                continue
            kind = head_qtype if key == "output.weight" else qtype
            block = blocks[kind]
            data = t.detach().to("cpu", torch.float32).numpy()
            if data.ndim == 1 or kind == "f32":
                w.add_tensor(out_name, data)
            elif kind == "f16":
                w.add_tensor(out_name, data.astype(np.float16))
            else:
                if block in (Q.Q8_0, Q.Q4_0) and data.shape[-1] % 32:
                    raise ConfigError(f"{key} has rows of {data.shape[-1]} values; {kind} needs a multiple of 32")
                w.add_tensor(out_name, gguf.quants.quantize(data, block), raw_dtype=block)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(Exception):
            w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
