"""Tiny checkpoints in every layout, built from one random Meta state dict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import LLAMA2_TOKENIZER, TINYLLAMA_DIR, random_state
from hf_reference import hf_model_from_meta

from nabla.checkpoint.meta import args_from_params

TOKENS = [[1, 15043, 3186, 372, 338, 263, 1243, 29889]]  # "<s> Hello world it is a test."


def tiny_args(params: dict, **overrides):
    return args_from_params(dict(params), **overrides)


def meta_folder(path: Path, params: dict, state: dict, tokenizer: Path | None = LLAMA2_TOKENIZER) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    torch.save(state, path / "consolidated.00.pth")
    if tokenizer is not None:
        shutil.copy(tokenizer, path / "tokenizer.model")
    return path


def copy_hf_tokenizer(path: Path) -> None:
    for f in TINYLLAMA_DIR.iterdir():
        if f.name != "config.json":
            shutil.copy(f, path / f.name)


def hf_folder(path: Path, params: dict, seed: int = 0, *, max_shard_size: str | None = None,
              bin_file: bool = False, dtype=None):
    """save_pretrained of a transformers LlamaForCausalLM holding `random_state(params)`.

    Returns (folder, the HF model, the Meta state)."""
    args = tiny_args(params)
    state = random_state(args, seed)
    hf = hf_model_from_meta(state, args)
    if dtype is not None:
        hf = hf.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    if bin_file:
        hf.config.save_pretrained(path)
        sd = {k: v for k, v in hf.state_dict().items() if not (args.tie_word_embeddings and k == "lm_head.weight")}
        torch.save(sd, path / "pytorch_model.bin")
    elif max_shard_size:
        hf.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        hf.save_pretrained(path)
    copy_hf_tokenizer(path)
    return path, hf, state


def hf_logits(hf, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.float()


def hf_greedy(hf, tokens: list[int], n: int) -> list[int]:
    """Greedy continuation by full recomputation (no cache): the plainest reference."""
    ids = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(tokens):]


def nabla_greedy(llama, tokens: list[int], n: int) -> list[int]:
    out, _ = llama.generate([tokens], max_gen_len=n, temperature=0.0)
    return out[0]
