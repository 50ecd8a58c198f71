"""The CPU table against llama.cpp at every bit width: nabla fp32 / int8 / int4 beside llama.cpp
f32 / q8_0 / q4_0 on the same weights, side by side in one run (`nabla bench --vs llama.cpp`).

Rows: for each shape (random weights), batch-1 decode and the 16-token prefill of the same run in
fp32, int8 and int4; for the first shape also batch-8 decode and a 512-token prefill in fp32. With
--gguf FILE (e.g. a Q4_K_M file llama.cpp quantized), one more row: that file's decode in both
engines (`nabla bench --model FILE --vs llama.cpp`). Ratios are nabla / llama.cpp.

    PYTHONPATH=src python benchmarks/bench_cpu_llamacpp.py [--shapes 110m,tinyllama-1.1b] [--gguf F] [--out r.jsonl]

Needs llama-cpp-python and gguf (`pip install -e ".[llamacpp]"`). Prints a Markdown table.
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


def setups(shapes: list[str], gen: int, gguf: str | None):
    for i, shape in enumerate(shapes):
        for q in (None, "int8", "int4"):
            yield shape, Setup(shape=shape, quantize=q, gen_len=gen, vs="llama.cpp")
        if i == 0:
            yield shape, Setup(shape=shape, batch_size=8, gen_len=gen, vs="llama.cpp")
            yield shape, Setup(shape=shape, prompt_len=512, gen_len=0, vs="llama.cpp")
    if gguf:
        yield os.path.basename(gguf), Setup(model=gguf, gen_len=gen, vs="llama.cpp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="110m,tinyllama-1.1b")
    parser.add_argument("--gguf", help="a GGUF file to bench in both engines as it is")
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also append every run's JSON to this file")
    args = parser.parse_args()
    import llama_cpp

    print(f"{devices.describe(torch.device('cpu'))}; torch {torch.__version__}, llama-cpp-python "
          f"{llama_cpp.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}; median of {args.repeats}, {args.gen_len} new tokens\n")
    print("| model | rows | nabla | llama.cpp | nabla tok/s | llama.cpp tok/s | ratio |")
    print("|---|---|---|---|---:|---:|---:|", flush=True)
    for name, setup in setups(args.shapes.split(","), args.gen_len, args.gguf):
        setup.repeats = args.repeats
        try:
            r = run(setup, progress=False)
        except ConfigError as e:
            print(f"| {name} | skipped: {str(e)[:120]} | | | | | |")
            continue
        finally:
            gc.collect()
        peer = r["llamacpp"]
        ours = setup.quantize or ("as stored" if setup.model else "fp32")
        kinds = []
        if setup.gen_len:
            kinds.append((f"decode, batch {setup.batch_size}", "decode_tok_s", "vs_llamacpp_ratio"))
        if setup.batch_size == 1:
            kinds.append((f"prefill, {setup.prompt_len} tokens", "prefill_tok_s", "vs_llamacpp_prefill_ratio"))
        for label, metric, ratio in kinds:
            print(f"| {name} | {label} | {ours} | {peer['gguf_type']} | {r[metric]:,.1f} | {peer[metric]:,.1f} | "
                  f"{r[ratio]:.2f} |", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
