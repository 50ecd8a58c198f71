"""Continuous batching: one decode loop serves every active request.

A background thread owns the model. Each sequence (one choice of one request)
gets its own row ("slot") of the key/value cache and sits at its own position
in it: a prefill writes the prompt at positions 0.. of its row, and each
decode step feeds the last token of every active sequence at once,
`model(last (B, 1), start_pos=positions (B,), rows=slots (B,))`. New
sequences join between steps; a finished or cancelled one frees its slot at
once. Sampling is per sequence (own temperature, top_p, penalties and
torch.Generator), so a greedy sequence yields exactly `Llama.generate`'s
tokens for its prompt alone. A step that fails is run again one sequence at
a time, so that a failure ends only the sequence that causes it. On a model
holding several LoRA adapters, each sequence names its own (or none), and
rows of different adapters share each pass (nabla.model.multi_lora).

With a prefix cache (nabla.model.prefix_cache), a prompt whose start was
prefilled before has those keys and values copied into its row, and only the
rest goes through the model; every prefill keeps its prompt's full blocks.

Leaves out: a request's text and stop strings (nabla.server.run), HTTP
(nabla.server.app), sharing cache rows between sequences without a copy, chunked prefill.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from nabla.generation.sampling import apply_mask, greedy, is_greedy, sample
from nabla.model.multi_lora import use_adapters
from nabla.model.prefix_cache import MIN_PASS, PrefixCache

log = logging.getLogger("nabla.server")


class QueueFullError(Exception):
    """The waiting queue is full; the client should retry after a while."""

    def __init__(self, retry_after: float):
        super().__init__(f"the server is busy; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class EngineStoppedError(Exception):
    """The engine is shutting down and takes no new work."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob and the k most likely."""
    prompt_logprobs: bool = False
    """Also score the prompt tokens (for `echo`)."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    """Generate max_tokens whatever comes (benchmarks)."""
    grammar: Any = None
    """A nabla.generation.constraints.Grammar the output must follow (JSON output, forced tool calls)."""


@dataclass
class TokenEvent:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptEvent:
    """Logprobs of the prompt tokens (the first is None: nothing precedes it)."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class FinishEvent:
    reason: str  # "stop" (a stop token), "length", "abort"


@dataclass
class ErrorEvent:
    message: str


Sink = Callable[[list], None]


@dataclass
class Sequence:
    """One generation: a prompt, how to sample, and where its events go."""

    prompt: list[int]
    params: SamplingParams
    sink: Sink
    """Called from the engine thread with a list of events after each step."""
    output: list[int] = field(default_factory=list)
    slot: int = -1
    cancelled: bool = False
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)
    arrived: float = field(default_factory=time.monotonic)
    request_id: str = ""
    """The request's id, in the log when this sequence fails."""
    matcher: Any = None
    """Where this sequence is in its grammar (SamplingParams.grammar), if it has one."""
    cached: list = field(default_factory=list)
    """Keys of the prefix-cache blocks its prefill starts from."""
    adapter: int | None = None
    """The LoRA adapter this sequence runs with (an index into the model's adapters), None for the base."""

    def cancel(self) -> None:
        """Ask the engine to drop this sequence (takes effect before the next step)."""
        self.cancelled = True


