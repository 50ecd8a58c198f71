"""Shared fixtures: tiny random checkpoints in Meta format, built on the fly."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/hf_reference.py and friends

DATA = Path(__file__).resolve().parent / "data"  # real files the tests need; origins in SOURCES.md
LLAMA2_TOKENIZER = DATA / "llama2" / "tokenizer.model"
LLAMA3_TOKENIZER = DATA / "llama3" / "tokenizer.model"
TINYLLAMA_DIR = DATA / "tinyllama-1.1b-chat-v1.0"
STORY_TEXT = DATA / "tinystories-v1-head.txt"

torch.set_num_threads(min(2, torch.get_num_threads()))
# Every test computes on the CPU in fp32, where the references are exact, even
# on a machine with a GPU; tests/gpu names its device itself.
os.environ["NABLA_DEVICE"] = "cpu"


def random_state(args, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random weights for a model of shape `args`, in Meta's naming."""
    from nabla.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_meta_checkpoint(path: Path, params: dict, state: dict, tokenizer: Path | None = LLAMA2_TOKENIZER,
                          dtype: torch.dtype | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    torch.save(state, path / "consolidated.00.pth")
    if tokenizer is not None:
        shutil.copy(tokenizer, path / "tokenizer.model")
    return path


TINY_MHA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=32000, multiple_of=32,
                norm_eps=1e-5)
TINY_GQA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32,
                norm_eps=1e-6, rope_theta=500000.0)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(params=TINY_MHA, seed=0, dtype=None) -> folder with params.json, weights, tokenizer."""
    from nabla.checkpoint.meta import args_from_params

    made = {}

    def make(params: dict | None = None, seed: int = 0, dtype=None, tokenizer=LLAMA2_TOKENIZER):
        params = dict(params or TINY_MHA)
        key = (json.dumps(params, sort_keys=True), seed, str(dtype), str(tokenizer))
        if key not in made:
            args = args_from_params(params)
            path = tmp_path_factory.mktemp("ckpt")
            made[key] = write_meta_checkpoint(path, params, random_state(args, seed), tokenizer, dtype)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(make_checkpoint):
    from nabla import Llama

    return Llama.build(make_checkpoint(TINY_MHA), None, max_seq_len=128, max_batch_size=4)
