"""`nabla convert`: Meta <-> Hugging Face, any number of model-parallel shards, or GGUF for llama.cpp."""

from __future__ import annotations

import argparse

from nabla.checkpoint.convert import convert_checkpoint
from nabla.cli.common import human_bytes

FORMAT_NAMES = {"meta": "Meta", "hf": "Hugging Face", "gguf": "GGUF"}


def run_convert(args: argparse.Namespace) -> int:
    written = convert_checkpoint(args.model, args.out, args.to, dtype=args.dtype, shards=args.shards,
                                 force=args.force, tokenizer=args.tokenizer,
                                 vocab_parallel_embedding=args.vocab_parallel_embedding, progress=True,
                                 quantize=args.quantize, merge_adapter=args.merge_adapter)
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} files ({human_bytes(total)}) to {args.out} in "
          f"{FORMAT_NAMES[args.to]} format{', ' + args.quantize if args.quantize else ''}"
          f"{', adapter merged' if args.merge_adapter else ''}: "
          + ", ".join(p.name for p in written))
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between Meta and Hugging Face formats (or to GGUF)",
                       description="Write a checkpoint in the other format (or re-shard a Meta one); "
                                   "the converted model gives identical logits.")
    p.add_argument("--model", metavar="DIR", required=True, help="source checkpoint folder or .gguf file")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer file, when the folder holds none")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write")
    p.add_argument("--to", choices=["meta", "hf", "gguf"], required=True,
                   help="output format (gguf: one file for llama.cpp; needs `pip install gguf`)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: keep)")
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards of Meta output (default: 1)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="save the linear layers quantized (Meta: loads back as it is; GGUF: q8_0 / q4_0)")
    p.add_argument("--merge-adapter", metavar="DIR",
                   help="add a LoRA adapter (PEFT's layout, what `nabla finetune` writes) into the weights")
    p.add_argument("--vocab-parallel-embedding", action="store_true",
                   help="split the embedding by vocabulary (Llama 3 style) instead of by width (Llama 2)")
    p.add_argument("--force", action="store_true", help="overwrite checkpoint files in --out")
    p.set_defaults(func=run_convert)
