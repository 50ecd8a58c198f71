"""From a validated OpenAI request to generation and back, per endpoint.

`Serving` checks what the schema cannot (the model name, token ids, the
context length), turns a completions or chat request into one engine sequence
per prompt and choice (`PreparedRequest`, already queued), and follows the
choices' deltas into OpenAI's answer: one JSON body, or SSE chunks. Embeddings
run on the engine thread too, in short slices between decode steps. With
--lora-modules, the `model` name picks the base or one of its LoRA adapters,
and the answer names the model asked for.

Leaves out: HTTP (nabla.server.app), request schemas (nabla.server.protocol),
running the sequences (nabla.server.run), the fields of the answer
(nabla.server.responses).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from nabla.errors import ContextLengthError, InvalidRequestError
from nabla.generation.constraints import Grammar
from nabla.model.multi_lora import use_adapters
from nabla.server.batching import Engine, SamplingParams
from nabla.server.lora_modules import LoraModule
from nabla.server.metrics import Metrics
from nabla.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, json_format
from nabla.server.responses import (
    DONE,
    Chunker,
    chat_choice,
    chat_chunk_choice,
    chat_logprobs,
    completion_choice,
    completion_logprobs,
    embedding_list,
    error_body,
    merge_logprobs,
    now,
    response,
    sse,
    usage,
)
from nabla.server.run import GenerationError, Run
from nabla.server.text import TokenText
from nabla.server.tools import ToolPlan, forced_calls, may_be_call, openai_calls, parse_calls, plan
from nabla.server.tools import dialog as tool_dialog

EMBED_SLICE_S = 0.02
"""The longest an embeddings request holds the engine at a time (but one input always runs whole)."""


class ModelNotFoundError(Exception):
    def __init__(self, name: str):
        super().__init__(f"The model '{name}' does not exist; see GET /v1/models for the models this server serves")


@dataclass
class PreparedRequest:
    """A checked request whose sequences are queued on the engine."""

    prompts: list[list[int]]
    """Token ids of each prompt (chat: the one rendered dialog)."""
    texts: list[str]
    """Each prompt as text, for completions' echo and text_offset (chat: empty)."""
    n: int
    """Choices per prompt: choice i answers prompt i // n."""
    run: Run
    tools: ToolPlan | None = None
    """Chat: how tool calls are made and read (nabla.server.tools)."""

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def choices(self) -> int:
        return len(self.run.seqs)


