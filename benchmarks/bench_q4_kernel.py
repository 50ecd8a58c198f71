"""The int4 (Q4_0) row kernel alone, timed from inside numba: per call and GB/s of weights read.

A layer's products call cpu_kernels_jit._rows_q4 from numba, so Python's dispatch
is left out: an njit loop calls the kernel --reps times per round, median of
--rounds. Weights are random, in enough copies (--cold-mb) that each call reads
them from memory as a decode step does (0: one copy, hot in cache: the kernel's
own compute cost). Shapes: the products of a 110M llama (dim 768, hidden 2048)
and of TinyLlama (dim 2048, hidden 5632, k/v 256 wide), several weights per call
where a layer reads one x for them (q, k, v; w1, w3).

    PYTHONPATH=src python benchmarks/bench_q4_kernel.py [--threads 2] [--rows 1,8,16] [--shapes qkv110,w2TL]
        [--kinds vnni512,avx2,portable]

Timings on a shared or small machine are noisy: compare kinds in one run (they
alternate round by round), never across runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPES = {  # name: (K, rows of each weight read in one call)
    "qkv110": (768, [2304]), "o110": (768, [768]), "w13_110": (768, [2048, 2048]), "w2_110": (2048, [768]),
    "qkvTL": (2048, [2048, 256, 256]), "oTL": (2048, [2048]), "w13TL": (2048, [5632, 5632]), "w2TL": (5632, [2048]),
}


def main() -> None:
    import numba
    from numba import njit
    from numba.typed import List

    from nabla.model import cpu_kernels_jit, cpu_kernels_simd
    from nabla.model.cpu_kernels import _x_buffers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--rows", default="1,16", help="rows of x per call")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--kinds", default=(cpu_kernels_simd.KINDS or ("portable",))[0],
                    help=f"of {', '.join(cpu_kernels_simd.KINDS + ('portable',))}")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--cold-mb", type=int, default=96)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)

    def looper(kernel):
        @njit(nogil=True)
        def loop(Ps, Ss, Ms, X, XL, XH, DX, XS, Ys, reps):
            for r in range(reps):
                kernel(Ps[r % len(Ps)], Ss[r % len(Ss)], Ms, X, XL, XH, DX, XS, Ys)

        return loop

    kinds = args.kinds.split(",")
    loops = [looper(cpu_kernels_jit.rows_q4_kernel(None if k == "portable" else k)) for k in kinds]
    rng = np.random.default_rng(0)
    print(f"{args.threads} thread(s); per call, median of {args.rounds} rounds of {args.reps}")
    for name in args.shapes.split(","):
        K, Ns = SHAPES[name]
        nbytes = sum(Ns) * (K // 2 + K // 16)  # nibbles + fp16 scales
        copies = max(1, (args.cold_mb << 20) // nbytes)
        Ps = List([tuple(rng.integers(0, 256, (N, K // 2), dtype=np.uint8) for N in Ns) for _ in range(copies)])
        Ss = List([tuple((rng.standard_normal((N, K // 32)) * 0.01).astype(np.float16).view(np.uint16) for N in Ns)
                   for _ in range(copies)])
        for B in (int(b) for b in args.rows.split(",")):
            X = rng.standard_normal((B, K)).astype(np.float32)
            bufs = _x_buffers(B, K // 32)
            Ys = tuple(np.empty((B, N), np.float32) for N in Ns)
            Ms = tuple(np.empty((0, 0), np.uint16) for _ in Ns)  # Q4_0: no mins
            for loop in loops:
                loop(Ps, Ss, Ms, X, *bufs, Ys, 2)
            times = [[] for _ in loops]
            for _ in range(args.rounds):
                for loop, ts in zip(loops, times):
                    t = time.perf_counter()
                    loop(Ps, Ss, Ms, X, *bufs, Ys, args.reps)
                    ts.append((time.perf_counter() - t) / args.reps)
            line = f"{name:8s} {K:5d}x{'+'.join(map(str, Ns)):15s} B={B:2d} {nbytes / 1e6:6.2f} MB"
            for kind, ts in zip(kinds, times):
                t = float(np.median(ts))
                line += f" | {kind}: {t * 1e6:8.1f} us {nbytes / t / 1e9:5.1f} GB/s"
            print(line, flush=True)


if __name__ == "__main__":
    main()
