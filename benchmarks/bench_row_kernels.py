"""Per-call time of the CPU row kernels (nabla.model.cpu_kernels_jit), measured from inside numba.

Each kernel is called many times from an njit loop (no Python per call), cycling through enough copies
of the weight to read it from memory rather than the cache. Reports the fastest and the median round.
On a busy machine the median drifts; use --threads 1, which times the calling thread's CPU time
(numba runs a one-thread parallel loop on the calling thread), for comparisons less exposed to it.

    python benchmarks/bench_row_kernels.py --kind i8 --rows 1,8,16 --threads 2
    python benchmarks/bench_row_kernels.py --kind f32 --shapes 2304x768,5632x2048 --threads 1

Leaves out: whole-model timings (bench_cpu.py), llama.cpp (bench_cpu_llamacpp.py).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPES = {  # (N, K): the 110M model's (qkv stacked, wo, w1/w3, w2, head) and TinyLlama's
    "110m": [(2304, 768), (768, 768), (2048, 768), (768, 2048), (32000, 768)],
    "tinyllama": [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (32000, 2048)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["f32", "i8"], default="i8",
                    help="fp32 weights, or int8 (VNNI where the CPU has it)")
    ap.add_argument("--rows", default="1,8,16", help="rows of x per call, comma-separated")
    ap.add_argument("--shapes", default="110m,tinyllama", help="110m, tinyllama, or NxK,... ")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (0: numba's default)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--bytes", type=float, default=96, help="MiB of weight copies to cycle through")
    args = ap.parse_args()

    import numba
    from numba import njit

    from nabla.model import cpu_kernels
    from nabla.model import cpu_kernels_jit as jit

    if args.threads:
        numba.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    vnni = args.kind == "i8" and cpu_kernels.I8_VNNI

    @njit(nogil=True)
    def loop_f32(W3, X, Y, reps):
        for r in range(reps):
            jit._rows_f32((W3[r % W3.shape[0]],), X, (Y,))

    @njit(nogil=True)
    def loop_i8(W3, S2, X, XU, DXE, Y, reps):
        for r in range(reps):
            c = r % W3.shape[0]
            jit._rows_i8_vnni((W3[c],), (S2[c],), X, XU, DXE, (Y,))

    @njit(nogil=True)
    def loop_i8_plain(W3, S2, X, Y, reps):
        for r in range(reps):
            c = r % W3.shape[0]
            jit._rows_i8((W3[c],), (S2[c],), X, (Y,))

    shapes = []
    for part in args.shapes.split(","):
        shapes += SHAPES[part] if part in SHAPES else [tuple(int(v) for v in part.split("x"))]
    rng = np.random.default_rng(0)
    print(f"kind {args.kind}{' (VNNI)' if vnni else ''}, threads {numba.get_num_threads()}, "
          f"{'thread CPU time' if clock is time.thread_time else 'wall time'}")
    for N, K in shapes:
        size = N * K * (1 if args.kind == "i8" else 4)
        copies = max(2, int(args.bytes * (1 << 20) // size))
        if args.kind == "i8":
            W = rng.integers(-127, 128, size=(copies, N, K), dtype=np.int8)
            S = rng.random((copies, N), dtype=np.float32) * np.float32(0.01)
        else:
            W = rng.standard_normal((copies, N, K), dtype=np.float32)
        for B in (int(v) for v in args.rows.split(",")):
            X = rng.standard_normal((B, K)).astype(np.float32)
            Y = np.zeros((B, N), dtype=np.float32)
            reps = max(copies, int(2e8 // size))
            if args.kind == "f32":
                loop, call_args = loop_f32, (W, X, Y, reps)
            elif vnni:
                loop, call_args = loop_i8, (W, S, X, np.zeros((B, K), np.uint8), np.zeros((B, K // 4), np.float32), Y,
                                            reps)
            else:
                loop, call_args = loop_i8_plain, (W, S, X, Y, reps)
            loop(*call_args)  # compile, warm up
            times = []
            for _ in range(args.rounds):
                t = clock()
                loop(*call_args)
                times.append((clock() - t) / reps)
            best, med = min(times), float(np.median(times))
            print(f"{N:>6}x{K:<5} rows {B:>2}: {best * 1e6:9.1f} us (median {med * 1e6:9.1f})  "
                  f"{size / best / 1e9:6.1f} GB/s  {2 * B * N * K / best / 1e9:6.1f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