class Serving:
    def __init__(self, llama, engine: Engine, model_name: str, metrics: Metrics | None = None,
                 lora_modules: list[LoraModule] | None = None):
        self.llama = llama
        self.tokenizer = llama.tokenizer
        self.tokens = TokenText(self.tokenizer)
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics or Metrics()
        self.created = now()
        self.max_seq_len = engine.max_seq_len
        self.vocab_size = min(llama.model.args.vocab_size, self.tokenizer.n_words)
        self.lora_modules = list(lora_modules or [])
        """The adapters on the model, adapter i under lora_modules[i].name."""
        self.adapters = {m.name: i for i, m in enumerate(self.lora_modules)}

    def check_model(self, name: str) -> int | None:
        """The adapter a `model` name asks for (None: the base); ModelNotFoundError for an unknown name."""
        if name != self.model_name and name not in self.adapters:
            raise ModelNotFoundError(name)
        return self.adapters.get(name)

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

    def check_length(self, ids: list[int], max_tokens: int | None, param: str, what: str,
                     tokens_param: str | None = None) -> int:
        """The max_tokens to use (chat's default fills the context); raise if it does not fit.

        The error names the prompt (`param`) when the prompt alone leaves no room, else the
        max_tokens parameter the client set (`tokens_param`), whose value is then what is too big.
        """
        limit = self.max_seq_len
        if max_tokens is None:
            max_tokens = limit - len(ids)
        if len(ids) + max_tokens > limit or max_tokens < 1:
            blame = tokens_param if tokens_param is not None and len(ids) < limit else param
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max(max_tokens, 1)} tokens ({len(ids)} in {what}, {max(max_tokens, 1)} in the "
                "completion). Please reduce the length of the prompt or of max_tokens.", blame)
        return max_tokens

    # ---------------------------------------------------------- generation
    def grammar(self, schema: dict | None, param: str) -> Grammar:
        return Grammar.json(self.tokenizer, schema, self.llama.model.args.vocab_size, param)

    def response_grammar(self, req) -> Grammar | None:
        """The grammar response_format asks for, compiled once for all the request's choices."""
        constrained, schema = json_format(req.response_format)
        return self.grammar(schema, "response_format.json_schema.schema") if constrained else None

    def _start(self, req, prompts: list[list[int]], texts: list[str], max_tokens: int, logprobs: int | None,
               prompt_logprobs: bool = False, grammar: Grammar | None = None) -> PreparedRequest:
        """Queue n sequences per prompt now (so a full queue is a 429 before any response).

        The queue counts sequences, not requests, so a request that alone would overfill it
        is refused outright (a 400: retrying cannot help).
        """
        n = req.n or 1
        limit = self.engine.max_queue
        if len(prompts) * n > limit:
            raise InvalidRequestError(
                f"This request asks for {len(prompts) * n} sequences ({len(prompts)} prompts x n={n}), but this "
                f"server queues at most {limit} sequences (--max-queue {limit}); send fewer prompts or a smaller n.",
                "n" if n > 1 else "prompt")
        jobs, bases = [], []
        for ids, text in zip(prompts, texts):
            for j in range(n):
                params = self._params(req, max_tokens, j, logprobs, prompt_logprobs)
                params.grammar = grammar
                jobs.append((ids, params))
                bases.append(len(text))  # OpenAI's text_offset counts from the prompt's start
        run = Run(self.engine, self.metrics, self.tokens, jobs, req.stop or [], bases,
                  adapter=self.check_model(req.model))
        return PreparedRequest(prompts, texts, n, run)

    def _params(self, req, max_tokens, j, logprobs, prompt_logprobs=False) -> SamplingParams:
        """Sampling settings of choice j (with a seed, choice j draws from seed + j)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=None if req.seed is None else (req.seed + j) % 2**64,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
            ignore_eos=bool(req.ignore_eos))

    async def _stream(self, req, p: PreparedRequest, prefix: str, obj: str,
                      chunks: AsyncIterator[list[dict]]) -> AsyncIterator[str]:
        """The SSE stream of chunks' choices; a failed generation ends it with an error event."""
        chunk = Chunker(prefix, obj, req.model, bool(req.stream_options and req.stream_options.include_usage))
        try:
            async for choices in chunks:
                yield chunk(choices)
        except GenerationError as e:  # the run has ended the other choices too
            yield sse(error_body(f"{e} (request id {e.request_id})", "server_error"))
        else:
            if chunk.with_usage:
                yield chunk([], usage(p.prompt_tokens, p.run.generated))
        yield DONE

    # ---------------------------------------------------------- completions
    def prepare_completion(self, req: CompletionRequest) -> PreparedRequest:
        req.check()
        self.check_model(req.model)
        prompts = self.encode_prompts(req.prompt, "prompt")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for ids in prompts:
            self.check_length(ids, max_tokens, "prompt", "your prompt",
                              None if req.max_tokens is None else "max_tokens")
        texts = [p if isinstance(p, str) else self.tokenizer.decode(ids) for p, ids in zip(req.prompt, prompts)]
        return self._start(req, prompts, texts, max_tokens, req.logprobs,
                           prompt_logprobs=bool(req.echo) and req.logprobs is not None,
                           grammar=self.response_grammar(req))

    async def completion_choices(self, req: CompletionRequest, p: PreparedRequest) -> AsyncIterator[dict]:
        """Partial choices as text arrives: echo first, then generated text, then the end."""
        want_lp = req.logprobs is not None
        if req.echo and not want_lp:  # with logprobs, the echo goes out with the prompt's scores
            for i in range(p.choices):
                yield completion_choice(i, p.texts[i // p.n], None, None)
        async for d in p.run.deltas():
            if d.prompt:
                yield completion_choice(d.index, p.texts[d.index // p.n], completion_logprobs(d.toks), None)
            elif d.text or d.toks or d.finish_reason:
                yield completion_choice(d.index, d.text, completion_logprobs(d.toks) if want_lp else None,
                                        d.finish_reason)

    async def completion(self, req: CompletionRequest) -> dict:
        p = self.prepare_completion(req)
        choices = [completion_choice(i, "", None, None) for i in range(p.choices)]
        lps: list[dict | None] = [None] * p.choices
        async for part in self.completion_choices(req, p):
            i = part["index"]
            choices[i]["text"] += part["text"]
            if part["logprobs"] is not None:
                lps[i] = merge_logprobs(lps[i], part["logprobs"])
            choices[i]["finish_reason"] = part["finish_reason"] or choices[i]["finish_reason"]
        if req.logprobs is not None:
            for c, lp in zip(choices, lps):
                c["logprobs"] = lp or completion_logprobs([])
        return response("cmpl", "text_completion", req.model, choices,
                        usage(p.prompt_tokens, p.run.generated))

    def completion_stream(self, req: CompletionRequest, p: PreparedRequest) -> AsyncIterator[str]:
        return self._stream(req, p, "cmpl", "text_completion", self._completion_chunks(req, p))

    async def _completion_chunks(self, req: CompletionRequest, p: PreparedRequest) -> AsyncIterator[list[dict]]:
        async for choice in self.completion_choices(req, p):
            yield [choice]

    # ----------------------------------------------------------------- chat
    def prepare_chat(self, req: ChatCompletionRequest) -> PreparedRequest:
        req.check()
        self.check_model(req.model)
        tools = plan(req)
        fmt = self.llama.chat_format
        knows_tools = bool(getattr(fmt, "knows_tools", False))
        dialog = tool_dialog(req.messages, tools.tools if tools.mode != "none" else [], knows_tools)
        variables = {"template_kwargs": req.chat_template_kwargs} if req.chat_template_kwargs else {}
        ids = (fmt.encode_dialog(dialog, tools.tools, **variables) if knows_tools and tools.tools
               else self.llama.encode_chat(dialog, req.chat_template_kwargs))
        tokens_param = ("max_completion_tokens" if req.max_completion_tokens is not None else
                        "max_tokens" if req.max_tokens is not None else None)
        max_tokens = None if tokens_param is None else getattr(req, tokens_param)
        max_tokens = self.check_length(ids, max_tokens, "messages", "the messages", tokens_param)
        k = (req.top_logprobs or 0) if req.logprobs else None
        if tools.mode == "forced":
            grammar = self.grammar(tools.schema, "tools")
        else:
            grammar = self.response_grammar(req)
        p = self._start(req, [ids], [""], max_tokens, k, grammar=grammar)
        p.tools = tools
        return p

    def _reply(self, p: PreparedRequest, text: str, reason: str | None) -> tuple[str | None, list[dict], str | None]:
        """A choice's (content, tool_calls, finish_reason) from its whole text."""
        tools = p.tools
        if tools is None or tools.mode == "none" or reason == "length":
            return text, [], reason
        if tools.mode == "forced":
            return None, openai_calls(forced_calls(text)), "tool_calls"
        content, calls = parse_calls(text, tools.tools)
        return (content, openai_calls(calls), "tool_calls") if calls else (text, [], reason)

    async def chat(self, req: ChatCompletionRequest) -> dict:
        p = self.prepare_chat(req)
        texts, lps, reasons = [""] * p.choices, [[] for _ in range(p.choices)], [None] * p.choices
        async for d in p.run.deltas():
            texts[d.index] += d.text
            if req.logprobs:
                lps[d.index] += chat_logprobs(d.toks)["content"]
            reasons[d.index] = d.finish_reason or reasons[d.index]
        choices = []
        for i in range(p.choices):
            content, calls, reason = self._reply(p, texts[i], reasons[i])
            choices.append(chat_choice(i, content, lps[i] if req.logprobs else None, reason, calls))
        return response("chatcmpl", "chat.completion", req.model, choices,
                        usage(p.prompt_tokens, p.run.generated))

    def chat_stream(self, req: ChatCompletionRequest, p: PreparedRequest) -> AsyncIterator[str]:
        return self._stream(req, p, "chatcmpl", "chat.completion.chunk", self._chat_chunks(req, p))

    async def _chat_chunks(self, req: ChatCompletionRequest, p: PreparedRequest) -> AsyncIterator[list[dict]]:
        for i in range(p.choices):
            yield [chat_chunk_choice(i, {"role": "assistant", "content": ""})]
        # With tools, text that may be a call is held back until it is known (held[i] is None once
        # a choice's text is plain text and streams as it comes).
        calling = p.tools is not None and p.tools.mode != "none"
        held: list[str | None] = ["" if calling else None for _ in range(p.choices)]
        async for d in p.run.deltas():
            lp = chat_logprobs(d.toks) if req.logprobs else None
            text = d.text
            if held[d.index] is not None:
                held[d.index] += text
                text = ""
                if p.tools.mode == "auto" and not may_be_call(held[d.index]):
                    text, held[d.index] = held[d.index], None
            if text or lp:  # with logprobs, every delta sends its (maybe empty) list
                yield [chat_chunk_choice(d.index, {"content": text}, lp)]
            if d.finish_reason:
                reason = d.finish_reason
                if held[d.index] is not None:
                    content, calls, reason = self._reply(p, held[d.index], reason)
                    if calls:
                        yield [chat_chunk_choice(d.index, {"tool_calls": [
                            {"index": k, **c} for k, c in enumerate(calls)]})]
                    elif content:
                        yield [chat_chunk_choice(d.index, {"content": content})]
                yield [chat_chunk_choice(d.index, {}, finish_reason=reason)]

    # ------------------------------------------------------------ embeddings
    async def embeddings(self, req: EmbeddingRequest) -> dict:
        req.check_supported()
        adapter = self.check_model(req.model)
        prompts = self.encode_prompts(req.input, "input")
        for ids in prompts:
            if len(ids) > self.max_seq_len:
                raise ContextLengthError(
                    f"This model's maximum context length is {self.max_seq_len} tokens, however you requested "
                    f"{len(ids)} tokens in the input. Please reduce your input.", "input")
        model, device = self.llama.model, self.engine.device

        def embed(start: int) -> list[torch.Tensor]:
            """Vectors of prompts[start:], as many as EMBED_SLICE_S allows (at least one)."""
            out, t0 = [], time.perf_counter()
            for ids in prompts[start:]:
                with use_adapters(model, [adapter]):
                    h = model(torch.tensor([ids], device=device), return_hidden=True)[0].float()  # (T, dim)
                v = h.mean(0)
                out.append((v / v.norm().clamp_min(1e-12)).cpu())
                if time.perf_counter() - t0 >= EMBED_SLICE_S:
                    break
            return out

        # One slice per engine iteration, so decoding goes on in between; a client that
        # leaves cancels this coroutine, and no further slice is queued.
        vectors: list[torch.Tensor] = []
        while len(vectors) < len(prompts):
            vectors += await asyncio.wrap_future(self.engine.run_job(functools.partial(embed, len(vectors))))
        return embedding_list(vectors, req.encoding_format, req.model, sum(map(len, prompts)))
