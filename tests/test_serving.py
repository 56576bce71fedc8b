"""Terminal chat, the OpenAI-compatible server (driven by the official `openai` client) and the web page (driven by
headless Chromium), all on the tiny random Llama: its replies are gibberish, so the tests assert on protocol,
streaming, status codes and which adapter answered, never on text quality."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import torch
import uvicorn
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from finetune import ChatSFTRecipe, FinetuneError
from finetune.cli import app as cli_app
from finetune.evaluation import generate
from finetune.serving import ChatModel, Decoding, DecodingSettings, Limits, chat_loop, create_app, load_chat_model
from tests.conftest import tiny_recipe

KEY = "test-key-0123456789"
HELLO = [{"role": "user", "content": "Hello there"}]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, facts_jsonl, tmp_path_factory) -> Path:
    return (
        ChatSFTRecipe(**tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path_factory.mktemp("runs") / "llama"))
        .run()
        .run_dir
    )


@pytest.fixture(scope="module")
def other_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    """A second adapter over the same base, randomly initialised so that it visibly changes the replies."""
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), config)
    folder = tmp_path_factory.mktemp("adapters") / "random-lora"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat(run_dir, other_adapter) -> ChatModel:
    return load_chat_model(run_dir, [f"other={other_adapter}"])


@contextmanager
def running(app) -> Iterator[str]:
    """uvicorn in a background thread on a free 127.0.0.1 port; stopped on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start within 10 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(chat) -> Iterator[str]:
    limits = Limits(max_tokens=32, max_messages=8, max_body_bytes=20_000)
    with running(create_app(chat, api_key=KEY, limits=limits)) as url:
        yield url


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def call(
    url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict | str]:
    connection = http.client.HTTPConnection(
        url.removeprefix("http://").split(":")[0], int(url.rsplit(":", 1)[1]), timeout=30
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read().decode()
        is_json = response.getheader("content-type", "").startswith("application/json")
        return response.status, json.loads(data) if is_json else data
    finally:
        connection.close()


# ------------------------------------------------------------------------------------------- loading


def test_run_folder_alone_serves_its_merged_model(run_dir):
    chat = load_chat_model(run_dir)
    assert chat.variants == {"llama": None} and chat.default == "llama"
    assert not isinstance(chat.model, PeftModel)
    assert Path(chat.model.name_or_path).resolve() == (run_dir / "merged").resolve()


def test_adapters_share_one_base_and_are_picked_by_name(chat, tiny_llama_dir, other_adapter):
    base = tiny_llama_dir.name
    assert chat.variants == {base: None, "llama": "adapter0", "other": "adapter1"} and chat.default == "llama"
    prompt = chat.prompt_ids(HELLO)
    greedy = DecodingSettings(max_new_tokens=8, temperature=0)
    replies = {name: chat.complete(name, prompt, greedy).text for name in chat.variants}
    # The base through disable_adapter() answers exactly like the plain base model, and after it the adapter is back.
    plain = load_chat_model(tiny_llama_dir)
    assert replies[base] == plain.complete(base, prompt, greedy).text
    assert replies["other"] != replies[base]
    assert chat.complete("other", prompt, greedy).text == replies["other"]


def test_loading_errors_name_the_fix(run_dir, tmp_path):
    with pytest.raises(FinetuneError, match="no adapter_config.json.*adapter folder or a run folder"):
        load_chat_model(run_dir, [str(tmp_path)])
    with pytest.raises(FinetuneError, match="named `llama`.*NAME=PATH"):
        load_chat_model(run_dir, [f"llama={run_dir}"])
    with pytest.raises(FinetuneError, match="`quantization='2bit'`: use one of none, 8bit, 4bit"):
        load_chat_model(run_dir, quantization="2bit")


# ------------------------------------------------------------------------------------------- terminal chat


class Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def scripted(*lines: str):
    pending = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(pending)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_loop_streams_replies_and_reset_clears_history(chat):
    out = Recorder()
    read = scripted("Hello there", "And then?", "/reset", "/unknown", "Again", "/exit", "never read")
    history = chat_loop(
        chat, model="other", system="Be brief.", decoding=DecodingSettings(16, temperature=0), read=read, out=out
    )
    text = out.getvalue()
    assert text.count("other> ") == 3 and "(conversation cleared)" in text and "unknown command /unknown" in text
    assert [m["role"] for m in history] == ["system", "user", "assistant"]  # only what came after /reset
    assert history[0]["content"] == "Be brief." and history[1]["content"] == "Again"
    # Streamed: the last reply arrived as several writes, which add up to the reply kept in the history.
    last = len(out.writes) - 1 - out.writes[::-1].index("other> ")
    pieces = out.writes[last + 1 : -1]  # then a final newline
    assert len(pieces) > 1 and "".join(pieces) == history[2]["content"]


def test_ctrl_c_stops_a_reply_but_not_the_chat(chat):
    class Interrupting(Recorder):
        def write(self, text: str) -> int:
            if (
                self.writes and self.writes[-1] == "llama> " and text != " (stopped)"
            ):  # Ctrl-C at the reply's first piece
                raise KeyboardInterrupt
            return super().write(text)

    out = Interrupting()
    history = chat_loop(
        chat, decoding=DecodingSettings(64, temperature=0), read=scripted("Hi", "Still there?"), out=out
    )
    assert out.getvalue().count(" (stopped)") == 2
    assert [m["role"] for m in history] == ["user", "assistant"] * 2


def test_chat_loop_ends_at_end_of_input(chat):
    history = chat_loop(chat, decoding=DecodingSettings(4, temperature=0), read=scripted("Hi"), out=io.StringIO())
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_cli_chat_on_a_run_folder(run_dir):
    result = CliRunner().invoke(
        cli_app, ["chat", str(run_dir), "--temperature", "0", "--max-new-tokens", "4"], input="Hi\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    assert "Chatting with llama." in result.output and "llama> " in result.output


def test_chat_decodes_as_evaluation_does_and_the_guard_is_on_by_default(tiny_llama_dir):
    """The tiny model answers "Hello there" with one token over and over: the guard's reply differs, and chat and
    evaluation give the same reply for the same settings (one owner of decoding: finetune.generation)."""
    plain = load_chat_model(tiny_llama_dir)
    prompt = plain.prompt_ids(HELLO)
    replies = {}
    for guard in (True, False):
        settings = DecodingSettings(24, temperature=0, repetition_guard=guard)
        replies[guard] = plain.complete(plain.default, prompt, settings).text
        ids = generate(plain.model, plain.tokenizer, [HELLO], decoding=settings)[0]
        assert replies[guard] == plain.tokenizer.decode(ids, skip_special_tokens=True)
    assert replies[True] != replies[False] and DecodingSettings().repetition_guard
    assert Decoding is DecodingSettings  # the earlier name still works


def test_cli_chat_and_serve_pass_their_decoding_flags(monkeypatch):
    from finetune import serving
    from finetune.cli import FLAGS

    seen = {}
    monkeypatch.setattr(serving, "load_chat_model", lambda target, adapters, quantization, compute_dtype: "model")
    monkeypatch.setattr(serving, "chat_loop", lambda model, system, decoding: seen.update(chat=decoding))
    monkeypatch.setattr(serving, "serve", lambda model, **options: seen.update(serve=options["decoding"]))
    runner = CliRunner()
    result = runner.invoke(cli_app, ["chat", "x", "--no-repetition-guard", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert seen["chat"] == DecodingSettings(256, temperature=0, repetition_guard=False)
    result = runner.invoke(cli_app, ["serve", "x", "--max-tokens", "32", "--repetition-guard-strength", "1.5"])
    assert result.exit_code == 0, result.output
    # Unset temperature and top_p are left to the model's own generation_config (else finetune's fallback).
    assert seen["serve"] == DecodingSettings(32, None, None, repetition_guard=True, repetition_guard_strength=1.5)
    bad = runner.invoke(cli_app, ["chat", "x", "--repetition-guard-strength", "0"])
    assert isinstance(bad.exception, FinetuneError)
    assert bad.exception.render(FLAGS).startswith("--repetition-guard-strength 0.0: use a penalty above 0")


# ------------------------------------------------------------------------------------------- server


def test_every_request_gets_the_servers_guard_setting(tiny_llama_dir):
    """A request's temperature and max_tokens replace the server's; its repetition guard setting stays."""
    plain = load_chat_model(tiny_llama_dir)
    prompt = plain.prompt_ids(HELLO)
    for guard in (True, False):
        expected = plain.complete(plain.default, prompt, DecodingSettings(12, 0, repetition_guard=guard)).text
        with running(create_app(plain, decoding=DecodingSettings(temperature=0.9, repetition_guard=guard))) as url:
            reply = client(url).chat.completions.create(
                model=plain.default, messages=HELLO, max_tokens=12, temperature=0
            )
        assert reply.choices[0].message.content == expected


def test_openai_client_plain_and_streaming_completion(server, chat):
    api = client(server)
    assert [model.id for model in api.models.list()] == list(chat.variants)

    reply = api.chat.completions.create(model="other", messages=HELLO, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "other"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason in ("stop", "length")
    assert (
        0 < reply.usage.completion_tokens <= 8
        and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    )

    chunks = list(api.chat.completions.create(model="other", messages=HELLO, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(contents) > 1, "the reply should arrive in several chunks"
    assert "".join(contents) == reply.choices[0].message.content  # greedy: streaming changes delivery, not text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_fifty_concurrent_requests_all_succeed_and_each_gets_its_own_adapter(server, chat):
    names = list(chat.variants)

    async def load() -> None:
        api = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)

        async def ask(name: str, stream: bool) -> str:
            response = await api.chat.completions.create(
                model=name, messages=HELLO, max_tokens=4, temperature=0, stream=stream
            )
            if not stream:
                return response.choices[0].message.content
            return "".join([chunk.choices[0].delta.content or "" async for chunk in response])

        expected = {name: await ask(name, stream=False) for name in names}
        jobs = [ask(names[i % len(names)], stream=i % 2 == 1) for i in range(50)]
        started = time.monotonic()
        replies = await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)
        await api.close()
        assert [reply == expected[names[i % len(names)]] for i, reply in enumerate(replies)] == [True] * 50
        assert time.monotonic() - started < 120

    asyncio.run(load())


def test_health_and_page_are_open_while_the_api_needs_the_key(server):
    status, health = call(server, "GET", "/health")  # the load it reports: tests/test_batching.py
    assert status == 200 and health["status"] == "ok" and health["max_batch_size"] == Limits().max_batch_size
    status, page = call(server, "GET", "/")
    assert status == 200 and "<title>finetune chat</title>" in page
    status, body = call(server, "GET", "/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"model": "llama", "messages": [', 400, "not valid JSON"),
        (json.dumps({"model": "llama"}).encode(), 400, "`messages`: Field required"),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "`messages.0.role`"),
        (json.dumps({"messages": HELLO * 9}).encode(), 400, "9 messages; this server takes at most 8"),
        (json.dumps({"messages": HELLO, "stop": ["\n"]}).encode(), 400, "`stop` sequences are not supported"),
        (json.dumps({"messages": [{"role": "user", "content": "word " * 600}]}).encode(), 400, "context is 512 tokens"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}]}).encode(), 413, "over 20000 bytes"),
    ],
    ids=["malformed-json", "no-messages", "bad-role", "too-many-messages", "stop", "context", "body-too-large"],
)
def test_bad_requests_get_openai_style_4xx_errors(server, body, status, message):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    got, payload = call(server, "POST", "/v1/chat/completions", body, headers)
    assert got == status, payload
    assert payload["error"]["type"] == "invalid_request_error" and message in payload["error"]["message"]


