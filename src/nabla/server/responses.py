"""OpenAI's response bodies and stream chunks, as plain dicts in OpenAI's field order.

The envelope every completion body and chunk shares, the choices of
completions and chat, their logprobs fields (built from nabla.server.text's
`Tok`s), usage, embeddings, model cards and the error object; `sse` frames a
body as one server-sent event.

Leaves out: what goes in them (nabla.server.serving), HTTP statuses (nabla.server.app).
"""

from __future__ import annotations

import base64
import json
import time
import uuid

from nabla.server.text import Tok

DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_card(name: str, created: int, root: str | None = None, parent: str | None = None) -> dict:
    """A /v1/models entry; as vLLM, `root` is what the model was loaded from (the base: its own name) and
    `parent` the base model a LoRA adapter runs on (None for the base)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "nabla", "root": root or name,
            "parent": parent}


# ------------------------------------------------------- bodies and chunks
def envelope(rid: str, obj: str, created: int, model: str, choices: list[dict]) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": choices}


def response(prefix: str, obj: str, model: str, choices: list[dict], use: dict) -> dict:
    """A whole (non-streamed) completion or chat completion."""
    return {**envelope(new_id(prefix), obj, now(), model, choices), "usage": use}


class Chunker:
    """Makes one stream's SSE chunks: the same id and time on each, and a usage field if asked for."""

    def __init__(self, prefix: str, obj: str, model: str, with_usage: bool):
        self.rid, self.obj, self.created, self.model = new_id(prefix), obj, now(), model
        self.with_usage = with_usage

    def __call__(self, choices: list[dict], use: dict | None = None) -> str:
        body = envelope(self.rid, self.obj, self.created, self.model, choices)
        if self.with_usage:
            body["usage"] = use
        return sse(body)


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, content: str | None, logprobs: list[dict] | None, finish_reason: str | None,
                tool_calls: list[dict] | None = None) -> dict:
    """A chat choice; logprobs: the entries of its tokens, or None when not asked for."""
    message = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish_reason}


def chat_chunk_choice(index: int, delta: dict, logprobs: dict | None = None,
                      finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


# ------------------------------------------------------------------ logprobs
def completion_logprobs(toks: list[Tok]) -> dict:
    return {"tokens": [t.text for t in toks], "token_logprobs": [t.logprob for t in toks],
            "top_logprobs": [None if t.top is None else {s: lp for s, _, lp in t.top} for t in toks],
            "text_offset": [t.offset for t in toks]}


def merge_logprobs(a: dict | None, b: dict) -> dict:
    """Completion logprobs a followed by b (a is extended in place, or copied from b when None)."""
    if a is None:
        return {k: list(v) for k, v in b.items()}
    for k in a:
        a[k] += b[k]
    return a


def chat_logprobs(toks: list[Tok]) -> dict:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": t.bytes,
                         "top_logprobs": [{"token": s, "logprob": lp, "bytes": b} for s, b, lp in t.top or []]}
                        for t in toks], "refusal": None}


# ---------------------------------------------------------------- embeddings
def embedding_list(vectors: list, encoding_format: str, model: str, prompt_tokens: int) -> dict:
    """Embeddings (1-D CPU tensors) as floats, or as base64 of little-endian float32."""
    data = []
    for i, v in enumerate(vectors):
        if encoding_format == "base64":
            emb = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
        else:
            emb = v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
