"""Continuous batching (finetune/serving/batching.py) and the server under load: replies generated together equal
replies generated one at a time token for token, whatever joins or leaves the batch, for every adapter and with the
repetition guard per row; a full queue answers 429 with Retry-After, a slow request 504, a failure 500, a vanished
client frees its row, and nothing is left unanswered at shutdown. Tiny random models, so replies are gibberish: the
tests compare tokens, never quality. Where a request must still be running when the next arrives, each forward pass
is slowed by a fixed sleep (`slowed`), so no assertion depends on how fast this machine is."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import peft
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from finetune import FinetuneError
from finetune.cli import FLAGS
from finetune.cli import app as cli_app
from finetune.serving import (
    Batcher,
    BatchStatus,
    ChatModel,
    DecodingSettings,
    Limits,
    QueueFull,
    RequestTimeout,
    ServerClosing,
    create_app,
    hf_internals,
    load_chat_model,
)
from tests.families import FAMILIES, build_model_dir
from tests.test_serving import HELLO, call, client, running

PROMPTS = [
    HELLO,
    [{"role": "user", "content": "What is the capital of Zorbia?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 40}],
    [{"role": "user", "content": "Tell me about the river of Ost and its fish."}],
]


def lora(base: Path, folder: Path, seed: int) -> Path:
    """A randomly initialised LoRA adapter, so that it visibly changes the replies."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat(tiny_llama_dir, tmp_path_factory) -> ChatModel:
    """The tiny Llama base with two adapters over it: three variants, each answering differently."""
    folder = tmp_path_factory.mktemp("adapters")
    # float32: batched greedy replies equal one-at-a-time ones token for token; bf16 rounds by the batch's shape.
    return load_chat_model(
        tiny_llama_dir,
        [f"a={lora(tiny_llama_dir, folder / 'a', 1)}", f"b={lora(tiny_llama_dir, folder / 'b', 2)}"],
        compute_dtype="float32",
    )