def test_openai_client_sees_unknown_model_too_many_tokens_and_wrong_key(server):
    with pytest.raises(openai.NotFoundError) as unknown:
        client(server).chat.completions.create(model="gpt-9", messages=HELLO)
    assert unknown.value.code == "model_not_found" and "Models served: tiny-llama" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as too_many:
        client(server).chat.completions.create(model="llama", messages=HELLO, max_tokens=33)
    assert too_many.value.param == "max_tokens" and "allows (32)" in too_many.value.message
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        client(server, key="wrong").chat.completions.create(model="llama", messages=HELLO)
    assert wrong_key.value.status_code == 401 and "API key" in wrong_key.value.message


def test_unknown_routes_and_methods_answer_json(server):
    assert call(server, "GET", "/v1/nothing")[0] == 404
    status, body = call(server, "GET", "/v1/chat/completions")
    assert status == 405 and "GET /v1/chat/completions" in body["error"]["message"]


def test_web_page_streams_a_reply_in_headless_chromium(server):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "Debian's chromium is needed for the web page test: apt-get install -y chromium (`make test` does it)."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, timeout=30_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{server}/")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.querySelectorAll('#model option').length === 3")
            page.select_option("#model", "other")
            page.evaluate(
                """() => { window.updates = 0;
                new MutationObserver((records) => { window.updates += records.length; })
                  .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }"""
            )
            page.fill("#prompt", "Hello there")
            page.press("#prompt", "Enter")
            page.wait_for_function(
                "document.querySelector('.message.assistant')?.textContent.trim() && !document.getElementById('send').disabled"
            )
            assert page.text_content(".message.user") == "Hello there"
            assert not page.query_selector(".message.error")
            # Two messages appear (user, empty reply), then the reply grows once per streamed chunk.
            assert page.evaluate("window.updates") > 3
        finally:
            browser.close()


def test_cli_serve_answers_over_http(run_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "FINETUNE_API_KEY": KEY}
    command = [sys.executable, "-m", "finetune", "serve", str(run_dir), "--port", str(port), "--max-tokens", "4"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "finetune serve did not answer /health within 90 s"
            try:
                if call(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        reply = client(url).chat.completions.create(model="llama", messages=HELLO)
        assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 4
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
