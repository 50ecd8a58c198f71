"""`nabla train`: the command-line face of nabla.training (the loop is nabla.training.loop).

Every flag defaults to None here so that `--resume` can tell the flags given
now from the settings saved with the run; nabla.training.TrainConfig
holds the real defaults. Leaves out: the loop itself.
"""

from __future__ import annotations

import argparse

from nabla.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a Llama model on text files (or continue one)",
        description="Train a Llama-family model on a text corpus and write a Meta-format folder "
                    "(params.json, consolidated.00.pth, tokenizer.model) that nabla generate/chat/serve load. "
                    "Run under `torchrun --nproc_per_node N -m nabla train ...` for data-parallel training.",
    )
    p.add_argument("--data", nargs="+", metavar="FILE_OR_DIR",
                   help="UTF-8 text files or folders of .txt files; append *N (quoted) to repeat a "
                        "source's training text N times, e.g. 'corpus/tinystories*3'")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--preset", help="model shape from the table nabla.model.args.SHAPES "
                                    "(tiny, stories, stories15m, 110m, ...); default: stories")
    p.add_argument("--init-from", metavar="DIR", help="continue training this Meta checkpoint folder")
    p.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.model instead of training one")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly")
    p.add_argument("--force", action="store_true", help="overwrite a previous run in --out")
    g = p.add_argument_group("model shape (overrides the preset)")
    for name in ("dim", "n-layers", "n-heads", "n-kv-heads", "vocab-size"):
        g.add_argument(f"--{name}", type=int)
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, help="tokens per training sequence (default 256)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch and process (default 32)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step, over all processes (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    g.add_argument("--min-lr", type=float, help="final learning rate (default lr/10)")
    g.add_argument("--warmup", type=int, help="warmup steps (default 100)")
    g.add_argument("--steps", type=int, help="optimizer steps (default 2000)")
    g.add_argument("--dropout", type=float, help="dropout probability (default 0)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    g.add_argument("--grad-clip", type=float, help="gradient norm clip, 0 for none (default 1.0)")
    g.add_argument("--seed", type=int, help="seed of initial weights and data order (default 1337)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--val-fraction", type=float, help="share of documents held out (default 0.05)")
    g.add_argument("--eval-every", type=int, help="steps between validation runs (default 200)")
    g.add_argument("--eval-tokens", type=int, help="validation tokens per run (default 32768)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default 500)")
    g.add_argument("--save-dtype", choices=("fp32", "bf16", "fp16"), help="dtype of consolidated.00.pth (default fp32)")
    g.add_argument("--stop-at", type=int, metavar="STEP", help="save and stop after this step (train in chunks)")
    g.add_argument("--time-limit", type=float, metavar="MIN", help="save and stop after this many minutes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def run_train(ns: argparse.Namespace) -> int:
    from nabla.training import TrainConfig, train

    if not ns.data and not ns.resume:
        raise ConfigError("pass --data FILE_OR_DIR with the training text (or --resume an existing run)")
    given = {k: v for k, v in vars(ns).items() if k in TrainConfig.__dataclass_fields__}
    given["progress"] = False if ns.no_progress else None
    given["resume"] = ns.resume or None
    given["force"] = ns.force or None
    train(**given)
    return 0
