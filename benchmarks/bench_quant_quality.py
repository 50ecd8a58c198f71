"""Accuracy cost of weight-only quantization: perplexity and greedy agreement against fp32.

    python benchmarks/bench_quant_quality.py [--model DIR] [--text FILE] [--tokens N]

Defaults: nabla's built-in story model and the TinyStories text in
tests/data (pass --text with a text the model was not trained on for a fair
perplexity: BENCHMARKS.md says which one its table used).
Greedy agreement: for 4 prompts x 128 new tokens, the number of leading tokens
identical to fp32's, and the fraction of positions equal overall.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from nabla import Llama
from nabla.model.quantize import quantize_model

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tinystories-v1-head.txt"
PROMPTS = ["Once upon a time", "Tom and Lily went to the park", "The little dog was sad because",
           "One day, a girl named Sue"]


def perplexity(model, ids: list[int], window: int) -> float:
    nll, n = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[s: s + window + 1]])
            logits = model(chunk[:, :-1])
            nll += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            n += chunk.shape[1] - 1
    return math.exp(nll / n)


def greedy(llama: Llama, gen_len: int) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        (t,), _ = llama.generate([llama.tokenizer.encode(p, bos=True, eos=False)], max_gen_len=gen_len, temperature=0)
        out.append(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "src/nabla/assets/stories"))
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--gen-len", type=int, default=128)
    a = ap.parse_args()
    llama = Llama.build(a.model, max_seq_len=256, max_batch_size=1)
    ids = llama.tokenizer.encode(Path(a.text).read_text(encoding="utf-8")[-60000:], bos=True, eos=False)[: a.tokens]
    base_ppl, base = perplexity(llama.model, ids, 256), greedy(llama, a.gen_len)
    print(f"| fp32 | - | {base_ppl:.3f} | - | - |")
    for mode, kernel in (("int8", None), ("int8", "dequant"), ("int4", None)):
        model = quantize_model(copy.deepcopy(llama.model), mode, kernel=kernel)
        model.setup_cache(1, 256)
        q = Llama(model, llama.tokenizer)
        ppl, toks = perplexity(model, ids, 256), greedy(q, a.gen_len)
        prefix = []
        equal = total = 0
        for x, y in zip(base, toks):
            k = 0
            while k < min(len(x), len(y)) and x[k] == y[k]:
                k += 1
            prefix.append(k)
            equal += sum(u == v for u, v in zip(x, y))
            total += max(len(x), len(y))
        kname = model.layers[0].attention.wq.kernel
        print(f"| {mode} | {kname} | {ppl:.3f} ({100 * (ppl / base_ppl - 1):+.2f}%) | "
              f"{'/'.join(map(str, prefix))} of {a.gen_len} | {100 * equal / total:.1f}% |")


if __name__ == "__main__":
    main()
