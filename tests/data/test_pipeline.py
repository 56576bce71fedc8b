import json

import pytest

from finetune.config import DataConfig, DataSource
from finetune.data import (
    IGNORE_INDEX,
    DataReport,
    RowError,
    end_of_turn_ids,
    load_conversations,
    prepare_data,
    split_conversations,
    to_messages,
    tokenize_conversation,
    validate_messages,
)
from finetune.errors import FinetuneError
from tests.conftest import build_chatml_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


def trained_segments(tokens: dict) -> list[list[int]]:
    """Maximal runs of positions whose label is not ignored."""
    segments, current = [], []
    for token, label in zip(tokens["input_ids"], tokens["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            segments.append(current)
            current = []
    return segments + ([current] if current else [])


def test_only_assistant_replies_and_their_end_of_turn_carry_labels(chatml_tokenizer):
    [tokens] = tokenize_conversation(chatml_tokenizer, CONVERSATION)
    decoded = [chatml_tokenizer.decode(segment) for segment in trained_segments(tokens)]
    assert decoded == ["Hello! How can I help?<|im_end|>", "Blue.<|im_end|>"]
    # The whole rendering is tokenized once, exactly as apply_chat_template would tokenize it.
    assert (
        tokens["input_ids"]
        == chatml_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    )


def test_masks_on_the_real_smollm2_template(smollm2_tokenizer):
    # SmolLM2's template injects a default system prompt; TRL's assistant_only_loss refuses this template.
    [tokens] = tokenize_conversation(smollm2_tokenizer, CONVERSATION[1:])
    decoded = [smollm2_tokenizer.decode(segment) for segment in trained_segments(tokens)]
    assert decoded == ["Hello! How can I help?<|im_end|>", "Blue.<|im_end|>"]
    assert tokens["input_ids"].count(smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5  # no doubled BOS
    assert end_of_turn_ids(smollm2_tokenizer) == [smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_eos_stays_trained_even_when_pad_equals_eos(chatml_tokenizer):
    tokenizer = chatml_tokenizer
    [tokens] = tokenize_conversation(tokenizer, CONVERSATION)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Positional labels: every end-of-turn that closes an assistant reply is trained, whatever the pad id is.
    closing = [i for i, t in enumerate(tokens["input_ids"]) if t == eos and tokens["labels"][i] != IGNORE_INDEX]
    assert len(closing) == 2


def test_non_prefix_preserving_template_is_refused():
    tokenizer = build_chatml_tokenizer()
    # Renders the number of messages first, so every prefix renders differently.
    tokenizer.chat_template = "{{ messages|length }}" + tokenizer.chat_template
    with pytest.raises(FinetuneError, match="prefix-preserving"):
        tokenize_conversation(tokenizer, CONVERSATION)


@pytest.mark.parametrize(
    ("row", "fmt", "expected_roles"),
    [
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "auto",
            ["user", "assistant"],
        ),
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            "auto",
            ["user", "assistant"],
        ),
        ({"instruction": "a", "input": "ctx", "output": "b"}, "auto", ["user", "assistant"]),
        ({"prompt": "a", "completion": "b"}, "auto", ["user", "assistant"]),
        ({"instruction": "a", "output": "b", "system": "s"}, "alpaca", ["system", "user", "assistant"]),
    ],
)
def test_formats_become_messages(row, fmt, expected_roles):
    messages = to_messages(row, fmt)
    assert [m["role"] for m in messages] == expected_roles
    validate_messages(messages)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "no messages"),
        ([{"role": "user", "content": "a"}], "no assistant reply"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "empty content"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "b"},
            ],
            "system",
        ),
    ],
)
def test_invalid_conversations_are_named(messages, problem):
    with pytest.raises(RowError, match=problem):
        validate_messages(messages)


def test_unknown_role_and_format_are_named():
    with pytest.raises(RowError, match="unknown role 'bot'"):
        to_messages({"messages": [{"role": "bot", "content": "x"}]}, "messages")
    with pytest.raises(RowError, match="unknown row format"):
        to_messages({"body": "x"}, "auto")


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows) + "\n")
    return path


