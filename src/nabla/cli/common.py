"""The flags every command that takes a model shares, and loading that model.

`add_model_args` (--model, --tokenizer, --device, --dtype, --quantize, --adapter, the
context and batch sizes, --model-parallel-size) and `add_sampling_args`
(--max-gen-len, --temperature, --top-p, --seed) are defined here once;
`load_model` turns them into a `Llama`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nabla.errors import CheckpointError


def add_model_args(p: argparse.ArgumentParser, max_seq_len: int = 2048, max_batch_size: int = 1,
                   batch_help: str = argparse.SUPPRESS) -> None:
    """--model, --tokenizer, --device, --dtype, --max-seq-len, --max-batch-size."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="checkpoint folder or .gguf file (default: the built-in story model)")
    g.add_argument("--tokenizer", metavar="FILE", help="tokenizer file, when the folder holds none")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "auto"],
                   help="compute dtype (default: per device; auto: the checkpoint's own)")
    g.add_argument("--quantize", choices=["int8", "int4"],
                   help="store the linear layers' weights in 8 or 4 bits (faster decode, less memory)")
    g.add_argument("--adapter", metavar="DIR",
                   help="a LoRA adapter in PEFT's layout (what `nabla finetune` writes), merged as the model loads")
    g.add_argument("--adapter-unmerged", action="store_true",
                   help="apply --adapter at run time (base weights untouched) instead of merging it")
    g.add_argument("--max-seq-len", type=int, default=max_seq_len, help="context length (default: %(default)s)")
    g.add_argument("--max-batch-size", type=int, default=max_batch_size, help=batch_help)
    g.add_argument("--model-parallel-size", type=int, metavar="N",
                   help="split the model across N processes started by `torchrun --nproc_per_node N` "
                        "(default: torchrun's WORLD_SIZE, else 1)")


def add_sampling_args(p: argparse.ArgumentParser, max_gen_len: int | None = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-gen-len", type=int, default=max_gen_len, help="new tokens at most (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus size (default: %(default)s)")
    g.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")


def model_dir(args: argparse.Namespace) -> Path:
    """The folder named by --model, or the built-in model."""
    if args.model:
        return Path(args.model)
    from nabla import default_model_path

    path = default_model_path()
    if not (path / "params.json").is_file():
        raise CheckpointError("no built-in model is installed in this copy of nabla; "
                              "pass --model DIR (a checkpoint folder)")
    return path


def load_model(args: argparse.Namespace, rank_0_only: bool = False):
    """Llama.build from the shared model flags.

    Under torchrun every rank runs the command and only rank 0 prints; with
    `rank_0_only` (chat, serve) only rank 0 runs it, the others follow its
    forward passes and exit (nabla.distributed.only_rank_0_runs).
    """
    from nabla.api import Llama

    llama = Llama.build(model_dir(args), args.tokenizer, max_seq_len=args.max_seq_len,
                        max_batch_size=args.max_batch_size, seed=getattr(args, "seed", 1),
                        device=args.device, dtype=args.dtype, verbose=False,
                        quantize=getattr(args, "quantize", None), adapter=getattr(args, "adapter", None),
                        merge_adapter=not getattr(args, "adapter_unmerged", False),
                        model_parallel_size=getattr(args, "model_parallel_size", None),
                        prefix_cache_mb=getattr(args, "prefix_cache_mb", 0))
    from nabla.distributed import is_main_process, only_rank_0_runs

    if rank_0_only:
        only_rank_0_runs(llama.model)
    if not is_main_process():  # under torchrun every rank runs the same loop; only rank 0 prints
        sys.stdout = open(os.devnull, "w")
    return llama


PREFIX_CACHE_MB = 512
"""`--prefix-cache-mb`'s default (serve, chat): some thousand tokens of a 7B model's keys and values."""


def add_prefix_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-cache-mb", type=float, default=PREFIX_CACHE_MB, metavar="MB",
                   help="keep this many MB of prompt prefixes' keys and values for prompts that start the same "
                        "way (a system prompt, earlier turns); 0: off (default: %(default)s)")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
