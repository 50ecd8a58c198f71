"""What a checkpoint holds (format, shape, parameters, dtype, tokenizer) and the memory running it takes.

Reads only metadata and tensor shapes: no weight is loaded. Rendering it for
people is the CLI's (nabla.cli.info).
"""

from __future__ import annotations

import math
from pathlib import Path

from nabla.errors import NablaError


def try_tokenizer(path):
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
    from nabla.model.args import DEFAULT_CONTEXT, LLAMA_SWITCHES
    from nabla.tokenizer import tokenizer_kind
    from nabla.tokenizer.chat import chat_format_for

    ckpt = open_checkpoint(model)
    a = ckpt.args
    vocab = ckpt.shapes.get("tok_embeddings.weight", (a.vocab_size,))[0]
    tok_path = Path(tokenizer) if tokenizer else ckpt.tokenizer_path
    from_gguf = ckpt.format == "gguf" and tok_path is None  # the tokenizer is the file's metadata
    if from_gguf:
        tok_path = ckpt.path
        try:
            tok, tok_error = ckpt.tokenizer(), None
        except NablaError as e:
            tok, tok_error = None, str(e)
    else:
        tok, tok_error = try_tokenizer(tok_path)
    ctx = context or ckpt.context_length or DEFAULT_CONTEXT
    if not isinstance(batch, int) or batch < 1 or not isinstance(ctx, int) or ctx < 1:
        raise NablaError(f"--context and --batch must be positive integers, got {ctx} and {batch}")
    run_dtype = devices.parse_dtype(dtype) or ckpt.dtype or torch.float32
    nbytes = run_dtype.itemsize
    weights = ckpt.n_params * nbytes
    mode = (ckpt.quantization or {}).get("mode") or getattr(ckpt, "load_quantize", None)
    if mode is not None:  # stored or run quantized: the linear layers and the head at their own width
        from nabla.model.quantize import quantized_weights

        linear = sum(math.prod(ckpt.shapes[k]) for k in quantized_weights(a) if k in ckpt.shapes)
        if ckpt.quantization is not None and mode == "int4":
            linear *= 2  # the stored shapes are packed: two weights a byte
        head = a.vocab_size * a.dim if a.vocab_size > 0 else 0
        # Q4_0: nibbles and an fp16 scale per 32; Q4_1 an fp16 minimum too; Q4_K (a GGUF file's) a byte of
        # scale and one of minimum per 32, and fp16 d and dmin per 256
        types = set(ckpt.tensor_types) if ckpt.format == "gguf" else set()
        per = (0.5 + (4 / 32 if "Q4_1" in types else 2 / 32 + 4 / 256 if "Q4_K" in types else 2 / 32)
               if mode == "int4" else 1.0)
        rest = max(ckpt.n_params - linear - (0 if a.tie_word_embeddings else head), 0)
        weights = int(linear * per + head + rest * nbytes)
    kv = 2 * a.n_layers * batch * ctx * a.n_kv_heads * a.head_dim * nbytes
    info = {
        "path": str(ckpt.path), "format": ckpt.format, "files": [f.name for f in ckpt.files],
        "shards": ckpt.num_shards,
        "architecture": {
            "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
            "head_dim": a.head_dim, "hidden_dim": a.hidden_dim, "vocab_size": vocab, "norm_eps": a.norm_eps,
            "rope_theta": a.rope_theta, "rope_scaling": a.rope_scaling,
            "tie_word_embeddings": a.tie_word_embeddings, "model_type": a.model_type,
            "switches": {k: getattr(a, k) for k, v in LLAMA_SWITCHES.items()
                         if k != "model_type" and getattr(a, k) != v},
        },
        "parameters": ckpt.n_params,
        "dtype": str(ckpt.dtype).replace("torch.", "") if ckpt.dtype else None,
        "size_bytes": ckpt.size_bytes,
        "context_length": ckpt.context_length,
        "tokenizer": None,
        "memory": {"context": ctx, "batch": batch, "dtype": str(run_dtype).replace("torch.", ""),
                   "weights_bytes": weights, "kv_cache_bytes": kv, "total_bytes": weights + kv},
    }
    if ckpt.format == "gguf":
        from nabla.checkpoint.gguf_read import LOADS_AS

        info["gguf"] = {"architecture": ckpt.metadata.get("general.architecture"),
                        "tensor_types": ckpt.tensor_types, "load_quantize": ckpt.load_quantize,
                        "loads_as": {t: LOADS_AS[t] for t in ckpt.tensor_types}}
    if tok is not None:
        kind = f"gguf {ckpt.metadata.get('tokenizer.ggml.model')}" if from_gguf else tokenizer_kind(tok_path)
        info["tokenizer"] = {
            "path": str(tok_path), "kind": kind, "n_words": tok.n_words, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "stop_ids": list(tok.stop_ids), "chat_format": chat_format_for(tok).name,
            "fits": tok.n_words <= vocab,
        }
    else:
        info["tokenizer"] = {"path": str(tok_path) if tok_path else None, "error": tok_error}
    return info


CHECKLIST = "checklist.chk"
"""Meta's downloads: one `MD5  FILE` line per file of the folder."""


def verify_checklist(folder: str | Path, progress: bool = False) -> list[dict]:
    """Each file `checklist.chk` names, with its size and whether its MD5 matches.

    Returns one {"file", "bytes", "ok", "problem"} per line; a folder without
    the checklist, or a checklist that is not `MD5  FILE` lines, is an error.
    """
    import hashlib

    folder = Path(folder)
    chk = folder / CHECKLIST
    if not chk.is_file():
        raise NablaError(f"{folder} has no {CHECKLIST}; --verify checks the MD5 list that comes with Meta's "
                         "downloads (put it beside the .pth files)")
    entries = []
    for n, line in enumerate(chk.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 32 or any(c not in "0123456789abcdefABCDEF" for c in parts[0]):
            raise NablaError(f"{chk}, line {n}: expected 'MD5  FILE', got {line.strip()[:80]!r}")
        entries.append((parts[0].lower(), parts[1].lstrip("*")))
    total = sum((folder / name).stat().st_size for _, name in entries if (folder / name).is_file())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="verifying", leave=False)
    out = []
    for digest, name in entries:
        path = folder / name
        if not path.is_file():
            out.append({"file": name, "bytes": None, "ok": False, "problem": "missing"})
            continue
        md5 = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                md5.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        size = path.stat().st_size
        ok = md5.hexdigest() == digest
        out.append({"file": name, "bytes": size, "ok": ok,
                    "problem": None if ok else ("empty" if size == 0 else "MD5 differs: damaged or incomplete")})
    if bar is not None:
        bar.close()
    return out

