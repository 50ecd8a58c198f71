"""Issue 9's table on a GPU: nabla against transformers on the same card, same weights, same run.

For each named shape (random weights, bf16): decode at batch 1 (with and without
CUDA graphs) and 32 (16-token prompt, 128 new tokens) and prefill of 512 tokens
at batch 1, each through
nabla.bench.runner with `--vs hf` (nabla and transformers alternate,
median of 3). One process, so the card and its clocks are the same for both.

    PYTHONPATH=src python benchmarks/bench_gpu.py [--shapes 110m,tinyllama-1.1b] [--out results.jsonl]

Prints a Markdown table for BENCHMARKS.md; --out also keeps every run's JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform

import torch

from nabla import device as devices
from nabla.bench import Setup, run
from nabla.errors import ConfigError

RUNS = [  # (label, batch, prompt, new tokens, replay recorded decode steps)
    ("decode b1", 1, 16, 128, True),
    ("decode b1, no graphs", 1, 16, 128, False),
    ("decode b32", 32, 16, 128, True),
    ("prefill 512", 1, 512, 0, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="stories15m,110m,tinyllama-1.1b,llama2-7b")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also append every run's JSON to this file")
    args = parser.parse_args()
    dev = devices.choose_device()
    import transformers

    print(f"{devices.describe(dev)}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"Python {platform.python_version()}; {args.dtype}, median of {args.repeats}\n", flush=True)
    print("| shape | run | nabla tok/s | transformers tok/s | ratio | nabla roofline | peak GPU memory |")
    print("|---|---|---:|---:|---:|---:|---:|", flush=True)
    for shape in args.shapes.split(","):
        for label, batch, prompt, gen, graphs in RUNS:
            setup = Setup(shape=shape, dtype=args.dtype, batch_size=batch, prompt_len=prompt, gen_len=gen,
                          vs="hf", repeats=args.repeats, graphs=graphs)
            try:
                r = run(setup, progress=False)
            except (ConfigError, torch.OutOfMemoryError) as e:
                print(f"| {shape} | {label} | skipped: {str(e).splitlines()[0][:120]} | | | | |", flush=True)
                continue
            finally:
                gc.collect()
                torch.cuda.empty_cache() if dev.type == "cuda" else None
            if gen:
                ours, theirs, ratio = r["decode_tok_s"], r["hf"]["decode_tok_s"], r["vs_hf_ratio"]
                roof = f"{100 * r['roofline_fraction']:.0f}%"
            else:
                ours, theirs, ratio = r["prefill_tok_s"], r["hf"]["prefill_tok_s"], r["vs_hf_prefill_ratio"]
                roof = ""
            peak = r["peak_device_bytes"] or r["peak_rss_bytes"]
            print(f"| {shape} | {label} | {ours:,.0f} | {theirs:,.0f} | {ratio:.2f}x | {roof} | "
                  f"{peak / 2**30:.1f} GiB |", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)


if __name__ == "__main__":
    main()
