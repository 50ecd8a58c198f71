"""Checkpoint folders: find out what a folder holds and open it.

`open_checkpoint(dir)` returns the model's settings, a (lazily loaded, memory
mapped) state dict in Meta's naming, and the folder's tokenizer file if any.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nabla.checkpoint import meta
from nabla.errors import CheckpointError
from nabla.model.args import ModelArgs, args_from_params, read_params

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


@dataclass
class Checkpoint:
    path: Path
    format: str  # "meta" or "hf"
    args: ModelArgs  # vocab_size may be -1 (take it from the tokenizer)
    load_state: Callable[[], dict[str, torch.Tensor]]
    tokenizer_path: Path | None


def check_folder(ckpt_dir: str | Path) -> Path:
    path = Path(ckpt_dir)
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist; pass the folder that holds "
                              "params.json and consolidated.00.pth (or config.json and *.safetensors)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that contains it")
    if not any(path.iterdir()):
        raise CheckpointError(f"checkpoint folder {path} is empty; download or convert a model into it")
    return path


def find_tokenizer(path: Path) -> Path | None:
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            return path / name
    return None


def open_checkpoint(ckpt_dir: str | Path, **overrides) -> Checkpoint:
    path = check_folder(ckpt_dir)
    if meta.is_meta_checkpoint(path):
        if not meta.shard_paths(path):
            raise CheckpointError(f"{path} has params.json but no consolidated.*.pth weight file")
        args = args_from_params(read_params(path / "params.json"), **overrides)
        return Checkpoint(path, "meta", args, lambda: meta.load_meta_state(path), find_tokenizer(path))
    names = ", ".join(sorted(p.name for p in path.iterdir())[:8])
    raise CheckpointError(f"{path} is not a model folder nabla knows: expected params.json + "
                          f"consolidated.*.pth (Meta) but found: {names}")
