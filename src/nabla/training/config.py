"""The settings of a training run: `TrainConfig`, its checks, the model shape, and resume merging.

`TrainConfig.from_given(given)` turns keyword settings into settings (unknown
names fail); `check_config` refuses values the loop cannot use; `get_model_args`
picks the model shape (preset, or --init-from's params.json, then the shape
flags); `merge_resumed` lays the flags given now over the settings saved
with a run, refusing any change of architecture.

Leaves out: the command-line flags (commands.py), the output folder and
saved state (rundir.py), the loop (loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

# The flags that change the model's shape (and so cannot change on --resume or with --init-from).
from nabla.checkpoint.meta import args_from_params, read_params
from nabla.errors import CheckpointError, ConfigError
from nabla.model.args import ModelArgs, from_name

SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")
# Settings of one invocation only: never taken from the run being resumed.
PER_RUN = ("stop_at", "time_limit", "force", "progress")


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)
    """Text files or folders; `PATH*N` repeats that source's training text N times."""
    out: str = "out"
    """The output folder: the Meta checkpoint, train_state.pt, the token files and the logs."""
    preset: str = "stories"
    """A shape from nabla.model.args.SHAPES."""
    init_from: str | None = None
    """A Meta folder whose weights (and tokenizer) to start from."""
    tokenizer: str | None = None
    """An existing tokenizer.model to use instead of training one."""
    dim: int | None = None
    """Model width (overrides the preset, as do the four shape fields below)."""
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    """Embeddings; by default one per tokenizer piece (a trained tokenizer gets the preset's size)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 32
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step, summed over all processes."""
    lr: float = 1e-3
    """Peak learning rate, reached after `warmup` steps."""
    min_lr: float | None = None
    """Final learning rate of the cosine decay (None: lr / 10)."""
    warmup: int = 100
    """Steps of linear warmup."""
    steps: int = 2000
    """Optimizer steps in the whole run."""
    eval_every: int = 200
    """Steps between validation runs."""
    eval_tokens: int = 32_768
    """Validation tokens per periodic evaluation (the final one uses 8x as many)."""
    save_every: int = 500
    """Steps between checkpoints."""
    seed: int = 1337
    """Seed of the initial weights, the tokenizer, the validation split and the data order."""
    dropout: float = 0.0
    """Dropout probability."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Gradient norm clip; 0 for none."""
    val_fraction: float = 0.05
    """Share of documents held out for validation."""
    compile: bool = False
    """torch.compile the model."""
    device: str | None = None
    """cpu, cuda, cuda:N or mps (None: the best available)."""
    save_dtype: str = "fp32"
    """dtype of consolidated.00.pth (bf16 halves the file)."""
    stop_at: int | None = None
    """Save and stop after this step (to train in chunks; continue with resume)."""
    time_limit: float | None = None
    """Save and stop after this many minutes."""
    resume: bool = False
    """Continue the run saved in `out` exactly."""
    force: bool = False
    """Overwrite a previous run in `out`."""
    progress: bool = True
    """Show a progress bar."""

    @classmethod
    def from_given(cls, given: dict) -> TrainConfig:
        """Settings from keyword arguments; None means the default. Unknown names fail."""
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in given.items() if v is not None})


def check_config(cfg: TrainConfig, world: int) -> None:
    """Refuse settings the loop cannot use, naming the flag; `world` is the number of processes."""
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "save_every", "eval_tokens"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {cfg.warmup}")
    if not cfg.lr > 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be 0 or more, got {cfg.weight_decay}")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1, got {cfg.val_fraction}")
    if cfg.grad_accum % world:
        raise ConfigError(f"--grad-accum {cfg.grad_accum} must be a multiple of the number of processes "
                          f"({world}), so each computes the same number of micro-batches")
    if not cfg.data and not cfg.resume:
        raise ConfigError("no training text: pass --data FILE_OR_DIR (or --resume an existing run)")


def get_model_args(cfg: TrainConfig, n_words: int | None) -> ModelArgs:
    """The model shape: preset (or --init-from params.json), then the flags."""
    overrides = {k: getattr(cfg, k) for k in SHAPE_KEYS if getattr(cfg, k) is not None}
    if cfg.init_from:
        args = args_from_params(read_params(Path(cfg.init_from) / "params.json"))
        changed = {k: v for k, v in overrides.items() if getattr(args, k) != v}
        if changed:
            raise ConfigError(f"--init-from {cfg.init_from} has a fixed shape; drop the flags {changed} "
                              "or train from scratch without --init-from")
        return args
    if "vocab_size" not in overrides and n_words is not None:
        overrides["vocab_size"] = n_words
    if "n_heads" in overrides and "n_kv_heads" not in overrides:
        overrides["n_kv_heads"] = None
    return from_name(cfg.preset, **overrides)


def merge_resumed(cfg: TrainConfig, state: dict, given: dict) -> TrainConfig:
    """Saved settings, with the flags given now on top; the model shape may not change."""
    saved = dict(state["config"])
    saved_args = state["model_args"]
    changed = {k: (saved_args[k], given[k]) for k in SHAPE_KEYS
               if given.get(k) is not None and saved_args.get(k) != given[k]}
    if given.get("seq_len") is not None and given["seq_len"] != saved["seq_len"]:
        changed["seq_len"] = (saved["seq_len"], given["seq_len"])
    if given.get("preset") and given["preset"] != saved["preset"]:
        changed["preset"] = (saved["preset"], given["preset"])
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise CheckpointError(f"--resume: the checkpoint in {cfg.out} has a different architecture "
                              f"({what}); drop those flags, or start a new run with --out elsewhere")
    names = {f.name for f in fields(TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in names and k not in PER_RUN}
    merged.update({k: v for k, v in given.items() if v is not None})
    merged["resume"] = True
    return TrainConfig(**merged)