def test_bad_rows_are_skipped_counted_and_located(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [good, {"messages": [{"role": "user", "content": "only"}]}]
        + [
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(30)
        ]
        + [good],
    )
    report = DataReport()
    cfg = DataConfig(sources=[DataSource(path=str(path))], max_bad_fraction=0.1)
    dataset = load_conversations(cfg, report)
    assert len(dataset) == 31 and report.dropped["exact duplicate"] == 1 and report.rows_read == 33
    assert report.invalid["no assistant reply to train on (the last turn must be the assistant's)"] == 1
    assert report.invalid_examples[0].startswith(f"{path}:2:")
    with pytest.raises(FinetuneError, match=rf"{path}:2: no assistant reply"):
        load_conversations(cfg.model_copy(update={"strict": True}), DataReport())
    with pytest.raises(FinetuneError, match="1 of 33 rows are invalid"):
        load_conversations(cfg.model_copy(update={"max_bad_fraction": 0.0}), DataReport())


def test_invalid_json_names_the_line(tmp_path):
    path = _write_jsonl(
        tmp_path / "broken.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": ']
    )
    with pytest.raises(FinetuneError, match=rf"{path}:2: invalid JSON"):
        load_conversations(DataConfig(sources=[DataSource(path=str(path))]), DataReport())


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FinetuneError, match="nope.jsonl` not found"):
        load_conversations(DataConfig(sources=[DataSource(path=str(tmp_path / "nope.jsonl"))]), DataReport())


def test_splits_are_disjoint_and_seeded(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(50)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(sources=[DataSource(path=str(path))], validation_split=0.1, test_split=0.2, seed=3)
    first = split_conversations(load_conversations(cfg, DataReport()), cfg)
    again = split_conversations(load_conversations(cfg, DataReport()), cfg)
    origins = {name: set(split["origin"]) for name, split in first.items()}
    assert {n: len(s) for n, s in origins.items()} == {"test": 10, "validation": 5, "train": 35}
    assert not (origins["train"] & origins["test"]) and not (origins["train"] & origins["validation"])
    assert origins == {name: set(split["origin"]) for name, split in again.items()}


def test_chatterbot_source_and_too_long_policy(chatml_tokenizer):
    cfg = DataConfig(
        sources=[DataSource(type="chatterbot", categories=["greetings", "food"])], max_length=24, too_long="drop"
    )
    prepared = prepare_data(cfg, chatml_tokenizer)
    assert prepared.report.dropped["longer than data.max_length"] > 0
    assert all(len(ids) <= 24 for split in prepared.splits.values() for ids in split["input_ids"])
    truncated = prepare_data(cfg.model_copy(update={"too_long": "truncate"}), chatml_tokenizer)
    assert truncated.report.truncated > 0 and "longer than data.max_length" not in truncated.report.dropped
    assert all(len(ids) <= 24 for split in truncated.splits.values() for ids in split["input_ids"])
    with pytest.raises(FinetuneError, match="longer than data.max_length=24"):
        prepare_data(cfg.model_copy(update={"too_long": "error"}), chatml_tokenizer)
    with pytest.raises(FinetuneError, match="unknown chatterbot categories"):
        prepare_data(DataConfig(sources=[DataSource(type="chatterbot", categories=["nope"])]), chatml_tokenizer)


def test_truncate_keeps_whole_turns(chatml_tokenizer):
    from finetune.data import truncate_at_turn

    [tokens] = tokenize_conversation(chatml_tokenizer, CONVERSATION)
    first_reply_end = tokens["turn_ends"][0]
    cut = truncate_at_turn(tokens, CONVERSATION, first_reply_end + 3)
    assert cut is not None
    kept, messages = cut
    assert messages == CONVERSATION[:3] and len(kept["input_ids"]) == first_reply_end
    assert chatml_tokenizer.decode(trained_segments(kept)[-1]) == "Hello! How can I help?<|im_end|>"
    assert truncate_at_turn(tokens, CONVERSATION, first_reply_end - 1) is None
