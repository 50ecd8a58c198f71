"""A training run's output folder and the state saved in it.

The folder holds a Meta checkpoint (`params.json`, `consolidated.00.pth`,
`tokenizer.model`), `train_state.pt` (model, optimizer, step, batch-sampler
and dropout RNG states, settings, log), the token files under `data/`, and
the reports (report.py). `prepare_out` checks the folder for a new run
(`--force` replaces only the files listed in OWNED) or reads the state to
resume; `prepare_data` makes the tokenizer and token files once;
`state_payload` / `restore_state` / `save_state` turn the loop's objects
into train_state.pt and back, every file written atomically.

Leaves out: what the settings mean (config.py), when to save (loop.py), the
logs and plot (report.py).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from nabla.checkpoint.io import atomic_torch_save, atomic_write_bytes
from nabla.checkpoint.meta import save_meta_checkpoint
from nabla.device import rng_state, set_rng_state
from nabla.errors import CheckpointError, ConfigError
from nabla.model.args import ModelArgs, from_name
from nabla.training import data
from nabla.training.config import TrainConfig

STATE_FILE = "train_state.pt"
# Files a training run owns in its output folder (what --force replaces).
OWNED = ("train_state.pt", "params.json", "consolidated.00.pth", "tokenizer.model", "log.csv",
         "loss.png", "summary.json", "data")


def load_state(out: Path, state_file: str = STATE_FILE) -> dict:
    """The saved state of the run in `out` (tensors and plain data only)."""
    return torch.load(out / state_file, map_location="cpu", weights_only=True)


def remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files and folders (`.NAME.*.tmp`) a run killed mid-write left behind."""
    for p in out.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def unfinished(out: Path, state_file: str = STATE_FILE, owned: tuple[str, ...] = OWNED) -> bool:
    """A run that stopped before its first checkpoint: only files a run owns, and no saved state."""
    return not (out / state_file).exists() and all(p.name in owned for p in out.iterdir())


def prepare_out(cfg, out: Path, state_file: str = STATE_FILE, owned: tuple[str, ...] = OWNED,
                what: str = "training") -> dict | None:
    """Check the output folder of a run (`nabla train`, or `nabla finetune` with its own state file and
    owned files); returns the saved state when resuming (cfg.resume), clears the owned files with cfg.force.

    A run killed before its first checkpoint starts again on a plain rerun;
    temporary files of a write that was cut short are removed either way.
    """
    state_path = out / state_file
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder (it is created if missing)")
    if out.is_dir():
        remove_stale_temporaries(out)
    if cfg.resume:
        if not state_path.is_file():
            stopped_early = out.is_dir() and unfinished(out, state_file, owned)
            raise CheckpointError(
                f"--resume: {state_path} not found; nothing to resume in {out}"
                + (" (its run stopped before the first checkpoint). Run the same command without --resume "
                   "to start it again" if stopped_early else ". Start a new run without --resume"))
        try:
            return load_state(out, state_file)
        except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways: say so, never a traceback
            raise CheckpointError(f"cannot read {state_path} ({str(e).splitlines()[0]}); "
                                  "start over with --force") from None
    if out.is_dir() and any(out.iterdir()):
        if not cfg.force and not unfinished(out, state_file, owned):
            raise ConfigError(f"output folder {out} exists and is not empty; pass --resume to continue "
                              f"its {what}, --force to overwrite it, or another --out")
        for name in owned:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass  # can files be made there? (a read-only disk, a folder of someone else's)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {out} ({e.strerror or e}); "
                          "name a folder you can write to") from None
    return None


def prepare_data(cfg: TrainConfig, tok_path: Path, data_dir: Path) -> None:
    """Tokenizer (given, inherited from --init-from, or trained) and the token files."""
    from nabla.tokenizer.sentencepiece import SentencePieceTokenizer

    sources = data.parse_sources(cfg.data)
    given_tok = cfg.tokenizer or (str(Path(cfg.init_from) / "tokenizer.model") if cfg.init_from else None)
    if cfg.resume and tok_path.is_file():  # re-tokenizing a resumed run: keep the model's tokenizer
        given_tok = str(tok_path)
    if given_tok:
        if not Path(given_tok).is_file():
            raise ConfigError(f"tokenizer {given_tok} not found; pass --tokenizer path/to/tokenizer.model")
        SentencePieceTokenizer(given_tok)  # fails clearly if it is not one
        if Path(given_tok).resolve() != tok_path.resolve():
            atomic_write_bytes(tok_path, Path(given_tok).read_bytes())
    else:
        vocab = cfg.vocab_size or from_name(cfg.preset).vocab_size
        print(f"nabla train: training a {vocab}-piece BPE tokenizer", file=sys.stderr)
        data.train_tokenizer(sources, tok_path, vocab, seed=cfg.seed)
    tokenizer = SentencePieceTokenizer(tok_path)
    print("nabla train: tokenizing the corpus", file=sys.stderr)
    data.build_token_files(sources, tokenizer, data_dir, cfg.val_fraction, cfg.seed)


def open_data(data_dir: Path, seq_len: int) -> data.TokenData:
    """The prepared token files, checked to hold at least one sequence per split."""
    try:
        tokens = data.TokenData(data_dir)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"the token files in {data_dir} are damaged ({e}); delete that folder and "
                              "run again to re-tokenize the corpus") from None
    tokens.check(seq_len)
    return tokens


def state_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, gen: torch.Generator, step: int,
                  history: list[dict], cfg: TrainConfig, args: ModelArgs, device: torch.device) -> dict:
    """What train_state.pt holds: enough to continue bit for bit."""
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": step, "batch_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
        "config": asdict(cfg), "model_args": args.as_dict(), "history": history,
    }
    if rng_state(device) is not None:
        payload["cuda_rng"] = rng_state(device)
    return payload


def restore_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, gen: torch.Generator,
                  device: torch.device) -> tuple[int, list[dict]]:
    """Load a saved payload into the loop's objects and RNGs; returns the step and the log so far."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["batch_rng"])
    torch.set_rng_state(state["torch_rng"])
    set_rng_state(device, state.get("cuda_rng"))
    return int(state["step"]), list(state["history"])


def save_state(out: Path, payload: dict, model: torch.nn.Module, args: ModelArgs,
               dtype: torch.dtype | None) -> None:
    """The Meta folder (weights in `dtype`), then train_state.pt; each file atomically."""
    save_meta_checkpoint(out, model, args, out / "tokenizer.model", dtype=dtype)
    atomic_torch_save(payload, out / STATE_FILE)
