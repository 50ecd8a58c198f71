"""Fine-tune a model with LoRA: `finetune(**settings)`, the engine of `nabla finetune`.

The base model is loaded as `nabla generate` loads it (any format and family
nabla runs; fp32, bf16, or int8 / int4 quantized, which stays quantized), its
weights frozen, and LoRA adapters added to the chosen projections
(nabla.model.lora). The data (nabla.training.finetune_data) are text files
or JSONL chat conversations with the loss on the assistant turns. Training
is nabla.training.loop's loop (`train_steps`): the same schedule, gradient
accumulation, clipping, progress bar, periodic validation, stop signals,
log.csv / loss.png / summary.json and DDP under torchrun; only the batches,
the validation and what is saved differ, given as the loop's hooks. The
optimizer sees the adapter's parameters only.

The output folder holds the adapter in PEFT's layout (adapter_config.json,
adapter_model.safetensors; nabla.checkpoint.peft), finetune_state.pt (the
adapter, the optimizer, the step and the RNG states: `resume=True`
continues bit for bit; the base is read again from `model`) and the reports.

Leaves out: full fine-tuning (`nabla train --init-from`), adapters on the
embedding or head, several adapters in one run, saving a merged model
(`nabla convert --merge-adapter`).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from nabla import device as devices
from nabla.checkpoint.io import atomic_torch_save
from nabla.checkpoint.peft import adapter_of, write_adapter
from nabla.distributed import data_parallel
from nabla.errors import CheckpointError, ConfigError
from nabla.model.lora import LoraSettings, add_lora, load_lora_state, lora_parameters, lora_state
from nabla.training import finetune_data as fd
from nabla.training import report, rundir
from nabla.training.config import TrainConfig, check_config
from nabla.training.loop import Run, configure_optimizer, save_checkpoint, train_steps, validate

STATE_FILE = "finetune_state.pt"
OWNED = (STATE_FILE, "adapter_config.json", "adapter_model.safetensors", "log.csv", "loss.png", "summary.json")
# Settings that fix what the adapter is: they may not change on resume.
FIXED = ("model", "rank", "alpha", "targets", "quantize", "seq_len", "rslora")


@dataclass
class FinetuneConfig(TrainConfig):
    model: str = ""
    """The base model's folder (Meta, Hugging Face or GGUF, as `nabla generate --model`)."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    """Projections to adapt (Meta or PEFT names)."""
    rslora: bool = False
    """Scale by alpha / sqrt(rank)."""
    quantize: str | None = None
    """int8 or int4: keep the base quantized (QLoRA-style); adapters train in fp32."""
    dtype: str | None = None
    """The base's compute dtype (fp32, bf16, ...; None: the device's)."""
    out: str = "adapter"
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 2e-4
    warmup: int = 10
    steps: int = 200
    eval_every: int = 50
    eval_tokens: int = 16_384
    save_every: int = 100
    weight_decay: float = 0.0
    val_fraction: float = 0.1

    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.rank, alpha=self.alpha, dropout=self.lora_dropout, targets=tuple(self.targets),
                            rslora=self.rslora)


def finetune(**given) -> dict:
    """Run (or resume) a LoRA fine-tune; returns the final metrics. Keyword args are FinetuneConfig fields."""
    cfg = FinetuneConfig.from_given(given)
    with report.speaking_as("finetune"):
        return data_parallel.run(cfg.device,
                                 lambda device, rank, world: _finetune(cfg, given, device, rank, world))


def _finetune(cfg: FinetuneConfig, given: dict, device: torch.device, rank: int, world: int) -> dict:
    run, data, count_bytes = _setup(cfg, given, device, rank, world)
    cfg = run.cfg
    if rank == 0:
        n_train = sum(p.numel() for p in lora_parameters(run.raw))
        report.say(f"LoRA rank {cfg.rank} on {', '.join(run.raw.lora.targets)}: {n_train / 1e6:.3f}M trainable "
                   f"parameters; {len(data.train):,} training / {len(data.val):,} validation tokens; "
                   f"{cfg.batch_size * cfg.grad_accum * cfg.seq_len:,} tokens per step on {world} x {device}")
        if run.step:
            report.say(f"resuming at step {run.step} of {cfg.steps}")
    stopped = train_steps(run, fd.val_windows(data, cfg.seq_len, cfg.eval_tokens))
    result = {"step": run.step, "steps": cfg.steps, "stopped": stopped,
              "trainable_params": sum(p.numel() for p in lora_parameters(run.raw))}
    if rank == 0:
        if not stopped:
            m = validate(run, fd.val_windows(data, cfg.seq_len, 8 * cfg.eval_tokens))
            result.update(val_loss=m["loss"], val_bpb=m["bpb"], val_tokens=m["tokens"])
            report.say(report.val_line(run.step, m))
        save_checkpoint(run, final=True)
        report.write_summary(run.out, result, run.args, cfg)
        report.print_done(run.out, run.step, stopped)
    if world > 1:
        data_parallel.barrier()
    return result


