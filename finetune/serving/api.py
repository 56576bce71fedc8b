"""The OpenAI-compatible HTTP server: `create_app(chat)` is the Starlette app (`POST /v1/chat/completions`,
`GET /v1/models`, `GET /health`, the web chat page at `/`); `serve(chat)` runs it under uvicorn. Replies are
generated in a continuous batch (`finetune.serving.batching.Batcher`)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from transformers import AsyncTextIteratorStreamer

from finetune.data import RowError, to_messages, tools_json
from finetune.errors import FinetuneError
from finetune.generation import DecodingSettings
from finetune.serving.batching import Batcher, QueueFull, RequestTimeout, ServerClosing, check_load_limits
from finetune.serving.chat_model import ChatModel, Completion
from finetune.serving.tool_calls import StreamedReply, ToolCallFormat

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much load the server takes; beyond these a request gets a 4xx (429 when
    the queue is full), so no client can exhaust the server."""

    max_tokens: int = 512  # also the reply length when a request gives no max_tokens
    max_messages: int = 100
    max_body_bytes: int = 1_000_000
    # Requests generated together, one row each. 16 callers got 4.9x the tokens/s of one-at-a-time serving on 2 CPU
    # cores (benchmarks/results/serve_load.md). 32 rows gave 1.1-1.55x the tokens/s of 16 with requests waiting, but
    # each stream slows down as the batch grows, and the KV cache grows with the rows (per token 2 x layers x KV heads
    # x head_dim values: 46 KB on SmolLM2-135M, 393 KB on SmolLM2-1.7B), so the default stays at 16.
    max_batch_size: int = 16
    max_queue: int = 64  # requests waiting for a row; one more gets 429 with Retry-After
    request_timeout: float | None = 300.0  # seconds from arrival to the last token, waiting included; None: no limit

    def __post_init__(self) -> None:
        check_load_limits(self.max_batch_size, self.max_queue, self.request_timeout)


class ApiError(Exception):
    """A request the server refuses, answered as OpenAI does: {"error": {"message", "type", "param", "code"}}.

    Args:
        status: The HTTP status code (400, 401, 404, 413, 429, ...).
        message: What was wrong, for the client.
        param: The request field at fault, when there is one.
        code: OpenAI's error code (e.g. "invalid_api_key", "model_not_found").
        headers: Extra response headers (e.g. Retry-After).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None  # null beside an assistant's tool_calls
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def plain(self) -> dict[str, Any]:
        """As a data row's message; `to_messages` then checks the tool calls the way training data is checked."""
        text = (
            self.content
            if isinstance(self.content, str) or self.content is None
            else "".join(part.text for part in self.content)
        )
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        return {
            **message,
            **{
                k: v for k, v in (("tool_calls", self.tool_calls), ("tool_call_id", self.tool_call_id)) if v is not None
            },
        }


class ChatRequest(BaseModel):
    """The body of a POST /v1/chat/completions request, as OpenAI's API defines it (the fields served here).

    Fields not listed (user, seed, logprobs, ...) are ignored. `model` picks a served variant (default: the first);
    `max_completion_tokens` or `max_tokens` bounds the reply; `stop` sequences and `n` other than 1 are refused.
    """

    # Fields not listed (user, seed, logprobs, ...) are ignored: OpenAI clients send many optional ones.
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Literal[1] = 1
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(_error_body(status, message, param, code), status_code=status, headers=headers)


def _engine_error(exc: BaseException) -> ApiError:
    """What a client is told when the batcher could not answer: the queue was full, the request timed out, or the
    server is shutting down."""
    if isinstance(exc, QueueFull):
        return ApiError(
            429,
            f"The server is busy: every batch row is generating and {exc.waiting} requests are waiting (its "
            f"max_batch_size and max_queue). Retry after {exc.retry_after} s.",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, RequestTimeout):
        return ApiError(
            504,
            f"No reply: {exc}. Ask for fewer max_tokens, or ask the server's operator to raise request_timeout.",
            code="timeout",
        )
    if isinstance(exc, ServerClosing):
        return ApiError(503, f"No reply: {exc}; retry against a running server.", code="server_shutting_down")
    return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the traceback.")


