"""Reasoning (Qwen3-style templates that drop earlier <think> blocks) and tool calling: every sample is compared token
by token with apply_chat_template, and every trained token with what the model generates at inference."""

import json

import pytest

from finetune.config import DataConfig, DataSource
from finetune.data import RowError, inspect_data, prepare_data, tokenize_conversation, validate_messages
from finetune.data.formats import chat_messages, to_conversation
from finetune.errors import FinetuneError
from tests.conftest import build_chatml_tokenizer
from tests.families import FAMILIES, assert_masks_exact, build_tokenizer, qwen3_template, template_ids, trained_text

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "reasoning_content": "The user wants live data.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    {"role": "assistant", "content": "It is 3 degrees in Oslo.", "reasoning_content": "Report the tool's answer."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome.", "reasoning_content": "Be polite."},
]
REASONING_CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "And 3+3?"},
    {
        "role": "assistant",
        "content": "<think>\nThree and three make six.\n</think>\n\n6.",
    },  # inline, as Qwen3 also accepts
]


@pytest.fixture(scope="module")
def qwen3():
    return build_tokenizer(FAMILIES["qwen3"])


@pytest.fixture(scope="module")
def qwen2():
    return build_tokenizer(FAMILIES["qwen2"])


def _messages(row: dict) -> tuple[list[dict], str]:
    _, messages, _, tools = to_conversation(row, DataSource(path="rows.jsonl"))
    validate_messages(messages, tools)
    return messages, tools


def assert_exact(tokenizer, messages, tools, sample) -> list[int]:
    return assert_masks_exact(tokenizer, messages, tools, sample, "<|im_end|>")


def test_drop_trains_every_turn_with_its_reasoning_after_its_inference_prompt(qwen3):
    messages, tools = _messages({"messages": REASONING_CHAT})
    samples = tokenize_conversation(qwen3, messages, tools, "drop")
    # The full rendering drops turn 1's reasoning, so turn 1 gets a sample of its own that ends with it.
    assert [assert_exact(qwen3, messages, tools, s) for s in samples] == [[1], [3]]
    assert trained_text(qwen3, samples[0]) == ["<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>"]
    assert trained_text(qwen3, samples[1]) == ["<think>\nThree and three make six.\n</think>\n\n6.<|im_end|>"]
    assert "Two and two" not in qwen3.decode(samples[1]["input_ids"])  # as at inference


def test_drop_keeps_a_tool_chain_in_one_sample_where_the_template_keeps_its_reasoning(qwen3):
    messages, tools = _messages({"messages": TOOL_CHAT, "tools": TOOLS})
    samples = tokenize_conversation(qwen3, messages, tools, "drop")
    # Turns 1 and 3 follow the same user message, so the template shows their reasoning to each other: one sample.
    assert [assert_exact(qwen3, messages, tools, s) for s in samples] == [[1, 3], [5]]
    call, answer = trained_text(qwen3, samples[0])
    assert call.startswith("<think>\nThe user wants live data.\n</think>") and call.endswith(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    )
    assert answer == "<think>\nReport the tool's answer.\n</think>\n\nIt is 3 degrees in Oslo.<|im_end|>"
    assert all("tool_response" not in text and "temp" not in text for s in samples for text in trained_text(qwen3, s))


