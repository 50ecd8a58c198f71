"""`nabla info` (what a checkpoint holds and what running it costs) and
`nabla convert` (Meta <-> Hugging Face, any number of model-parallel shards)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from nabla.errors import CheckpointError, NablaError

# Files of a tokenizer and its metadata, copied along by `convert`.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
# Weight and config files a converted folder may hold (cleared by --force).
CHECKPOINT_FILES = ("params.json", "consolidated.*.pth", "config.json", "model*.safetensors",
                    "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
                    "quantization.json")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _try_tokenizer(path):
    """(tokenizer, error message): a missing or broken tokenizer does not stop `info`."""
    if path is None:
        return None, "none in the folder (pass --tokenizer FILE)"
    from nabla.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path), None
    except NablaError as e:
        return None, str(e)


def checkpoint_info(model: str | Path, tokenizer: str | Path | None = None, context: int | None = None,
                    batch: int = 1, dtype: str | None = None) -> dict:
    """Everything `nabla info` prints, as a dict."""
    import torch

    from nabla import device as devices
    from nabla.checkpoint import open_checkpoint
    from nabla.tokenizer import tokenizer_kind
    from nabla.tokenizer.chat import chat_format_for

    ckpt = open_checkpoint(model)
    a = ckpt.args
    vocab = ckpt.shapes.get("tok_embeddings.weight", (a.vocab_size,))[0]
    tok_path = Path(tokenizer) if tokenizer else ckpt.tokenizer_path
    tok, tok_error = _try_tokenizer(tok_path)
    ctx = context or ckpt.context_length or a.max_seq_len
    if not isinstance(batch, int) or batch < 1 or not isinstance(ctx, int) or ctx < 1:
        raise NablaError(f"--context and --batch must be positive integers, got {ctx} and {batch}")
    run_dtype = devices.parse_dtype(dtype) or ckpt.dtype or torch.float32
    nbytes = run_dtype.itemsize
    weights = ckpt.n_params * nbytes
    kv = 2 * a.n_layers * batch * ctx * a.n_kv_heads * a.head_dim * nbytes
    info = {
        "path": str(ckpt.path), "format": ckpt.format, "files": [f.name for f in ckpt.files],
        "shards": ckpt.num_shards,
        "architecture": {
            "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
            "head_dim": a.head_dim, "hidden_dim": a.hidden_dim, "vocab_size": vocab, "norm_eps": a.norm_eps,
            "rope_theta": a.rope_theta, "rope_scaling": a.rope_scaling,
            "tie_word_embeddings": a.tie_word_embeddings,
        },
        "parameters": ckpt.n_params,
        "dtype": str(ckpt.dtype).replace("torch.", "") if ckpt.dtype else None,
        "size_bytes": ckpt.size_bytes,
        "context_length": ckpt.context_length,
        "tokenizer": None,
        "memory": {"context": ctx, "batch": batch, "dtype": str(run_dtype).replace("torch.", ""),
                   "weights_bytes": weights, "kv_cache_bytes": kv, "total_bytes": weights + kv},
    }
    if tok is not None:
        info["tokenizer"] = {
            "path": str(tok_path), "kind": tokenizer_kind(tok_path), "n_words": tok.n_words, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "stop_ids": list(tok.stop_ids), "chat_format": chat_format_for(tok).name,
            "fits": tok.n_words <= vocab,
        }
    else:
        info["tokenizer"] = {"path": str(tok_path) if tok_path else None, "error": tok_error}
    return info


def print_info(info: dict, out=None) -> None:
    out = out or sys.stdout
    a, m, t = info["architecture"], info["memory"], info["tokenizer"]
    files = f"{len(info['files'])} file{'s' if len(info['files']) != 1 else ''}"
    rows = [
        ("checkpoint", f"{info['path']}"),
        ("format", f"{'Meta' if info['format'] == 'meta' else 'Hugging Face'} ({files}"
                   + (f", model-parallel {info['shards']}" if info["format"] == "meta" and info["shards"] > 1 else "")
                   + ")"),
        ("layers", f"{a['n_layers']} x (dim {a['dim']}, {a['n_heads']} heads, {a['n_kv_heads']} kv heads, "
                   f"head_dim {a['head_dim']}, ffn {a['hidden_dim']})"),
        ("vocabulary", f"{a['vocab_size']} rows" + (", tied output" if a["tie_word_embeddings"] else "")),
        ("rope", f"theta {a['rope_theta']:g}" + (f", llama3 scaling x{a['rope_scaling']['factor']:g}"
                                                 if a["rope_scaling"] else "")),
        ("norm_eps", f"{a['norm_eps']:g}"),
        ("parameters", f"{human_count(info['parameters'])} ({info['parameters']:,})"),
        ("dtype", str(info["dtype"])),
        ("size on disk", human_bytes(info["size_bytes"])),
    ]
    if info["context_length"]:
        rows.append(("trained context", str(info["context_length"])))
    if t and "error" not in t:
        fits = "" if t["fits"] else "  (MORE ids than the embedding has rows: wrong tokenizer?)"
        rows.append(("tokenizer", f"{t['kind']}, {t['n_words']} ids, bos {t['bos_id']}, stop {t['stop_ids']}, "
                                  f"chat format {t['chat_format']}{fits}"))
    else:
        rows.append(("tokenizer", t["error"] if t else "none"))
    rows.append(("memory", f"{human_bytes(m['total_bytes'])} in {m['dtype']} = weights "
                           f"{human_bytes(m['weights_bytes'])} + KV cache {human_bytes(m['kv_cache_bytes'])} "
                           f"(context {m['context']}, batch {m['batch']})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)


def run_info(args: argparse.Namespace) -> int:
    from nabla.generation.commands import model_dir

    info = checkpoint_info(model_dir(args), args.tokenizer, args.context, args.batch, args.dtype)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_info(info)
    return 0


# ------------------------------------------------------------------- convert
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
                       quantize: str | None = None) -> list[Path]:
    """Write the checkpoint in `src` to `out` in format `to` ("meta", "hf" or "gguf"); returns the files written.

    `quantize` ("int8" / "int4") saves the linear layers quantized: for Meta output as
    nabla.model.quantize does at load, with a quantization.json that Llama.build reads back;
    for GGUF (llama.cpp) as q8_0 / q4_0.
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
    if args.vocab_size == -1:
        args.vocab_size = ckpt.shapes["tok_embeddings.weight"][0]
    state = ckpt.load_state()
    tok_path = Path(tokenizer) if tokenizer else ckpt.tokenizer_path
    tok, _ = _try_tokenizer(tok_path)
    _prepare_out(ckpt.path, out, force)
    written: list[Path] = []
    if to == "gguf":
        import torch

        from nabla.checkpoint.gguf import write_gguf

        qtype = {"int8": "q8_0", "int4": "q4_0"}.get(quantize) or \
            {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}.get(cast or ckpt.dtype, "f32")
        name = ckpt.path.resolve().name
        return [write_gguf(out / f"{name}-{qtype}.gguf", state, args, tok, qtype, name=name)]
    if to == "hf":
        bos = ckpt.bos_id if ckpt.bos_id is not None else (tok.bos_id if tok else None)
        eos = ckpt.eos_ids or (list(tok.stop_ids) if tok else None)
        written += hf.save_hf_checkpoint(out, state, args, dtype=cast, bos_id=bos, eos_ids=eos,
                                         context_length=ckpt.context_length)
    else:
        if quantize is not None:
            from dataclasses import replace

            from nabla.checkpoint import QUANTIZATION_FILE
            from nabla.model.quantize import GROUP_SIZE, quantize_state

            if cast is not None:  # the unquantized tensors (embedding, norms) take --dtype
                state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
            state = quantize_state(state, args, quantize)
            args = replace(args, tie_word_embeddings=False)  # the quantized head is a copy of its own
            cast = None
            atomic_write_text(out / QUANTIZATION_FILE,
                              json.dumps({"mode": quantize, "group_size": GROUP_SIZE}, indent=2) + "\n")
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
    return written


