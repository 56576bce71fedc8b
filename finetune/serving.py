"""Stage 7: talk to a trained model, in the terminal or over an OpenAI-compatible HTTP API with a web chat page.

Entry points: `load_chat_model(target, adapters)` resolves a run folder, model folder, .gguf file, bundled alias or
Hub id (plus LoRA adapters over the same base); `chat_loop(chat)` is the terminal chat; `create_app(chat)` is the
Starlette app (`POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, the page at `/`); `serve(chat)` runs
it under uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
from jinja2 import TemplateError
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from transformers import (
    AsyncTextIteratorStreamer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from finetune import models
from finetune.config import ModelConfig, RecipeConfig
from finetune.data import end_of_turn_ids
from finetune.errors import FinetuneError

QUANTIZATIONS = ("none", "8bit", "4bit")


@dataclass(frozen=True)
class Decoding:
    """How a reply is generated; temperature 0 means greedy decoding (the same reply every time)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class _Cancelled(StoppingCriteria):
    """Ends a generation once its requester has gone (closed stream, Ctrl-C), so the next request need not wait."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class ChatModel:
    """One loaded base model, optionally with several LoRA adapters over it, each reachable by a public name."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    variants: dict[str, str | None]  # public name -> peft adapter name; None is the model without any adapter
    default: str

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation rendered with the model's own chat template, ready for the assistant's turn."""
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            raise FinetuneError(f"the model's chat template rejected the conversation: {exc}") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def complete(
        self,
        name: str,
        prompt_ids: list[int],
        decoding: Decoding,
        *,
        streamer: TextIteratorStreamer | AsyncTextIteratorStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> Completion:
        """Generate one reply with variant `name`. One call at a time: the active adapter is state on the model."""
        if cancel is not None and cancel.is_set():  # the requester left while this waited in the queue
            return Completion("", len(prompt_ids), 0, "stop")
        adapter = self.variants[name]
        if adapter is not None:
            self.model.set_adapter(adapter)
        # The base shares its weights with the adapters; disable_adapter() bypasses LoRA for this call only.
        scope = self.model.disable_adapter() if adapter is None and isinstance(self.model, PeftModel) else nullcontext()
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        try:
            with scope:
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]) if cancel else None,
                    **decoding.generate_kwargs(),
                )
        except BaseException:
            if streamer is not None:
                streamer.end()  # wakes the reader, which would otherwise wait for text forever
            raise
        reply = output[0, len(prompt_ids) :].tolist()
        eos = self.model.generation_config.eos_token_id
        stops = {eos} if isinstance(eos, int) else set(eos or [])
        finish = "stop" if reply and reply[-1] in stops else "length"
        text = self.tokenizer.decode(reply, skip_special_tokens=True)
        return Completion(text, len(prompt_ids), len(reply), finish)


def load_chat_model(
    target: str | Path, adapters: Sequence[str | Path] = (), *, quantization: str = "none"
) -> ChatModel:
    """Load what `target` names, ready to chat.

    target: a run folder (runs/NAME) serves its merged/ model, or the recipe's base plus its adapter/ when there is
    no merged/ or when `adapters` are given; otherwise a model folder, .gguf file, bundled alias or Hub id.
    adapters: LoRA adapters over the same base, each `PATH` or `NAME=PATH`, PATH an adapter folder or a run folder.
    Public names: the run folder's name, each adapter's name and, when adapters are loaded, the base's name.

    Raises:
        FinetuneError: unknown quantization, a run folder without weights, a missing or mismatched adapter.
    """
    if quantization not in QUANTIZATIONS:
        raise FinetuneError(f"quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}.")
    path = Path(target).expanduser()
    named = [_named_adapter(str(spec)) for spec in adapters]
    if (path / "recipe.yaml").is_file():
        recipe_model = RecipeConfig.from_yaml(path / "recipe.yaml").model.model_copy(update={"quantization": quantization})
        merged = path / "merged"
        if not named and (merged / "config.json").is_file():
            base_cfg = recipe_model.model_copy(update={"source": str(merged), "revision": None})
            base_name = path.name
        elif (path / "adapter" / "adapter_config.json").is_file():
            # Other adapters were trained on the base, not on this run's merge of it: serve all over the base.
            base_cfg, base_name = recipe_model, _display_name(recipe_model.source)
            named.insert(0, (path.name, path / "adapter"))
        else:
            raise FinetuneError(
                f"{path}: a run folder with neither merged/ nor adapter/ in it; the run did not finish. "
                f"Run it again: finetune run {path / 'recipe.yaml'} --overwrite"
            )
    else:
        base_cfg, base_name = ModelConfig(source=str(target), quantization=quantization), _display_name(str(target))
    names = [base_name, *(name for name, _ in named)]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise FinetuneError(f"two models would both be named `{duplicate}`; name adapters explicitly with NAME=PATH.")

    with_tokenizer = next((folder for _, folder in named if (folder / "tokenizer_config.json").is_file()), None)
    tokenizer = models.load_tokenizer(base_cfg, folder=with_tokenizer)  # the adapter's copy has the trained template
    model = models.load_model(base_cfg)
    models.configure_generation(model, tokenizer, end_of_turn_ids(tokenizer))
    variants: dict[str, str | None] = {base_name: None}
    for index, (name, folder) in enumerate(named):
        adapter = f"adapter{index}"  # peft adapter names become module keys, which may not contain dots
        try:
            if index == 0:
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter)
            else:
                model.load_adapter(str(folder), adapter_name=adapter)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise FinetuneError(
                f"adapter `{name}` ({folder}) does not fit the base `{base_cfg.source}`: {textwrap.shorten(str(exc), 300)}. "
                "Serve together only adapters trained on the same base model."
            ) from None
        variants[name] = adapter
    model.eval()
    return ChatModel(model, tokenizer, variants, default=named[0][0] if named else base_name)


def _named_adapter(spec: str) -> tuple[str, Path]:
    name, sep, location = spec.partition("=")
    if not sep or "/" in name:
        name, location = "", spec
    folder = Path(location).expanduser()
    if (folder / "adapter" / "adapter_config.json").is_file():  # a run folder
        name, folder = name or folder.name, folder / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise FinetuneError(f"--adapter {spec}: no adapter_config.json in {folder}; pass a LoRA adapter folder or a run folder.")
    return name or _display_name(str(folder)), folder


def _display_name(source: str) -> str:
    """A model's public name: the alias or Hub id as given, a path's last part (its run's name for merged/, adapter/)."""
    path = Path(source).expanduser()
    if not path.exists():
        return source
    path = path.resolve()
    return path.parent.name if path.name in ("merged", "adapter") else path.name.removesuffix(".gguf")


# ---------------------------------------------------------------------------------------------- terminal chat


def chat_loop(
    chat: ChatModel,
    *,
    model: str | None = None,
    system: str | None = None,
    decoding: Decoding = Decoding(),
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> list[dict[str, str]]:
    """Chat in the terminal until /exit or end of input, printing each reply as it is generated.

    `read` takes the prompt and returns one line, raising EOFError at the end (as `input` does). `/reset` starts the
    conversation over (keeping the system prompt); Ctrl-C stops a reply midway. Returns the conversation since the
    last reset.
    """
    out = out or sys.stdout
    name = model or chat.default
    if name not in chat.variants:
        raise FinetuneError(f"model `{name}` is not loaded; choose one of: {', '.join(chat.variants)}.")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    out.write(f"Chatting with {name}. /reset starts over, /exit quits.\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return history
        if line == "/exit":
            return history
        if line == "/reset":
            history = list(start)
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"(unknown command {line.split()[0]}; commands: /reset, /exit)\n")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt = chat.prompt_ids(history)
        except FinetuneError as exc:
            out.write(f"({exc})\n")
            history.pop()
            continue
        context = chat.context_length
        if context and len(prompt) + decoding.max_new_tokens > context:
            out.write(f"(the conversation is {len(prompt)} tokens and the model's context {context}; /reset to start over)\n")
            history.pop()
            continue
        out.write(f"{name}> ")
        out.flush()
        completion = _stream_to(out, chat, name, prompt, decoding)
        out.write("\n")
        history.append({"role": "assistant", "content": completion.text})


def _stream_to(out: TextIO, chat: ChatModel, name: str, prompt: list[int], decoding: Decoding) -> Completion:
    streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as worker:
        job = worker.submit(chat.complete, name, prompt, decoding, streamer=streamer, cancel=cancel)
        try:
            for text in streamer:
                out.write(text)
                out.flush()
        except KeyboardInterrupt:  # Ctrl-C ends this reply, not the chat; the part already shown is kept
            out.write(" (stopped)")
        finally:
            cancel.set()  # generation stops at the next token instead of running on to max_new_tokens
        return job.result()


# ---------------------------------------------------------------------------------------------- HTTP server


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond these it gets a 4xx, so no client can exhaust the server."""

    max_tokens: int = 512  # also the reply length when a request gives no max_tokens
    max_messages: int = 100
    max_body_bytes: int = 1_000_000


class ApiError(Exception):
    """A request the server refuses, answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(BaseModel):
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


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def create_app(
    chat: ChatModel, *, api_key: str | None = None, limits: Limits = Limits(), decoding: Decoding = Decoding()
) -> Starlette:
    """The OpenAI-compatible app. `decoding` gives temperature and top_p when a request omits them."""
    # One worker thread runs every generation, in arrival order. Two at once would race on the active adapter
    # (set_adapter changes the shared model) and split the same cores, making both slower; queued requests simply
    # wait their turn, so load never fails a request. Generation off the event loop keeps /health and streams live.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-generate")
    page = resources.files("finetune").joinpath("static/chat.html").read_text(encoding="utf-8")
    expected = api_key.encode() if api_key else None

    def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes as long wherever the strings differ, so response times do not leak the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY`.", code="invalid_api_key")

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await _read_json(request, limits.max_body_bytes)
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise ApiError(400, f"Invalid request: `{where}`: {first['msg']}.", param=where) from None
        name = req.model or chat.default
        if name not in chat.variants:
            raise ApiError(
                404, f"The model `{name}` does not exist here. Models served: {', '.join(chat.variants)}.",
                param="model", code="model_not_found",
            )
        if len(req.messages) > limits.max_messages:
            raise ApiError(400, f"{len(req.messages)} messages; this server takes at most {limits.max_messages}.", param="messages")
        if req.stop:
            raise ApiError(400, "`stop` sequences are not supported; replies end at the model's end-of-turn token.", param="stop")
        max_tokens = req.max_completion_tokens or req.max_tokens or limits.max_tokens
        if max_tokens > limits.max_tokens:
            raise ApiError(
                400, f"max_tokens={max_tokens} is more than this server allows ({limits.max_tokens}); ask for fewer.",
                param="max_tokens",
            )
        try:
            prompt = chat.prompt_ids([message.plain() for message in req.messages])
        except FinetuneError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        context = chat.context_length
        if context and len(prompt) + max_tokens > context:
            raise ApiError(
                400, f"This model's context is {context} tokens: the messages take {len(prompt)} and max_tokens asks "
                f"for {max_tokens}. Shorten the conversation or lower max_tokens.",
                param="messages", code="context_length_exceeded",
            )
        settings = Decoding(
            max_new_tokens=max_tokens,
            temperature=decoding.temperature if req.temperature is None else req.temperature,
            top_p=decoding.top_p if req.top_p is None else req.top_p,
        )
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            events = _sse(chat, worker, name, prompt, settings, reply_id)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        job = partial(chat.complete, name, prompt, settings)
        completion = await asyncio.get_running_loop().run_in_executor(worker, job)
        return JSONResponse({
            "id": reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        })

    async def list_models(request: Request) -> Response:
        authorize(request)
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "finetune"} for name in chat.variants]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.message, param=exc.param, code=exc.code)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the traceback.")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/", index, methods=["GET"]),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )


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
        raise ApiError(400, f"The request body is not valid JSON ({exc}).") from None


async def _sse(
    chat: ChatModel, worker: ThreadPoolExecutor, name: str, prompt: list[int], decoding: Decoding, reply_id: str
) -> AsyncIterator[str]:
    """The reply as OpenAI's server-sent events: a role chunk, content chunks, a finish chunk, then [DONE]."""
    created = int(time.time())

    def event(delta: dict[str, str], finish_reason: str | None = None) -> str:
        chunk = {
            "id": reply_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return f"data: {json.dumps(chunk)}\n\n"

    cancel = threading.Event()
    streamer = AsyncTextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
    job = asyncio.get_running_loop().run_in_executor(
        worker, partial(chat.complete, name, prompt, decoding, streamer=streamer, cancel=cancel)
    )
    try:
        yield event({"role": "assistant", "content": ""})
        async for text in streamer:
            if text:
                yield event({"content": text})
        completion = await job
        yield event({}, completion.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # a client that hung up stops its generation at the next token


def serve(
    chat: ChatModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: Limits = Limits(),
    decoding: Decoding = Decoding(),
) -> None:
    """Run the app under uvicorn until Ctrl-C."""
    import uvicorn

    try:
        exposed = not (host == "localhost" or ipaddress.ip_address(host).is_loopback)
    except ValueError:  # a host name other than localhost
        exposed = True
    if exposed and api_key is None:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model.", file=sys.stderr)
    print(f"Models: {', '.join(chat.variants)}. Web chat: http://{host}:{port}/", file=sys.stderr)
    uvicorn.run(create_app(chat, api_key=api_key, limits=limits, decoding=decoding), host=host, port=port)
