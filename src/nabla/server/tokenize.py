"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info.

The request and answer fields are vLLM's, so that clients written for it
(lm-evaluation-harness's remote tokenizer, token counters) work unchanged:
`{"prompt", "add_special_tokens"}` or `{"messages", "add_generation_prompt"}`
-> `{"count", "max_model_len", "tokens", "token_strs"}`; `{"tokens"}` ->
`{"prompt"}`. As in vLLM, the text of a special token ("</s>") in a prompt is
that token. Leaves out: vLLM's multimodal content, `tools` and custom chat
templates in a tokenize request (400s naming them), HTTP (nabla.server.app).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from nabla.errors import InvalidRequestError
from nabla.server.protocol import ChatMessage
from nabla.tokenizer.chat import check_template_kwargs


class TokenizeRequest(BaseModel):
    """A completion prompt or chat messages (exactly one of them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    """A prompt: add BOS (default true). Messages: the chat format adds what it needs, as vLLM's default false."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: Any = None
    """Messages: further variables for the model's chat template, as in a chat completion."""


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


def encode_special(tokenizer, text: str) -> list[int]:
    """text's ids where a special token's text (as the model's own) is that token."""
    with_special = getattr(tokenizer, "encode_with_special", None)
    if with_special is not None:
        return with_special(text)
    piece = getattr(tokenizer, "id_to_piece", None)
    if piece is not None:  # SentencePiece: BOS and EOS by their text, on their own
        for i in (tokenizer.bos_id, tokenizer.eos_id):
            if i >= 0 and text == piece(i):
                return [i]
    return tokenizer.encode(text, bos=False, eos=False)


def token_text(tokenizer, i: int) -> str | None:
    piece = getattr(tokenizer, "id_to_piece", None)
    return piece(i) if piece is not None and 0 <= i < tokenizer.n_words else None


class Tokenization:
    """The three endpoints for one served model."""

    def __init__(self, llama, serving):
        self.llama, self.serving, self.tokenizer = llama, serving, llama.tokenizer

    def tokenize(self, req: TokenizeRequest) -> dict:
        if req.model is not None:
            self.serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("send exactly one of 'prompt' (text) and 'messages' (a chat)",
                                      "prompt" if req.prompt is None else "messages")
        if req.prompt is not None and req.chat_template_kwargs is not None:
            raise InvalidRequestError("chat_template_kwargs go with 'messages', not with a text 'prompt'",
                                      "chat_template_kwargs")
        if req.prompt is not None:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = ([self.tokenizer.bos_id] if add and self.tokenizer.bos_id >= 0 else [])
            ids += encode_special(self.tokenizer, req.prompt)
        else:
            if not req.add_generation_prompt:
                raise InvalidRequestError("nabla's chat formats always end with the assistant's header; "
                                          "add_generation_prompt=false is not supported", "add_generation_prompt")
            if req.continue_final_message:
                raise InvalidRequestError("continue_final_message=true is not supported", "continue_final_message")
            dialog = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                      for m in req.messages]
            ids = self.llama.encode_chat(dialog, check_template_kwargs(req.chat_template_kwargs))
        out = {"count": len(ids), "max_model_len": self.serving.max_seq_len, "tokens": ids, "token_strs": None}
        if req.return_token_strs:
            out["token_strs"] = [token_text(self.tokenizer, i) for i in ids]
        return out

    def detokenize(self, req: DetokenizeRequest) -> dict:
        if req.model is not None:
            self.serving.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.serving.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.serving.vocab_size})",
                                      "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def info(self) -> dict:
        """What vLLM's /tokenizer_info tells: the special tokens' text, the length, the chat template."""
        t = self.tokenizer
        config = getattr(t, "config", None) or {}
        template = config.get("chat_template")
        return {
            "tokenizer_class": type(t).__name__,
            "bos_token": token_text(t, t.bos_id),
            "eos_token": token_text(t, t.eos_id),
            "pad_token": token_text(t, t.pad_id),
            "bos_token_id": t.bos_id if t.bos_id >= 0 else None,
            "eos_token_id": t.eos_id if t.eos_id >= 0 else None,
            "model_max_length": self.serving.max_seq_len,
            "vocab_size": self.serving.vocab_size,
            "chat_template": template if isinstance(template, str) else None,
        }
