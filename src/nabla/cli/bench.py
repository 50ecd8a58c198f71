"""`nabla bench`: prefill and decode speed against the machine's memory limit (and transformers)."""

from __future__ import annotations

import argparse
import json


def run_bench(args: argparse.Namespace) -> int:
    from nabla.bench import Setup, format_report, run

    if args.model and args.shape:
        from nabla.errors import ConfigError

        raise ConfigError("give either --model DIR or --shape NAME, not both")
    setup = Setup(shape=None if args.model else (args.shape or "110m"), model=args.model, dtype=args.dtype,
                  quantize=args.quantize, batch_size=args.batch_size, prompt_len=args.prompt_len,
                  gen_len=args.gen_len, vs=args.vs, repeats=args.repeats, seed=args.seed,
                  threads=args.threads, device=args.device, graphs=not args.no_graphs, adapter=args.adapter,
                  adapter_unmerged=args.adapter_unmerged)
    result = run(setup, progress=not args.json)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def register(sub) -> None:
    from nabla.model.args import SHAPES

    p = sub.add_parser("bench", help="measure prefill and decode speed against the memory limit",
                       description="Time prefill and greedy decode of a checkpoint, or of random weights of a "
                                   "named shape, and compare decode with the machine's memory read bandwidth.")
    p.add_argument("--model", metavar="DIR", help="checkpoint folder or .gguf file (default: random weights of "
                   "--shape); with --vs llama.cpp, llama.cpp runs a GGUF file as it is")
    p.add_argument("--shape", choices=list(SHAPES), help="named model shape for random weights (default: 110m)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="weights and compute dtype (default: %(default)s)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of the linear layers")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter for --model (PEFT's layout), merged at load")
    p.add_argument("--adapter-unmerged", action="store_true", help="apply --adapter at run time (time its cost)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence (default: %(default)s)")
    p.add_argument("--gen-len", type=int, default=128, help="new tokens per sequence (default: %(default)s)")
    p.add_argument("--vs", choices=["hf", "llama.cpp"], help="time a peer on the same weights in the same run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, median reported (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: every core)")
    p.add_argument("--no-graphs", action="store_true",
                   help="run every decode step directly, not as a replayed CUDA graph (to compare)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_bench)
