"""Training speed and peak memory of LoRA against full fine-tuning, and LoRA on an int4 base against a bf16 one.

Each configuration runs in its own process (so its peak resident memory, or on a GPU its peak allocated memory,
is its own): one warm-up step, then timed steps of batch x seq_len tokens, AdamW on what trains; tokens/s is
batch x seq_len over the median step time. The configurations run in --repeats rounds, interleaved (every row once,
then every row again), and each row reports the median over its rounds, so a burst of load from other jobs on a
shared machine slows one round of one row rather than the whole row (a single round of 3 steps is ~0.3 s on the
story model: one such burst once made the fp32 rows look 10x slower than the int4 one). Each row also reports
the loss of its first and last step and how many trainable tensors got a nonzero gradient in the last step, to
show that every configuration does the same work. Models: the built-in story model (its weights) and the 110M
shape (random weights). Prints one Markdown table.

    PYTHONPATH=src python benchmarks/bench_lora.py [--device cpu] [--steps 3] [--batch 4] [--seq-len 128]
        [--repeats 3] [--models stories,110m]

Leaves out: data loading (random tokens), evaluation, torch.compile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = [("stories", "full", "fp32"), ("stories", "lora", "fp32"), ("stories", "lora", "bf16"),
           ("stories", "lora", "int4"), ("110m", "full", "fp32"), ("110m", "lora", "fp32"),
           ("110m", "lora", "bf16"), ("110m", "lora", "int4")]


def one(model_name: str, mode: str, base: str, device: str, steps: int, batch: int, seq_len: int) -> dict:
    import torch

    from nabla import default_model_path
    from nabla.bench.machine import peak_rss
    from nabla.model.args import from_name
    from nabla.model.llama import Transformer
    from nabla.model.lora import LoraSettings, add_lora
    from nabla.model.quantize import quantize_model

    torch.manual_seed(0)
    dev = torch.device(device)
    if model_name == "stories":
        from nabla.checkpoint.meta import args_from_params, load_into, load_meta_state, read_params

        path = default_model_path()
        model = Transformer(args_from_params(read_params(path / "params.json")))
        load_into(model, load_meta_state(path), source=str(path))
    else:
        model = Transformer(from_name(model_name))
    model = model.to(dev, torch.bfloat16 if base == "bf16" else torch.float32)
    if base == "int4":
        quantize_model(model, "int4", kernel="dequant")
    if mode == "lora":
        add_lora(model, LoraSettings(r=8, alpha=16))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    x = torch.randint(0, model.args.vocab_size, (batch, seq_len + 1), device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and base != "fp32" else None

    def step() -> tuple[float, int]:
        import contextlib

        with amp or contextlib.nullcontext():
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        with_grad = sum(int(p.grad is not None and bool(p.grad.abs().sum() > 0)) for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), with_grad

    first, with_grad = step()  # warm-up: optimizer state, allocator (LoRA's A has no gradient yet: B is 0)
    times, last = [], first
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        last, with_grad = step()  # .item() waits for the device
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss()
    return {"model": model_name, "mode": mode, "base": base,
            "tok_s": batch * seq_len / statistics.median(times), "peak_mb": peak / 1e6,
            "trainable_m": sum(p.numel() for p in params) / 1e6, "loss_first": first, "loss_last": last,
            "with_grad": with_grad, "tensors": len(params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each row reports the median")
    ap.add_argument("--models", default="stories,110m", help="comma-separated: stories, 110m")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(*a.one.split(","), a.device, a.steps, a.batch, a.seq_len)))
        return
    configs = [c for c in CONFIGS if c[0] in a.models.split(",")]
    runs: dict[tuple, list] = {c: [] for c in configs}
    for _ in range(a.repeats):
        for cfg in configs:
            out = subprocess.run([sys.executable, __file__, "--one", ",".join(cfg), "--device", a.device, "--steps",
                                  str(a.steps), "--batch", str(a.batch), "--seq-len", str(a.seq_len)],
                                 capture_output=True, text=True)
            runs[cfg].append(out.stderr.strip().splitlines()[-1] if out.returncode
                             else json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"device {a.device}, batch {a.batch} x {a.seq_len} tokens, {a.steps} timed steps after one warm-up, "
          f"median of {a.repeats} interleaved rounds\n")
    print("| model | training | base weights | trainable params | tokens/s (median) | tokens/s (each round) "
          "| loss first -> last | tensors with gradient | peak memory |")
    print("|---|---|---|---:|---:|---:|---|---:|---:|")
    for cfg, rs in runs.items():
        failed = [r for r in rs if isinstance(r, str)]
        if failed:
            print(f"| {' | '.join(cfg)} | failed: {failed[0]} ||||||")
            continue
        r = rs[0]
        each = ", ".join(f"{x['tok_s']:,.0f}" for x in rs)
        print(f"| {r['model']} | {r['mode']} | {r['base']} | {r['trainable_m']:.2f}M "
              f"| {statistics.median(x['tok_s'] for x in rs):,.0f} | {each} "
              f"| {r['loss_first']:.3f} -> {r['loss_last']:.3f} | {r['with_grad']}/{r['tensors']} "
              f"| {max(x['peak_mb'] for x in rs):,.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
