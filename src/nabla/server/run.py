"""One request on the engine: its sequences, and what each choice adds as it comes.

`Run` queues one sequence per choice on the engine at once (all or none, so a
full queue is a QueueFullError before any response is sent), carries the
engine thread's events over to the request's event loop through a `Mailbox`,
and turns each choice's tokens into `Delta`s of released text (the text
held back while it could still begin a stop string: nabla.server.text). It
counts the generated tokens (usage) and times the first one (/metrics). A
failed or aborted choice raises GenerationError and ends the other choices;
the request id it carries is the one the engine's log names the failure under.
Every sequence of a request runs with the request's LoRA adapter (or none).

Leaves out: what the request asks for (nabla.server.serving), the response
fields (nabla.server.responses), the decode loop itself (nabla.server.batching).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nabla.server.batching import Engine, ErrorEvent, FinishEvent, PromptEvent, SamplingParams, Sequence, TokenEvent
from nabla.server.metrics import Metrics
from nabla.server.responses import new_id
from nabla.server.text import ChoiceText, Tok, TokenText


class GenerationError(Exception):
    """The engine failed a sequence (not the user's fault), or aborted it (`internal` False)."""

    def __init__(self, message: str, request_id: str, internal: bool = True):
        super().__init__(message)
        self.request_id, self.internal = request_id, internal


@dataclass
class Delta:
    """What one choice adds: text, its tokens, and maybe the end."""

    index: int
    text: str = ""
    toks: list[Tok] = field(default_factory=list)
    finish_reason: str | None = None
    prompt: bool = False
    """The prompt's own tokens, scored (for echo with logprobs); no text of its own."""


class Mailbox:
    """Hands the engine thread's events to an event loop's queues, one loop wake-up per batch.

    A decode step of B sequences posts B times; the first post schedules one
    delivery on the loop and the rest join it, instead of B wake-ups.
    """

    _boxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list = []
        self.scheduled = False

    @classmethod
    def of(cls, loop) -> Mailbox:
        box = cls._boxes.get(loop)
        if box is None:
            box = cls._boxes[loop] = cls(loop)
        return box

    def post(self, queue: asyncio.Queue, item) -> bool:
        """Queue item for delivery; False if the loop is gone."""
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return True
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            self._boxes.pop(self.loop, None)
            return False
        return True

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class Run:
    """The sequences of one request, on the engine, and their deltas as they come."""

    def __init__(self, engine: Engine, metrics: Metrics, tokens: TokenText,
                 jobs: list[tuple[list[int], SamplingParams]], stops: list[str], bases: list[int],
                 adapter: int | None = None):
        self.metrics = metrics
        self.tokens = tokens
        self.started = time.perf_counter()
        self.generated = 0  # tokens generated so far, over all choices (usage)
        self.queue: asyncio.Queue = asyncio.Queue()
        mailbox = Mailbox.of(asyncio.get_running_loop())

        def sink(i, events):
            if not mailbox.post(self.queue, (i, events)):
                self.seqs[i].cancel()  # the event loop is closed: nobody is listening any more

        self.request_id = new_id("req")
        self.seqs = [Sequence(ids, p, functools.partial(sink, i), request_id=self.request_id, adapter=adapter)
                     for i, (ids, p) in enumerate(jobs)]
        self.texts = [ChoiceText(tokens.tokenizer, ids, stops, base) for (ids, _), base in zip(jobs, bases)]
        self.done = [False] * len(self.seqs)
        engine.submit(self.seqs)

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancel()  # no-op for finished ones; frees the slot of the rest

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every choice's deltas in the order they come, until all have ended; GenerationError if one fails."""
        done, texts, seqs, tokens = self.done, self.texts, self.seqs, self.tokens
        try:
            while not all(done):
                i, events = await self.queue.get()
                for ev in events:
                    if done[i]:
                        break
                    if isinstance(ev, PromptEvent):
                        toks = [tokens.tok(t, lp, top) for t, lp, top in zip(seqs[i].prompt, ev.logprobs, ev.top)]
                        offset = 0
                        for t in toks:
                            t.offset, offset = offset, offset + len(t.text)
                        yield Delta(i, toks=toks, prompt=True)
                    elif isinstance(ev, TokenEvent):
                        if not self.generated:
                            self.metrics.observe_ttft(time.perf_counter() - self.started)
                        self.generated += 1
                        text, toks, stopped = texts[i].push(tokens.tok(ev.token, ev.logprob, ev.top))
                        if stopped:
                            seqs[i].cancel()
                            done[i] = True
                        yield Delta(i, text, toks, "stop" if stopped else None)
                    elif isinstance(ev, FinishEvent):
                        done[i] = True
                        if ev.reason == "abort":
                            raise GenerationError("the generation was aborted: the server is shutting down",
                                                  self.request_id, internal=False)
                        text, toks, stopped = texts[i].finish()
                        yield Delta(i, text, toks, "stop" if stopped else ev.reason)
                    elif isinstance(ev, ErrorEvent):
                        done[i] = True
                        raise GenerationError(ev.message, self.request_id)
        finally:
            left = sum(not d for d in done)
            self.cancel()  # the other choices too: the request ends here
            if left:
                self.metrics.count_cancelled(left)
