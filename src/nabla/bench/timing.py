"""Timing one run of nabla: the prompt in one pass (prefill), then greedy decode steps.

Also the rates every peer's times become (median of the runs, tokens per second).

Leaves out: building the model and the peers (runner.py, peers.py).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

from nabla import device as devices
from nabla.generation.sampling import greedy
from nabla.model.llama import Transformer


def time_nabla(model: Transformer, tokens: torch.Tensor, gen_len: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one run: prompt in one pass, then greedy steps."""
    B, P = tokens.shape
    sync = functools.partial(devices.synchronize, tokens.device)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        logits = model(tokens, 0, last_only=True)
        sync()
        t1 = time.perf_counter()
        nxt = greedy(logits[:, -1])[:, None]
        for i in range(gen_len):
            logits = model.decode(nxt, P + i)
            nxt = greedy(logits[:, -1])[:, None]
        sync()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def rates(times: list[tuple[float, float]], B: int, P: int, G: int) -> dict:
    pre = statistics.median(t[0] for t in times)
    dec = statistics.median(t[1] for t in times)
    return {"prefill_tok_s": B * P / pre, "decode_tok_s": B * G / dec if G else 0.0,
            "prefill_s": pre, "decode_s": dec}