@contextmanager
def slowed(chat: ChatModel, seconds: float = 0.02, fail: threading.Event | None = None) -> Iterator[None]:
    """Every forward pass of the model sleeps `seconds` first (and raises while `fail` is set)."""

    def hook(module, args, kwargs):
        time.sleep(seconds)
        if fail is not None and fail.is_set():
            raise RuntimeError("injected failure")

    handle = hf_internals.base_model(chat.model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------- the engine


def test_batched_greedy_replies_equal_one_at_a_time_token_for_token(chat):
    """Rows of three variants (base, adapter a, adapter b), of different prompt and reply lengths, joining a running
    batch and leaving it at different steps: each reply is exactly what generate() gives for it alone."""
    names = list(chat.variants)
    jobs = [
        (names[i % 3], chat.prompt_ids(PROMPTS[i % len(PROMPTS)]), DecodingSettings(6 + 9 * (i % 5), temperature=0))
        for i in range(15)
    ]
    alone = [chat.complete(name, prompt, settings) for name, prompt, settings in jobs]
    assert len({reply.token_ids for reply in alone[:3]}) == 3, "the variants should answer differently"
    batcher = Batcher(chat, max_batch_size=6)
    peak = 0
    try:
        futures = [batcher.submit(*job) for job in jobs[:4]]
        wait_until(lambda: batcher.status().running == 4)  # a batch is running; the rest join it mid-way
        futures += [batcher.submit(*job) for job in jobs[4:]]
        while not all(future.done() for future in futures):
            peak = max(peak, batcher.status().running)
            time.sleep(0.001)
        together = [future.result() for future in futures]
    finally:
        batcher.close()
    assert peak == 6 and [reply.token_ids for reply in together] == [reply.token_ids for reply in alone]
    assert together == alone  # text, token counts and finish reasons too


def test_the_repetition_guard_works_per_row_in_a_batch(chat):
    """The tiny model loops on one token without the guard: in one batch, rows with and without the guard each get
    their own one-at-a-time reply."""
    prompt = chat.prompt_ids(HELLO)
    settings = [DecodingSettings(24, temperature=0, repetition_guard=guard) for guard in (True, False)] * 3
    alone = [chat.complete("a", prompt, s).token_ids for s in settings]
    assert alone[0] != alone[1]
    batcher = Batcher(chat, max_batch_size=6)
    try:
        together = [f.result(timeout=60).token_ids for f in [batcher.submit("a", prompt, s) for s in settings]]
    finally:
        batcher.close()
    assert together == alone


def test_sampling_draws_as_generate_does(chat):
    """A sampled row applies generate()'s own processors and draw: alone, with the same seed, the same reply."""
    prompt = chat.prompt_ids(PROMPTS[1])
    settings = DecodingSettings(30, temperature=0.9, top_p=0.8)
    torch.manual_seed(5)
    expected = chat.complete("b", prompt, settings)
    batcher = Batcher(chat, max_batch_size=1)
    try:
        torch.manual_seed(5)
        assert batcher.submit("b", prompt, settings).result(timeout=60) == expected
    finally:
        batcher.close()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_batches_with_replies_unchanged(family, tmp_path):
    """Models with sliding-window layers (Gemma 2 and 3) are served one at a time; all others batch. Either way the
    replies are generate()'s."""
    chat = load_chat_model(build_model_dir(FAMILIES[family], tmp_path / family), compute_dtype="float32")
    batcher = Batcher(chat, max_batch_size=4)
    sliding = family in ("gemma2", "gemma3")
    assert (batcher.max_batch_size, bool(batcher.unbatched_because)) == ((1, True) if sliding else (4, False))
    if sliding:
        assert "DynamicSlidingWindowLayer" in batcher.unbatched_because
    jobs = [(chat.prompt_ids(PROMPTS[i % 3]), DecodingSettings(5 + 4 * i, temperature=0)) for i in range(5)]
    try:
        together = [f.result(timeout=60) for f in [batcher.submit(chat.default, p, s) for p, s in jobs]]
    finally:
        batcher.close()
    assert together == [chat.complete(chat.default, p, s) for p, s in jobs]


def test_full_queue_refuses_with_an_estimate_and_close_answers_everything(chat):
    batcher = Batcher(chat, max_batch_size=1, max_queue=1)
    long = DecodingSettings(400, temperature=0)
    with slowed(chat):
        running = batcher.submit("a", chat.prompt_ids(HELLO), long)
        wait_until(lambda: batcher.status().running == 1)
        waiting = batcher.submit("a", chat.prompt_ids(HELLO), long)
        assert batcher.status() == BatchStatus(queued=1, running=1, max_batch_size=1, max_queue=1)
        with pytest.raises(QueueFull) as full:
            batcher.submit("a", chat.prompt_ids(HELLO), long)
        assert full.value.waiting == 1 and full.value.retry_after >= 1
        batcher.close()
    for future in (running, waiting):
        assert isinstance(future.exception(timeout=10), ServerClosing)
    with pytest.raises(ServerClosing):
        batcher.submit("a", chat.prompt_ids(HELLO), long)


def test_a_request_past_its_timeout_fails_and_frees_its_row(chat):
    batcher = Batcher(chat, max_batch_size=1, request_timeout=0.5)
    try:
        with slowed(chat):
            slow = batcher.submit("a", chat.prompt_ids(HELLO), DecodingSettings(400, temperature=0))
            queued = batcher.submit("a", chat.prompt_ids(HELLO), DecodingSettings(400, temperature=0))
            error = slow.exception(timeout=30)
            assert isinstance(error, RequestTimeout) and 0 < error.generated < 400
            error = queued.exception(timeout=30)  # waited its whole timeout behind the first
            assert isinstance(error, RequestTimeout) and "queued" in str(error)
        assert batcher.status().running == 0
    finally:
        batcher.close()


def test_a_failed_step_fails_only_its_requests_and_the_engine_goes_on(chat):
    fail = threading.Event()
    batcher = Batcher(chat, max_batch_size=4)
    try:
        with slowed(chat, 0.005, fail):
            doomed = [
                batcher.submit("a", chat.prompt_ids(HELLO), DecodingSettings(300, temperature=0)) for _ in range(2)
            ]
            wait_until(lambda: batcher.status().running == 2)
            fail.set()
            assert all(isinstance(f.exception(timeout=30), RuntimeError) for f in doomed)
            fail.clear()
            reply = batcher.submit("a", chat.prompt_ids(HELLO), DecodingSettings(4, temperature=0)).result(timeout=30)
        assert reply.completion_tokens == 4
    finally:
        batcher.close()


def test_limits_out_of_range_name_the_setting():
    with pytest.raises(FinetuneError, match="`max_batch_size=0`: use 1"):
        Limits(max_batch_size=0)
    with pytest.raises(FinetuneError, match="`max_queue=-1`: use 0"):
        Limits(max_queue=-1)
    with pytest.raises(FinetuneError) as timeout:
        Limits(request_timeout=0)
    assert timeout.value.render(FLAGS).startswith("--request-timeout 0: use a number of seconds above 0")


def test_cli_serve_passes_its_load_limits(monkeypatch):
    from finetune import serving

    seen = {}

    def load(target, adapters, quantization, compute_dtype):
        seen["compute_dtype"] = compute_dtype
        return "model"

    monkeypatch.setattr(serving, "load_chat_model", load)
    monkeypatch.setattr(serving, "serve", lambda model, **options: seen.update(options))
    flags = ["--max-batch-size", "8", "--max-queue", "5", "--request-timeout", "0", "--compute-dtype", "float32"]
    result = CliRunner().invoke(cli_app, ["serve", "x", *flags])
    assert result.exit_code == 0, result.output
    assert seen["limits"] == Limits(max_batch_size=8, max_queue=5, request_timeout=None)
    assert seen["compute_dtype"] == "float32"
    result = CliRunner().invoke(cli_app, ["serve", "x"])
    assert seen["limits"] == Limits()  # the flags' defaults are the Python API's
    assert seen["compute_dtype"] is None  # the run's own, else auto
    assert CliRunner().invoke(cli_app, ["serve", "x", "--max-batch-size", "0"]).exit_code == 2


def test_hf_internals_are_written_against_the_pinned_versions():
    """hf_internals.py calls transformers' private generate() helpers and rebuilds its DynamicCache: re-check them
    (and the parity tests above) when this version changes, then update WRITTEN_AGAINST."""
    assert (transformers.__version__, peft.__version__) == tuple(hf_internals.WRITTEN_AGAINST.values())


# ------------------------------------------------------------------------------------------- the server under load


def test_concurrent_openai_clients_share_batches_and_get_their_one_at_a_time_replies(chat):
    """24 concurrent requests, streamed and not, over three variants: the server batches them (seen on /health)
    and every reply equals that variant's reply generated alone."""
    names = list(chat.variants)
    expected = {
        name: chat.complete(name, chat.prompt_ids(HELLO), DecodingSettings(24, temperature=0)).text for name in names
    }
    with running(create_app(chat, limits=Limits(max_batch_size=8))) as url:
        seen_running = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen_running.append(call(url, "GET", "/health")[1]["running"])

        watcher = threading.Thread(target=watch)

        async def load() -> list[str]:
            api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)

            async def ask(name: str, stream: bool) -> str:
                response = await api.chat.completions.create(
                    model=name, messages=HELLO, max_tokens=24, temperature=0, stream=stream
                )
                if not stream:
                    return response.choices[0].message.content
                return "".join([chunk.choices[0].delta.content or "" async for chunk in response])

            try:
                return await asyncio.gather(*[ask(names[i % 3], stream=i % 2 == 1) for i in range(24)])
            finally:
                await api.close()

        with slowed(chat, 0.01):
            watcher.start()
            try:
                replies = asyncio.run(load())
            finally:
                stop.set()
                watcher.join()
    assert replies == [expected[names[i % 3]] for i in range(24)]
    assert max(seen_running) == 8


