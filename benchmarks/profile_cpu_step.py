"""Where a CPU decode step's time goes: each part of nabla.model.cpu_step timed on its own.

Builds a random model of a named shape (int4, int8 or fp32, as `nabla bench` does), then times
one decode step as a whole (Transformer.decode) and each part of it over all layers: the product
kernels (q/k/v, wo, w1/w3, w2 and the head, with their bytes read and GB/s), the norms, the
rotation and cache write, attention and SwiGLU. Each part runs over every layer `--repeats` times
inside one compiled loop; a part alone reads only its own weights, which may stay in the CPU's
caches between rounds, so the compiled layers are also timed together in one loop ("the parts
together": what streaming all the weights from memory adds). "rest" is the step minus that:
Python, numba's dispatch, the embedding lookup.

    PYTHONPATH=src python benchmarks/profile_cpu_step.py --shape 110m --quantize int4 [--rows 1] [--pos 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from numba import njit

from nabla import device as devices
from nabla.bench.runner import random_weights
from nabla.model import cpu_kernels_jit as kj
from nabla.model import cpu_step_jit as sj
from nabla.model.args import from_name
from nabla.model.llama import Transformer
from nabla.model.prepare import prepare_model


@njit
def _repeat(n, f, calls):  # pragma: no cover - compiled
    for _ in range(n):
        for i in range(len(calls)):
            f(*calls[i])


def _seconds(f, calls: list[tuple], n: int) -> float:
    """Seconds per round of f(*args) for each args in `calls` (one per layer: the weights of every
    layer in turn, so that they come from memory as in a step)."""
    calls = tuple(calls)
    _repeat(1, f, calls)
    t = time.perf_counter()
    _repeat(n, f, calls)
    return (time.perf_counter() - t) / n


def nbytes(group) -> int:
    """Bytes of a product group's weights: every array of each format it holds (cpu_step._group)."""
    return sum(a.nbytes for fields in group for field in fields for a in field)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="110m")
    p.add_argument("--quantize", choices=["int4", "int8", "fp32"], default="int4")
    p.add_argument("--rows", type=int, default=1, help="sequences in the step (batch size)")
    p.add_argument("--pos", type=int, default=64, help="the position decoded (context length before it)")
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args()
    devices.use_all_cores()
    args = from_name(a.shape)
    args.vocab_size = 32000
    with torch.device("meta"):
        model = Transformer(args)
    model = prepare_model(model, torch.device("cpu"), torch.float32, random_weights, max_batch_size=a.rows,
                          max_seq_len=a.pos + 8, quantize=None if a.quantize == "fp32" else a.quantize)
    tok = torch.randint(0, 32000, (a.rows, 1))
    with torch.inference_mode():
        model(torch.randint(0, 32000, (a.rows, a.pos)), 0)
        step = model.cpu_step[1]
        if step is None:
            raise SystemExit("this model does not take the compiled step (see nabla.model.cpu_step)")
        for _ in range(3):
            model.decode(tok, a.pos)

    def whole_step() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            for _ in range(a.repeats):
                model.decode(tok, a.pos)
            return (time.perf_counter() - t) / a.repeats

    whole = whole_step()

    R = a.rows
    bufs, sd, sh = step._buffers(R)
    XN, Q, K, V, Y, Z, G, U, P, E, NONE = bufs
    H = np.random.default_rng(0).standard_normal((R, args.dim)).astype(np.float32)
    for b in bufs[:8]:
        b[:] = np.random.default_rng(1).standard_normal(b.shape)
    starts, slots = np.full(R, a.pos, dtype=np.int64), np.arange(R, dtype=np.int64)
    rope = model.rope.numpy()
    parts: dict[str, float] = {}
    read: dict[str, int] = {}
    n = a.repeats

    def add(name, f, calls, nb=0):
        parts[name] = parts.get(name, 0.0) + _seconds(f, calls, n)
        read[name] = read.get(name, 0) + nb

    L = step.layers  # (window, scale, attention norm, ffn norm, qkv, biases, wo, w13, w2, K cache, V cache)
    add("norms", kj._rms_norm, [(H, x[2], 1e-5, XN) for x in L] + [(H, x[3], 1e-5, XN) for x in L])
    add("q/k/v", sj._products, [(x[4], XN, (Q, K, V), sd) for x in L], sum(nbytes(x[4]) for x in L))
    add("rotate + cache write", sj._rotate_and_cache,
        [(Q, K, V, x[5][0], x[5][1], x[5][2], 1, starts, slots, rope, x[9], x[10]) for x in L])
    add("attention", sj._attend, [(Q, x[9], x[10], Y, 1, starts, slots, x[0], x[1]) for x in L])
    add("wo", sj._products, [(x[6], Y, (Z, NONE, NONE), sd) for x in L], sum(nbytes(x[6]) for x in L))
    add("residual adds", sj._add, [(H, Z)] * (2 * len(L)))
    add("w1/w3", sj._products, [(x[7], XN, (G, U, NONE), sd) for x in L], sum(nbytes(x[7]) for x in L))
    add("swiglu", sj._swiglu, [(G, U, P, E)] * len(L))
    add("w2", sj._products, [(x[8], G, (Z, NONE, NONE), sh) for x in L], sum(nbytes(x[8]) for x in L))
    logits = np.empty((R, args.vocab_size), dtype=np.float32)
    add("head", sj._products, [(step.head, XN, (logits, NONE, NONE), sd)], nbytes(step.head))
    eps = float(args.norm_eps)
    layers_only = _seconds(sj.layer, [(H, bufs, sd, sh, 1, starts, slots, eps, x[0], x[1], rope, *x[2:]) for x in L], n)
    norm = model.norm.weight.detach().numpy()
    layers_only += _seconds(sj.head, [(H, XN, eps, norm, step.head, logits, NONE, sd)], n)
    whole = min(whole, whole_step())  # once before the parts and once after: the faster of the two
    total = sum(parts.values())
    print(f"{a.shape} {a.quantize}, {R} row(s) at position {a.pos}, {torch.get_num_threads()} threads: "
          f"step {whole * 1e3:.2f} ms\n")
    print("| part | ms per step | share | GB/s |")
    print("|---|---:|---:|---:|")
    for name, s in parts.items():
        gbs = f"{read[name] / s / 1e9:.1f}" if read[name] else ""
        print(f"| {name} | {s * 1e3:.3f} | {s / whole:.0%} | {gbs} |")
    print(f"| the parts together, as the step runs them (from memory) | {(layers_only - total) * 1e3:+.3f} | "
          f"{(layers_only - total) / whole:+.0%} | |")
    print(f"| rest (Python, numba's dispatch, embedding) | {(whole - layers_only) * 1e3:.3f} | "
          f"{(whole - layers_only) / whole:.0%} | |")
    products = sum(parts[k] for k in ("q/k/v", "wo", "w1/w3", "w2", "head"))
    nb = sum(read.values())
    print(f"\nproducts: {products * 1e3:.2f} ms for {nb / 1e6:.1f} MB, {nb / products / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
