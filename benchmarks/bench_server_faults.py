"""Fault load on `nabla serve`: 64 streaming clients, half leaving mid-stream, and a bad request a second.

Starts `nabla serve` in a subprocess on a free loopback port (the built-in model by default), then runs
`--clients` concurrent clients, each sending `--requests` streaming completions one after the other (a
`--prompt-tokens` token-id prompt, `--gen-tokens` new tokens with `ignore_eos`, greedy). Every other
client leaves each of its streams after `--leave-after` tokens. Meanwhile one bad or hostile request goes
out every second, in turn: a missing prompt, a tiny temperature, messages of the wrong type, 64 prompts
x n=128, invalid JSON, a body cut off by a client that leaves, a 3,000-input embeddings request whose
client gives up.

Reports: failures among the good requests (a stream that errs, ends short, or is refused; must be 0),
the answers to the bad requests (no 5xx expected), time to first token p50/p99, tokens/s received, the
server's 5xx count from /metrics, and whether every cache slot is free afterwards.

    python benchmarks/bench_server_faults.py
    python benchmarks/bench_server_faults.py --clients 16 --json

Bounded: the clients and requests are counted, the run stops after `--timeout` seconds, and nothing
leaves the loopback interface.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import time

import httpx
from bench_server import free_port, make_prompts, model_folder, start_server  # this folder's own module

MODEL = "bench"


def bad_requests(prompt: list[int]) -> list[tuple[str, str, object]]:
    """(name, route, body: a dict, raw bytes, or a callable doing something odd) in the order sent."""
    good = {"model": MODEL, "prompt": prompt, "max_tokens": 8}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    return [
        ("missing prompt", "/v1/completions", {"model": MODEL, "max_tokens": 8}),
        ("temperature 1e-300", "/v1/completions", {**good, "temperature": 1e-300}),
        ("temperature 1e-300, streamed, penalised", "/v1/completions",
         {**good, "temperature": 1e-300, "stream": True, "frequency_penalty": 2}),
        ("messages [[]]", "/v1/chat/completions", {**chat, "messages": [[]]}),
        ("stream_options of the wrong type", "/v1/chat/completions", {**chat, "stream": True, "stream_options": 1}),
        ("max_tokens 10**9", "/v1/completions", {**good, "max_tokens": 10**9}),
        ("64 prompts x n=128", "/v1/completions", {**good, "prompt": [prompt] * 64, "n": 128}),
        ("invalid JSON", "/v1/completions", b'{"model": "bench", "prompt": '),
        ("body cut off, client leaves", "/v1/completions", "cut"),
        ("3,000-input embeddings, client leaves after 1 s", "/v1/embeddings",
         {"model": MODEL, "input": [prompt[:16]] * 3000}),
    ]


async def send_bad(http: httpx.AsyncClient, url: str, name: str, route: str, body) -> str:
    """The answer to one bad request, as 'HTTP 400 (param)' or what happened."""
    if body == "cut":
        port = int(url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{\"model\": ".encode())
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        return "left mid-body"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    timeout = 1.0 if route == "/v1/embeddings" else 60
    try:
        async with http.stream("POST", route, content=content, timeout=timeout,
                               headers={"Content-Type": "application/json"}) as r:
            text = (await r.aread()).decode()
    except httpx.TimeoutException:
        return "client gave up"
    if r.status_code >= 400:
        return f"HTTP {r.status_code} (param {json.loads(text)['error']['param']})"
    if '"error"' in text:
        return f"HTTP {r.status_code} with an error event"
    return f"HTTP {r.status_code}"


async def one_stream(http: httpx.AsyncClient, prompt: list[int], gen_tokens: int, leave_after: int | None) -> dict:
    """A good streaming request; with leave_after, the client leaves after that many tokens."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": gen_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, tokens, error = None, 0, None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"tokens": 0, "error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    break
                if chunk["choices"]:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    tokens += 1  # one chunk per token (greedy, no stop strings)
                if leave_after is not None and tokens >= leave_after:
                    break  # leaving the `async with` closes the connection mid-stream
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    want = gen_tokens if leave_after is None else leave_after
    if error is None and tokens < want:
        error = f"got {tokens} tokens, expected {want}"
    return {"ttft": ttft, "tokens": tokens, "error": error, "left": leave_after is not None}


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def server_errors(m: dict[str, float]) -> int:
    return int(sum(v for k, v in m.items() if k.startswith("nabla_requests_total") and 'status="5' in k))


