"""Issue 9's CPU table: nabla against transformers and llama.cpp on the same weights, in one run.

For each named shape (random weights): decode at batch 1 and 8 (16-token prompt,
--gen-len new tokens) in fp32, int8 and int4, each timed against llama.cpp at
equal bytes per weight (f32, q8_0, q4_0; `nabla bench --vs llama.cpp`) and, for
fp32, against transformers (`--vs hf`); then prefill of 512 tokens in fp32.
Every pair alternates in one process, median of --repeats.

    PYTHONPATH=src python benchmarks/bench_cpu.py [--shapes stories15m,110m] [--out results.jsonl]

Needs llama-cpp-python and gguf (`pip install -e ".[llamacpp]"`). Prints a
Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform

import torch

from nabla import device as devices
from nabla.bench import Setup, run
from nabla.errors import ConfigError


def rows(shape: str, gen: int):
    """(label, Setup) pairs for one shape."""
    for q in (None, "int8", "int4"):
        for b in (1, 8):
            peers = ["llama.cpp", "hf"] if q is None else ["llama.cpp"]
            if q == "int4" and b == 8:
                continue
            for vs in peers:
                yield f"decode b{b}", Setup(shape=shape, quantize=q, batch_size=b, gen_len=gen, vs=vs)
    for vs in ("llama.cpp", "hf"):
        yield "prefill 512", Setup(shape=shape, prompt_len=512, gen_len=0, vs=vs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="stories15m,110m,tinyllama-1.1b")
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also append every run's JSON to this file")
    args = parser.parse_args()
    import transformers

    print(f"{devices.describe(torch.device('cpu'))}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}; median of {args.repeats}, {args.gen_len} new tokens\n")
    print("| shape | run | nabla weights | nabla tok/s | peer | peer tok/s | ratio | nabla roofline |")
    print("|---|---|---|---:|---|---:|---:|---:|", flush=True)
    for shape in args.shapes.split(","):
        for label, setup in rows(shape, args.gen_len):
            setup.repeats = args.repeats
            try:
                r = run(setup, progress=False)
            except ConfigError as e:
                print(f"| {shape} | {label} | {setup.quantize or 'fp32'} | skipped: {str(e)[:100]} | | | | |")
                continue
            finally:
                gc.collect()
            key = "hf" if setup.vs == "hf" else "llamacpp"
            peer = r[key]
            who = "transformers fp32" if key == "hf" else f"llama.cpp {peer['gguf_type']}"
            metric = "decode_tok_s" if setup.gen_len else "prefill_tok_s"
            ratio = r[f"vs_{key}_ratio"] if setup.gen_len else r[f"vs_{key}_prefill_ratio"]
            roof = f"{100 * r['roofline_fraction']:.0f}%" if setup.gen_len else ""
            print(f"| {shape} | {label} | {setup.quantize or 'fp32'} | {r[metric]:,.1f} | {who} | "
                  f"{peer[metric]:,.1f} | {ratio:.2f}x | {roof} |", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
