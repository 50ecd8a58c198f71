"""Train a Llama model from scratch (or continue one) on a text corpus: `train(**settings)`.

A short nanoGPT-style loop: `get_batch` draws random windows of the token
stream, `get_lr` warms up then decays, AdamW (weight decay on 2-D weights
only) steps after `grad_accum` micro-batches with gradient clipping, and
`estimate_loss` reports validation loss and bits per byte every
`eval_every` steps. bf16 autocast on GPUs that have it; fp32 elsewhere.

Nothing is lost: `save_checkpoint` writes the Meta folder and
train_state.pt every `save_every` steps, at the end, and on Ctrl-C /
SIGTERM; `resume=True` continues exactly (on CPU, N steps straight and
N/2 + resume + N/2 give bit-identical weights).

Under `torchrun` every process draws the same global batch from the same
seeded generator and computes its share of the micro-batches; DDP averages
the gradients, so W processes match one at the same global batch (up to
float summation order).

Leaves out: the settings and their checks (config.py), the output folder,
token files and saved state (rundir.py), logs and plot (report.py), the
process group (nabla.distributed.data_parallel); fine-tuning with LoRA
(nabla.training.finetune, which runs this loop through the `Run` hooks
`draw_batch`, `evaluate` and `save`), mixed-precision loss scaling for fp16-only GPUs (those
train in fp32 here), pipeline/tensor parallel.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nabla import device as devices
from nabla.checkpoint.meta import args_from_params
from nabla.distributed import data_parallel
from nabla.errors import ConfigError, NablaError
from nabla.model.args import ModelArgs, param_count
from nabla.model.llama import Transformer
from nabla.training import config, report, rundir
from nabla.training.config import TrainConfig
from nabla.training.data import TokenData, eval_windows, get_batch, token_byte_lengths
from nabla.training.schedule import get_lr


@dataclass
class Run:
    """One process's view of a run: what the loop and its helpers share."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    args: ModelArgs
    data: TokenData
    token_bytes: np.ndarray  # UTF-8 bytes of each token id, for bits per byte
    raw: torch.nn.Module  # the model itself (saved, evaluated)
    model: torch.nn.Module  # what trains: raw, compiled and/or in DDP
    optimizer: torch.optim.Optimizer
    gen: torch.Generator  # batch positions: the data order
    ctx: contextlib.AbstractContextManager  # autocast, or nothing
    save_dtype: torch.dtype | None
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one dict per step and per validation run
    t_start: float = 0.0
    # Hooks for runs on other data (fine-tuning); None: the token files, estimate_loss, the Meta folder.
    draw_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None
    evaluate: Callable[[Run, list], dict] | None = None
    save: Callable[[Run], None] | None = None


def train(**given) -> dict:
    """Run (or resume) a training run; returns the final metrics. Keyword args are TrainConfig fields."""
    cfg = TrainConfig.from_given(given)
    return data_parallel.run(cfg.device, lambda device, rank, world: _train(cfg, given, device, rank, world))


def _train(cfg: TrainConfig, given: dict, device: torch.device, rank: int, world: int) -> dict:
    run = _setup(cfg, given, device, rank, world)
    cfg = run.cfg
    windows = eval_windows(run.data.meta, len(run.data.val), cfg.seq_len, cfg.eval_tokens)
    if rank == 0:
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        report.print_start(param_count(run.args), run.args, run.data, tokens_per_step, world, device, run.step,
                           cfg.steps)
    stopped = train_steps(run, windows)
    result = {"step": run.step, "steps": cfg.steps, "params": param_count(run.args), "stopped": stopped}
    if rank == 0:
        if not stopped:
            m = validate(run, eval_windows(run.data.meta, len(run.data.val), cfg.seq_len, 8 * cfg.eval_tokens))
            result.update(val_loss=m["loss"], val_bpb=m["bpb"], val_tokens=m["tokens"], val_sources=m["sources"])
            report.print_final_validation(run.step, m)
        save_checkpoint(run, final=True)
        report.write_summary(run.out, result, run.args, cfg)
        report.print_done(run.out, run.step, stopped)
    if world > 1:
        data_parallel.barrier()
    return result