class Engine:
    def __init__(self, model, stop_ids, max_queue: int = 64, idle_wait: float = 0.05,
                 prefix_cache: PrefixCache | None = None):
        self.model = model
        self.prefix_cache = prefix_cache
        self.args = model.args
        self.device = next(model.parameters()).device
        self.n_slots = model.layers[0].attention.cache.k.shape[0]
        self.max_seq_len = model.layers[0].attention.cache.k.shape[2]
        self.stop_ids = set(int(t) for t in stop_ids)
        self.max_queue = max_queue
        self.idle_wait = idle_wait
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._free = list(range(self.n_slots))  # a heap: the lowest free row first
        self._jobs: deque[tuple[Callable, Future]] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Counters read by /metrics.
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.step_seconds = 0.0

    # ------------------------------------------------------------ public
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="nabla-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and end the loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def slots_in_use(self) -> int:
        return self.n_slots - len(self._free)

    def retry_after(self) -> float:
        """A rough guess of when a slot frees up, in seconds (at least 1)."""
        per_step = self.step_seconds / self.steps if self.steps else 0.05
        return max(1.0, per_step * 32)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (one request's choices) to run; all or none are taken."""
        with self._cv:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            # Sequences count, not requests: n choices of k prompts take n * k places. (A request
            # larger than the whole queue never gets here: serving refuses it.)
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFullError(self.retry_after())
            for s in seqs:
                s.generator = torch.Generator(device=self.device)
                if s.params.seed is None:
                    s.generator.seed()
                else:
                    s.generator.manual_seed(s.params.seed)
                if s.params.grammar is not None:
                    s.matcher = s.params.grammar.matcher()
                self._waiting.append(s)
            self._cv.notify_all()

    def run_job(self, fn: Callable) -> Future:
        """Run fn() on the engine thread between steps (embeddings); a Future of its result."""
        fut: Future = Future()
        with self._cv:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            self._jobs.append((fn, fut))
            self._cv.notify_all()
        return fut

    # -------------------------------------------------------------- loop
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._iteration()
                except Exception:  # a bug here must not leave every client waiting forever
                    log.exception("the decode loop failed; ending its sequences")
                    for s in list(self._active):
                        self._release(s)
                        s.sink([ErrorEvent("generation failed: internal error in the decode loop")])
        with self._cv:
            left = list(self._waiting) + self._active
            self._waiting.clear()
            for _, fut in self._jobs:
                fut.cancel()
            self._jobs.clear()
        for s in left:
            s.sink([FinishEvent("abort")])
        self._active = []

    def _iteration(self) -> None:
        """Run queued jobs, admit waiting sequences (prefill), then one decode step for all."""
        with self._cv:
            if self._stopping:
                return
            if not (self._jobs or self._active or self._waiting):
                self._cv.wait(self.idle_wait)
                return
            jobs, self._jobs = list(self._jobs), deque()
            admitted = self._admit()
        for fn, fut in jobs:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the caller, never kills the loop
                    fut.set_exception(e)
        self._drop_cancelled()
        self._guarded(self._prefill, admitted)
        self._drop_cancelled()
        if self._active:
            # Rows in order: when they are consecutive the model reads the cache as a view.
            self._guarded(self._decode, sorted(self._active, key=lambda s: s.slot))

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots (caller holds the lock)."""
        admitted = []
        while self._waiting and self._free:
            s = self._waiting.popleft()
            if s.cancelled:
                s.sink([FinishEvent("abort")])
                continue
            s.slot = heapq.heappop(self._free)
            self._active.append(s)
            admitted.append(s)
        return admitted

    def _release(self, s: Sequence) -> None:
        if s in self._active:
            self._active.remove(s)
            with self._cv:
                heapq.heappush(self._free, s.slot)
        s.slot = -1

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._active if s.cancelled]:
            self._release(s)
            s.sink([FinishEvent("abort")])

    def _guarded(self, step: Callable, seqs: list[Sequence]) -> None:
        """Run a batched step; if it fails, run it again for each sequence alone.

        A step raises only from its batched forward pass (writing the cache again is harmless),
        never once it has handed a sequence its token: so the retry ends only the sequence that
        fails on its own, and its neighbours go on as if nothing had happened.
        """
        if not seqs:
            return
        try:
            step(seqs)
        except Exception as e:
            if len(seqs) == 1:
                self._fail(seqs[0], e)
                return
            log.warning("a step of %d sequences failed (%s: %s); running them one at a time",
                        len(seqs), type(e).__name__, e)
            for s in seqs:
                if s.slot >= 0:
                    self._guarded(step, [s])

    def _fail(self, s: Sequence, e: Exception) -> None:
        """End s, and only s, with an error; the log keeps the traceback under its request id."""
        log.error("generation failed (request id %s)", s.request_id or "?", exc_info=e)
        if s.slot >= 0:
            self._release(s)
        s.sink([ErrorEvent(f"generation failed: {type(e).__name__}: {e}")])

    def _emit(self, s: Sequence, logits: torch.Tensor, events: list, token: int | None = None) -> None:
        """_advance, but an error in it (sampling) ends s alone."""
        try:
            self._advance(s, logits, events, token)
        except Exception as e:
            self._fail(s, e)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Write each new prompt into its slot and pick its first token.

        Prompts of the same length (and the same need for prompt logprobs) go
        through the model together.
        """
        groups: dict[tuple[int, int, bool], list[Sequence]] = {}
        for s in seqs:
            # Keys and values depend on the adapter: the cache holds the base model's only.
            if self.prefix_cache is not None and not s.params.prompt_logprobs and s.adapter is None:
                s.cached = self.prefix_cache.match(s.prompt)
            groups.setdefault((len(s.prompt), len(s.cached), s.params.prompt_logprobs), []).append(s)
        for group in groups.values():
            self._guarded(self._prefill_group, group)

    def _prefill_group(self, group: list[Sequence]) -> None:
        t0 = time.perf_counter()
        all_logits = group[0].params.prompt_logprobs
        cache = self.prefix_cache
        n = max(cache.load(self.model, s.slot, s.cached) for s in group) if cache is not None else 0
        tokens = torch.tensor([s.prompt for s in group], dtype=torch.long, device=self.device)
        start = torch.full((len(group),), n, dtype=torch.long, device=self.device)
        rows = torch.tensor([s.slot for s in group], dtype=torch.long, device=self.device)
        with use_adapters(self.model, [s.adapter for s in group]):
            logits = self.model(tokens[:, n:], start, rows=rows, last_only=not all_logits)  # (G, T - n or 1, V)
        self.prompt_tokens += tokens.numel()
        if cache is not None and tokens.shape[1] - n >= MIN_PASS:  # a prefill's own kernels computed them
            for s in group:
                if s.adapter is None:
                    cache.store(self.model, s.slot, s.prompt, len(s.prompt))
        for i, s in enumerate(group):
            try:
                events = [_prompt_event(logits[i, :-1], tokens[i, 1:], s.params.logprobs)] if all_logits else []
            except Exception as e:
                self._fail(s, e)
                continue
            self._emit(s, logits[i, -1], events)
        self.step_seconds += time.perf_counter() - t0

    def _decode(self, seqs: list[Sequence]) -> None:
        """One step for every active sequence: feed its last token, pick the next."""
        t0 = time.perf_counter()
        last = torch.tensor([[s.output[-1]] for s in seqs], dtype=torch.long, device=self.device)
        pos = torch.tensor([len(s.prompt) + len(s.output) - 1 for s in seqs], dtype=torch.long,
                           device=self.device)
        rows = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=self.device)
        with use_adapters(self.model, [s.adapter for s in seqs]):
            logits = self.model(last, pos, rows=rows)[:, -1]  # (B, V)
        argmax_rows = [i for i, s in enumerate(seqs)
                       if is_greedy(s.params.temperature) and not _penalised(s) and s.matcher is None]
        picks = greedy(logits[argmax_rows]).tolist() if argmax_rows else []
        chosen = dict(zip(argmax_rows, picks))
        for i, s in enumerate(seqs):
            self._emit(s, logits[i], [], chosen.get(i))
        self.steps += 1
        self.step_seconds += time.perf_counter() - t0

    def _advance(self, s: Sequence, logits: torch.Tensor, events: list, token: int | None = None) -> None:
        """Pick s's next token from logits (V,), emit it, and retire s when it is done."""
        p = s.params
        if token is None:
            scores = logits
            if _penalised(s):
                ids = torch.tensor(list(s.counts), dtype=torch.long, device=logits.device)
                n = torch.tensor(list(s.counts.values()), dtype=logits.dtype, device=logits.device)
                scores = logits.clone()
                scores[ids] -= n * p.frequency_penalty + p.presence_penalty
            allowed = s.matcher.allowed()[None].to(logits.device) if s.matcher is not None else None
            token = int(sample(apply_mask(scores[None], allowed), p.temperature, p.top_p, s.generator)[0])
        if s.matcher is not None:
            s.matcher.accept(token)
        self.generated_tokens += 1
        if token in self.stop_ids and not p.ignore_eos:
            self._release(s)
            s.sink(events + [FinishEvent("stop")])
            return
        ev = TokenEvent(token)
        if p.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            ev.logprob = float(lp[token])
            ev.top = _top(lp, p.logprobs)
        events.append(ev)
        s.output.append(token)
        s.counts[token] = s.counts.get(token, 0) + 1
        if len(s.output) >= p.max_tokens or len(s.prompt) + len(s.output) >= self.max_seq_len:
            self._release(s)
            events.append(FinishEvent("length"))
        s.sink(events)


def _penalised(s: Sequence) -> bool:
    return bool(s.counts) and (s.params.frequency_penalty != 0 or s.params.presence_penalty != 0)


def _top(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    v, i = torch.topk(lp, k)
    return list(zip(i.tolist(), v.tolist()))


def _prompt_event(logits: torch.Tensor, targets: torch.Tensor, k: int | None) -> PromptEvent:
    """Logprob of each prompt token after the first, from logits (T-1, V)."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(-1, targets[:, None])[:, 0].tolist()
    top = [_top(row, k or 0) for row in lp] if k else [[] for _ in chosen]
    return PromptEvent([None] + chosen, [None] + top)
