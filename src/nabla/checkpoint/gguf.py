"""GGUF, the single-file format llama.cpp reads, written with the `gguf` package.

`write_gguf` stores a state dict (Meta names) of any family nabla runs as
llama.cpp's architecture for it (llama for Llama and Mistral, qwen2, qwen3,
gemma, gemma2, phi3), the way llama.cpp's convert_hf_to_gguf.py writes it:
names, metadata keys and per-family layouts come from
nabla.checkpoint.gguf_families, the vocabulary from nabla.tokenizer.gguf_export
(SentencePiece, tokenizer.json, or a stand-in one for random weights). Every
tensor is f32, f16, bf16, or the block quantizations q8_0 (int8, one scale per
32 weights), q4_0 (int4, one scale per 32) and q4_1 (int4, a scale and a minimum
per 32), which `gguf.quants` computes exactly as llama.cpp does. Norms and biases stay f32. A model llama.cpp would
compute differently (e.g. a Gemma 2 query_pre_attn_scalar it does not infer)
is refused before anything is written.

`nabla convert --to gguf` uses it to hand a model to llama.cpp (each family's
f32 GGUF gives transformers' logits in llama.cpp, tested), and
`nabla bench --vs llama.cpp` to time llama.cpp on the very weights nabla runs.

Leaves out: llama.cpp's k-quants; yarn and dynamic rope scaling (refused).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from nabla.errors import ConfigError
from nabla.model.args import DEFAULT_CONTEXT, ModelArgs

GGUF_HINT = "writing GGUF needs the gguf package: `pip install gguf`"

QTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError(GGUF_HINT) from None
    return gguf


def write_vocabulary(w, tokenizer, vocab_size: int) -> None:
    """The tokenizer's `tokenizer.*` metadata (nabla.tokenizer.gguf_export), written with the GGUFWriter `w`."""
    from nabla.tokenizer.gguf_export import gguf_vocab

    v = gguf_vocab(tokenizer, vocab_size)
    w.add_tokenizer_model(v.model)
    if v.pre is not None:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id, "eot": w.add_eot_token_id}
    for kind, i in v.special.items():
        if i is not None and 0 <= i < len(v.tokens):
            adders[kind](i)
    if v.add_bos is not None:
        w.add_add_bos_token(v.add_bos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


def write_gguf(path: str | Path, state: dict[str, torch.Tensor], args: ModelArgs, tokenizer=None,
               qtype: str = "f32", name: str = "nabla", context_length: int | None = None,
               head_qtype: str | None = None) -> Path:
    """Write `state` (Meta names, one shard) as a llama.cpp GGUF file at `path`, atomically, in the
    architecture of the model's family (nabla.checkpoint.gguf_families).

    `context_length` is the trained context recorded in the file (default DEFAULT_CONTEXT, or a longrope
    model's stretched context: sqrt(1 + ln(context / original) / ln(original)) is its attention factor).
    `head_qtype` is the output head's type: by default q8_0 under q4_0 / q4_1 (nabla's int4 keeps its
    head in int8, and llama.cpp's own quantizer keeps it above 4 bits too), else `qtype`."""
    from nabla.checkpoint.gguf_families import arch_of, to_gguf, write_hparams

    gguf = _gguf()
    if qtype not in QTYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}: use one of {', '.join(QTYPES)}")
    arch = arch_of(args)
    Q = gguf.GGMLQuantizationType
    if head_qtype is not None and head_qtype not in QTYPES:
        raise ConfigError(f"unknown GGUF type {head_qtype!r} for the head: use one of {', '.join(QTYPES)}")
    head_qtype = head_qtype or ("q8_0" if qtype in ("q4_0", "q4_1") else qtype)
    blocks = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "f16": Q.F16, "bf16": Q.BF16, "f32": Q.F32}
    file_type = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "bf16": 32}[qtype]  # llama_ftype
    if context_length is None:
        s = args.rope_scaling or {}
        if s.get("rope_type") == "longrope":  # the stretched context, from Phi-3's attention factor
            original = s["original_max_position_embeddings"]
            context_length = round(original * original ** (s["attention_factor"] ** 2 - 1))
        else:
            context_length = DEFAULT_CONTEXT
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(tmp, arch)
    try:
        w.add_name(name)
        rope_tensors = write_hparams(w, args, context_length)
        w.add_file_type(file_type)
        write_vocabulary(w, tokenizer, args.vocab_size)
        for out_name, values in rope_tensors:
            w.add_tensor(out_name, np.asarray(values, dtype=np.float32))
        for out_name, key, t in to_gguf(state, args):
            kind = head_qtype if key == "output.weight" else qtype
            block = blocks[kind]
            data = t.numpy()
            if data.ndim == 1 or kind == "f32":
                w.add_tensor(out_name, data)
            elif kind == "f16":
                w.add_tensor(out_name, data.astype(np.float16))
            else:
                if block in (Q.Q8_0, Q.Q4_0, Q.Q4_1) and data.shape[-1] % 32:
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
