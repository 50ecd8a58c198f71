"""The HTTP side of `nabla serve`: FastAPI routes, auth, limits, errors, metrics.

Every error leaves as OpenAI's error object, `{"error": {"message", "type",
"param", "code"}}`, with OpenAI's status: 400 for a bad request (never 422),
401 for a missing or wrong key, 404 for an unknown model or route, 413 for a
body over 1 MB, 429 when the queue is full (with Retry-After), 503 while
shutting down; a 500 tells only a request id, under which the log keeps the
error and its traceback. Request bodies are read and validated here by hand,
so that malformed JSON and wrong types are 400s naming the parameter (by its
path: `messages[0]`, `stream_options.include_usage`). A body is read as JSON
whatever its Content-Type says (none, text/plain), as OpenAI's clients all
send JSON. A client that leaves while its body is read is logged as a 499.

Leaves out: what a request means (nabla.server.serving), the fields of an
answer (nabla.server.responses).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from nabla.errors import ContextLengthError, InvalidRequestError
from nabla.server.batching import Engine, EngineStoppedError, QueueFullError
from nabla.server.lora_modules import LoraModule, load_lora_modules
from nabla.server.metrics import Metrics
from nabla.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, param_of
from nabla.server.responses import DONE, error_body, model_card, new_id, sse
from nabla.server.run import GenerationError
from nabla.server.serving import ModelNotFoundError, Serving
from nabla.server.tokenize import DetokenizeRequest, Tokenization, TokenizeRequest

log = logging.getLogger("nabla.server")
MAX_BODY = 1 << 20  # 1 MB
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
          "/tokenize", "/detokenize", "/tokenizer_info", "/")
KEYED = ("/v1", "/tokenize", "/detokenize", "/tokenizer_info")
"""Paths that need the API key when one is set (the chat page at / asks for it in a field)."""


def chat_html() -> str:
    from importlib.resources import files

    return files("nabla.server").joinpath("chat.html").read_text(encoding="utf-8")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class Gate:
    """ASGI middleware: refuse while draining, check the API key, count and time requests."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ROUTES or path.startswith("/v1/models") else "other"
        endpoint = "/v1/models" if endpoint.startswith("/v1/models") else endpoint
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                return await refusal(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            if endpoint != "/metrics":
                self.state.metrics.observe_request(endpoint, status[0], time.perf_counter() - t0)

    def _refusal(self, scope, path: str) -> Response | None:
        if self.state.draining:
            return error_response(503, "The server is shutting down; retry on another instance or later.",
                                  "server_error", code="service_unavailable")
        key = self.state.api_key
        if key is None or not path.startswith(KEYED) or scope["method"] == "OPTIONS":
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not auth:
            return error_response(401, "You didn't provide an API key. Send it in an Authorization header "
                                  "using Bearer auth (Authorization: Bearer YOUR_KEY).")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            return error_response(401, "Incorrect API key provided.", code="invalid_api_key")
        return None


class ClientGone(Exception):
    """The client left before its request was read: nobody to answer (a 499, as nginx logs it)."""


def internal_error(e: BaseException, what: str = "internal error") -> str:
    """Log e with its traceback under a new request id; the message for the client, which names only the id."""
    rid = new_id("req")
    log.error("%s (request id %s)", what, rid, exc_info=e)
    return f"{what}; request id {rid}"


class ServerState:
    def __init__(self, serving: Serving, api_key: str | None):
        self.serving, self.api_key = serving, api_key
        self.metrics = serving.metrics
        self.draining = False


async def read_request(request: Request, model: type[BaseModel]):
    """The JSON body as `model`, or an APIError (413 too big, 400 unparsable or invalid)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY:
        raise APIError(413, f"The request body is {int(size)} bytes; the limit is {MAX_BODY} bytes.")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise APIError(413, f"The request body is over the limit of {MAX_BODY} bytes.")
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as e:
        raise validation_error(first_error(e.errors(include_url=False))) from None


def first_error(errors: list[dict]) -> dict:
    """The error to report: an unsupported field first, so the answer does not
    depend on the order pydantic happens to list errors in (it varies by release)."""
    return min(errors, key=lambda err: err.get("type") != "extra_forbidden")


def validation_error(err: dict) -> APIError:
    kind = err["type"]
    param = param_of(tuple(err.get("loc", ())), field_last=kind in ("extra_forbidden", "missing"))
    if kind == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON "
                             f"({err.get('ctx', {}).get('error', 'syntax error')}).")
    if param is None:
        return APIError(400, "The request body must be a JSON object.")
    if kind == "model_type":  # a nested object (messages[0], stream_options) of another type
        got = _json_type(err.get("input"))
        return APIError(400, f"Invalid value for '{param}': must be a JSON object (got {got}).", param=param,
                        code="invalid_value")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param)
    check = err.get("ctx", {}).get("error")
    if isinstance(check, InvalidRequestError):  # one of nabla's own checks, run by the schema: its message as is
        return APIError(400, str(check), param=param, code="invalid_value")
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = repr(got) if isinstance(got, (int, float, str, bool)) or got is None else type(got).__name__
    return APIError(400, f"Invalid value for '{param}': {msg} (got {shown}).", param=param, code="invalid_value")


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


async def until_disconnected(request: Request, coro):
    """Await coro, but cancel it (and its generation) if the client goes away."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()


async def guarded(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """An SSE stream whose unexpected failures become an error event, then [DONE]."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as e:  # after the 200 is out, an error can only travel as an event
        yield sse(error_body(internal_error(e, "generation failed: internal error"), "server_error"))
        yield DONE
    finally:
        await stream.aclose()


def create_app(llama, model_name: str, *, api_key: str | None = None, cors_origins: list[str] | None = None,
               max_queue: int = 64, lora_modules: list[LoraModule] | None = None) -> FastAPI:
    """The FastAPI app serving `llama` (a nabla Llama, its cache sized for the batch).

    `lora_modules` are put on llama's model (its base weights untouched) and served under their own names.
    """
    lora_modules = load_lora_modules(llama.model, lora_modules, model_name) if lora_modules else []
    # The engine shares the Llama's prefix cache (Llama.build(prefix_cache_mb=...)); both use the model's cache.
    engine = Engine(llama.model, llama.tokenizer.stop_ids, max_queue=max_queue,
                    prefix_cache=getattr(llama, "prefix_cache", None))
    serving = Serving(llama, engine, model_name, Metrics(), lora_modules=lora_modules)
    state = ServerState(serving, api_key)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            state.draining = True
            engine.stop()

    app = FastAPI(title="nabla", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nabla = state
    app.add_middleware(Gate, state=state)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request, e: InvalidRequestError):
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else "invalid_value"
        return error_response(400, str(e), param=e.param, code=code)

    @app.exception_handler(ModelNotFoundError)
    async def _no_model(request, e):
        return error_response(404, str(e), param="model", code="model_not_found")

    @app.exception_handler(QueueFullError)
    async def _busy(request, e: QueueFullError):
        wait = str(math.ceil(e.retry_after))
        return error_response(429, f"The server is busy (the request queue is full); retry after {wait} s.",
                              "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": wait})

    @app.exception_handler(EngineStoppedError)
    async def _stopping(request, e):
        return error_response(503, "The server is shutting down.", "server_error", code="service_unavailable")

    @app.exception_handler(GenerationError)
    async def _failed(request, e: GenerationError):
        if not e.internal:
            return error_response(500, str(e), "server_error")
        # The engine logged the traceback under this request id; the client learns the id, not the error.
        log.error("request id %s: %s", e.request_id, e)
        return error_response(500, f"generation failed: internal error; request id {e.request_id}", "server_error")

    @app.exception_handler(ClientGone)
    async def _gone(request, e):
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(404, f"Unknown request URL: {request.method} {request.url.path}.",
                                  code="unknown_url")
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = validation_error(first_error(e.errors()))
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return error_response(500, internal_error(e), "server_error")

    def reply(body) -> Response:
        return Response(status_code=499) if body is None else JSONResponse(body)

    def event_stream(stream) -> StreamingResponse:
        return StreamingResponse(guarded(stream), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def generate(request: Request, schema: type[BaseModel], prepare, stream, whole) -> Response:
        req = await read_request(request, schema)
        if req.stream:  # checked and queued before the 200 goes out, so that errors keep their status
            return event_stream(stream(req, prepare(req)))
        return reply(await until_disconnected(request, whole(req)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest, serving.prepare_completion, serving.completion_stream,
                              serving.completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionRequest, serving.prepare_chat, serving.chat_stream,
                              serving.chat)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = await read_request(request, EmbeddingRequest)
        return reply(await until_disconnected(request, serving.embeddings(req)))

    cards = {model_name: model_card(model_name, serving.created)}
    cards.update({m.name: model_card(m.name, serving.created, m.path, m.base_model_name or model_name)
                  for m in lora_modules})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": list(cards.values())}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        serving.check_model(name)
        return cards[name]

    tokenization = Tokenization(llama, serving)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return tokenization.tokenize(await read_request(request, TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return tokenization.detokenize(await read_request(request, DetokenizeRequest))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenization.info()

    @app.get("/")
    async def chat_page():
        """The chat page (chat.html, shipped in the package); it calls /v1 with the key typed into it."""
        return HTMLResponse(chat_html())

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(503, "The decode loop is not running.", "server_error",
                                  code="service_unavailable")
        return {"status": "ok", "model": model_name, "active": engine.active, "queued": engine.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(serving.metrics.render(engine), media_type="text/plain; version=0.0.4")

    return app
