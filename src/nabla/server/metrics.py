"""Counters for `GET /metrics`, in Prometheus' text exposition format.

Requests by endpoint and status, request latency and time to first token
(histograms), tokens, the engine's queue depth and busy slots, and the prefix
cache's hits, misses, tokens saved and size.
"""

from __future__ import annotations

import threading
from collections import Counter

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, x: float) -> None:
        self.sum += x
        self.n += 1
        for i, b in enumerate(BUCKETS):
            if x <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, acc = [], 0
        sep = "," if labels else ""
        for b, c in zip(BUCKETS, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        tail = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{tail} {self.sum:.6f}", f"{name}_count{tail} {self.n}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram()
        self.cancelled = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram()).observe(seconds)

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def count_cancelled(self, n: int = 1) -> None:
        with self._lock:
            self.cancelled += n

    def render(self, engine) -> str:
        lines = ["# HELP nabla_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE nabla_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'nabla_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += ["# HELP nabla_request_latency_seconds Time from request to the last byte.",
                      "# TYPE nabla_request_latency_seconds histogram"]
            for endpoint, h in sorted(self.latency.items()):
                lines += h.lines("nabla_request_latency_seconds", f'endpoint="{endpoint}"')
            lines += ["# HELP nabla_time_to_first_token_seconds Time from request to the first generated token.",
                      "# TYPE nabla_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("nabla_time_to_first_token_seconds")
            cancelled = self.cancelled
        gauges = [
            ("nabla_prompt_tokens_total", "counter", "Prompt tokens prefilled.", engine.prompt_tokens),
            ("nabla_generation_tokens_total", "counter", "Tokens generated.", engine.generated_tokens),
            ("nabla_requests_cancelled_total", "counter", "Generations stopped because the client left.",
             cancelled),
            ("nabla_queue_depth", "gauge", "Sequences waiting for a cache slot.", engine.queue_depth),
            ("nabla_active_sequences", "gauge", "Sequences being generated.", engine.active),
            ("nabla_slots_in_use", "gauge", "Key/value cache rows in use.", engine.slots_in_use),
            ("nabla_slots_total", "gauge", "Key/value cache rows (max batch size).", engine.n_slots),
            ("nabla_decode_steps_total", "counter", "Batched decode steps run.", engine.steps),
        ]
        pc = engine.prefix_cache
        gauges += [
            ("nabla_prefix_cache_hits_total", "counter", "Prompts that started from cached keys and values.",
             pc.hits if pc else 0),
            ("nabla_prefix_cache_misses_total", "counter", "Prompts that found no cached prefix.",
             pc.misses if pc else 0),
            ("nabla_prefix_cache_tokens_saved_total", "counter", "Prompt tokens copied from the prefix cache "
             "instead of computed.", pc.tokens_saved if pc else 0),
            ("nabla_prefix_cache_evictions_total", "counter", "Blocks dropped to stay within the budget.",
             pc.evicted if pc else 0),
            ("nabla_prefix_cache_bytes", "gauge", "Bytes of keys and values the prefix cache holds.",
             pc.bytes if pc else 0),
            ("nabla_prefix_cache_budget_bytes", "gauge", "The prefix cache's budget (--prefix-cache-mb).",
             pc.budget if pc else 0),
        ]
        for name, kind, help_, value in gauges:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"