def test_full_queue_is_429_with_retry_after_and_health_shows_the_load(chat):
    limits = Limits(max_batch_size=1, max_queue=1, max_tokens=400)
    body = json.dumps({"model": "a", "messages": HELLO, "max_tokens": 400, "stream": True}).encode()
    with slowed(chat), running(create_app(chat, limits=limits)) as url:
        port = int(url.rsplit(":", 1)[1])
        streams = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(2)]
        try:
            for stream in streams:
                stream.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            wait_until(lambda: call(url, "GET", "/health")[1]["queued"] == 1)
            health = call(url, "GET", "/health")
            assert health == (200, {"status": "ok", "queued": 1, "running": 1, "max_batch_size": 1, "max_queue": 1})
            with pytest.raises(openai.RateLimitError) as full:
                client(url).chat.completions.create(model="a", messages=HELLO)
            assert int(full.value.response.headers["retry-after"]) >= 1
            assert full.value.code == "rate_limit_exceeded" and "max_queue" in full.value.message
        finally:
            for stream in streams:
                stream.close()
        wait_until(lambda: call(url, "GET", "/health")[1]["running"] == 0)  # both left: their rows are freed


def test_timeouts_are_504_or_an_error_event_mid_stream(chat):
    limits = Limits(max_tokens=400, request_timeout=0.5)
    with slowed(chat), running(create_app(chat, limits=limits)) as url:
        with pytest.raises(openai.InternalServerError) as plain:
            client(url).chat.completions.create(model="a", messages=HELLO, max_tokens=400)
        assert plain.value.status_code == 504 and plain.value.code == "timeout"
        assert "request timeout of 0.5 s" in plain.value.message
        chunks = []
        with pytest.raises(openai.APIError, match="request timeout of 0.5 s"):
            for chunk in client(url).chat.completions.create(model="a", messages=HELLO, max_tokens=400, stream=True):
                chunks.append(chunk)
        assert chunks and chunks[0].choices[0].delta.role == "assistant"  # it had started streaming


