"""Per-token cost of JSON-schema decoding against free decoding, on the built-in story model.

Greedy decoding of the same prompt, with and without a schema, through
Llama.stream (one sequence, no batching): the time per generated token of
each (decode steps only: from the first token to the last), and the time
of the grammar's own work per token (computing the mask and accepting the
token), measured inside the same runs. Results go in
BENCHMARKS.md ("Structured output").

    PYTHONPATH=src python benchmarks/bench_structured.py [--tokens 96] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import nabla
from nabla.generation import constraints

STORIES = Path(nabla.__file__).parent / "assets" / "stories"
SCHEMA = {"type": "object", "properties": {
    "people": {"type": "array", "maxItems": 6, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "pet": {"enum": ["cat", "dog", "bird"]}},
        "required": ["name", "age", "pet"]}}},
    "required": ["people"]}


def per_token(llama, prompt, n, schema) -> tuple[float, int]:
    """Seconds per decode step, from the first token to the last (the prefill left out: a JSON answer
    ends sooner than free text, so counting the prefill would charge it to fewer tokens), and the count."""
    stamps = [time.perf_counter() for _ in llama.stream(prompt, n, temperature=0, json_schema=schema)]
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), len(stamps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    llama = nabla.Llama.build(STORIES, max_seq_len=256, max_batch_size=1)
    prompt = "Once upon a time"
    grammar_s = [0.0]
    allowed, accept = constraints.Matcher.allowed, constraints.Matcher.accept

    def timed(f):
        def g(*args):
            t0 = time.perf_counter()
            try:
                return f(*args)
            finally:
                grammar_s[0] += time.perf_counter() - t0
        return g

    constraints.Matcher.allowed, constraints.Matcher.accept = timed(allowed), timed(accept)
    per_token(llama, prompt, 8, SCHEMA)  # compile, warm up
    free, json_, own = [], [], []
    for _ in range(a.repeats):
        free.append(per_token(llama, prompt, a.tokens, None)[0])
        grammar_s[0] = 0.0
        t, k = per_token(llama, prompt, a.tokens, SCHEMA)
        json_.append(t)
        own.append(grammar_s[0] / k)
    f, j, g = statistics.median(free), statistics.median(json_), statistics.median(own)
    print(f"free decoding:        {f * 1e3:.2f} ms/token")
    print(f"JSON-schema decoding: {j * 1e3:.2f} ms/token  ({(j / f - 1) * 100:+.1f}%)")
    print(f"grammar work inside:  {g * 1e3:.3f} ms/token  ({g / f * 100:.1f}% of a free token)")


if __name__ == "__main__":
    main()
