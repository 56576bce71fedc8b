"""Continuous batching for `finetune serve`: concurrent requests share the model's decoding steps.

Entry point: `Batcher(chat, ...)`; `submit(...)` queues one reply and returns a Future of its `Completion`. One engine
thread runs every step. At each step, requests that arrived meanwhile are admitted up to `max_batch_size` rows: each
prompt is prefilled on its own (a prompt of a few dozen tokens already keeps the CPU busy, so prefilling them together
would save nothing) and its cache joins the running batch, left-padded to the batch's width. Then one forward pass
decodes the next token of every row, and a row that stops (end-of-turn token, max_tokens, a client that left, its
timeout) leaves the batch at once, so the next request takes its place.

On 2 CPU cores, 16 concurrent callers get 4.9x the tokens/s of one generation at a time (benchmarks/results/
serve_load.md), because a decoding step reads every weight once whatever the number of rows. Each row keeps its own decoding: its
logits processors (temperature, top_p, the repetition guard on its own reply) are the ones `generate()` would use
for it alone (`finetune.generation.generate_kwargs` via `hf_internals.decoding_processors`), and its adapter is
picked per row with peft's `adapter_names`, so requests for different adapters of one base share a batch.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers import LogitsProcessorList, TextIteratorStreamer

from finetune import precision
from finetune.errors import FinetuneError, argument
from finetune.generation import DecodingSettings, generate_kwargs
from finetune.serving import hf_internals
from finetune.serving.chat_model import ChatModel, Completion

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


class QueueFull(Exception):
    """Every batch row is busy and `max_queue` requests already wait; `retry_after` estimates when a slot frees.

    Args:
        waiting: Requests already waiting.
        retry_after: Seconds after which a retry is likely to find a row (the Retry-After header).
    """

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting, self.retry_after = waiting, retry_after


class RequestTimeout(Exception):
    """A request ran past `request_timeout` seconds (waiting included); what it generated is dropped.

    Args:
        seconds: The request timeout that passed.
        generated: Tokens generated before it passed (0: the request was still queued).
    """

    def __init__(self, seconds: float, generated: int) -> None:
        where = f"after {generated} generated tokens" if generated else "before it reached the model (queued)"
        super().__init__(f"no reply within the server's request timeout of {seconds:g} s ({where})")
        self.seconds, self.generated = seconds, generated


class ServerClosing(Exception):
    """The server is shutting down; requests not yet answered are failed, never dropped silently."""


def check_load_limits(max_batch_size: int, max_queue: int, request_timeout: float | None) -> None:
    """Raises FinetuneError naming the setting when a load limit is out of range."""
    if max_batch_size < 1:
        raise FinetuneError(f"{argument('max_batch_size', max_batch_size)}: use 1 (one at a time) or more rows.")
    if max_queue < 0:
        raise FinetuneError(f"{argument('max_queue', max_queue)}: use 0 (refuse when all rows are busy) or more.")
    if request_timeout is not None and request_timeout <= 0:
        raise FinetuneError(
            f"{argument('request_timeout', request_timeout)}: use a number of seconds above 0, or None for no limit."
        )


@dataclass(frozen=True)
class BatchStatus:
    """How busy a Batcher is.

    Attributes:
        queued: Requests waiting for a row.
        running: Rows being generated.
        max_batch_size: Rows generated together at most.
        max_queue: Requests that may wait.
    """

    queued: int  # waiting for a row
    running: int  # rows being generated
    max_batch_size: int
    max_queue: int


@dataclass
class _Job:
    name: str
    prompt: list[int]
    settings: DecodingSettings
    streamer: TextIteratorStreamer | None
    cancel: threading.Event
    deadline: float | None
    future: Future[Completion] = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Row:
    """A request in the running batch: its tokens so far (prompt + reply) and how it decodes."""

    job: _Job
    adapter: str
    processors: LogitsProcessorList
    do_sample: bool
    tokens: list[int]
    cached: int  # tokens of this row in the batch's KV cache (the rest of its columns are left padding)

    @property
    def reply(self) -> list[int]:
        return self.tokens[len(self.job.prompt) :]


class Batcher:
    """Serves replies from one `ChatModel` in a continuous batch. Thread-safe; the engine thread starts on the first
    request and stops at `close()`.

    Args:
        chat: The loaded model.
        max_batch_size: Requests generated together, one row each (1 for models whose cache rows cannot share one).
        max_queue: Requests that may wait for a row; one more raises QueueFull.
        request_timeout: Seconds from arrival to the last token, waiting included; None for no limit.

    Raises:
        FinetuneError: A limit is out of range (`max_batch_size` below 1, `max_queue` below 0, `request_timeout`
            not above 0).
    """

    def __init__(
        self,
        chat: ChatModel,
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        request_timeout: float | None = 300.0,
    ) -> None:
        check_load_limits(max_batch_size, max_queue, request_timeout)
        self.chat = chat
        # Models whose cache cannot be left-padded (sliding-window layers) are served one request at a time.
        self.unbatched_because = hf_internals.rows_can_share_a_cache(chat.model) if max_batch_size > 1 else None
        self.max_batch_size = 1 if self.unbatched_because else max_batch_size
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self._router = hf_internals.AdapterRouter(chat.model) if isinstance(chat.model, PeftModel) else None
        stops = chat.model.generation_config.eos_token_id
        self._stops = {stops} if isinstance(stops, int) else set(stops or [])
        self._condition = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running = 0  # rows admitted and not yet finished, counted under _condition for status()
        self._rows: list[_Row] = []  # engine thread only
        self._cache = None  # the batch's KV cache; engine thread only
        self._seconds_per_reply = 1.0  # running mean, for Retry-After
        self._closed = False
        self._thread: threading.Thread | None = None

    def status(self) -> BatchStatus:
        """How busy the batcher is now (for /health).

        Returns:
            BatchStatus: requests queued and rows running, with the limits.
        """
        with self._condition:
            return BatchStatus(len(self._queue), self._running, self.max_batch_size, self.max_queue)

    def submit(
        self,
        name: str,
        prompt: list[int],
        settings: DecodingSettings,
        *,
        streamer: TextIteratorStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> Future[Completion]:
        """Queue one reply by variant `name`. `streamer` receives its tokens as they are chosen; setting `cancel`
        ends it at the next step (its Future then holds what was generated).

        Raises:
            QueueFull: all `max_batch_size` rows are busy and `max_queue` requests already wait.
            ServerClosing: after `close()`.

        Args:
            name: The variant (adapter name, or the base) to reply with.
            prompt: The prompt's token ids (`ChatModel.prompt_ids`).
            settings: How to decode this reply.
            streamer: Receives the reply's text as it is generated; None for none.
            cancel: Set it to end the reply at the next step; None for a request that cannot be cancelled.

        Returns:
            A Future holding the Completion, or RequestTimeout when `request_timeout` passed.
        """
        deadline = None if self.request_timeout is None else time.monotonic() + self.request_timeout
        job = _Job(name, prompt, settings, streamer, cancel or threading.Event(), deadline)
        with self._condition:
            if self._closed:
                raise ServerClosing("the server is shutting down")
            if len(self._queue) + self._running >= self.max_batch_size + self.max_queue:
                # Roughly when a row frees for this request: a reply's mean time per batch of requests ahead of it.
                batches_ahead = math.ceil((len(self._queue) + 1) / self.max_batch_size)
                raise QueueFull(len(self._queue), max(1, math.ceil(self._seconds_per_reply * batches_ahead)))
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="finetune-batcher", daemon=True)
                self._thread.start()
            self._condition.notify()
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine; every request not yet answered fails with ServerClosing.

        Args:
            timeout: Seconds to wait for the engine thread to finish its current step.
        """
        with self._condition:
            self._closed = True
            self._condition.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._condition:
            pending = list(self._queue)
            self._queue.clear()
        for job in pending:
            _fail(job, ServerClosing("the server shut down before this request reached the model"))
        if self._router is not None and (thread is None or not thread.is_alive()):
            self._router.remove()

    # ------------------------------------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._rows and not self._closed:
                    self._condition.wait()
                if self._closed:
                    break
                newcomers = []
                while self._queue and len(self._rows) + len(newcomers) < self.max_batch_size:
                    newcomers.append(self._queue.popleft())
                self._running = len(self._rows) + len(newcomers)
            try:
                self._step(newcomers)
            except Exception as exc:  # one failed step fails the requests in it, never the engine
                for job in [row.job for row in self._rows] + newcomers:
                    _fail(job, exc)  # a request that had already finished keeps its reply
                self._rows, self._cache = [], None
            with self._condition:
                self._running = len(self._rows)
        for row in self._rows:
            _fail(row.job, ServerClosing("the server shut down during this reply"))
        self._rows, self._cache = [], None

    @torch.inference_mode()
    def _step(self, newcomers: list[_Job]) -> None:
        joined = []
        for job in newcomers:
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.cancel.is_set():  # the requester left while this waited in the queue
                _finish(job, Completion("", len(job.prompt), 0, "stop"))
            elif job.deadline is not None and time.monotonic() > job.deadline:
                _fail(job, RequestTimeout(self.request_timeout or 0, 0))
            else:
                try:
                    row, cache = self._prefill(job)
                except Exception as exc:  # this request's own failure (e.g. an unknown adapter) is its alone
                    _fail(job, exc)
                    continue
                if self._ended(row):
                    self._close_row(row)
                else:
                    joined.append((row, cache))
        if joined:
            caches = ([self._cache] if self._rows else []) + [cache for _, cache in joined]
            self._cache = caches[0] if len(caches) == 1 else hf_internals.join_rows(caches)
            self._rows += [row for row, _ in joined]
        if self._rows:
            self._decode()

    def _prefill(self, job: _Job) -> tuple[_Row, object]:
        """The prompt through the model on its own, as `generate()` does for one prompt; picks the first token."""
        model = self.chat.model
        adapter = self.chat.variants[job.name] or BASE_ADAPTER
        ids = torch.tensor([job.prompt], device=model.device)
        kwargs = generate_kwargs(job.settings, model.generation_config, prompt_length=len(job.prompt))
        processors, do_sample = hf_internals.decoding_processors(model, kwargs, ids)
        row = _Row(job, adapter, processors, do_sample, list(job.prompt), len(job.prompt))
        if job.streamer is not None:
            job.streamer.put(ids.cpu())  # the streamer skips the prompt (skip_prompt=True) and then streams the reply
        cache = hf_internals.new_cache(model)
        positions = torch.arange(len(job.prompt), device=model.device)[None]
        logits = self._forward(ids, None, positions, cache, [adapter])
        self._choose(row, logits[0:1])
        return row, cache

    def _decode(self) -> None:
        """One step for every row: each feeds its newest token and gets the next."""
        model, rows = self.chat.model, self._rows
        width = hf_internals.width(self._cache)
        cached = torch.tensor([row.cached for row in rows], device=model.device)
        ids = torch.tensor([[row.tokens[-1]] for row in rows], device=model.device)
        # Left padding is masked out; with none (every row as long as the cache), no mask, as generate() passes.
        padded = bool((cached < width).any())
        mask = (torch.arange(width + 1, device=model.device) >= (width - cached)[:, None]).long() if padded else None
        logits = self._forward(ids, mask, cached[:, None], self._cache, [row.adapter for row in rows])
        for index, row in enumerate(rows):
            row.cached += 1
            self._choose(row, logits[index : index + 1])
        ended = [row for row in rows if self._ended(row)]
        if not ended:
            return
        for row in ended:
            self._close_row(row)
        self._rows = [row for row in rows if row not in ended]
        if not self._rows:
            self._cache = None
            return
        hf_internals.keep_rows(self._cache, [index for index, row in enumerate(rows) if row not in ended])
        unused = width + 1 - max(row.cached for row in self._rows)
        if unused:  # padding in every row now that the longest have left
            hf_internals.drop_columns(self._cache, unused)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache: object, adapters: list[str]
    ) -> torch.Tensor:
        routed = self._router.rows(adapters) if self._router else nullcontext()
        # The terminal chat's complete() switches adapters on the same model; autocast as training computed.
        with self.chat.lock, routed, precision.autocast_like(self.chat.model):
            output = self.chat.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return output.logits[:, -1, :].to(copy=True, dtype=torch.float32)

    def _choose(self, row: _Row, logits: torch.Tensor) -> None:
        """The next token of one row, exactly as generate() picks it: its processors over its own tokens, then the
        most likely token (greedy) or a draw from the distribution (sampling)."""
        scores = row.processors(torch.tensor([row.tokens], device=logits.device), logits)
        if row.do_sample:
            token = int(torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1)[0, 0])
        else:
            token = int(torch.argmax(scores, dim=-1)[0])
        row.tokens.append(token)
        if row.job.streamer is not None:
            try:
                row.job.streamer.put(torch.tensor([token]))
            except RuntimeError:  # the reader's event loop has closed: nobody is left to stream to
                row.job.cancel.set()

    def _ended(self, row: _Row) -> bool:
        reply = row.reply
        return bool(
            (reply and reply[-1] in self._stops)
            or len(reply) >= row.job.settings.max_new_tokens
            or row.job.cancel.is_set()
            or (row.job.deadline is not None and time.monotonic() > row.job.deadline)
        )

    def _close_row(self, row: _Row) -> None:
        job, reply = row.job, row.reply
        if job.deadline is not None and time.monotonic() > job.deadline and not job.cancel.is_set():
            _fail(job, RequestTimeout(self.request_timeout or 0, len(reply)))
        else:
            finish = "stop" if reply and reply[-1] in self._stops else "length"
            text = self.chat.tokenizer.decode(reply, skip_special_tokens=True)
            _finish(job, Completion(text, len(job.prompt), len(reply), finish, tuple(reply)))
        seconds = time.monotonic() - job.submitted
        self._seconds_per_reply = 0.8 * self._seconds_per_reply + 0.2 * seconds


def _finish(job: _Job, completion: Completion) -> None:
    _end_stream(job)
    try:
        job.future.set_result(completion)
    except InvalidStateError:  # cancelled by its requester meanwhile
        pass


def _fail(job: _Job, error: BaseException) -> None:
    _end_stream(job)
    try:
        job.future.set_exception(error)
    except InvalidStateError:
        pass


def _end_stream(job: _Job) -> None:
    if job.streamer is not None:
        try:
            job.streamer.end()  # wakes the reader, which would otherwise wait for text forever
        except RuntimeError:  # its event loop has closed
            pass
