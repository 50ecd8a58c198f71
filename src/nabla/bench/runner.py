"""`nabla bench`: how fast this machine prefills and decodes, against its memory limit.

Decoding one token at batch 1 reads every weight once, so its ceiling is
(memory read bandwidth) / (bytes of weights). `bench` measures the bandwidth
with several probes (the best is the roofline), builds a model (a checkpoint,
or random weights of a named shape from nabla.model.args.SHAPES; token ids are
drawn at random, no tokenizer needed), times prefill and greedy decode, and
reports decode as a fraction of the roofline. `--vs hf` times transformers'
LlamaForCausalLM on the same weights in the same process, alternating runs;
`--vs llama.cpp` writes the same weights to GGUF (f32, bf16, f16, or q8_0 /
q4_0 beside nabla's int8 / int4) and times llama.cpp the same way
(nabla.bench.llamacpp); with `--model FILE.gguf` both engines load that very
file, nabla as Llama.build does (its Q4_0 blocks as they are).

A checkpoint is built by Llama.build, random weights by
nabla.model.prepare.prepare_model: the same dtype and kernel choices either
way. Leaves out: the probes (machine.py), the timing loop (timing.py), the
peers (peers.py, llamacpp.py) and the CLI flags (nabla.cli.bench).
"""

from __future__ import annotations

import functools
import gc
import os
import time
from dataclasses import dataclass

import torch

from nabla import device as devices
from nabla.bench.machine import available_memory, peak_rss, read_bandwidth
from nabla.bench.peers import gguf_file, hf_peer, llamacpp_file_peer, llamacpp_peer, time_hf
from nabla.bench.timing import rates, time_nabla
from nabla.errors import ConfigError
from nabla.model.args import ModelArgs, from_name, param_count
from nabla.model.llama import Transformer
from nabla.model.prepare import materialize, prepare_model
from nabla.model.quantize import quantize_model, weight_bytes


@dataclass
class Setup:
    shape: str | None = None
    model: str | None = None
    dtype: str = "fp32"
    quantize: str | None = None
    batch_size: int = 1
    prompt_len: int = 16
    gen_len: int = 128
    vs: str | None = None
    repeats: int = 3
    seed: int = 0
    threads: int | None = None
    """None: every core (nabla.device.use_all_cores)."""
    device: str | None = None
    """None: the one nabla.device picks (CUDA, MPS, CPU)."""
    graphs: bool = True
    adapter: str | None = None
    """A LoRA adapter folder for --model (merged at load unless adapter_unmerged)."""
    adapter_unmerged: bool = False
    """Replay recorded decode steps where the device records graphs (nabla.model.graphs)."""


def check_fits(args: ModelArgs, dtype: torch.dtype, setup: Setup, device: torch.device | None = None) -> int:
    """Bytes the run needs; a ConfigError when the machine has less."""
    size = torch.tensor([], dtype=dtype).element_size()
    cache = 2 * args.n_layers * setup.batch_size * args.n_kv_heads * args.head_dim * \
        (setup.prompt_len + setup.gen_len) * size
    need = param_count(args) * size + cache
    if setup.vs == "hf":
        need *= 2  # the peer holds its own copy of the permuted weights and its cache
    device = device or torch.device("cpu")
    have = available_memory(device)
    if need > 0.9 * have:
        who = " and the transformers peer" if setup.vs == "hf" else ""
        where = "this machine" if device.type == "cpu" else str(device)
        raise ConfigError(
            f"shape {setup.shape or setup.model} in {setup.dtype}{who} needs about {need / 2**30:.1f} GiB "
            f"but {where} has {have / 2**30:.1f} GiB available; pick a smaller --shape, "
            f"--dtype bf16, or drop --vs")
    return need


def random_weights(model: Transformer, seed: int = 0) -> None:
    """Fill `model` in place with random weights (std 0.02, norms 1), drawn on its device."""
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def random_model(args: ModelArgs, dtype: torch.dtype, seed: int = 0,
                 device: torch.device | None = None) -> Transformer:
    """A model of shape `args` in `dtype` with random weights, built in place on `device`; torch's layers, no cache."""
    with torch.device("meta"):
        model = Transformer(args)
    return materialize(model, device or torch.device("cpu"), dtype, functools.partial(random_weights, seed=seed))


