"""What a training run tells: console lines, log.csv, loss.png and summary.json.

The loop keeps its log as a list of dicts (one per step, plus one per
validation run); `write_log` writes it as log.csv and `plot` as loss.png.
Console lines go to stderr with the command's prefix (`nabla train:`, or
`nabla finetune:` inside `speaking_as("finetune")`), so stdout stays free;
files are written atomically.

Leaves out: the progress bar (the loop owns it), train_state.pt and the
Meta checkpoint (rundir.py).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from nabla.checkpoint.io import atomic_write_bytes, atomic_write_text
from nabla.model.args import ModelArgs
from nabla.training.config import TrainConfig
from nabla.training.data import TokenData

LOG_COLUMNS = ["step", "lr", "train_loss", "val_loss", "val_bpb", "time"]


COMMAND = ["train"]
"""The command whose run this is, named at the start of each console line."""


@contextlib.contextmanager
def speaking_as(command: str):
    """Console lines inside the block start with `nabla <command>:`."""
    COMMAND.append(command)
    try:
        yield
    finally:
        COMMAND.pop()


def say(line: str, lead: str = "") -> None:
    print(f"{lead}nabla {COMMAND[-1]}: {line}", file=sys.stderr)


def print_start(n_params: int, args: ModelArgs, data: TokenData, tokens_per_step: int, world: int,
                device: torch.device, step: int, steps: int) -> None:
    """The model, the data and the batch in one line (and where a resumed run picks up)."""
    say(f"{n_params / 1e6:.2f}M parameters ({args.dim} wide, {args.n_layers} layers, "
        f"vocab {args.vocab_size}); {len(data.train):,} training / {len(data.val):,} validation "
        f"tokens; {tokens_per_step:,} tokens per step on {world} x {device}")
    if step:
        say(f"resuming at step {step} of {steps}")


def val_line(step: int, m: dict) -> str:
    return f"step {step}: val loss {m['loss']:.4f}, {m['bpb']:.4f} bits/byte"


def print_final_validation(step: int, m: dict) -> None:
    """The final validation: overall, then per source."""
    say(val_line(step, m))
    for name, s in m["sources"].items():
        print(f"  {name}: loss {s['loss']:.4f}, {s['bpb']:.4f} bits/byte", file=sys.stderr)


def print_done(out: Path, step: int, stopped: bool) -> None:
    say(f"{'stopped at' if stopped else 'finished'} step {step}; saved {out}"
        + (" (continue with --resume)" if stopped else ""))


def write_summary(out: Path, result: dict, args: ModelArgs, cfg: TrainConfig) -> None:
    """summary.json: the final metrics, the model's params.json and the settings."""
    atomic_write_text(out / "summary.json", json.dumps(
        {**result, "model_args": args.to_params(), "config": asdict(cfg)}, indent=2) + "\n")


def write_log(out: Path, history: list[dict]) -> None:
    """log.csv: one row per step and per validation run."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out / "log.csv", buf.getvalue())


def plot(out: Path, history: list[dict]) -> None:
    """loss.png: training loss (smoothed) and validation loss against step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return
    tr = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    va = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        s, loss = map(np.array, zip(*tr))
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(s[k - 1:], smooth, label="train (smoothed)")
    if va:
        s, loss = zip(*va)
        ax.plot(s, loss, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out / "loss.png", buf.getvalue())
