"""The OpenAI HTTP API's request schemas (pydantic).

Requests are validated strictly, as OpenAI does: unknown fields, wrong types
and out-of-range values are errors naming the parameter (`param_of` turns a
pydantic error location into OpenAI's `messages[0].content` spelling).
temperature and top_p go through nabla's own sampling checks
(nabla.generation.checks), plus OpenAI's upper bound on temperature.
Parameters OpenAI has but nabla does not implement are declared, so that
setting one is a clear "not supported" error rather than silently ignored.

Leaves out: responses (nabla.server.responses), checks that need the model
(vocabulary, context length: nabla.server.serving).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nabla.errors import InvalidRequestError
from nabla.generation.checks import check_temperature, check_top_p
from nabla.tokenizer.chat import check_template_kwargs

MAX_STOP = 4
MAX_TEMPERATURE = 2  # OpenAI's limit; nabla itself takes any temperature >= 0


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # Parameters of OpenAI's API that nabla does not implement: set (to a
    # value other than null or an empty default) they are a 400, never ignored.
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()

    def check_supported(self) -> None:
        for name in self.UNSUPPORTED:
            value = getattr(self, name, None)
            if value is not None and value != [] and value != {}:
                raise InvalidRequestError(f"nabla does not support the parameter '{name}'; remove it", name)


class StreamOptions(Strict):
    include_usage: bool = False


class _Sampling(Strict):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = Field(None, ge=1, le=128)
    stop: Any = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    logit_bias: Any = None
    ignore_eos: bool | None = False
    """An extension (as in vLLM): keep generating past the end-of-text token, for benchmarks."""

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if v is not None:
            check_temperature(v)
            if v > MAX_TEMPERATURE:
                raise InvalidRequestError(f"temperature must be at most {MAX_TEMPERATURE} in OpenAI's API, "
                                          f"got {v!r}", "temperature")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if v is not None:
            check_top_p(v)
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(v)}")
        if any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty strings")
        return v

    def check(self) -> None:
        self.check_supported()
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when 'stream' is true", "stream_options")


def json_format(fmt) -> tuple[bool, dict | None]:
    """response_format as (constrained, schema): text is (False, None), json_object (True, None)."""
    if fmt is None or fmt == {"type": "text"}:
        return False, None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequestError("response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                  "{\"type\": \"json_schema\", \"json_schema\": {...}}", "response_format")
    extra = sorted(set(fmt) - {"type", "json_schema"})
    if extra:
        raise InvalidRequestError(f"Unrecognized argument: response_format.{extra[0]}", f"response_format.{extra[0]}")
    if fmt["type"] != "json_schema":
        return True, None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError("response_format.json_schema must be an object with 'name' and 'schema'",
                                  "response_format.json_schema")
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise InvalidRequestError(f"Unrecognized argument: response_format.json_schema.{extra[0]}",
                                  f"response_format.json_schema.{extra[0]}")
    if not isinstance(spec.get("name"), str):
        raise InvalidRequestError("response_format.json_schema.name is required (a string)",
                                  "response_format.json_schema.name")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise InvalidRequestError("response_format.json_schema.schema must be a JSON object",
                                  "response_format.json_schema.schema")
    return True, schema


class CompletionRequest(_Sampling):
    prompt: Any  # required: the validator below runs only on a value that was sent
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: Any = None
    response_format: Any = None
    """An extension (as in vLLM): JSON output on completions too."""

    UNSUPPORTED = ("logit_bias", "suffix")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return _text_or_ids(v, "prompt")

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise InvalidRequestError(
                f"nabla does not support best_of ({self.best_of}) different from n ({self.n or 1}); "
                "drop best_of", "best_of")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    chat_template_kwargs: Any = None
    """An extension (as in vLLM): further variables for the model's chat template, {"enable_thinking": false}."""

    UNSUPPORTED = ("functions", "function_call", "logit_bias", "audio", "modalities", "prediction")

    def check(self) -> None:
        super().check()
        check_template_kwargs(self.chat_template_kwargs)
        json_format(self.response_format)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs 'logprobs' set to true", "top_logprobs")


class EmbeddingRequest(Strict):
    model: str
    input: Any  # required, as prompt is
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    UNSUPPORTED = ("dimensions",)

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        return _text_or_ids(v, "input")


def _text_or_ids(v, what: str) -> list[str | list[int]]:
    """A string, strings, token ids or lists of token ids, as a list of items."""
    msg = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
    if v is None:
        raise ValueError(f"'{what}' is required")
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not v:
        raise ValueError(msg + " (and not empty)")
    if all(_is_int(t) for t in v):
        return [v]
    if all(isinstance(t, str) for t in v):
        return v
    if all(isinstance(t, list) and t and all(_is_int(x) for x in t) for t in v):
        return v
    raise ValueError(msg)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def param_of(loc: tuple, field_last: bool = False) -> str | None:
    """pydantic's error location ('messages', 0, 'content') as OpenAI's 'messages[0].content'.

    pydantic puts a union member's tag ('str', 'list[TextPart]') in the location; such parts are
    skipped, except the first (a request's own field) and, with `field_last`, the last (a field
    the client sent or left out: its name as written, whatever it looks like).
    """
    if not loc:
        return None
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif 0 < i and not (field_last and i == len(loc) - 1) and (
                "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none")):
            continue  # a union member's tag, not a field
        else:
            out += ("." if out else "") + part
    return out