def run(setup: Setup, progress: bool = True) -> dict:
    """Build, measure and return every figure of one bench run as a dict."""
    if setup.vs == "llama.cpp":
        from nabla.bench.llamacpp import check_installed

        check_installed()
    for name in ("batch_size", "prompt_len", "repeats"):
        if getattr(setup, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if setup.adapter and not setup.model:
        raise ConfigError("--adapter needs --model DIR, the base the adapter was trained on")
    if setup.gen_len < 0:
        raise ConfigError("--gen-len must be at least 0")
    if setup.threads is not None:
        if setup.threads < 1:
            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(setup.threads)
    else:
        devices.use_all_cores()
    dev = devices.choose_device(setup.device)
    if setup.vs == "llama.cpp" and dev.type != "cpu":
        raise ConfigError("--vs llama.cpp times llama.cpp on the CPU; add --device cpu")
    dtype = devices.parse_dtype(setup.dtype)
    say = _Progress(progress)
    say(f"measuring the read bandwidth of {dev}")
    bw = read_bandwidth(dev)
    context = setup.prompt_len + setup.gen_len + 1
    hf = cpp = None

    def make_peer(model: Transformer, tokenizer) -> None:
        """The peer copies the weights as loaded, before nabla swaps in its own layers."""
        nonlocal hf, cpp
        if setup.vs == "hf":
            say("building the transformers peer on the same weights")
            hf = hf_peer(model, dtype, context_length=context)
        elif setup.vs == "llama.cpp":
            cpp = llamacpp_peer(model, tokenizer, setup, say)

    gguf_path = gguf_file(setup.model) if setup.model else None
    gguf_types = None
    quantized = setup.quantize
    if gguf_path is not None:
        from nabla.api import Llama
        from nabla.checkpoint import open_checkpoint

        # A GGUF file runs as Llama.build loads it (Q4_0 blocks as they are, other blocks requantized once,
        # --quantize applied at the load), and llama.cpp runs the very same file, not a rewritten copy.
        ckpt = open_checkpoint(gguf_path)
        gguf_types = dict(ckpt.tensor_types)
        quantized = setup.quantize or ckpt.load_quantize
        if setup.vs == "hf" and quantized:
            raise ConfigError(f"--vs hf needs float weights but {gguf_path.name} loads as {quantized}; "
                              "use --vs llama.cpp for a quantized GGUF file")
        if setup.vs == "llama.cpp" and setup.adapter:
            raise ConfigError("--adapter with --vs llama.cpp on a GGUF file: llama.cpp would run the file without "
                              "the adapter; merge it into the model first (nabla convert --merge-adapter)")
        llama = Llama.build(gguf_path, max_seq_len=context, max_batch_size=setup.batch_size, device=dev,
                            dtype=setup.dtype, quantize=setup.quantize, adapter=setup.adapter,
                            merge_adapter=not setup.adapter_unmerged)
        model, args, tokenizer = llama.model, llama.model.args, llama.tokenizer
        check_fits(args, dtype, setup, dev)
        if setup.vs == "llama.cpp":
            cpp = llamacpp_file_peer(gguf_path, gguf_types, ckpt.metadata.get("general.file_type"), setup, say)
        else:
            make_peer(model, tokenizer)
    elif setup.model:
        from nabla.api import Llama

        # Prepared as for generation, but quantized only once the peer has copied the weights.
        llama = Llama.build(setup.model, max_seq_len=context, max_batch_size=setup.batch_size, device=dev,
                            dtype=setup.dtype, adapter=setup.adapter, merge_adapter=not setup.adapter_unmerged)
        model, args, tokenizer = llama.model, llama.model.args, llama.tokenizer
        check_fits(args, dtype, setup, dev)
        make_peer(model, tokenizer)
        if setup.quantize:
            say(f"quantizing to {setup.quantize}")
            quantize_model(model, setup.quantize)
    else:
        args = from_name(setup.shape or "tiny")
        check_fits(args, dtype, setup, dev)
        say(f"building random {setup.shape} weights ({param_count(args) / 1e6:.0f}M parameters)")

        def load_weights(m: Transformer) -> None:
            random_weights(m, setup.seed)
            make_peer(m, None)

        with torch.device("meta"):
            model = Transformer(args)
        model = prepare_model(model, dev, dtype, load_weights, max_batch_size=setup.batch_size,
                              max_seq_len=context, quantize=setup.quantize)
    graphs = setup.graphs and devices.records_graphs(dev)
    if not graphs:
        from nabla.model.graphs import plain_steps

        plain_steps(model)
    gc.collect()
    B, P, G = setup.batch_size, setup.prompt_len, setup.gen_len
    tokens = torch.randint(0, args.vocab_size, (B, P), generator=torch.Generator().manual_seed(setup.seed)).to(dev)
    ours, theirs = [], []
    time_nabla(model, tokens, min(G, 2))  # warm up (allocations, first-call costs)
    peer = None
    if hf is not None:
        peer = functools.partial(time_hf, hf, tokens)
    elif cpp is not None:
        peer = functools.partial(cpp.time, tokens.tolist())
    if peer is not None:
        peer(min(G, 2))
    for r in range(setup.repeats):
        say(f"run {r + 1}/{setup.repeats}")
        ours.append(time_nabla(model, tokens, G))
        if peer is not None:
            theirs.append(peer(G))
    result = {
        "shape": setup.shape, "model": setup.model, "dtype": setup.dtype, "quantize": quantized,
        "gguf_types": gguf_types,
        "device": str(dev), "device_name": devices.describe(dev), "graphs": graphs,
        "batch_size": B, "prompt_len": P, "gen_len": G, "repeats": setup.repeats,
        "threads": torch.get_num_threads(), "params": param_count(args),
        **rates(ours, B, P, G),
    }
    nbytes = weight_bytes(model)
    best_bw = max(bw.values())
    steps_per_s = result["decode_tok_s"] / B
    result.update({
        "weight_bytes": nbytes,
        "bandwidth_probes_gb_s": bw, "bandwidth_gb_s": best_bw,
        "roofline_tok_s": best_bw * 1e9 / nbytes * B,
        "roofline_fraction": steps_per_s * nbytes / (best_bw * 1e9),
        "peak_rss_bytes": peak_rss(),
        "peak_device_bytes": devices.peak_device_memory(dev),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    })
    if peer is not None:
        name = "hf" if hf is not None else "llamacpp"
        peer_rates = rates(theirs, B, P, G)
        if cpp is not None:
            peer_rates["gguf_type"] = cpp.gguf_type
            peer_rates["gguf_file"] = cpp.gguf_file  # None: a GGUF bench wrote of the weights
            peer_rates["gguf_types"] = cpp.gguf_types
            cpp.close()
            if cpp.folder is not None:
                cpp.folder.cleanup()
        result[name] = peer_rates
        result[f"vs_{name}_ratio"] = result["decode_tok_s"] / peer_rates["decode_tok_s"] if G else None
        result[f"vs_{name}_prefill_ratio"] = result["prefill_tok_s"] / peer_rates["prefill_tok_s"]
    say.close()
    return result


class _Progress:
    """One status line on stderr (rich when there is a terminal), silent otherwise."""

    def __init__(self, on: bool):
        import sys

        self.on = on and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.on:
            import sys

            sys.stderr.write(f"\r\033[K[{time.perf_counter() - self.t0:6.1f}s] {msg}...")
            sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            import sys

            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _types(types: dict[str, int]) -> str:
    return ", ".join(f"{t} x{n}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))


def format_report(r: dict) -> str:
    what = r["model"] or r["shape"]
    q = f", {r['quantize']}" if r["quantize"] else ""
    lines = [
        f"nabla bench: {what} ({r['params'] / 1e6:.1f}M params), {r['dtype']}{q}, batch {r['batch_size']}, "
        f"prompt {r['prompt_len']}, {r['gen_len']} new tokens, median of {r['repeats']}, on {r['device_name']}"
        + (f" ({r['threads']} threads)" if r["device"] == "cpu" else ""),
        "memory read bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in r["bandwidth_probes_gb_s"].items())
        + f" (roofline uses {r['bandwidth_gb_s']:.1f})",
        *([f"GGUF tensor types: {_types(r['gguf_types'])} (nabla runs the linear layers as "
           f"{r['quantize'] or r['dtype']})"] if r.get("gguf_types") else []),
        f"weights read per step: {r['weight_bytes'] / 1e6:.1f} MB -> roofline {r['roofline_tok_s']:.1f} tok/s",
        f"prefill: {r['prefill_tok_s']:10.1f} tok/s",
        f"decode:  {r['decode_tok_s']:10.1f} tok/s  ({100 * r['roofline_fraction']:.0f}% of the roofline)",
        f"peak RSS: {r['peak_rss_bytes'] / 2**20:.0f} MiB"
        + (f", peak {r['device']} memory: {r['peak_device_bytes'] / 2**20:.0f} MiB" if r["peak_device_bytes"] else ""),
    ]
    for key, who in (("hf", "transformers"), ("llamacpp", "llama.cpp")):
        if key in r:
            peer = r[key]
            kind = f" ({peer['gguf_type']})" if "gguf_type" in peer else ""
            if peer.get("gguf_file"):
                kind = f" (the same file, {peer['gguf_type']})"
            at_decode = f"{r[f'vs_{key}_ratio']:.2f}x at decode, " if r[f"vs_{key}_ratio"] else ""
            lines.append(f"{who}{kind}: prefill {peer['prefill_tok_s']:.1f} tok/s, decode "
                         f"{peer['decode_tok_s']:.1f} tok/s -> nabla is {at_decode}"
                         f"{r[f'vs_{key}_prefill_ratio']:.2f}x at prefill")
    if r["device"] == "cpu" and r.get("load_average") is not None and r["load_average"] > os.cpu_count():
        lines.append(f"note: load average {r['load_average']:.1f} on {os.cpu_count()} cores: "
                     "the machine is busy, numbers are pessimistic")
    return "\n".join(lines)
