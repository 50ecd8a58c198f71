"""Time to first token with a repeated system prompt, with and without the prefix cache.

Random weights of a named shape (default 110m, `nabla.model.args.SHAPES`) and
the Llama 2 tokenizer of tests/data; each request is a ~1,500-token system
prompt (the same every time) followed by a changing ~40-token user message,
answered through `Llama.generate` with one new token: the time to first token.
The first request with the cache fills it and is left out; the rest are
timed. The tokens must match the run without the cache.

    python benchmarks/bench_prefix_cache.py
    python benchmarks/bench_prefix_cache.py --shape stories --system 1500 --requests 10

Leaves out: HTTP (the engine takes the same path: tests/server/test_prefix_cache.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nabla.api import Llama  # noqa: E402
from nabla.bench.runner import random_weights  # noqa: E402
from nabla.model.args import from_name  # noqa: E402
from nabla.model.llama import Transformer  # noqa: E402
from nabla.model.prefix_cache import PrefixCache  # noqa: E402
from nabla.model.prepare import prepare_model  # noqa: E402
from nabla.tokenizer import load_tokenizer  # noqa: E402


def build(shape: str, context: int) -> Llama:
    args = from_name(shape)
    with torch.device("meta"):
        model = Transformer(args)
    model = prepare_model(model, torch.device("cpu"), torch.float32, random_weights, max_batch_size=1,
                          max_seq_len=context)
    return Llama(model, load_tokenizer(ROOT / "tests" / "data" / "llama2" / "tokenizer.model"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="110m")
    ap.add_argument("--system", type=int, default=1500, help="system prompt tokens")
    ap.add_argument("--user", type=int, default=40, help="user message tokens")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--mb", type=float, default=512, help="prefix cache size")
    a = ap.parse_args()
    llama = build(a.shape, a.system + a.user + 64)
    g = torch.Generator().manual_seed(0)
    V = llama.model.args.vocab_size
    system = [1] + torch.randint(3, V, (a.system - 1,), generator=g).tolist()
    prompts = [system + torch.randint(3, V, (a.user + i % 5,), generator=g).tolist() for i in range(a.requests + 1)]

    def ttft(p):
        t0 = time.perf_counter()
        out, _ = llama.generate([p], 1, temperature=0)
        return time.perf_counter() - t0, out

    llama.prefix_cache = None
    ttft(prompts[0])  # warm up
    off = [ttft(p) for p in prompts[1:]]
    llama.prefix_cache = PrefixCache(int(a.mb * 2**20))
    ttft(prompts[0])  # fills the cache
    on = [ttft(p) for p in prompts[1:]]
    assert [o for _, o in on] == [o for _, o in off], "the prefix cache changed the tokens"
    t_off, t_on = statistics.median(t for t, _ in off), statistics.median(t for t, _ in on)
    pc = llama.prefix_cache
    print(f"shape {a.shape}, {torch.get_num_threads()} threads, system prompt {a.system} tokens, "
          f"user messages {a.user}-{a.user + 4} tokens, {a.requests} requests (median)")
    print(f"time to first token without the cache: {t_off * 1000:8.1f} ms")
    print(f"time to first token with the cache:    {t_on * 1000:8.1f} ms  ({t_off / t_on:.1f}x faster; "
          f"{pc.hits} hits, {pc.tokens_saved // max(pc.hits, 1)} tokens reused per hit, "
          f"{pc.bytes / 2**20:.0f} MB held)")


if __name__ == "__main__":
    main()