def _setup(cfg: FinetuneConfig, given: dict, device: torch.device, rank: int, world: int):
    from nabla.api import Llama
    from nabla.checkpoint import open_checkpoint
    from nabla.tokenizer import load_tokenizer
    from nabla.tokenizer.chat import chat_format_for

    out = Path(cfg.out)
    state = rundir.prepare_out(cfg, out, STATE_FILE, OWNED, "fine-tune") if rank == 0 else None
    if world > 1:
        data_parallel.barrier()
    if rank and cfg.resume:
        state = rundir.load_state(out, STATE_FILE)
    if state is not None:
        cfg = _merge_resumed(cfg, state, given)
    if not cfg.model:
        raise ConfigError("no base model: pass --model DIR (the checkpoint folder to fine-tune)")
    check_config(cfg, world)
    settings = cfg.lora()  # a bad rank or target fails here, before anything loads

    # The data first: a bad line fails before the model loads.
    ckpt = open_checkpoint(cfg.model)
    tok_path = cfg.tokenizer or ckpt.tokenizer_path
    if tok_path is None:
        raise ConfigError(f"{ckpt.path} holds no tokenizer; pass --tokenizer FILE")
    tokenizer = load_tokenizer(tok_path, model_dir=ckpt.path)
    examples = fd.read_examples(cfg.data, tokenizer, chat_format_for(tokenizer))
    data = fd.split_examples(examples, cfg.val_fraction, cfg.seed)
    data.check(cfg.seq_len)

    # Data parallel: every process holds the whole model (not torchrun's default, a model split across them).
    llama = Llama.build(cfg.model, cfg.tokenizer, max_seq_len=cfg.seq_len, max_batch_size=1, device=device,
                        dtype=cfg.dtype, quantize=cfg.quantize, model_parallel_size=1)
    raw = llama.model
    torch.manual_seed(cfg.seed)
    add_lora(raw, settings)
    raw.set_dropout(cfg.dropout)
    raw.train()
    optimizer = configure_optimizer(raw, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    if state is not None:
        load_lora_state(raw, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        devices.set_rng_state(device, state.get("cuda_rng"))
        step, history = int(state["step"]), list(state["history"])
    if rank:
        torch.manual_seed(cfg.seed + rank)
    model = data_parallel.wrap(raw, device) if world > 1 else raw
    amp = devices.autocast_dtype(device)
    ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    count_bytes = fd.byte_counter(tokenizer)

    def draw_batch(g: torch.Generator):
        return fd.draw(data, cfg.batch_size, cfg.seq_len, g)

    def evaluate(run: Run, starts: list[int]) -> dict:
        return fd.masked_loss(run.raw, data, starts, cfg.seq_len, run.device, run.ctx, cfg.batch_size, count_bytes)

    run = Run(cfg, out, device, rank, world, raw.args, data, None, raw, model, optimizer, gen, ctx,
              save_dtype=None, step=step, history=history, draw_batch=draw_batch, evaluate=evaluate, save=_save)
    return run, data, count_bytes


def _save(run: Run) -> None:
    """The adapter in PEFT's layout, then finetune_state.pt; each file atomically."""
    cfg = run.cfg
    write_adapter(run.out, adapter_of(run.raw), run.args, base_model=cfg.model)
    payload = {"lora": {k: v.cpu() for k, v in lora_state(run.raw).items()},
               "optimizer": run.optimizer.state_dict(), "step": run.step, "batch_rng": run.gen.get_state(),
               "torch_rng": torch.get_rng_state(), "config": asdict(cfg), "history": run.history}
    if devices.rng_state(run.device) is not None:
        payload["cuda_rng"] = devices.rng_state(run.device)
    atomic_torch_save(payload, run.out / STATE_FILE)


def _merge_resumed(cfg: FinetuneConfig, state: dict, given: dict) -> FinetuneConfig:
    saved = dict(state["config"])
    changed = {k: (saved.get(k), given[k]) for k in FIXED
               if given.get(k) is not None and _same(saved.get(k)) != _same(given[k])}
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise CheckpointError(f"--resume: the fine-tune in {cfg.out} was made with other settings ({what}); "
                              "drop those flags, or start a new run with --out elsewhere")
    names = {f.name for f in fields(FinetuneConfig)}
    merged = {k: v for k, v in saved.items() if k in names and k not in ("stop_at", "time_limit", "force",
                                                                          "progress")}
    merged.update({k: v for k, v in given.items() if v is not None})
    merged["resume"] = True
    merged["targets"] = tuple(merged.get("targets", ()))
    return FinetuneConfig(**merged)


def _same(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v
