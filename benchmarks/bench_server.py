"""Load benchmark of `nabla serve`: concurrent streaming clients, on CPU by default.

Starts `nabla serve` in a subprocess, then for each concurrency level runs that
many clients, each sending `--requests` streaming completions one after the
other (a `--prompt-tokens` token-id prompt, `--gen-tokens` new tokens with
`ignore_eos`, greedy). Reports aggregate generated tokens/s, time to first
token and p50/p99 request latency per level, failed requests, and the
throughput of each level against one client (the same requests served one
at a time). It also reports tokens per CPU-second of the server process,
which a busy shared machine distorts less than wall-clock throughput.

    python benchmarks/bench_server.py                  # built-in model, 1/4/16 clients
    python benchmarks/bench_server.py --model DIR --clients 1 8 --json

Without the built-in model (or --model), a random model of the built-in
model's shape is written to a temporary folder (with the Llama 2 tokenizer, so
its vocabulary is 32000) and the report says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = ROOT / "tests" / "data" / "llama2" / "tokenizer.model"


def model_folder(args) -> tuple[Path, str]:
    if args.model:
        return Path(args.model), f"{args.model}"
    from nabla import default_model_path

    path = default_model_path()
    if (path / "params.json").is_file():
        return path, "the built-in model (nabla.default_model_path())"
    return random_model(), ("a RANDOM model of the built-in 'stories' shape (dim 288, 6 layers, 6 heads) "
                            "with the Llama 2 tokenizer (vocab 32000): the built-in model was not installed")


def random_model() -> Path:
    import shutil

    import torch

    from nabla.model import from_name
    from nabla.model.llama import Transformer

    args = from_name("stories", vocab_size=32000)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    path = Path(tempfile.mkdtemp(prefix="nabla-bench-"))
    (path / "params.json").write_text(json.dumps(args.to_params()))
    torch.save(model.state_dict(), path / "consolidated.00.pth")
    shutil.copy(LLAMA2_TOKENIZER, path / "tokenizer.model")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nabla", "serve", "--model", str(path), "--port", str(port),
           "--model-name", "bench", "--max-batch-size", str(args.max_batch_size),
           "--max-seq-len", str(args.prompt_tokens + args.gen_tokens + 8), "--log-level", "warning",
           "--max-queue", "1024"]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with code {proc.returncode}") from None
            time.sleep(0.1)


async def one_request(http: httpx.AsyncClient, prompt: list[int], gen_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": gen_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, error = None, 0, None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                elif chunk["choices"] and ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and tokens != gen_tokens:
        error = f"got {tokens} tokens, expected {gen_tokens}"
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens, "error": error}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux), NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


async def run_level(url: str, clients: int, prompts: list[list[int]], gen_tokens: int, per_client: int,
                    pid: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(c: int):
            return [await one_request(http, prompts[(c * per_client + k) % len(prompts)], gen_tokens)
                    for k in range(per_client)]

        t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    ok = [r for r in results if not r.get("error")]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if r.get("error")})[:3],
            "wall_s": wall, "server_cpu_s": cpu, "tokens": sum(r["tokens"] for r in ok),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "tokens_per_cpu_s": sum(r["tokens"] for r in ok) / cpu if cpu > 0 else float("nan"),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99)}


def make_prompts(path: Path, n: int, length: int) -> list[list[int]]:
    """n prompts of exactly `length` token ids: BOS then slices of a story."""
    from nabla.tokenizer import load_tokenizer

    tok = load_tokenizer(path / "tokenizer.model")
    text = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with "
            "her friends. One day, she found a shiny red ball under a big tree. She ran to her mom and said, "
            "look what I found! Her mom smiled and said they could share it with everyone at the park. ") * 4
    ids = tok.encode(text, bos=False, eos=False)
    rng = random.Random(0)
    return [[tok.bos_id] + ids[(s := rng.randrange(len(ids) - length)): s + length - 1] for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="checkpoint folder (default: the built-in model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--device", help="server device (default: nabla's choice)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()

    path, what = model_folder(args)
    prompts = make_prompts(path, 64, args.prompt_tokens)
    port = free_port()
    print(f"model: {what}\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    proc = start_server(path, port, args)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(run_level(url, 1, prompts, 4, 1, proc.pid))  # warm up
        levels = [asyncio.run(run_level(url, c, prompts, args.gen_tokens, args.requests, proc.pid))
                  for c in args.clients]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    base = next((lv for lv in levels if lv["clients"] == 1), None)
    for lv in levels:
        lv["speedup_vs_one_at_a_time"] = lv["tokens_per_s"] / base["tokens_per_s"] if base else None
        lv["cpu_speedup_vs_one_at_a_time"] = lv["tokens_per_cpu_s"] / base["tokens_per_cpu_s"] if base else None
    if args.json:
        print(json.dumps({"model": what, "args": vars(args), "levels": levels}, indent=2))
        return 0
    print(f"{'clients':>7} {'requests':>8} {'failed':>6} {'tok/s':>8} {'x 1-at-a-time':>13} "
          f"{'tok/CPU-s':>9} {'x':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} {'lat p99':>8}")
    nan = float("nan")
    for lv in levels:
        print(f"{lv['clients']:>7} {lv['requests']:>8} {lv['failed']:>6} {lv['tokens_per_s']:>8.1f} "
              f"{lv['speedup_vs_one_at_a_time'] or nan:>13.2f} {lv['tokens_per_cpu_s']:>9.1f} "
              f"{lv['cpu_speedup_vs_one_at_a_time'] or nan:>6.2f} {lv['ttft_p50_s']:>8.3f}s "
              f"{lv['ttft_p99_s']:>8.3f}s {lv['latency_p50_s']:>7.2f}s {lv['latency_p99_s']:>7.2f}s")
        for e in lv["errors"]:
            print(f"        error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
