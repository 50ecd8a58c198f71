"""Quantization quality against llama.cpp: perplexity of the same weights in nabla and in llama.cpp.

    python benchmarks/bench_quant_vs_llamacpp.py [--held-out CORPUS/tinystories | --text FILE] [--tokens N]

The built-in story model in fp32 is scored by nabla as it is and quantized by
nabla (int8, int4); the same fp32 weights are written as an f32 GGUF and
quantized by llama.cpp's own `llama_model_quantize` to Q8_0 and Q4_0, and each
file is scored by llama.cpp. Both engines are also scored on llama.cpp's Q8_0
and Q4_0 files as nabla loads them (Llama.build). Perplexity is computed the
same way for every row: windows of 256 tokens (the model's training context),
each engine's float32 logits over a window, log-softmax and the next token's
log-probability in float64 here, exp of the mean over every scored token.

Text: `--held-out DIR` rebuilds the TinyStories stories the built-in model
never saw in training from the corpus folder it was trained on (the same
seeded 5% split `nabla train` made: nabla.training.data, seed 1337; it checks
that they come to the 29,708 tokens MODEL_CARD.md names), each as BOS + text +
EOS in order. `--text FILE` scores a plain text file instead (the default,
tests/data/tinystories-v1-head.txt, is mostly training text of this model).

Needs llama-cpp-python and gguf. Leaves out: timing (see bench_cpu.py).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import platform
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from nabla import Llama, default_model_path
from nabla.bench.llamacpp import LlamaCpp, _quiet
from nabla.checkpoint.gguf import write_gguf
from nabla.model.quantize import Int8Linear

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 256
HELD_OUT_SEED, HELD_OUT_FRACTION, HELD_OUT_TOKENS = 1337, 0.05, 29_708  # MODEL_CARD.md


def held_out_ids(folder: Path, tokenizer) -> list[int]:
    """The TinyStories validation stories of the built-in model's training run, as its val.bin holds them."""
    from nabla.training.data import parse_sources, read_documents

    (source,) = parse_sources([str(folder)])
    rng = random.Random(HELD_OUT_SEED)
    ids: list[int] = []
    for path in source.files:  # the run's first source, so the seeded draws line up with its split
        first = True
        for text, ends in read_documents(path):
            if not text and first:
                continue
            if rng.random() < HELD_OUT_FRACTION:
                ids += [tokenizer.bos_id] + (tokenizer.sp.encode(text) if first else [])
                ids += [tokenizer.eos_id] if ends else []
            first = ends
    if len(ids) != HELD_OUT_TOKENS:
        raise SystemExit(f"{folder}: rebuilt {len(ids)} held-out tokens, not the {HELD_OUT_TOKENS} of the "
                         "training run; pass the corpus/tinystories folder the built-in model was trained on")
    return ids


def nll(logits: np.ndarray, targets: list[int]) -> float:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    return -float(logp[np.arange(len(targets)), targets].sum())


def windows(ids: list[int]) -> list[list[int]]:
    return [ids[s: s + WINDOW + 1] for s in range(0, len(ids) - 1, WINDOW) if len(ids[s: s + WINDOW + 1]) > 1]


def perplexity_nabla(llama: Llama, ids: list[int]) -> float:
    total, n = 0.0, 0
    with torch.inference_mode():
        for w in windows(ids):
            total += nll(llama.model(torch.tensor([w[:-1]]))[0].numpy(), w[1:])
            n += len(w) - 1
    return math.exp(total / n)


def perplexity_llamacpp(path: Path, ids: list[int]) -> float:
    cpp = LlamaCpp(path, 1, WINDOW, torch.get_num_threads(), WINDOW)
    total, n = 0.0, 0
    try:
        for w in windows(ids):
            total += nll(cpp.logits(w[:-1]), w[1:])
            n += len(w) - 1
    finally:
        cpp.close()
    return math.exp(total / n)


def llama_cpp_quantize(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = torch.get_num_threads()
    if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize to {ftype} failed")
    return dst


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    import llama_cpp as lc

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held-out", metavar="DIR", help="the corpus/tinystories folder the built-in model trained on")
    ap.add_argument("--text", default=str(ROOT / "tests" / "data" / "tinystories-v1-head.txt"))
    ap.add_argument("--tokens", type=int, default=8192, help="tokens scored, from the start (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    lc.llama_log_set(_quiet, None)
    base = Llama.build(default_model_path(), max_seq_len=WINDOW, max_batch_size=1)
    tok = base.tokenizer
    if a.held_out:
        ids, what = held_out_ids(Path(a.held_out), tok), "held-out TinyStories stories (never trained on)"
    else:
        ids = tok.encode(Path(a.text).read_text(encoding="utf-8"), bos=True, eos=False)
        what = f"{Path(a.text).name}"
    ids = ids[: a.tokens]
    scored = sum(len(w) - 1 for w in windows(ids))
    print(f"{scored:,} tokens scored of {what}, windows of {WINDOW}; {cpu_name()}, {torch.get_num_threads()} "
          f"threads; torch {torch.__version__}, llama-cpp-python {lc.__version__}\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="nabla-ppl-") as tmp:
        state = {k: v for k, v in base.model.state_dict().items() if k != "rope" and ".cache." not in k}
        f32 = write_gguf(Path(tmp) / "stories-f32.gguf", state, base.model.args, tok, "f32", context_length=WINDOW)
        files = {q: llama_cpp_quantize(f32, Path(tmp) / f"stories-{q}.gguf", q) for q in ("Q8_0", "Q4_0")}
        ours_fp32, theirs_f32 = perplexity_nabla(base, ids), perplexity_llamacpp(f32, ids)
        rows.append(("fp32", ours_fp32, "F32 (nabla's GGUF)", theirs_f32))
        del base
        theirs = {q: perplexity_llamacpp(path, ids) for q, path in files.items()}
        for mode, q in (("int8", "Q8_0"), ("int4", "Q4_0")):
            ours = Llama.build(default_model_path(), max_seq_len=WINDOW, max_batch_size=1, quantize=mode)
            rows.append((f"{mode} (nabla quantizes)", perplexity_nabla(ours, ids),
                         f"{q} (llama.cpp quantizes)", theirs[q]))
            if mode == "int8":  # the same int8 weights through the weight-only kernel, inputs not quantized
                for module in ours.model.modules():
                    if isinstance(module, Int8Linear):
                        module.kernel = "dequant"
                rows.append(("int8, weight-only kernel (dequant)", perplexity_nabla(ours, ids),
                             f"{q} (llama.cpp quantizes)", theirs[q]))
        for q, path in files.items():
            ours = Llama.build(path, max_seq_len=WINDOW, max_batch_size=1)
            rows.append((f"llama.cpp's {q} file, loaded by nabla", perplexity_nabla(ours, ids),
                         f"the same {q} file", theirs[q]))
    print("| nabla weights | nabla perplexity | vs nabla fp32 | llama.cpp weights | llama.cpp perplexity "
          "| vs llama.cpp f32 | nabla vs llama.cpp |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name, ours, theirs_name, theirs in rows:
        print(f"| {name} | {ours:.4f} | {100 * (ours / ours_fp32 - 1):+.2f}% | {theirs_name} | {theirs:.4f} | "
              f"{100 * (theirs / theirs_f32 - 1):+.2f}% | {100 * (ours / theirs - 1):+.2f}% |")


if __name__ == "__main__":
    main()