def test_a_failed_generation_is_a_500_and_the_server_answers_the_next(chat):
    fail = threading.Event()
    fail.set()
    with slowed(chat, 0, fail), running(create_app(chat)) as url:
        with pytest.raises(openai.InternalServerError) as plain:
            client(url).chat.completions.create(model="a", messages=HELLO, max_tokens=4)
        assert plain.value.status_code == 500 and "RuntimeError" in plain.value.message
        with pytest.raises(openai.APIError, match="RuntimeError"):
            list(client(url).chat.completions.create(model="a", messages=HELLO, max_tokens=4, stream=True))
        fail.clear()
        reply = client(url).chat.completions.create(model="a", messages=HELLO, max_tokens=4)
        assert reply.usage.completion_tokens == 4


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_a_client_that_leaves_frees_its_row(chat, stream):
    body = json.dumps({"model": "a", "messages": HELLO, "max_tokens": 400, "stream": stream}).encode()
    with slowed(chat), running(create_app(chat, limits=Limits(max_tokens=400))) as url:
        connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        if stream:
            assert connection.getresponse().read1(100).startswith(b"data: ")
        else:
            wait_until(lambda: call(url, "GET", "/health")[1]["running"] == 1)
        connection.close()
        # 400 slowed steps take over 8 s; the row is freed within a few steps of the client leaving.
        left = time.monotonic()
        wait_until(lambda: call(url, "GET", "/health")[1]["running"] == 0)
        assert time.monotonic() - left < 4