async def run(url: str, args, prompts: list[list[int]]) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client(c: int):
            leave = args.leave_after if c % 2 else None
            return [await one_stream(http, prompts[(c * args.requests + k) % len(prompts)], args.gen_tokens, leave)
                    for k in range(args.requests)]

        bad_answers: list[tuple[str, str]] = []
        stop = asyncio.Event()

        async def saboteur():
            plan = bad_requests(prompts[0])
            i = 0
            while not stop.is_set():
                name, route, body = plan[i % len(plan)]
                asyncio.ensure_future(send_bad(http, url, name, route, body)).add_done_callback(
                    lambda f, name=name: bad_answers.append((name, f.result() if not f.exception()
                                                             else f"client error {f.exception()!r}")))
                i += 1
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

        t0 = time.perf_counter()
        bad = asyncio.ensure_future(saboteur())
        results = await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(args.clients))), args.timeout)
        wall = time.perf_counter() - t0
        stop.set()
        await bad
        await asyncio.sleep(1.5)  # the last bad requests' answers
    results = [r for rs in results for r in rs]
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    return {"requests": len(results), "left_mid_stream": sum(r["left"] for r in results),
            "failed": sum(r["error"] is not None for r in results),
            "errors": sorted({r["error"] for r in results if r["error"]})[:5],
            "wall_s": wall, "tokens": sum(r["tokens"] for r in results),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "bad_requests": bad_answers}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="checkpoint folder (default: the built-in model)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=4, help="requests per client (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--leave-after", type=int, default=8, help="tokens a leaving client reads (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--timeout", type=float, default=600, help="seconds the whole run may take (default: %(default)s)")
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
        result = asyncio.run(run(url, args, prompts))
        for _ in range(100):  # the slots of clients that left free within a step or two
            m = metrics(url)
            if m["nabla_slots_in_use"] == 0 and m["nabla_queue_depth"] == 0:
                break
            time.sleep(0.1)
        result.update(slots_in_use_after=int(m["nabla_slots_in_use"]), queue_depth_after=int(m["nabla_queue_depth"]),
                      slots_total=int(m["nabla_slots_total"]), server_5xx=server_errors(m),
                      cancelled=int(m["nabla_requests_cancelled_total"]))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    if args.json:
        print(json.dumps({"model": what, "args": vars(args), **result}, indent=2))
        return 0 if result["failed"] == 0 and result["server_5xx"] == 0 else 1
    r = result
    print(f"good requests: {r['requests']} ({r['left_mid_stream']} left mid-stream), failed: {r['failed']}")
    for e in r["errors"]:
        print(f"    error: {e}")
    print(f"tokens received: {r['tokens']} in {r['wall_s']:.1f} s = {r['tokens_per_s']:.1f} tokens/s")
    print(f"time to first token: p50 {r['ttft_p50_s']:.3f} s, p99 {r['ttft_p99_s']:.3f} s")
    print(f"server 5xx (/metrics): {r['server_5xx']}; generations cancelled: {r['cancelled']}")
    print(f"afterwards: {r['slots_in_use_after']} of {r['slots_total']} slots in use, "
          f"{r['queue_depth_after']} queued")
    print(f"bad requests ({len(r['bad_requests'])}):")
    for name in dict.fromkeys(n for n, _ in r["bad_requests"]):
        answers = sorted({a for n, a in r["bad_requests"] if n == name})
        print(f"    {name}: {', '.join(answers)}")
    return 0 if r["failed"] == 0 and r["server_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
