"""Checkpoint folders: find out what a folder holds and open it.

`open_checkpoint(dir)` tells the format from the files (never the folder's
name) and returns the model's settings, a lazily loaded, memory-mapped state
dict in Meta's naming, the stored dtype and shapes, and the folder's
tokenizer file if any:

    Meta:          params.json + consolidated.NN.pth (any number of shards)
    Hugging Face:  config.json + model.safetensors, sharded safetensors with
                   model.safetensors.index.json, or pytorch_model*.bin; the
                   families of nabla.checkpoint.families (Llama, Mistral,
                   Qwen2/3, Gemma, Gemma 2, Phi-3)
    GGUF:          one .gguf file (llama.cpp), passed itself or in a folder of
                   its own (nabla.checkpoint.gguf_read)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nabla.checkpoint import hf, meta
from nabla.checkpoint.meta import args_from_params, read_params
from nabla.checkpoint.shards import LazyState, merge_shards
from nabla.errors import CheckpointError
from nabla.jsonfile import read_json_object, token_ids
from nabla.model.args import ModelArgs
from nabla.tokenizer.stops import eos_token_ids

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
PROGRESS_BYTES = 1 << 30  # checkpoints from 1 GiB load with a progress bar


@dataclass
class Checkpoint:
    path: Path
    format: str  # "meta", "hf" or "gguf"
    args: ModelArgs  # vocab_size may be -1 (take it from the tokenizer)
    load_state: Callable[[], Mapping[str, torch.Tensor]]
    tokenizer_path: Path | None
    dtype: torch.dtype | None = None
    """The dtype the weights are stored in."""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Every weight's shape in Meta naming (shards merged), known without loading."""
    files: list[Path] = field(default_factory=list)
    """The weight files."""
    num_shards: int = 1
    """Model-parallel shards (Meta) or weight files (HF)."""
    context_length: int | None = None
    """The context the model was trained for (HF max_position_embeddings), when known."""
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    """The eos_token_id lists of config.json and generation_config.json (nabla.tokenizer.stops.eos_token_ids)."""
    quantization: dict | None = None
    """{"mode": "int8" | "int4", "group_size": n} for a folder `nabla convert --quantize` wrote."""
    config: dict | None = None
    """A Hugging Face folder's config.json, as read (kept by `nabla convert --to hf`)."""

    @property
    def n_params(self) -> int:
        total = 0
        for key, shape in self.shapes.items():
            if key != "rope.freqs":
                n = 1
                for s in shape:
                    n *= s
                total += n
        return total

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def show_progress(self) -> bool:
        """Whether loading deserves a progress bar: a big checkpoint and a terminal to draw on."""
        return self.size_bytes >= PROGRESS_BYTES and sys.stderr.isatty()


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


def find_tokenizer(path: Path, prefer: tuple[str, ...] = TOKENIZER_FILES) -> Path | None:
    for name in prefer:
        if (path / name).is_file():
            return path / name
    return None


def detect_format(path: Path) -> str:
    """'meta', 'hf' or 'gguf', from which files the folder holds."""
    has_meta = (path / "params.json").is_file() and bool(meta.shard_paths(path))
    hf_files = hf.weight_files(path) if (path / "config.json").is_file() else []
    has_hf = bool(hf_files)
    if has_meta and has_hf:
        raise CheckpointError(
            f"{path} holds both a Meta checkpoint (params.json + consolidated.*.pth) and a Hugging Face "
            "one (config.json + weights); move one of them to its own folder and pass that folder")
    if has_meta:
        return "meta"
    if has_hf:
        return "hf"
    from nabla.checkpoint.gguf_read import find_gguf

    if find_gguf(path) is not None:
        return "gguf"
    if (path / "params.json").is_file():
        raise CheckpointError(f"{path} has params.json but no consolidated.*.pth weight file; "
                              "download the weights into the same folder")
    if meta.shard_paths(path):
        raise CheckpointError(f"{path} has consolidated.*.pth but no params.json; a Meta checkpoint "
                              "needs the params.json that came with it")
    if (path / "config.json").is_file():
        raise CheckpointError(f"{path} has config.json but no weights: expected model.safetensors, "
                              "model.safetensors.index.json (with its shards) or pytorch_model.bin")
    names = ", ".join(sorted(p.name for p in path.iterdir())[:8])
    raise CheckpointError(f"{path} is not a model folder nabla knows: expected params.json + "
                          f"consolidated.*.pth (Meta) or config.json + model.safetensors (Hugging Face), "
                          f"but found: {names}")


def _meta_state(path: Path, params: dict) -> LazyState:
    return merge_shards([meta.load_shard(p) for p in meta.shard_paths(path)], params, file_backed=True)


QUANTIZATION_FILE = "quantization.json"


def read_quantization(path: Path) -> dict | None:
    """The folder's quantization.json (written by `nabla convert --quantize`), checked; None if absent."""
    from nabla.model.quantize import GROUP_SIZE, INT4_LAYOUT, MODES

    f = path / QUANTIZATION_FILE
    if not f.is_file():
        return None
    q = read_json_object(f)
    mode, group = q.get("mode"), q.get("group_size", GROUP_SIZE)
    if mode not in MODES or isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise CheckpointError(f"{f}: expected {{\"mode\": \"int8\" or \"int4\", \"group_size\": 32}}, got {q}; "
                              "convert the original checkpoint again with `nabla convert --quantize`")
    if mode == "int4" and (q.get("layout") != INT4_LAYOUT or group != GROUP_SIZE):
        raise CheckpointError(f"{f}: these int4 weights were saved by an older nabla in another layout "
                              f"({q.get('layout', 'scale and offset per group')}); nabla's int4 is now llama.cpp's "
                              "Q4_0: convert the original checkpoint again with `nabla convert --quantize int4`")
    return {"mode": mode, "group_size": group}


def open_checkpoint(ckpt_dir: str | Path) -> Checkpoint:
    from nabla.checkpoint import gguf_read

    if Path(ckpt_dir).is_file() and gguf_read.is_gguf(Path(ckpt_dir)):
        return gguf_read.open_gguf(ckpt_dir)
    path = check_folder(ckpt_dir)
    fmt = detect_format(path)
    if fmt == "gguf":
        return gguf_read.open_gguf(gguf_read.find_gguf(path))
    if fmt == "meta":
        params = read_params(path / "params.json")
        args = args_from_params(params)
        state = _meta_state(path, params)  # reads only the pickles: shapes and dtypes
        files = meta.shard_paths(path)
        return Checkpoint(path, "meta", args, lambda: _meta_state(path, params), find_tokenizer(path),
                          dtype=hf.state_dtype(state), shapes=state.shapes, files=files, num_shards=len(files),
                          quantization=read_quantization(path))
    config = read_json_object(path / "config.json")
    args = hf.config_to_args(config, source=str(path / "config.json"))
    files = hf.weight_files(path)
    state = hf.load_hf_state(path, args, files)
    bos = token_ids(config.get("bos_token_id"), str(path / "config.json"))
    return Checkpoint(path, "hf", args, lambda: hf.load_hf_state(path, args, files),
                      find_tokenizer(path, ("tokenizer.json", "tokenizer.model")),
                      dtype=hf.state_dtype(state), shapes=state.shapes, files=files, num_shards=len(files),
                      context_length=config.get("max_position_embeddings"),
                      bos_id=bos[0] if bos else None, eos_ids=eos_token_ids(path), config=config)


__all__ = ["Checkpoint", "open_checkpoint", "detect_format", "find_tokenizer", "check_folder"]
