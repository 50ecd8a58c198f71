"""From a validated OpenAI request to generation and back, per endpoint.

`Serving` turns a completions or chat request into engine sequences (one per
prompt and choice), follows their token events, turns tokens into text
(nabla.server.text: stop strings never leak) and logprob fields, and shapes
OpenAI's response: a JSON body, or the SSE chunks of a stream. Embeddings run
on the engine thread too.

Leaves out: HTTP (nabla.server.app) and the decode loop (nabla.server.batching).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from nabla.errors import ContextLengthError, InvalidRequestError
from nabla.server.batching import (Engine, ErrorEvent, FinishEvent, PromptEvent, SamplingParams, Sequence,
                                   TokenEvent)
from nabla.server.metrics import Metrics
from nabla.server.protocol import (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, error_body,
                                   new_id, now, usage)
from nabla.server.text import ChoiceText, Tok


class ModelNotFoundError(Exception):
    def __init__(self, name: str):
        super().__init__(f"The model '{name}' does not exist; this server serves one model, see GET /v1/models")


@dataclass
class Delta:
    """What one choice adds: text, its tokens, and maybe the end."""

    index: int
    text: str = ""
    toks: list[Tok] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Serving:
    def __init__(self, llama, engine: Engine, model_name: str, metrics: Metrics | None = None):
        self.llama = llama
        self.tokenizer = llama.tokenizer
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics or Metrics()
        self.created = now()
        self.max_seq_len = engine.max_seq_len
        self.vocab_size = min(llama.model.args.vocab_size, self.tokenizer.n_words)
        self._special = {self.tokenizer.bos_id, *self.tokenizer.stop_ids}

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ModelNotFoundError(name)

    # ------------------------------------------------------------- tokens
    @functools.lru_cache(maxsize=65536)
    def token_str(self, i: int) -> tuple[str, list[int]]:
        """The text a token adds (SentencePiece's '▁' as a space) and its UTF-8 bytes."""
        if i in self._special:
            return "", []
        piece = getattr(self.tokenizer, "id_to_piece", None)
        if piece is None:
            s = self.tokenizer.decode([i])
            return s, list(s.encode())
        p = piece(i)
        m = _BYTE.fullmatch(p)
        if m:
            b = int(m[1], 16)
            return (chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"), [b]
        s = p.replace("\u2581", " ")
        return s, list(s.encode())

    def _tok(self, token: int, logprob: float | None, top) -> Tok:
        text, raw = self.token_str(token)
        tops = None if top is None else [(*self.token_str(t), lp) for t, lp in top]
        return Tok(token, text, raw, logprob, tops)

    def encode_prompts(self, items: list, param: str) -> list[list[int]]:
        out = []
        for i, item in enumerate(items):
            ids = self.tokenizer.encode(item, bos=True, eos=False) if isinstance(item, str) else list(item)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"{param} {i} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})", param)
            out.append(ids)
        return out

    def check_length(self, ids: list[int], max_tokens: int | None, param: str, what: str) -> int:
        """The max_tokens to use (chat's default fills the context); raise if it does not fit."""
        limit = self.max_seq_len
        if max_tokens is None:
            max_tokens = limit - len(ids)
        if len(ids) + max_tokens > limit or max_tokens < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max(max_tokens, 1)} tokens ({len(ids)} in {what}, {max(max_tokens, 1)} in the "
                "completion). Please reduce the length of the prompt or of max_tokens.", param)
        return max_tokens

    # ---------------------------------------------------------- generation
    def start(self, jobs: list[tuple[list[int], SamplingParams]], stops: list[str], bases: list[int]) -> "Run":
        """Queue one sequence per job now (so a full queue is a 429 before any response)."""
        return Run(self, jobs, stops, bases)

    # ---------------------------------------------------------- completions
    def prepare_completion(self, req: CompletionRequest):
        req.check()
        self.check_model(req.model)
        prompts = self.encode_prompts(req.prompt, "prompt")
        n = req.n or 1
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for ids in prompts:
            self.check_length(ids, max_tokens, "prompt", "your prompt")
        texts = [p if isinstance(p, str) else self.tokenizer.decode(ids) for p, ids in zip(req.prompt, prompts)]
        jobs, bases = [], []
        for ids, text in zip(prompts, texts):
            for j in range(n):
                jobs.append((ids, self._params(req, max_tokens, j, req.logprobs,
                                               bool(req.echo) and req.logprobs is not None)))
                bases.append(len(text))  # OpenAI's text_offset counts from the prompt's start
        return prompts, texts, jobs, bases, self.start(jobs, req.stop or [], bases)

    def _params(self, req, max_tokens, j, logprobs, prompt_logprobs=False) -> SamplingParams:
        """Sampling settings of choice j (with a seed, choice j draws from seed + j)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=None if req.seed is None else (req.seed + j) % 2**64,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
            ignore_eos=bool(req.ignore_eos))

    async def completion_events(self, req: CompletionRequest, prepared) -> AsyncIterator[tuple[int, dict]]:
        """(choice index, partial choice) as text arrives: echo first, then generated text, then the end."""
        prompts, texts, jobs, bases, run = prepared
        n = req.n or 1
        want_lp = req.logprobs is not None
        if req.echo:
            for i, (ids, _) in enumerate(jobs):
                if not want_lp:  # with logprobs, the echo goes out with the prompt's scores
                    yield i, {"text": texts[i // n], "logprobs": None}
        async for d in run.deltas():
            if isinstance(d, _Count):
                yield d.index, {"count": 1}
                continue
            if isinstance(d, tuple):
                i, ev = d
                toks = [self._tok(t, lp, top) for t, lp, top in zip(jobs[i][0], ev.logprobs, ev.top)]
                _offsets(toks, 0)
                yield i, {"text": texts[i // n], "logprobs": _completion_logprobs(toks)}
                continue
            if d.error:
                yield d.index, {"error": d.error}
                continue
            out = {"text": d.text, "logprobs": _completion_logprobs(d.toks) if want_lp else None}
            if d.finish_reason:
                out["finish_reason"] = d.finish_reason
            if out["text"] or d.toks or d.finish_reason:
                yield d.index, out

    async def completion(self, req: CompletionRequest) -> dict:
        prepared = self.prepare_completion(req)
        choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": None}
                   for i in range(len(prepared[2]))]
        lps = [None] * len(choices)
        generated = 0
        async for i, part in self.completion_events(req, prepared):
            if "error" in part:
                prepared[-1].cancel()
                raise GenerationError(part["error"])
            if "count" in part:
                generated += 1
                continue
            choices[i]["text"] += part["text"]
            if part["logprobs"] is not None:
                lps[i] = _merge(lps[i], part["logprobs"])
            if "finish_reason" in part:
                choices[i]["finish_reason"] = part["finish_reason"]
        if req.logprobs is not None:
            for c, lp in zip(choices, lps):
                c["logprobs"] = lp or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": self.model_name,
                "system_fingerprint": None, "choices": choices,
                "usage": usage(sum(map(len, prepared[0])), generated)}

    def _chunker(self, req, prefix: str, obj: str):
        """The function that makes one stream's SSE chunks (the same id and time on each)."""
        rid, created = new_id(prefix), now()
        with_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, use=None):
            body = {"id": rid, "object": obj, "created": created, "model": self.model_name,
                    "system_fingerprint": None, "choices": choices}
            if with_usage:
                body["usage"] = use
            return sse(body)

        chunk.with_usage = with_usage
        return chunk

    async def completion_stream(self, req: CompletionRequest, prepared) -> AsyncIterator[str]:
        chunk = self._chunker(req, "cmpl", "text_completion")
        generated = 0

        async for i, part in self.completion_events(req, prepared):
            if "error" in part:
                prepared[-1].cancel()  # the other choices too: the stream ends here
                yield sse(error_body(part["error"], "server_error"))
                break
            if "count" in part:
                generated += 1
                continue
            yield chunk([{"index": i, "text": part["text"], "logprobs": part["logprobs"],
                          "finish_reason": part.get("finish_reason")}])
        else:
            if chunk.with_usage:
                yield chunk([], usage(sum(map(len, prepared[0])), generated))
        yield "data: [DONE]\n\n"

    # ----------------------------------------------------------------- chat
    def prepare_chat(self, req: ChatCompletionRequest):
        req.check()
        self.check_model(req.model)
        dialog = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                  for m in req.messages]
        ids = self.llama.encode_chat(dialog)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self.check_length(ids, max_tokens, "messages", "the messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        jobs = [(ids, self._params(req, max_tokens, j, k)) for j in range(req.n or 1)]
        return ids, jobs, self.start(jobs, req.stop or [], [0] * len(jobs))

    async def chat_events(self, req, prepared) -> AsyncIterator[tuple[int, dict]]:
        async for d in prepared[2].deltas():
            if isinstance(d, _Count):
                yield d.index, {"count": 1}
            elif d.error:
                yield d.index, {"error": d.error}
            else:
                yield d.index, {"content": d.text, "logprobs": _chat_logprobs(d.toks) if req.logprobs else None,
                                "finish_reason": d.finish_reason}

    async def chat(self, req: ChatCompletionRequest) -> dict:
        prepared = self.prepare_chat(req)
        n = len(prepared[1])
        texts, lps, reasons = [""] * n, [[] for _ in range(n)], [None] * n
        generated = 0
        async for i, part in self.chat_events(req, prepared):
            if "error" in part:
                prepared[-1].cancel()
                raise GenerationError(part["error"])
            if "count" in part:
                generated += 1
                continue
            texts[i] += part["content"]
            if part["logprobs"]:
                lps[i] += part["logprobs"]["content"]
            reasons[i] = part["finish_reason"] or reasons[i]
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i], "refusal": None},
                    "logprobs": {"content": lps[i], "refusal": None} if req.logprobs else None,
                    "finish_reason": reasons[i]} for i in range(n)]
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(),
                "model": self.model_name, "system_fingerprint": None, "choices": choices,
                "usage": usage(len(prepared[0]), generated)}

    async def chat_stream(self, req: ChatCompletionRequest, prepared) -> AsyncIterator[str]:
        chunk = self._chunker(req, "chatcmpl", "chat.completion.chunk")
        generated = 0

        for i in range(len(prepared[1])):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for i, part in self.chat_events(req, prepared):
            if "error" in part:
                prepared[-1].cancel()  # the other choices too: the stream ends here
                yield sse(error_body(part["error"], "server_error"))
                break
            if "count" in part:
                generated += 1
                continue
            if part["content"] or part["logprobs"]:
                yield chunk([{"index": i, "delta": {"content": part["content"]}, "logprobs": part["logprobs"],
                              "finish_reason": None}])
            if part["finish_reason"]:
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": part["finish_reason"]}])
        else:
            if chunk.with_usage:
                yield chunk([], usage(len(prepared[0]), generated))
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------ embeddings
    async def embeddings(self, req: EmbeddingRequest) -> dict:
        req.check_supported()
        self.check_model(req.model)
        prompts = self.encode_prompts(req.input, "input")
        for ids in prompts:
            if len(ids) > self.max_seq_len:
                raise ContextLengthError(
                    f"This model's maximum context length is {self.max_seq_len} tokens, however you requested "
                    f"{len(ids)} tokens in the input. Please reduce your input.", "input")
        model, device = self.llama.model, self.engine.device

        def embed():
            out = []
            for ids in prompts:
                h = model(torch.tensor([ids], device=device), return_hidden=True)[0].float()  # (T, dim)
                v = h.mean(0)
                out.append(v / v.norm().clamp_min(1e-12))
            return [v.cpu() for v in out]

        vectors = await asyncio.wrap_future(self.engine.run_job(embed))
        data = []
        for i, v in enumerate(vectors):
            if req.encoding_format == "base64":
                emb = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
            else:
                emb = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(map(len, prompts))
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}


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
    def of(cls, loop) -> "Mailbox":
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

    def __init__(self, serving: Serving, jobs, stops: list[str], bases: list[int]):
        self.serving = serving
        self.started = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        mailbox = Mailbox.of(asyncio.get_running_loop())

        def sink(i, events):
            if not mailbox.post(self.queue, (i, events)):
                self.seqs[i].cancel()  # the event loop is closed: nobody is listening any more

        self.seqs = [Sequence(ids, p, functools.partial(sink, i)) for i, (ids, p) in enumerate(jobs)]
        self.texts = [ChoiceText(serving.tokenizer, ids, stops, base) for (ids, _), base in zip(jobs, bases)]
        self.done = [False] * len(self.seqs)
        serving.engine.submit(self.seqs)

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancel()  # no-op for finished ones; frees the slot of the rest

    async def deltas(self) -> AsyncIterator[Delta | _Count | tuple[int, PromptEvent]]:
        serving, done, texts, seqs = self.serving, self.done, self.texts, self.seqs
        first = True
        try:
            while not all(done):
                i, events = await self.queue.get()
                for ev in events:
                    if done[i]:
                        break
                    if isinstance(ev, PromptEvent):
                        yield i, ev
                    elif isinstance(ev, TokenEvent):
                        if first:
                            serving.metrics.observe_ttft(time.perf_counter() - self.started)
                            first = False
                        text, toks, stopped = texts[i].push(serving._tok(ev.token, ev.logprob, ev.top))
                        if stopped:
                            seqs[i].cancel()
                            done[i] = True
                        yield Delta(i, text, toks, "stop" if stopped else None)
                        yield _Count(i)
                    elif isinstance(ev, FinishEvent):
                        done[i] = True
                        if ev.reason == "abort":
                            yield Delta(i, error="the generation was aborted: the server is shutting down")
                        else:
                            text, toks, stopped = texts[i].finish()
                            yield Delta(i, text, toks, "stop" if stopped else ev.reason)
                    elif isinstance(ev, ErrorEvent):
                        done[i] = True
                        yield Delta(i, error=ev.message)
        finally:
            left = sum(not d for d in done)
            self.cancel()
            if left:
                serving.metrics.count_cancelled(left)


class GenerationError(Exception):
    """The engine failed a sequence (not the user's fault)."""


@dataclass
class _Count:
    """One more generated token for choice `index` (for usage)."""

    index: int


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _offsets(toks: list[Tok], start: int) -> None:
    for t in toks:
        t.offset = start
        start += len(t.text)


def _completion_logprobs(toks: list[Tok]) -> dict:
    return {"tokens": [t.text for t in toks], "token_logprobs": [t.logprob for t in toks],
            "top_logprobs": [None if t.top is None else {s: lp for s, _, lp in t.top} for t in toks],
            "text_offset": [t.offset for t in toks]}


def _merge(a: dict | None, b: dict) -> dict:
    if a is None:
        return {k: list(v) for k, v in b.items()}
    for k in a:
        a[k] += b[k]
    return a


def _chat_logprobs(toks: list[Tok]) -> dict:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": t.bytes,
                         "top_logprobs": [{"token": s, "logprob": lp, "bytes": b} for s, b, lp in t.top or []]}
                        for t in toks], "refusal": None}
