"""Meta-format checkpoints: `params.json` + `consolidated.NN.pth` (+ `tokenizer.model`).

`read_params` and `args_from_params` turn params.json into ModelArgs (as
nabla.checkpoint.hf does for config.json).

Weights are opened with `torch.load(weights_only=True, mmap=True)`, so a
checkpoint is paged in from disk as it is copied into the model instead of
being held twice in memory. Extra keys (`rope.freqs`) are ignored; missing or
mis-shaped keys are an error naming the key.
"""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from dataclasses import fields
from pathlib import Path

import torch

from nabla.checkpoint.io import atomic_torch_save, atomic_write_bytes, atomic_write_text
from nabla.errors import CheckpointError, ConfigError
from nabla.jsonfile import read_json_object
from nabla.model.args import LLAMA3_ROPE_SCALING, ModelArgs

IGNORED_KEYS = ("rope.freqs",)


# Keys of Meta params.json files that change nothing in the math: the run's
# cache sizes, which Meta's files (and older nabla training states) carry.
_IGNORED_PARAMS = {"max_batch_size", "max_seq_len"}
_PARAM_KEYS = {f.name for f in fields(ModelArgs)} | {"use_scaled_rope"} | _IGNORED_PARAMS


def read_params(path: str | Path) -> dict:
    """params.json as a dict, with a clear error when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} is missing: a Meta checkpoint folder needs params.json next to its .pth files")
    return read_json_object(path, "a JSON object of model settings")


REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")
"""Keys a params.json must give: a default for these would describe some other model."""


def args_from_params(params: dict, **overrides) -> ModelArgs:
    """ModelArgs from a Meta params.json dict; unknown keys warn, bad values raise."""
    params = dict(params)
    absent = [k for k in REQUIRED_PARAMS if k not in params and k not in overrides]
    if absent:
        raise ConfigError(f"params.json has no {', '.join(repr(k) for k in absent)}: a Meta params.json gives "
                          f"{', '.join(REQUIRED_PARAMS)}; add the missing key(s) with this model's values")
    unknown = sorted(set(params) - _PARAM_KEYS)
    if unknown:
        warnings.warn(f"params.json has keys nabla does not use, ignored: {', '.join(unknown)}", stacklevel=2)
        for key in unknown:
            del params[key]
    for key in _IGNORED_PARAMS:
        params.pop(key, None)
    if params.pop("use_scaled_rope", False) and params.get("rope_scaling") is None:
        params["rope_scaling"] = dict(LLAMA3_ROPE_SCALING)
    for key in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
        if isinstance(params.get(key), int) and not isinstance(params.get(key), bool):
            params[key] = float(params[key])
    try:
        return ModelArgs(**{**params, **overrides})
    except TypeError as e:
        raise ConfigError(f"invalid model settings: {e}") from None


def shard_paths(ckpt_dir: str | Path) -> list[Path]:
    """The consolidated.*.pth files of a Meta folder, in shard order."""
    return sorted(Path(ckpt_dir).glob("consolidated.*.pth"))


def load_shard(path: str | Path) -> dict[str, torch.Tensor]:
    """One .pth state dict, memory-mapped, with a clear error when the file is damaged."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; "
                              "download or copy it again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"cannot read {path}: {str(e).splitlines()[0]}. The file may be truncated or not a "
            f"PyTorch checkpoint; re-download or re-convert it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    if "model" in state and isinstance(state["model"], dict):  # a training checkpoint
        state = state["model"]
    return state


def load_meta_state(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a Meta folder with one shard."""
    paths = shard_paths(ckpt_dir)
    if not paths:
        raise CheckpointError(f"no consolidated.*.pth in {ckpt_dir}; a Meta checkpoint folder holds "
                              "params.json and consolidated.00.pth")
    if len(paths) > 1:
        from nabla.checkpoint.shards import merge_shards  # model-parallel checkpoints

        return merge_shards([load_shard(p) for p in paths])
    return load_shard(paths[0])


def expected_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
              progress: bool = False) -> None:
    """Copy `state` into `model` (casting dtype), checking every key and shape."""
    want = expected_shapes(model)
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    missing = [k for k in want if k not in state and not (tied and k == "output.weight")]
    if missing:
        raise CheckpointError(f"{source} is missing weights: {_some(missing)}. "
                              "Is it a checkpoint of this model (see params.json)?")
    unused = [k for k in state if k not in want and k not in IGNORED_KEYS]
    if unused:  # e.g. a 6-layer checkpoint whose params.json says 5: never drop weights silently
        raise CheckpointError(f"{source} has weights the model's config does not use: {_some(unused)}. "
                              "Its config (params.json / config.json) does not describe these weights; "
                              "fix the config (n_layers, dims) or use the checkpoint it belongs to")
    if tied and model.output.weight is not model.tok_embeddings.weight:
        model.output.weight = model.tok_embeddings.weight  # to_empty() unties shared weights
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    keys = [k for k in want if k in state]
    it = keys
    if progress:
        from tqdm import tqdm

        it = tqdm(keys, desc="loading weights", unit="tensor", leave=False)
    release = getattr(state, "release", None)  # memory-mapped files: drop pages once copied
    with torch.no_grad():
        for key in it:
            src = state[key]
            if not isinstance(src, torch.Tensor):
                raise CheckpointError(f"{source}: {key} is not a tensor")
            if src.shape != want[key]:
                raise CheckpointError(f"{source}: {key} has shape {tuple(src.shape)}, the model expects "
                                      f"{tuple(want[key])} (check params.json against the weights)")
            dst = params[key]
            dst.copy_(src)
            del src
            if dst.is_floating_point() and not bool(torch.isfinite(dst).all()):
                raise CheckpointError(f"{source}: {key} holds NaN or infinite values; the file is damaged "
                                      "(check it with `nabla info --verify`) or was saved from a diverged run")
            if release is not None:
                release(key)


def _some(keys: list[str]) -> str:
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return ", ".join(keys[:5]) + more


def save_meta_checkpoint(out_dir: str | Path, model: torch.nn.Module, args: ModelArgs,
                         tokenizer_path: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a Meta folder that Meta's code and nabla both load; each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        state.pop("output.weight", None)
    atomic_torch_save(state, out / "consolidated.00.pth")
    atomic_write_text(out / "params.json", json.dumps(args.to_params(), indent=2) + "\n")
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != (out / "tokenizer.model").resolve():
        atomic_write_bytes(out / "tokenizer.model", Path(tokenizer_path).read_bytes())
    return out
