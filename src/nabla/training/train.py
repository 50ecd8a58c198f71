"""Train a Llama model from scratch (or continue one) on a text corpus.

A short nanoGPT-style loop: `get_batch` draws random windows of the token
stream, `get_lr` warms up then decays, AdamW (weight decay on 2-D weights
only) steps after `grad_accum` micro-batches with gradient clipping, and
`estimate_loss` reports validation loss and bits per byte every
`eval_every` steps. bf16 autocast on GPUs that have it; fp32 elsewhere.

Nothing is lost: `train_state.pt` (model, optimizer, step, batch-sampler and
dropout RNG states, settings, log) and the Meta folder (`params.json`,
`consolidated.00.pth`, `tokenizer.model`) are written atomically every
`save_every` steps, at the end, and on Ctrl-C / SIGTERM; `resume=True`
continues exactly (on CPU, N steps straight and N/2 + resume + N/2 give
bit-identical weights).

Under `torchrun` every process draws the same global batch from the same
seeded generator and computes its share of the micro-batches; DDP averages
the gradients, so W processes match one at the same global batch (up to
float summation order).

Leaves out: fine-tuning tricks (LoRA, frozen layers), mixed-precision loss
scaling for fp16-only GPUs (those train in fp32 here), pipeline/tensor parallel.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from nabla.checkpoint.io import atomic_torch_save, atomic_write_bytes, atomic_write_text
from nabla.checkpoint.meta import save_meta_checkpoint
from nabla.device import (autocast_dtype, choose_device, is_accelerator, parse_dtype, rng_state, set_rng_state,
                          use_all_cores)
from nabla.distributed import data_parallel
from nabla.errors import CheckpointError, ConfigError, NablaError
from nabla.model.args import ModelArgs, args_from_params, from_name, param_count, read_params
from nabla.model.llama import Transformer
from nabla.training.data import (TokenData, build_token_files, eval_windows, get_batch, parse_sources,
                                 token_byte_lengths, train_tokenizer)
from nabla.training.schedule import get_lr

STATE_FILE = "train_state.pt"
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")
# Files a training run owns in its output folder (what --force replaces).
OWNED = ("train_state.pt", "params.json", "consolidated.00.pth", "tokenizer.model", "log.csv",
         "loss.png", "summary.json", "data")


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)
    """Text files or folders; `PATH*N` repeats that source's training text N times."""
    out: str = "out"
    preset: str = "stories"
    """A shape from nabla.model.args.SHAPES."""
    init_from: str | None = None
    """A Meta folder whose weights (and tokenizer) to start from."""
    tokenizer: str | None = None
    """An existing tokenizer.model to use instead of training one."""
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    seq_len: int = 256
    batch_size: int = 32
    """Sequences per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step, summed over all processes."""
    lr: float = 1e-3
    min_lr: float | None = None
    warmup: int = 100
    steps: int = 2000
    eval_every: int = 200
    eval_tokens: int = 32_768
    """Validation tokens per periodic evaluation (the final one uses 8x as many)."""
    save_every: int = 500
    seed: int = 1337
    dropout: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    val_fraction: float = 0.05
    compile: bool = False
    device: str | None = None
    save_dtype: str = "fp32"
    """dtype of consolidated.00.pth (bf16 halves the file)."""
    stop_at: int | None = None
    """Save and stop after this step (to train in chunks; continue with resume)."""
    time_limit: float | None = None
    """Save and stop after this many minutes."""
    resume: bool = False
    force: bool = False
    progress: bool = True


# ---------------------------------------------------------------------------- helpers


def get_model_args(cfg: TrainConfig, n_words: int | None) -> ModelArgs:
    """The model shape: preset (or --init-from params.json), then the flags."""
    overrides = {k: getattr(cfg, k) for k in SHAPE_KEYS if getattr(cfg, k) is not None}
    if cfg.init_from:
        args = args_from_params(read_params(Path(cfg.init_from) / "params.json"), max_seq_len=cfg.seq_len)
        changed = {k: v for k, v in overrides.items() if getattr(args, k) != v}
        if changed:
            raise ConfigError(f"--init-from {cfg.init_from} has a fixed shape; drop the flags {changed} "
                              "or train from scratch without --init-from")
        return args
    if "vocab_size" not in overrides and n_words is not None:
        overrides["vocab_size"] = n_words
    if "n_heads" in overrides and "n_kv_heads" not in overrides:
        overrides["n_kv_heads"] = None
    return from_name(cfg.preset, max_seq_len=cfg.seq_len, **overrides)


