"""What a checkpoint holds (format, shape, parameters, dtype, tokenizer) and the memory running it takes.

Reads only metadata and tensor shapes: no weight is loaded. Rendering it for
people is the CLI's (nabla.cli.info).
"""

from __future__ import annotations

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
    tok, tok_error = try_tokenizer(tok_path)
    ctx = context or ckpt.context_length or DEFAULT_CONTEXT
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
    if tok is not None:
        info["tokenizer"] = {
            "path": str(tok_path), "kind": tokenizer_kind(tok_path), "n_words": tok.n_words, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "stop_ids": list(tok.stop_ids), "chat_format": chat_format_for(tok).name,
            "fits": tok.n_words <= vocab,
        }
    else:
        info["tokenizer"] = {"path": str(tok_path) if tok_path else None, "error": tok_error}
    return info