def test_keep_is_one_sample_rendered_as_a_template_that_keeps_reasoning(qwen3):
    keeping = build_tokenizer(FAMILIES["qwen3"])
    keeping.chat_template = qwen3_template(strip_earlier_reasoning=False)
    for chat, tools in ((REASONING_CHAT, ""), (TOOL_CHAT, json.dumps(TOOLS))):
        messages, tools = _messages({"messages": chat, "tools": json.loads(tools) if tools else None})
        [sample] = tokenize_conversation(qwen3, messages, tools, "keep")
        assert sample["input_ids"] == template_ids(keeping, messages, tools)
        assert sample["turn_messages"] == [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
        expected = [
            text for s in tokenize_conversation(keeping, messages, tools, "drop") for text in trained_text(keeping, s)
        ]
        assert trained_text(qwen3, sample) == expected and len(expected) == len(sample["turn_messages"])


def test_reasoning_goes_inline_for_a_template_without_the_field(chatml_tokenizer):
    messages, tools = _messages({"messages": REASONING_CHAT})
    [sample] = tokenize_conversation(chatml_tokenizer, messages, tools, "drop")
    assert trained_text(chatml_tokenizer, sample) == [
        "<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>",
        "<think>\nThree and three make six.\n</think>\n\n6.<|im_end|>",
    ]


def test_tool_results_never_carry_loss_and_calls_do(qwen2):
    messages, tools = _messages({"messages": TOOL_CHAT, "tools": TOOLS})
    [sample] = tokenize_conversation(qwen2, messages, tools)
    assert assert_exact(qwen2, messages, tools, sample) == [1, 3, 5]
    call = trained_text(qwen2, sample)[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>' in call
    rendered = qwen2.decode(sample["input_ids"])
    assert (
        '<tool_response>\n{"temp": 3}\n</tool_response>' in rendered
        and '"get_weather"' in rendered.split("<|im_start|>user")[0]
    )


def test_tool_rows_validate_and_bad_ones_are_named():
    ok, _ = _messages({"messages": TOOL_CHAT, "tools": TOOLS})
    assert ok[1]["content"] == "" and ok[1]["tool_calls"][0]["function"] == CALL["function"]
    # Arguments given as an object become JSON text; a chat that ends with a call teaches the model to call.
    dict_args = {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    calls_only, _ = _messages(
        {"messages": [TOOL_CHAT[0], {"role": "assistant", "content": "", "tool_calls": [dict_args]}]}
    )
    assert json.loads(calls_only[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    user, call, result = TOOL_CHAT[0], TOOL_CHAT[1], TOOL_CHAT[2]
    bad = [
        ([user, {"role": "tool", "content": "x"}], "a tool result must answer"),
        ([user, call, {"role": "assistant", "content": "hm"}], "have no `tool` result"),
        ([user, call, {**result, "tool_call_id": "call_9"}, TOOL_CHAT[3]], "call_9"),
        ([user, call, result, {"role": "user", "content": "?"}], "alternate"),
        ([user, {"role": "assistant", "content": ""}], "empty content"),
    ]
    for chat, problem in bad:
        with pytest.raises(RowError, match=problem):
            _messages({"messages": chat})
    with pytest.raises(RowError, match="calls `get_weather`, which is not in the row's tools"):
        _messages({"messages": TOOL_CHAT, "tools": [{"type": "function", "function": {"name": "other"}}]})
    broken = {**CALL, "function": {"name": "get_weather", "arguments": "{city: Oslo"}}
    for chat, problem in (
        (
            [user, {"role": "assistant", "content": "", "tool_calls": [broken]}],
            r"tool_calls\[0\].function.arguments is not valid JSON",
        ),
        (
            [user, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}],
            r"tool_calls\[0\] must look like",
        ),
        ([user, {"role": "assistant", "content": "x", "reasoning_content": 3}], "reasoning_content"),
    ):
        with pytest.raises(RowError, match=problem):
            _messages({"messages": chat})
    with pytest.raises(RowError, match=r"tools\[0\]: must be"):
        _messages({"messages": TOOL_CHAT, "tools": [{"name": "get_weather"}]})


def test_stored_rows_render_like_the_originals(qwen2):
    # Arrow gives every message every field (null where a row lacked it); templates must not see those nulls.
    messages, _ = _messages({"messages": TOOL_CHAT})
    from datasets import Dataset

    stored = Dataset.from_list(
        [{"messages": messages}, {"messages": [{"role": "user", "content": "x", "name": "bob"}]}]
    )[0]["messages"]
    assert stored[0]["tool_calls"] is None and chat_messages(stored) == chat_messages(messages)
    assert "tool_calls" not in chat_messages(stored)[0] and chat_messages(stored)[1]["tool_calls"][0]["function"][
        "arguments"
    ] == {"city": "Oslo"}


def test_pipeline_splits_samples_and_inspect_reports_the_policy(tmp_path, qwen3):
    path = tmp_path / "reasoning.jsonl"
    rows = [
        {"messages": REASONING_CHAT[:2] + [{**REASONING_CHAT[2], "content": f"And {i}+{i}?"}] + REASONING_CHAT[3:]}
        for i in range(10)
    ]
    rows += [{"messages": TOOL_CHAT, "tools": TOOLS}]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    cfg = DataConfig(sources=[DataSource(path=str(path))], validation_split=0, test_split=0, max_length=512)
    prepared = prepare_data(cfg, qwen3)
    train = prepared.splits["train"]
    assert len(train) == 22 and prepared.report.samples_added == 11
    assert sorted(len(m) for m in train["messages"]) == [2] * 10 + [4] * 11 + [6]
    assert "11 extra samples" in "\n".join(prepared.report.lines())
    assert "prompt tokens" not in {f.check for f in prepared.report.findings}
    findings = {f.check: f for f in prepared.report.findings}
    assert (
        findings["earlier reasoning"].level == "info"
        and "data.reasoning: drop" in findings["earlier reasoning"].message
    )
    assert findings["end of turn trained"].level == "ok"
    kept = inspect_data(cfg.model_copy(update={"reasoning": "keep"}), qwen3, tmp_path / "inspect")
    assert kept.report.splits["train"] == 11 and kept.report.samples_added == 0
    assert "data.reasoning: keep" in (tmp_path / "inspect" / "inspect.md").read_text()


def test_a_template_that_writes_no_reasoning_gets_a_warning(tmp_path):
    tokenizer = build_chatml_tokenizer()
    # Strips every <think> block, even from the latest turn: the rows' reasoning can never be trained.
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content']", "message['content'].split('</think>')[-1].lstrip()"
    )
    path = tmp_path / "r.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(
                {"messages": REASONING_CHAT[:2] + [{**REASONING_CHAT[2], "content": f"{i}?"}] + REASONING_CHAT[3:]}
            )
            for i in range(5)
        )
    )
    prepared = prepare_data(
        DataConfig(sources=[DataSource(path=str(path))], validation_split=0, test_split=0), tokenizer
    )
    finding = {f.check: f for f in prepared.report.findings}["reasoning"]
    assert finding.level == "warning" and "no reasoning is trained" in finding.message
    assert not any("Two and two" in text for row in prepared.splits["train"] for text in trained_text(tokenizer, row))


def test_an_unknown_reasoning_policy_is_named():
    with pytest.raises(FinetuneError, match="data.reasoning 'all': use one of drop, keep"):
        tokenize_conversation(build_chatml_tokenizer(), REASONING_CHAT[:2], reasoning="all")
