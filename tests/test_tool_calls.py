"""Tool calling end to end: a tiny Qwen2 trained on tool-calling rows is served, and the official `openai` client gets
OpenAI-format `tool_calls` back (plain and streamed); the tool-call format is read from each template."""

from __future__ import annotations

import json

import openai
import pytest

from finetune import ChatSFTRecipe
from finetune.data import tools_json
from finetune.serving import DecodingSettings, create_app, load_chat_model
from finetune.serving.tool_calls import StreamedReply, ToolCallFormat, tool_call_format
from tests.data.test_reasoning_and_tools import TOOLS
from tests.families import FAMILIES, build_model_dir, build_tokenizer
from tests.test_serving import call, running

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
QUESTIONS = ("Weather in Oslo?", "How is the weather in Oslo?", "Is it cold in Oslo?", "Oslo weather please.")
QWEN_FORMAT = ToolCallFormat("<tool_call>", "</tool_call>", "name", "arguments")
# Llama 3.1 style: a custom tool call is the whole reply, as bare JSON with "parameters".
BARE_JSON_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.tool_calls %}{{ {'name': message.tool_calls[0].function.name, 'parameters': message.tool_calls[0].function.arguments} | tojson }}"
    "{%- else %}{{ message.content }}{%- endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_the_format_is_read_from_each_template():
    assert tool_call_format(build_tokenizer(FAMILIES["qwen2"])) == QWEN_FORMAT
    assert tool_call_format(build_tokenizer(FAMILIES["qwen3"])) == QWEN_FORMAT
    assert tool_call_format(build_tokenizer(FAMILIES["gemma3"])) is None  # no tool calls in this template
    bare = build_tokenizer(FAMILIES["gpt2"])
    bare.chat_template = BARE_JSON_TEMPLATE
    assert tool_call_format(bare) == ToolCallFormat("", "", "name", "parameters")


def test_replies_parse_into_openai_tool_calls():
    content, calls = QWEN_FORMAT.parse(
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>'
    )
    assert content == "Checking."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Oslo"}),
        ("function", "get_time", {"zone": "CET"}),
    ]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    for text in (
        "<tool_call>{broken</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f"}',
    ):
        assert QWEN_FORMAT.parse(text) == (text, [])  # not a well-formed call: all content
    bare = ToolCallFormat("", "", "name", "parameters")
    assert bare.parse('{"name": "f", "parameters": {"x": 1}}')[1][0]["function"]["arguments"] == '{"x": 1}'
    assert bare.parse('{"name": "f", "parameters": {}} and more') == ('{"name": "f", "parameters": {}} and more', [])


def test_streamed_text_is_held_only_where_a_call_may_start():
    reply = StreamedReply(QWEN_FORMAT)
    sent = [
        reply.feed(piece)
        for piece in ("Let me ", "check <tool", '_call>\n{"name": "f", ', '"arguments": {}}\n</tool_call>')
    ]
    assert sent == ["Let me ", "check ", "", ""]
    content, calls = reply.finish()
    assert content == "" and calls[0]["function"] == {"name": "f", "arguments": "{}"}
    plain = StreamedReply(QWEN_FORMAT)
    assert [plain.feed(p) for p in ("a <to", "y", "!")] == ["a ", "<toy", "!"] and plain.finish() == ("", [])
    bare = StreamedReply(ToolCallFormat("", "", "name", "parameters"))
    assert [bare.feed(p) for p in (" ", '{"name": "f", ', '"parameters": {}}')] == ["", "", ""] and bare.finish()[1]
    words = StreamedReply(ToolCallFormat("", "", "name", "parameters"))
    assert [words.feed(p) for p in (" ", "Hi", " there")] == ["", " Hi", " there"]


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    """A tiny Qwen2 (ChatML with Qwen2.5-style tools) trained until it calls get_weather for questions about Oslo."""
    root = tmp_path_factory.mktemp("tools")
    rows = [
        {
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "", "tool_calls": [CALL]}],
            "tools": TOOLS,
        }
        for q in QUESTIONS
    ]
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
                {"role": "assistant", "content": "It is 3 degrees."},
            ],
            "tools": TOOLS,
        }
    )
    data = root / "tools.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    recipe = ChatSFTRecipe(
        name="tools",
        model={"source": str(build_model_dir(FAMILIES["qwen2"], root / "base")), "quantization": "none"},
        lora={"r": 8, "dropout": 0.0},
        data={
            "sources": [{"type": "file", "path": str(data)}],
            "max_length": 512,
            "validation_split": 0,
            "test_split": 0.2,
        },
        training={
            "max_steps": 100,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-2,
            "warmup_ratio": 0,
        },
        evaluation={"before_and_after": False, "max_rows": 2, "generation": False, "safety": False},
        output={"dir": str(root / "run")},
    )
    return recipe.run().run_dir


@pytest.fixture(scope="module")
def tool_server(tool_run):
    chat = load_chat_model(tool_run)
    with running(create_app(chat, decoding=DecodingSettings(temperature=0))) as url:
        yield url, chat


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_gets_tool_calls(tool_server):
    url, chat = tool_server
    reply = _client(url).chat.completions.create(
        model=chat.default, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS, max_tokens=40
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [tool_call] = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Oslo"}


def test_streamed_tool_calls_arrive_as_deltas(tool_server):
    url, chat = tool_server
    stream = _client(url).chat.completions.create(
        model=chat.default,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=TOOLS,
        max_tokens=40,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    calls = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert text == "" and [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Oslo"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_are_sent_back_and_rendered_as_in_training(tool_server):
    url, chat = tool_server
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    ]
    reply = _client(url).chat.completions.create(model=chat.default, messages=history, tools=TOOLS, max_tokens=20)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    stored = [{**history[0]}, {**history[1], "content": ""}, history[2]]
    prompt = chat.tokenizer.decode(chat.prompt_ids(stored, tools_json(TOOLS)))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>' in prompt
    assert prompt.endswith('<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>\n<|im_start|>assistant\n')


def test_bad_tool_requests_get_a_400_naming_the_problem(tool_server, tiny_llama_dir):
    url, _ = tool_server
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS}
    for change, param, problem in (
        ({"tool_choice": "required"}, "tool_choice", "`tool_choice` may be `auto` or `none`"),
        ({"tools": [{"name": "get_weather"}]}, "tools", "tools[0]: must be"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"name": "f"}]}]},
            "messages",
            "tool_calls[0] must look like",
        ),
    ):
        status, answer = call(
            url,
            "POST",
            "/v1/chat/completions",
            json.dumps({**body, **change}).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 400 and answer["error"]["param"] == param and problem in answer["error"]["message"], answer
    # tool_choice none: the reply is text even if it looks like a call
    status, answer = call(
        url, "POST", "/v1/chat/completions", json.dumps({**body, "tool_choice": "none", "max_tokens": 5}).encode(), {}
    )
    assert status == 200 and "tool_calls" not in answer["choices"][0]["message"]
    with running(create_app(load_chat_model(tiny_llama_dir))) as plain:  # ChatML without tools
        status, answer = call(plain, "POST", "/v1/chat/completions", json.dumps(body).encode(), {})
    assert (
        status == 400
        and answer["error"]["param"] == "tools"
        and "does not write tool calls" in answer["error"]["message"]
    )
