"""Benchmark the classic NumPy network, in one run:

1. Speed: one gradient-descent step on a mini-batch of 784-30-10, with the
   whole mini-batch backpropagated as one matrix (`Network.update_mini_batch`)
   against one example at a time as in the book (`update_mini_batch_looped`
   below, which calls `Network.backprop` once per example), at mini-batch
   sizes 10, 32 and 100; and one full epoch of each on 8,000 images.
2. Accuracy on the 2,000 held-out bundled MNIST images (the last 2,000 of the
   MNIST test set; the first 8,000 train) of the book's first network
   (784-30-10, quadratic cost, eta 3.0, mini-batch 10, 30 epochs) and of the
   improved one (784-100-10, cross-entropy, L2, scaled init, eta 0.5).

Run from the repository root, one BLAS thread so it does not starve others:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_network.py

Prints Markdown tables for BENCHMARKS.md.  --epochs and --skip-accuracy make
a quicker run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from nabla.network import Network, mnist


def best_time(fn, calls: int, repeats: int) -> float:
    """CPU seconds per call: the fastest of `repeats` runs of `calls` calls.
    CPU time (one BLAS thread) rather than wall time, and the fastest run,
    because the machine is shared: waiting for the CPU should not count."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best


def update_mini_batch_stacked(net, mini_batch, eta):
    """The library's step on a list of (x, y) pairs: stack them into one
    matrix X and one Y, one example per column, then one backprop for all."""
    X, Y = net._matrices(mini_batch, "mini_batch")
    net.update_mini_batch(X, Y, eta)


def update_mini_batch_looped(net, mini_batch, eta):
    """The book's step (src/network.py): backprop each example (x, y) alone
    (x and y columns), sum the gradients, then move against their mean.  The
    weights are updated in place, as the library does, so that only the loop
    differs."""
    nabla_b = [np.zeros(b.shape) for b in net.biases]
    nabla_w = [np.zeros(w.shape) for w in net.weights]
    for x, y in mini_batch:
        delta_nabla_b, delta_nabla_w = net.backprop(x, y)
        nabla_b = [nb + dnb for nb, dnb in zip(nabla_b, delta_nabla_b)]
        nabla_w = [nw + dnw for nw, dnw in zip(nabla_w, delta_nabla_w)]
    for w, nw in zip(net.weights, nabla_w):
        w -= (eta / len(mini_batch)) * nw
    for b, nb in zip(net.biases, nabla_b):
        b -= (eta / len(mini_batch)) * nb


def bench_updates(train, batch_sizes=(10, 32, 100), repeats=7):
    print("\n| mini-batch | matrix update (CPU time) | per-example loop (CPU time) | speed-up |")
    print("|---:|---:|---:|---:|")
    for m in batch_sizes:
        vectorised, looped = Network([784, 30, 10], seed=0), Network([784, 30, 10], seed=0)
        batches = [train[k : k + m] for k in range(0, 20 * m, m)]
        calls = max(20, 2000 // m)
        # Interleave the two so that a busy spell on the machine hits both alike.
        t_vec, t_loop = float("inf"), float("inf")
        for _ in range(repeats):
            it_v, it_l = iter(batches * calls), iter(batches * calls)
            t_vec = min(t_vec, best_time(
                lambda net=vectorised, it=it_v: update_mini_batch_stacked(net, next(it), 3.0), calls, 1))
            t_loop = min(t_loop, best_time(
                lambda net=looped, it=it_l: update_mini_batch_looped(net, next(it), 3.0), calls // 4 + 1, 1))
        print(f"| {m} | {t_vec * 1e6:.0f} µs | {t_loop * 1e6:.0f} µs | {t_loop / t_vec:.1f}x |", flush=True)


def bench_epochs(train, m=10, epochs=3):
    """`epochs` epochs on all of `train`: SGD (the pairs stacked into one
    matrix once, each mini-batch a gather of its columns) against the
    per-example loop over mini-batches of the same size."""
    net = Network([784, 30, 10], seed=0)
    start = time.process_time()
    net.SGD(train, epochs, m, 3.0, report=None)
    t_sgd = (time.process_time() - start) / epochs
    net = Network([784, 30, 10], seed=0)
    rng = np.random.default_rng(0)
    start = time.process_time()
    for _ in range(epochs):
        order = rng.permutation(len(train))
        for k in range(0, len(train), m):
            update_mini_batch_looped(net, [train[i] for i in order[k : k + m]], 3.0)
    t_loop = (time.process_time() - start) / epochs
    print(f"\nOne epoch of {len(train)} images, mini-batch {m} (CPU time, mean of {epochs}): "
          f"SGD {t_sgd:.2f} s, per-example loop {t_loop:.2f} s ({t_loop / t_sgd:.1f}x)", flush=True)  # fmt: skip


def bench_accuracy(train, held_out, epochs):
    n = len(train)
    runs = [
        ("784-30-10, quadratic, large init, eta 3.0", {"sizes": [784, 30, 10]}, {"eta": 3.0}),
        (
            f"784-100-10, cross-entropy, scaled init, eta 0.5, lmbda {5.0 * n / 50000:g}",
            {"sizes": [784, 100, 10], "cost": "cross-entropy", "init": "scaled"},
            # The book's lmbda = 5.0 is for n = 50,000; the decay per step is eta*lmbda/n, so keep lmbda/n.
            {"eta": 0.5, "lmbda": 5.0 * n / 50000},
        ),
    ]
    print(f"\n| network (mini-batch 10, {epochs} epochs, seed 0) | held out, last epoch | best epoch | CPU time |")
    print("|---|---:|---:|---:|")
    for name, net_args, sgd_args in runs:
        net = Network(**net_args, seed=0)
        start = time.process_time()
        metrics = net.SGD(train, epochs, 10, test_data=held_out, report=None, **sgd_args)
        seconds = time.process_time() - start
        acc = metrics["evaluation_accuracy"]
        best = max(range(len(acc)), key=acc.__getitem__)
        total = len(held_out)
        print(f"| {name} | {acc[-1]} / {total} = {100 * acc[-1] / total:.2f}% | "
              f"{100 * acc[best] / total:.2f}% (epoch {best}) | {seconds:.0f} s |", flush=True)  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    print(f"Python {platform.python_version()}, NumPy {np.__version__}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    (train_images, train_labels), (test_images, test_labels) = mnist.load_bundled()
    train = mnist.as_pairs(train_images, train_labels, one_hot=True)
    held_out = mnist.as_pairs(test_images, test_labels)
    bench_updates(train)
    bench_epochs(train)
    if not args.skip_accuracy:
        bench_accuracy(train, held_out, args.epochs)


if __name__ == "__main__":
    main()
