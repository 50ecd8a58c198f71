"""Write a checkpoint in another format: Meta (any number of model-parallel shards), Hugging Face, GGUF.

The converted folder gives the same logits; `quantize` saves the linear
layers in int8/int4 (Meta: loads back as it is; GGUF: q8_0/q4_0). A Hugging
Face folder also gets the tokenizer.json, tokenizer_config.json and
generation_config.json that transformers needs to open it as it is
(nabla.tokenizer.hf_export makes their contents).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nabla.checkpoint.info import try_tokenizer
from nabla.errors import CheckpointError, NablaError

# Files of a tokenizer and its metadata, copied along by `convert`.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
# Weight and config files a converted folder may hold (cleared by --force).
CHECKPOINT_FILES = ("params.json", "consolidated.*.pth", "config.json", "model*.safetensors",
                    "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
                    "quantization.json")



def _prepare_out(src: Path, out: Path, force: bool) -> None:
    if out.resolve() == src.resolve():
        raise CheckpointError(f"--out {out} is the source folder; write the converted model to a new folder")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CheckpointError(f"--out {out} is not empty; pass --force to overwrite its checkpoint files")
        for pattern in CHECKPOINT_FILES:  # stale shards would make the folder ambiguous
            for f in out.glob(pattern):
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)


def convert_checkpoint(src: str | Path, out: str | Path, to: str, *, dtype: str | None = None, shards: int = 1,
                       force: bool = False, tokenizer: str | Path | None = None,
                       vocab_parallel_embedding: bool = False, progress: bool = False,
                       quantize: str | None = None, merge_adapter: str | Path | None = None) -> list[Path]:
    """Write the checkpoint in `src` to `out` in format `to` ("meta", "hf" or "gguf"); returns the files written.

    `quantize` ("int8" / "int4") saves the linear layers quantized: for Meta output as
    nabla.model.quantize does at load, with a quantization.json that Llama.build reads back;
    for GGUF (llama.cpp) as q8_0 / q4_0. `merge_adapter` is a LoRA adapter folder (PEFT's
    layout) whose update is added into the weights first (nabla.checkpoint.peft).
    """
    from nabla import device as devices
    from nabla.checkpoint import hf, open_checkpoint
    from nabla.checkpoint.io import atomic_torch_save, atomic_write_text
    from nabla.checkpoint.shards import split_state

    if to not in ("meta", "hf", "gguf"):
        raise NablaError(f"--to must be 'meta', 'hf' or 'gguf', got {to!r}")
    if not isinstance(shards, int) or shards < 1:
        raise NablaError(f"--shards must be a positive integer, got {shards!r}")
    if to == "hf" and shards != 1:
        raise NablaError("--shards applies to Meta output (model-parallel consolidated.NN.pth files); "
                         "Hugging Face output is one model.safetensors")
    if to == "gguf" and shards != 1:
        raise NablaError("--shards applies to Meta output; GGUF is one file")
    if quantize is not None and (to == "hf" or shards != 1):
        raise NablaError("--quantize writes a quantized layout: use it with --to meta (one shard) or --to gguf")
    ckpt = open_checkpoint(src)
    if ckpt.quantization is not None:
        raise NablaError(f"{ckpt.path} is already quantized ({ckpt.quantization['mode']}); convert the original "
                         "checkpoint instead")
    out = Path(out)
    cast = devices.parse_dtype(dtype)
    args = ckpt.args
    from nabla.model.rope import rope_kind

    if to == "meta" and (not args.is_llama or rope_kind(args.rope_scaling) not in ("default", "llama3")):
        what = f"{args.model_type!r} model" if not args.is_llama else \
            f"model with {rope_kind(args.rope_scaling)!r} rope scaling"
        raise NablaError(f"Meta output cannot express this {what} (nabla writes plain Llama models in that "
                         "format); convert it with --to hf instead")
    if to == "gguf":  # each family as its llama.cpp architecture; what llama.cpp cannot express is refused
        from nabla.checkpoint.gguf_families import arch_of, check_writable

        check_writable(args, arch_of(args))
    if args.vocab_size == -1:
        args.vocab_size = ckpt.shapes["tok_embeddings.weight"][0]
    state = ckpt.load_state()
    if merge_adapter is not None:
        from nabla.checkpoint.peft import merged_state, read_adapter

        state = merged_state(state, read_adapter(merge_adapter, args))
    tok_path = Path(tokenizer) if tokenizer else ckpt.tokenizer_path
    tok, _ = try_tokenizer(tok_path)
    from_gguf = ckpt.format == "gguf" and tok_path is None  # the tokenizer is the file's metadata
    if from_gguf:
        tok = ckpt.tokenizer()
    _prepare_out(ckpt.path, out, force)
    written: list[Path] = []
    if to == "gguf":
        import torch

        from nabla.checkpoint.gguf import write_gguf

        qtype = {"int8": "q8_0", "int4": "q4_0"}.get(quantize) or \
            {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}.get(cast or ckpt.dtype, "f32")
        name = ckpt.path.resolve().stem if ckpt.format == "gguf" else ckpt.path.resolve().name
        return [write_gguf(out / f"{name}-{qtype}.gguf", state, args, tok, qtype, name=name,
                           context_length=ckpt.context_length)]
    bos = eos = None
    if to == "hf":
        bos = ckpt.bos_id if ckpt.bos_id is not None else (tok.bos_id if tok else None)
        eos = ckpt.eos_ids or (list(tok.stop_ids) if tok else None)
        # A config.json nabla cannot rewrite (other families, other rope kinds) is kept as it was read.
        keep = ckpt.config if ckpt.config is not None and (
            not args.is_llama or rope_kind(args.rope_scaling) not in ("default", "llama3")) else None
        written += hf.save_hf_checkpoint(out, state, args, dtype=cast, bos_id=bos, eos_ids=eos,
                                         context_length=ckpt.context_length, config=keep)
    else:
        if quantize is not None:
            from dataclasses import replace

            from nabla.checkpoint import QUANTIZATION_FILE
            from nabla.model.quantize import GROUP_SIZE, INT4_LAYOUT, quantize_state

            if cast is not None:  # the unquantized tensors (embedding, norms) take --dtype
                state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
            state = quantize_state(state, args, quantize)
            args = replace(args, tie_word_embeddings=False)  # the quantized head is a copy of its own
            cast = None
            atomic_write_text(out / QUANTIZATION_FILE,
                              json.dumps({"mode": quantize, "group_size": GROUP_SIZE,
                                          **({"layout": INT4_LAYOUT} if quantize == "int4" else {})},
                                         indent=2) + "\n")
            written.append(out / QUANTIZATION_FILE)
        parts = split_state(state, shards, vocab_parallel_embedding=vocab_parallel_embedding, args=args) \
            if shards > 1 else [state]
        it = enumerate(parts)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(parts), desc="writing shards", unit="shard", leave=False)
        for i, part in it:
            tensors = {}
            for key in part:
                if key == "rope.freqs" or (args.tie_word_embeddings and key == "output.weight"):
                    continue
                t = part[key]
                tensors[key] = t.to(cast) if cast is not None and t.is_floating_point() else t
            atomic_torch_save(tensors, out / f"consolidated.{i:02d}.pth")
            written.append(out / f"consolidated.{i:02d}.pth")
            del tensors
        atomic_write_text(out / "params.json", json.dumps(args.to_params(), indent=2) + "\n")
        written.append(out / "params.json")
    if from_gguf:
        from nabla.checkpoint.gguf_read import save_tokenizer

        written += save_tokenizer(tok, ckpt.metadata, out)
    copied = set()
    for folder_file in ([tok_path.parent / n for n in TOKENIZER_FILES] if tok_path else []):
        if folder_file.is_file() and folder_file.name not in copied:
            shutil.copyfile(folder_file, out / folder_file.name)
            copied.add(folder_file.name)
            written.append(out / folder_file.name)
    if tok_path is not None and tok_path.is_file() and tok_path.name not in copied:
        name = "tokenizer.json" if tok_path.read_bytes()[:1] == b"{" else "tokenizer.model"
        shutil.copyfile(tok_path, out / name)
        written.append(out / name)
    if to == "hf" and tok is not None:
        written += write_hf_tokenizer(out, tok, bos_id=bos, eos_ids=eos)
    return written


def write_hf_tokenizer(out: Path, tok, *, bos_id: int | None = None, eos_ids: list[int] | None = None) -> list[Path]:
    """Add the tokenizer files transformers needs to open a Hugging Face folder as it is: tokenizer.json,
    tokenizer_config.json and generation_config.json, each unless the folder already has it (files
    copied from the source are kept as they are). Returns the files written."""
    from nabla.checkpoint.io import atomic_write_text
    from nabla.tokenizer import hf_export

    def dump(obj) -> str:
        return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"

    written = []
    if not (out / "tokenizer.json").is_file():
        atomic_write_text(out / "tokenizer.json", hf_export.tokenizer_json(tok))
        written.append(out / "tokenizer.json")
    if not (out / "tokenizer_config.json").is_file():
        config = json.loads((out / "config.json").read_text(encoding="utf-8")) \
            if (out / "config.json").is_file() else {}
        atomic_write_text(out / "tokenizer_config.json", dump(hf_export.tokenizer_config(
            tok, model_max_length=config.get("max_position_embeddings"))))
        written.append(out / "tokenizer_config.json")
    if not (out / "generation_config.json").is_file():
        atomic_write_text(out / "generation_config.json",
                          dump(hf_export.generation_config(tok, bos_id=bos_id, eos_ids=eos_ids)))
        written.append(out / "generation_config.json")
    return written
