"""A GGUF file quantized by llama.cpp itself, of random weights of a named shape, for the benches.

Random weights of the shape (as `nabla bench --shape` draws them) are written as an f32 GGUF by nabla,
then quantized by llama.cpp's own `llama_model_quantize` to the type asked for (Q4_K_M mixes Q4_K and
Q6_K as llama.cpp chooses). The result is what `bench_cpu_llamacpp.py --gguf FILE` and
`nabla bench --model FILE --vs llama.cpp` read.

    PYTHONPATH=src python benchmarks/make_llamacpp_gguf.py --shape tinyllama-1.1b --type Q4_K_M out.gguf

Needs llama-cpp-python and gguf (`pip install -e ".[llamacpp]"`).
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from pathlib import Path

import torch

from nabla.bench.runner import random_model
from nabla.checkpoint.gguf import write_gguf
from nabla.model.args import from_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--shape", default="tinyllama-1.1b")
    p.add_argument("--type", default="Q4_K_M", help="a llama.cpp file type: Q4_K_M, Q4_0, Q8_0, ...")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import llama_cpp as lc

    args = from_name(a.shape)
    model = random_model(args, torch.float32, seed=a.seed)
    with tempfile.TemporaryDirectory(prefix="nabla-gguf-") as tmp:
        src = write_gguf(Path(tmp) / "f32.gguf", model.state_dict(), args, None, "f32")
        del model
        params = lc.llama_model_quantize_default_params()
        params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{a.type.upper()}")
        params.nthread = torch.get_num_threads()
        if lc.llama_model_quantize(str(src).encode(), str(a.out).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama_model_quantize to {a.type} failed")
    print(a.out)


if __name__ == "__main__":
    main()