FORMAT_NAMES = {"meta": "Meta", "hf": "Hugging Face", "gguf": "GGUF"}


def run_convert(args: argparse.Namespace) -> int:
    written = convert_checkpoint(args.model, args.out, args.to, dtype=args.dtype, shards=args.shards,
                                 force=args.force, tokenizer=args.tokenizer,
                                 vocab_parallel_embedding=args.vocab_parallel_embedding, progress=True,
                                 quantize=args.quantize)
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} files ({human_bytes(total)}) to {args.out} in "
          f"{FORMAT_NAMES[args.to]} format{', ' + args.quantize if args.quantize else ''}: "
          + ", ".join(p.name for p in written))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="what a checkpoint holds and the memory it needs",
                       description="Describe a checkpoint folder (Meta or Hugging Face): architecture, "
                                   "parameters, dtype, size, tokenizer, and the memory to run it.")
    p.add_argument("--model", metavar="DIR", help="checkpoint folder (default: the built-in story model)")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer file, when the folder holds none")
    p.add_argument("--context", type=int, help="context length for the memory estimate "
                                               "(default: the model's trained context, else 2048)")
    p.add_argument("--batch", type=int, default=1, help="batch size for the memory estimate (default: 1)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="compute dtype for the memory estimate (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_info)

    p = sub.add_parser("convert", help="convert a checkpoint between Meta and Hugging Face formats (or to GGUF)",
                       description="Write a checkpoint in the other format (or re-shard a Meta one); "
                                   "the converted model gives identical logits.")
    p.add_argument("--model", metavar="DIR", required=True, help="source checkpoint folder")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer file, when the folder holds none")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write")
    p.add_argument("--to", choices=["meta", "hf", "gguf"], required=True,
                   help="output format (gguf: one file for llama.cpp; needs `pip install gguf`)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: keep)")
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards of Meta output (default: 1)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="save the linear layers quantized (Meta: loads back as it is; GGUF: q8_0 / q4_0)")
    p.add_argument("--vocab-parallel-embedding", action="store_true",
                   help="split the embedding by vocabulary (Llama 3 style) instead of by width (Llama 2)")
    p.add_argument("--force", action="store_true", help="overwrite checkpoint files in --out")
    p.set_defaults(func=run_convert)


__all__ = ["register", "checkpoint_info", "convert_checkpoint"]