def _setup(cfg: TrainConfig, given: dict, device: torch.device, rank: int, world: int) -> Run:
    """The folder, settings, token files, model, optimizer and RNGs, fresh or as saved."""
    master, ddp = rank == 0, world > 1
    out = Path(cfg.out)
    state = rundir.prepare_out(cfg, out) if master else None
    if ddp:
        data_parallel.barrier()
    if not master and cfg.resume:
        state = rundir.load_state(out)
    if state is not None:
        cfg = config.merge_resumed(cfg, state, given)
    config.check_config(cfg, world)

    # Tokenizer and token files: made once by process 0, reused on resume.
    tok_path, data_dir = out / "tokenizer.model", out / "data"
    if master and not (data_dir / "meta.json").is_file():
        rundir.prepare_data(cfg, tok_path, data_dir)
    if ddp:
        data_parallel.barrier()
    from nabla.tokenizer.sentencepiece import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(tok_path)
    data = rundir.open_data(data_dir, cfg.seq_len)
    token_bytes = token_byte_lengths(tokenizer)

    if state is not None:
        args = args_from_params(state["model_args"])  # drops the cache sizes older runs saved with the shape
    else:
        args = config.get_model_args(cfg, tokenizer.n_words)
    if tokenizer.n_words > args.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.n_words} pieces but the model only {args.vocab_size} "
                          f"embeddings; pass --vocab-size {tokenizer.n_words} or a smaller tokenizer")

    torch.manual_seed(cfg.seed)
    raw = Transformer(args, dropout=cfg.dropout).to(device)
    raw.init_rope(cfg.seq_len)  # the rotary table for the training windows, before compile and DDP
    if cfg.init_from and state is None:
        from nabla.checkpoint.meta import load_into, load_meta_state

        load_into(raw, load_meta_state(cfg.init_from), source=cfg.init_from)
    optimizer = configure_optimizer(raw, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    if state is not None:
        step, history = rundir.restore_state(state, raw, optimizer, gen, device)
    if rank:
        torch.manual_seed(cfg.seed + rank)  # each process its own dropout masks

    model = torch.compile(raw) if cfg.compile else raw
    if ddp:
        model = data_parallel.wrap(model, device)
    amp = devices.autocast_dtype(device)
    ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    return Run(cfg, out, device, rank, world, args, data, token_bytes, raw, model, optimizer, gen, ctx,
               save_dtype=devices.parse_dtype(cfg.save_dtype), step=step, history=history)


def train_steps(run: Run, windows: list) -> bool:
    """Step until the last step or a stop (signal, --stop-at, --time-limit); True when stopped early."""
    from tqdm import tqdm

    cfg, master = run.cfg, run.rank == 0
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not (master and cfg.progress), unit="step",
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    run.t_start = time.time()
    t_last, tokens_since = time.time(), 0
    stopped = False
    with _StopFlag() as stop:
        while run.step < cfg.steps:
            if master and run.step > 0 and run.step % cfg.eval_every == 0 and not _evaluated(run.history, run.step):
                bar.write(report.val_line(run.step, validate(run, windows)))
            lr = get_lr(run.step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            # The whole global batch is drawn on every process; each takes its share.
            batches = [run.draw_batch(run.gen) if run.draw_batch else
                       get_batch(run.data.train, cfg.batch_size, cfg.seq_len, run.gen, torch.device("cpu"))
                       for _ in range(cfg.grad_accum)]
            train_loss = _forward_backward(run, batches[run.rank::run.world])
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            if not math.isfinite(train_loss):
                raise NablaError(f"the training loss became {train_loss} at step {run.step}; "
                                 "lower --lr or raise --warmup")
            tokens_since += tokens_per_step
            if master:
                run.history.append({"step": run.step, "lr": lr, "train_loss": train_loss,
                                    "time": time.time() - run.t_start})
                now = time.time()
                if now - t_last > 2 or run.step == cfg.steps:
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_since / (now - t_last):.0f}",
                                    lr=f"{lr:.1e}", refresh=False)
                    t_last, tokens_since = now, 0
                bar.update(1)
            if _should_stop(run, stop.set) and run.step < cfg.steps:
                stopped = True
                break
            if run.step % cfg.save_every == 0 and run.step < cfg.steps:
                save_checkpoint(run)
    bar.close()
    return stopped


def _forward_backward(run: Run, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Gradients of this process's micro-batches (DDP averages on the last one); their mean loss."""
    cfg = run.cfg
    micro_per_rank = cfg.grad_accum // run.world
    loss_sum = 0.0
    try:
        for i, (x, y) in enumerate(batches):
            x, y = x.to(run.device), y.to(run.device)
            sync = run.world == 1 or i == len(batches) - 1
            with (contextlib.nullcontext() if sync else run.model.no_sync()), run.ctx:
                logits = run.model(x)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            (loss / micro_per_rank).backward()
            loss_sum += loss.item()
    except (RuntimeError, MemoryError) as e:
        if _is_oom(e) or isinstance(e, MemoryError):
            raise ConfigError(
                f"a batch of {cfg.batch_size} x {cfg.seq_len} tokens does not fit in memory on "
                f"{run.device}; pass a smaller --batch-size (and a larger --grad-accum to keep the "
                "same tokens per step) or a smaller --seq-len") from None
        raise
    return loss_sum / len(batches)


def _should_stop(run: Run, signalled: bool) -> bool:
    """A signal, --stop-at or --time-limit; agreed by every process, so all stop at the same step."""
    cfg = run.cfg
    stop = signalled or (cfg.stop_at is not None and run.step >= cfg.stop_at) or (
        cfg.time_limit is not None and time.time() - run.t_start > cfg.time_limit * 60)
    if run.world > 1:
        stop = data_parallel.any_process(stop, run.device)
    return stop


def save_checkpoint(run: Run, final: bool = False) -> None:
    """Process 0 writes the Meta folder, train_state.pt and log.csv (and, at the end, loss.png)."""
    if run.rank:
        return
    if run.save is not None:
        run.save(run)
    else:
        payload = rundir.state_payload(run.raw, run.optimizer, run.gen, run.step, run.history, run.cfg, run.args,
                                       run.device)
        rundir.save_state(run.out, payload, run.raw, run.args, run.save_dtype)
    report.write_log(run.out, run.history)
    if final:
        report.plot(run.out, run.history)


def validate(run: Run, windows: list) -> dict:
    """estimate_loss on `windows`, logged at the current step."""
    cfg = run.cfg
    if run.evaluate is not None:
        m = run.evaluate(run, windows)
    else:
        m = estimate_loss(run.raw, run.data, windows, run.token_bytes, cfg.seq_len, run.device, run.ctx,
                          cfg.batch_size)
    run.history.append({"step": run.step, "val_loss": m["loss"], "val_bpb": m["bpb"],
                        "time": time.time() - run.t_start})
    return m


def _evaluated(history: list[dict], step: int) -> bool:
    return any(h["step"] == step and "val_loss" in h for h in history)


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
    extra = {"fused": True} if devices.is_accelerator(device) else {}
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
        report.say(f"{signal.Signals(signum).name}, saving a checkpoint after this step (Ctrl-C again to abort)",
                   lead="\n")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
