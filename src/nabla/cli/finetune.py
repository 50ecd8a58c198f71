"""`nabla finetune`: the command-line face of nabla.training.finetune (LoRA on a model you have).

Flags default to None so that `--resume` can tell the flags given now from
the settings saved with the run; FinetuneConfig holds the real defaults.
Leaves out: the training itself.
"""

from __future__ import annotations

import argparse

from nabla.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model on your text or chats with LoRA (adapter in PEFT's layout)",
        description="Train LoRA adapters on a frozen model and save them in PEFT's layout (adapter_config.json, "
                    "adapter_model.safetensors), which `nabla generate/chat/serve --adapter DIR`, peft and "
                    "transformers load. Data: text files, or .jsonl lines {\"messages\": [...]} (loss on the "
                    "assistant turns) or {\"text\": ...}. Run under `torchrun --nproc_per_node N -m nabla "
                    "finetune ...` for data-parallel training.")
    p.add_argument("--model", metavar="DIR", help="the base checkpoint folder (default: the built-in model)")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer file, when the folder holds none")
    p.add_argument("--data", nargs="+", metavar="FILE", help="text files/folders or .jsonl files")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (the adapter and the run's state)")
    p.add_argument("--resume", action="store_true", help="continue the fine-tune saved in --out exactly")
    p.add_argument("--force", action="store_true", help="overwrite a previous fine-tune in --out")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, help="adapter rank r (default 8)")
    g.add_argument("--alpha", type=float, help="scale numerator: updates are scaled by alpha/rank (default 16)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0)")
    g.add_argument("--targets", nargs="+", metavar="NAME",
                   help="projections to adapt: wq wk wv wo w1 w2 w3 (or q_proj ... down_proj; default all)")
    g.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(rank)")
    g.add_argument("--quantize", choices=["int8", "int4"], help="keep the base quantized (QLoRA-style)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="the base's compute dtype (default: per device)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, help="tokens per training sequence (default 256)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch and process (default 8)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step, over all processes (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    g.add_argument("--min-lr", type=float, help="final learning rate (default lr/10)")
    g.add_argument("--warmup", type=int, help="warmup steps (default 10)")
    g.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on the adapters (default 0)")
    g.add_argument("--grad-clip", type=float, help="gradient norm clip, 0 for none (default 1.0)")
    g.add_argument("--seed", type=int, help="seed of the adapters, the split and the data order (default 1337)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--val-fraction", type=float, help="share of examples held out (default 0.1)")
    g.add_argument("--eval-every", type=int, help="steps between validation runs (default 50)")
    g.add_argument("--eval-tokens", type=int, help="validation tokens per run (default 16384)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default 100)")
    g.add_argument("--stop-at", type=int, metavar="STEP", help="save and stop after this step")
    g.add_argument("--time-limit", type=float, metavar="MIN", help="save and stop after this many minutes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_finetune)


def run_finetune(ns: argparse.Namespace) -> int:
    from nabla.training.finetune import FinetuneConfig, finetune

    if not ns.data and not ns.resume:
        raise ConfigError("pass --data FILE with the text or .jsonl conversations to learn (or --resume a run)")
    given = {k: v for k, v in vars(ns).items() if k in FinetuneConfig.__dataclass_fields__}
    if not ns.model and not ns.resume:
        from nabla.cli.common import model_dir

        given["model"] = str(model_dir(ns))
    if ns.targets:
        given["targets"] = tuple(ns.targets)
    given["progress"] = False if ns.no_progress else None
    given["resume"] = ns.resume or None
    given["force"] = ns.force or None
    finetune(**given)
    return 0