def create_app(
    chat: ChatModel,
    *,
    api_key: str | None = None,
    limits: Limits = Limits(),
    decoding: DecodingSettings = DecodingSettings(),
) -> Starlette:
    """The OpenAI-compatible app. `decoding` gives temperature and top_p when a request omits them (None: the
    model's own generation_config), and the repetition guard every request gets. `limits` bounds each request and
    the load: rows generated together, requests waiting, seconds per request.


    Args:
        chat: The loaded model (`load_chat_model`).
        api_key: The bearer key every /v1 request must send; None for no key.
        limits: Per-request bounds and the load the server takes (Limits' defaults: 512 tokens, 16 rows together, 64
            waiting, 300 s per request).
        decoding: Default temperature and top_p for requests that omit them, and the repetition guard.

    Returns:
        The Starlette app: /v1/chat/completions, /v1/models, /health and the web chat page at /; the Batcher is in
        `app.state.batcher`.
    """
    # One engine thread generates every reply, the concurrent ones together in a continuous batch (batching.py); the
    # event loop only parses, queues and streams, so /health and streams stay live under load.
    batcher = Batcher(
        chat,
        max_batch_size=limits.max_batch_size,
        max_queue=limits.max_queue,
        request_timeout=limits.request_timeout,
    )
    page = resources.files("finetune").joinpath("static/chat.html").read_text(encoding="utf-8")
    expected = api_key.encode() if api_key else None

    def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes as long wherever the strings differ, so response times do not leak the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise ApiError(
                401, "Incorrect or missing API key: send `Authorization: Bearer KEY`.", code="invalid_api_key"
            )

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await _read_json(request, limits.max_body_bytes)
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise ApiError(400, f"Invalid request: `{where}`: {first['msg']}.", param=where) from exc
        name = req.model or chat.default
        if name not in chat.variants:
            raise ApiError(
                404,
                f"The model `{name}` does not exist here. Models served: {', '.join(chat.variants)}.",
                param="model",
                code="model_not_found",
            )
        if len(req.messages) > limits.max_messages:
            raise ApiError(
                400, f"{len(req.messages)} messages; this server takes at most {limits.max_messages}.", param="messages"
            )
        if req.stop:
            raise ApiError(
                400, "`stop` sequences are not supported; replies end at the model's end-of-turn token.", param="stop"
            )
        max_tokens = req.max_completion_tokens or req.max_tokens or limits.max_tokens
        if max_tokens > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} is more than this server allows ({limits.max_tokens}); ask for fewer.",
                param="max_tokens",
            )
        messages, tools, tool_format = _conversation(req, chat)
        try:
            prompt = chat.prompt_ids(messages, tools)
        except FinetuneError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        context = chat.context_length
        if context and len(prompt) + max_tokens > context:
            raise ApiError(
                400,
                f"This model's context is {context} tokens: the messages take {len(prompt)} and max_tokens asks "
                f"for {max_tokens}. Shorten the conversation or lower max_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        settings = replace(
            decoding,
            max_new_tokens=max_tokens,
            temperature=decoding.temperature if req.temperature is None else req.temperature,
            top_p=decoding.top_p if req.top_p is None else req.top_p,
        )
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        cancel = threading.Event()
        streamer = (
            AsyncTextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
            if req.stream
            else None
        )
        try:  # queued before answering, so a full queue is a plain 429 even for a stream
            future = batcher.submit(name, prompt, settings, streamer=streamer, cancel=cancel)
        except (QueueFull, ServerClosing) as exc:
            raise _engine_error(exc) from None
        if streamer is not None:
            events = _sse(chat, future, streamer, cancel, name, reply_id, tool_format)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        completion = await _answer(request, future, cancel)
        content, calls = tool_format.parse(completion.text) if tool_format else (completion.text, [])
        message = (
            {"role": "assistant", "content": content or None, "tool_calls": calls}
            if calls
            else {"role": "assistant", "content": content}
        )
        return JSONResponse(
            {
                "id": reply_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if calls else completion.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "total_tokens": completion.prompt_tokens + completion.completion_tokens,
                },
            }
        )

    async def list_models(request: Request) -> Response:
        authorize(request)
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "finetune"} for name in chat.variants]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        load = batcher.status()
        return JSONResponse(
            {
                "status": "ok",
                "queued": load.queued,
                "running": load.running,
                "max_batch_size": load.max_batch_size,
                "max_queue": load.max_queue,
            }
        )

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the traceback.")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        batcher.close()  # every request still waiting gets an answer (503), none is left hanging

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/", index, methods=["GET"]),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.batcher = batcher  # for serve()'s start-up line and for tests
    return app