def estimate_loss(model, data: TokenData, windows, token_bytes: np.ndarray, seq_len: int,
                  device: torch.device, ctx, batch_size: int) -> dict:
    """Validation loss (nats/token) and bits per byte over fixed windows, overall and per source."""
    model.eval()
    nats: dict[str, float] = {}
    toks: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    lengths = torch.from_numpy(token_bytes)
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            xy = torch.from_numpy(np.stack([data.val[i:i + seq_len + 1].astype(np.int64) for i, _ in chunk]))
            x, y = xy[:, :-1].to(device), xy[:, 1:]
            with ctx:
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none").view(y.shape).cpu()
            for row, (_, name) in enumerate(chunk):
                nats[name] = nats.get(name, 0.0) + loss[row].double().sum().item()
                toks[name] = toks.get(name, 0) + seq_len
                nbytes[name] = nbytes.get(name, 0) + int(lengths[y[row]].sum())
    model.train()
    total_nats, total_toks, total_bytes = sum(nats.values()), sum(toks.values()), sum(nbytes.values())
    out = {"loss": total_nats / max(1, total_toks),
           "bpb": total_nats / math.log(2) / max(1, total_bytes), "tokens": total_toks}
    out["sources"] = {k: {"loss": nats[k] / toks[k], "bpb": nats[k] / math.log(2) / max(1, nbytes[k])}
                      for k in nats}
    return out


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices (2-D) only; norms' gains are left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if is_accelerator(device) else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class _StopFlag:
    """Set by SIGTERM or a first Ctrl-C: finish the step, save, stop. A second Ctrl-C aborts."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        print(f"\nnabla train: {signal.Signals(signum).name}, saving a checkpoint after this step "
              "(Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------- output folder


def _prepare_out(cfg: TrainConfig, out: Path) -> dict | None:
    """Check the output folder; returns the saved state when resuming."""
    state_path = out / STATE_FILE
    if cfg.resume:
        if not state_path.is_file():
            raise CheckpointError(f"--resume: {state_path} not found; nothing to resume in {out}. "
                                  "Start a new run without --resume")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # damaged file: say so, never a traceback
            raise CheckpointError(f"cannot read {state_path} ({str(e).splitlines()[0]}); "
                                  "start over with --force") from None
        return state
    if out.exists() and any(out.iterdir()):
        if not cfg.force:
            raise ConfigError(f"output folder {out} exists and is not empty; pass --resume to continue "
                              "its training, --force to overwrite it, or another --out")
        for name in OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None


def _merge_resumed(cfg: TrainConfig, state: dict, given: dict) -> TrainConfig:
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
    per_run = ("stop_at", "time_limit", "force", "progress")  # settings of one invocation only
    merged = {k: v for k, v in saved.items() if k in names and k not in per_run}
    merged.update({k: v for k, v in given.items() if v is not None})
    merged["resume"] = True
    return TrainConfig(**merged)


# ---------------------------------------------------------------------------- training


def train(**given) -> dict:
    """Run (or resume) a training run; returns the final metrics. Keyword args are TrainConfig fields."""
    unknown = set(given) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown training settings: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = choose_device(cfg.device)
    if ddp:
        with data_parallel.process_group(device):
            return _train(cfg, given, device, rank, world, ddp)
    if device.type == "cpu":
        use_all_cores()
    return _train(cfg, given, device, rank, world, ddp)


def _barrier(ddp: bool) -> None:
    if ddp:
        data_parallel.barrier()


def _train(cfg: TrainConfig, given: dict, device: torch.device, rank: int, world: int, ddp: bool) -> dict:
    master = rank == 0
    out = Path(cfg.out)
    state = None
    if master:
        state = _prepare_out(cfg, out)
    _barrier(ddp)
    if not master and cfg.resume:
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
    if state is not None:
        cfg = _merge_resumed(cfg, state, given)
    _check_config(cfg, world)

    # Tokenizer and token files: made once by process 0, reused on resume.
    tok_path = out / "tokenizer.model"
    data_dir = out / "data"
    if master and not (data_dir / "meta.json").is_file():
        _prepare_data(cfg, tok_path, data_dir)
    _barrier(ddp)
    from nabla.tokenizer.sentencepiece import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(tok_path)
    try:
        data = TokenData(data_dir)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"the token files in {data_dir} are damaged ({e}); delete that folder and "
                              "run again to re-tokenize the corpus") from None
    data.check(cfg.seq_len)
    token_bytes = token_byte_lengths(tokenizer)

    if state is not None:
        args = ModelArgs(**{**state["model_args"], "max_seq_len": cfg.seq_len})
    else:
        args = get_model_args(cfg, tokenizer.n_words)
    if tokenizer.n_words > args.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.n_words} pieces but the model only {args.vocab_size} "
                          f"embeddings; pass --vocab-size {tokenizer.n_words} or a smaller tokenizer")

    torch.manual_seed(cfg.seed)
    model = Transformer(args, dropout=cfg.dropout).to(device)
    if cfg.init_from and state is None:
        from nabla.checkpoint.meta import load_into, load_meta_state

        load_into(model, load_meta_state(cfg.init_from), source=cfg.init_from)
    optimizer = configure_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)  # batch positions: the data order
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        set_rng_state(device, state.get("cuda_rng"))
        step, history = int(state["step"]), list(state["history"])
    if rank:
        torch.manual_seed(cfg.seed + rank)  # each process its own dropout masks

    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = data_parallel.wrap(model, device)
    amp = autocast_dtype(device)
    ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    save_dtype = parse_dtype(cfg.save_dtype)
    micro_per_rank = cfg.grad_accum // world
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    n_params = param_count(args)
    windows = eval_windows(data.meta, len(data.val), cfg.seq_len, cfg.eval_tokens)

    def save(final: bool = False) -> None:
        if not master:
            return
        payload = {
            "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "step": step, "batch_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "config": asdict(cfg), "model_args": args.as_dict(), "history": history,
        }
        if rng_state(device) is not None:
            payload["cuda_rng"] = rng_state(device)
        save_meta_checkpoint(out, raw, args, tok_path, dtype=save_dtype)
        atomic_torch_save(payload, out / STATE_FILE)
        _write_log(out, history)
        if final:
            _plot(out, history)

    def evaluate(win) -> dict:
        return estimate_loss(raw, data, win, token_bytes, cfg.seq_len, device, ctx, cfg.batch_size)

    if master:
        print(f"nabla train: {n_params / 1e6:.2f}M parameters ({args.dim} wide, {args.n_layers} layers, "
              f"vocab {args.vocab_size}); {len(data.train):,} training / {len(data.val):,} validation "
              f"tokens; {tokens_per_step:,} tokens per step on {world} x {device}", file=sys.stderr)
        if step:
            print(f"nabla train: resuming at step {step} of {cfg.steps}", file=sys.stderr)

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not (master and cfg.progress), unit="step",
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    t_start = time.time()
    t_last, tokens_since = time.time(), 0
    stopped = False
    with _StopFlag() as stop:
        while step < cfg.steps:
            if master and (step % cfg.eval_every == 0) and step > 0 and not _evaluated(history, step):
                m = evaluate(windows)
                history.append({"step": step, "val_loss": m["loss"], "val_bpb": m["bpb"],
                                "time": time.time() - t_start})
                bar.write(f"step {step}: val loss {m['loss']:.4f}, {m['bpb']:.4f} bits/byte")
            lr = get_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # The whole global batch is drawn on every process; each takes its share.
            batches = [get_batch(data.train, cfg.batch_size, cfg.seq_len, gen, torch.device("cpu"))
                       for _ in range(cfg.grad_accum)]
            mine = batches[rank::world]
            loss_sum = 0.0
            try:
                for i, (x, y) in enumerate(mine):
                    x, y = x.to(device), y.to(device)
                    sync = (not ddp) or i == len(mine) - 1
                    with (contextlib.nullcontext() if sync else model.no_sync()), ctx:
                        logits = model(x)
                        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
                    (loss / micro_per_rank).backward()
                    loss_sum += loss.item()
            except (RuntimeError, MemoryError) as e:
                if _is_oom(e) or isinstance(e, MemoryError):
                    raise ConfigError(
                        f"a batch of {cfg.batch_size} x {cfg.seq_len} tokens does not fit in memory on "
                        f"{device}; pass a smaller --batch-size (and a larger --grad-accum to keep the "
                        "same tokens per step) or a smaller --seq-len") from None
                raise
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_loss = loss_sum / len(mine)
            if not math.isfinite(train_loss):
                raise NablaError(f"the training loss became {train_loss} at step {step}; "
                                 "lower --lr or raise --warmup")
            tokens_since += tokens_per_step
            if master:
                history.append({"step": step, "lr": lr, "train_loss": train_loss,
                                "time": time.time() - t_start})
                now = time.time()
                if now - t_last > 2 or step == cfg.steps:
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_since / (now - t_last):.0f}",
                                    lr=f"{lr:.1e}", refresh=False)
                    t_last, tokens_since = now, 0
                bar.update(1)
            stop_now = stop.set or (cfg.stop_at is not None and step >= cfg.stop_at) or (
                cfg.time_limit is not None and time.time() - t_start > cfg.time_limit * 60)
            if ddp:  # every process stops at the same step
                stop_now = data_parallel.any_process(stop_now, device)
            if stop_now and step < cfg.steps:
                stopped = True
                break
            if step % cfg.save_every == 0 and step < cfg.steps:
                save()
    bar.close()
    result = {"step": step, "steps": cfg.steps, "params": n_params, "stopped": stopped}
    if master:
        if not stopped:
            m = evaluate(eval_windows(data.meta, len(data.val), cfg.seq_len, 8 * cfg.eval_tokens))
            history.append({"step": step, "val_loss": m["loss"], "val_bpb": m["bpb"],
                            "time": time.time() - t_start})
            result.update(val_loss=m["loss"], val_bpb=m["bpb"], val_tokens=m["tokens"],
                          val_sources=m["sources"])
            print(f"nabla train: step {step}: val loss {m['loss']:.4f}, {m['bpb']:.4f} bits/byte", file=sys.stderr)
            for name, s in m["sources"].items():
                print(f"  {name}: loss {s['loss']:.4f}, {s['bpb']:.4f} bits/byte", file=sys.stderr)
        save(final=True)
        atomic_write_text(out / "summary.json", json.dumps(
            {**result, "model_args": args.to_params(), "config": asdict(cfg)}, indent=2) + "\n")
        print(f"nabla train: {'stopped at' if stopped else 'finished'} step {step}; saved {out}"
              + (" (continue with --resume)" if stopped else ""), file=sys.stderr)
    _barrier(ddp)
    return result


def _evaluated(history: list[dict], step: int) -> bool:
    return any(h["step"] == step and "val_loss" in h for h in history)


def _check_config(cfg: TrainConfig, world: int) -> None:
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


def _prepare_data(cfg: TrainConfig, tok_path: Path, data_dir: Path) -> None:
    """Tokenizer (given, inherited from --init-from, or trained) and the token files."""
    from nabla.tokenizer.sentencepiece import SentencePieceTokenizer

    sources = parse_sources(cfg.data)
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
        train_tokenizer(sources, tok_path, vocab, seed=cfg.seed)
    tokenizer = SentencePieceTokenizer(tok_path)
    print("nabla train: tokenizing the corpus", file=sys.stderr)
    build_token_files(sources, tokenizer, data_dir, cfg.val_fraction, cfg.seed)


# ---------------------------------------------------------------------------- logs


def _write_log(out: Path, history: list[dict]) -> None:
    cols = ["step", "lr", "train_loss", "val_loss", "val_bpb", "time"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out / "log.csv", buf.getvalue())


def _plot(out: Path, history: list[dict]) -> None:
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
        s, l = map(np.array, zip(*tr))
        k = max(1, len(l) // 50)
        smooth = np.convolve(l, np.ones(k) / k, mode="valid")
        ax.plot(s[k - 1:], smooth, label="train (smoothed)")
    if va:
        s, l = zip(*va)
        ax.plot(s, l, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out / "loss.png", buf.getvalue())