def _conversation(req: ChatRequest, chat: ChatModel) -> tuple[list[dict[str, Any]], str, ToolCallFormat | None]:
    """The request's messages and tools as training data is checked and stored, and the tool-call format to parse
    the reply with (None when the request offers no tools)."""
    try:
        messages = to_messages({"messages": [message.plain() for message in req.messages]}, "messages")
    except RowError as exc:
        raise ApiError(400, f"Invalid request: messages: {exc}.", param="messages") from exc
    try:
        tools = tools_json(req.tools)
    except RowError as exc:
        raise ApiError(400, f"Invalid request: {exc}.", param="tools") from exc
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if choice not in ("auto", "none"):
        raise ApiError(
            400,
            "`tool_choice` may be `auto` or `none` here: the model decides itself whether to call a tool.",
            param="tool_choice",
        )
    if not tools or choice == "none":
        return messages, tools, None
    if chat.tool_format is None:
        raise ApiError(
            400,
            "This model's chat template does not write tool calls, so it cannot be offered `tools`; serve a model "
            "whose template does (e.g. one fine-tuned on tool-calling rows with a Qwen2.5-style template).",
            param="tools",
        )
    return messages, tools, chat.tool_format


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"Request body over {limit} bytes; send a shorter conversation.")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # a chunked body has no Content-Length to check up front
            raise too_large
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"The request body is not valid JSON ({exc}).") from exc


async def _answer(request: Request, future: Future[Completion], cancel: threading.Event) -> Completion:
    """The reply once generated; a client that hangs up meanwhile has its generation stopped at the next step."""
    waiter = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiter}, timeout=_DISCONNECT_POLL_SECONDS)
        if done:
            break
        if not cancel.is_set() and await request.is_disconnected():
            cancel.set()
    try:
        return waiter.result()
    except (RequestTimeout, ServerClosing) as exc:
        raise _engine_error(exc) from None


_DISCONNECT_POLL_SECONDS = 0.5  # how soon a vanished non-streaming client frees its row; each poll costs microseconds


async def _sse(
    chat: ChatModel,
    future: Future[Completion],
    streamer: AsyncTextIteratorStreamer,
    cancel: threading.Event,
    name: str,
    reply_id: str,
    tool_format: ToolCallFormat | None = None,
) -> AsyncIterator[str]:
    """The reply as OpenAI's server-sent events: a role chunk, content chunks, tool-call chunks when the model called
    tools (text that may start a call is held back until it is known to be one), a finish chunk, then [DONE]. A
    request that fails midway (its timeout, a shutdown, an internal error) ends with an `error` event, which OpenAI
    clients raise as an APIError."""
    created = int(time.time())

    def event(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = {
            "id": reply_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return f"data: {json.dumps(chunk)}\n\n"

    reply = StreamedReply(tool_format) if tool_format else None
    try:
        yield event({"role": "assistant", "content": ""})
        async for text in streamer:
            text = reply.feed(text) if reply else text
            if text:
                yield event({"content": text})
        try:
            completion = await asyncio.wrap_future(future)
        except Exception as exc:
            if not isinstance(exc, (RequestTimeout, ServerClosing)):
                _log.error("generation failed", exc_info=exc)
            failure = _engine_error(exc)
            yield f"data: {json.dumps(_error_body(failure.status, failure.message, code=failure.code))}\n\n"
            return
        content, calls = reply.finish() if reply else ("", [])
        if content:
            yield event({"content": content})
        for index, call in enumerate(calls):
            yield event({"tool_calls": [{"index": index, **call}]})
        yield event({}, "tool_calls" if calls else completion.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # a client that hung up stops its generation at the next step


def serve(
    chat: ChatModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: Limits = Limits(),
    decoding: DecodingSettings = DecodingSettings(),
) -> None:
    """Run the app under uvicorn until Ctrl-C.

    A warning is printed when the server is reachable from other machines with no API key.

    Args:
        chat: The loaded model (`load_chat_model`).
        host: The address to bind; 0.0.0.0 exposes the server to the network.
        port: The TCP port.
        api_key: The bearer key every /v1 request must send; None for no key.
        limits: Per-request bounds and the load the server takes (Limits' defaults: 512 tokens, 16 rows together, 64
            waiting, 300 s per request).
        decoding: Default temperature and top_p for requests that omit them, and the repetition guard.
    """
    import uvicorn

    try:
        exposed = not (host == "localhost" or ipaddress.ip_address(host).is_loopback)
    except ValueError:  # a host name other than localhost
        exposed = True
    if exposed and api_key is None:
        print(
            f"warning: serving on {host} with no API key: anyone who can reach this port can use the model.",
            file=sys.stderr,
        )
    app = create_app(chat, api_key=api_key, limits=limits, decoding=decoding)
    batcher: Batcher = app.state.batcher
    if batcher.unbatched_because:
        print(f"note: one request at a time: {batcher.unbatched_because}, so rows cannot share it.", file=sys.stderr)
    else:
        print(
            f"Up to {batcher.max_batch_size} requests generated together, {batcher.max_queue} waiting.", file=sys.stderr
        )
    print(f"Models: {', '.join(chat.variants)}. Web chat: http://{host}:{port}/", file=sys.stderr)
    uvicorn.run(app, host=host, port=port)
