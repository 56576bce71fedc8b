"""Preference data: every format TRL defines, clear errors for bad rows, and tokens without the pitfalls other
libraries' users report (an EOS after the end-of-turn, a BOS before a reply, a prompt that is not the inference
prompt, a prompt that fills max_length)."""

from __future__ import annotations

import json

import pytest

from finetune import FinetuneError
from finetune.config import DataConfig
from finetune.data import prepare_data
from finetune.data.masks import render_prompt
from finetune.data.preference import prepare_preferences
from tests.families import FAMILIES, build_tokenizer

PAIRS = [
    {"prompt": "What is the capital of Zorbia?", "chosen": "Quenth.", "rejected": "Paris."},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Green."}],
        "rejected": [{"role": "assistant", "content": "I cannot help with that."}],
    },
    {
        "chosen": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Well, thank you."},
        ],
        "rejected": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "Go away."},
        ],
    },
    {
        "chosen": "\n\nHuman: Tell me a fact.\n\nAssistant: Tarsis has seven moons.",
        "rejected": "\n\nHuman: Tell me a fact.\n\nAssistant: No.",
    },
]


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _config(path, **data):
    settings = {"validation_split": 0, "test_split": 0, "max_length": 256, **data}
    return DataConfig(sources=[{"type": "file", "path": str(path)}], **settings)


def test_every_preference_format_becomes_a_prompt_and_two_replies(tmp_path, chatml_tokenizer):
    prepared = prepare_preferences(_config(_write(tmp_path / "p.jsonl", PAIRS)), chatml_tokenizer, paired=True)
    rows = {row["chosen"]: row for row in prepared.splits["train"]}
    assert prepared.report.formats == {"preference": 2, "preference_implicit": 2}
    assert rows["Quenth."]["prompt"] == [{"role": "user", "content": "What is the capital of Zorbia?"}]
    assert rows["Green."]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert rows["Well, thank you."]["rejected"] == "Go away." and len(rows["Well, thank you."]["prompt"]) == 3
    assert rows["Tarsis has seven moons."]["prompt"] == [{"role": "user", "content": "Tell me a fact."}]


def test_replies_are_exactly_the_tokens_after_the_inference_prompt_through_end_of_turn(tmp_path, chatml_tokenizer):
    prepared = prepare_preferences(_config(_write(tmp_path / "p.jsonl", PAIRS)), chatml_tokenizer, paired=True)
    end_of_turn = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in prepared.splits["train"]:
        prompt = chatml_tokenizer(render_prompt(chatml_tokenizer, row["prompt"]), add_special_tokens=False).input_ids
        assert row["prompt_ids"] == prompt  # the very tokens inference feeds the model
        for key, text in (("chosen_ids", row["chosen"]), ("rejected_ids", row["rejected"])):
            reply = row[key]
            assert reply[-1] == end_of_turn and reply.count(end_of_turn) == 1  # trained once, nothing after it
            assert reply[0] != chatml_tokenizer.bos_token_id
            assert chatml_tokenizer.decode(reply[:-1]) == text
        # The SFT view of the chosen conversation, for perplexity, the merge check and export.
        assert row["input_ids"] == row["prompt_ids"] + row["chosen_ids"]
        assert row["labels"] == [-100] * len(row["prompt_ids"]) + row["chosen_ids"]
    checks = {finding.check: finding for finding in prepared.report.findings}
    assert checks["reply ends at end of turn"].level == "ok" and checks["no stray BOS/EOS"].level == "ok"


def test_a_template_that_rewrites_earlier_turns_still_gets_the_inference_prompt(tmp_path):
    """Qwen3 drops earlier turns' reasoning once a later turn exists, so prompt + reply does not start with the
    prompt alone; the pair's prompt must be what inference sends (TRL's common prefix would cut it short)."""
    tokenizer = build_tokenizer(FAMILIES["qwen3"])
    rows = [
        {
            "prompt": [
                {"role": "user", "content": "One?"},
                {"role": "assistant", "content": "Two.", "reasoning_content": "count up"},
                {"role": "user", "content": "Three?"},
            ],
            "chosen": "Four.",
            "rejected": "Five.",
        }
    ]
    prepared = prepare_preferences(_config(_write(tmp_path / "q.jsonl", rows)), tokenizer, paired=True)
    row = prepared.splits["train"][0]
    inference = tokenizer(render_prompt(tokenizer, row["prompt"]), add_special_tokens=False).input_ids
    assert row["prompt_ids"] == inference


def test_unpaired_rows_for_kto(tmp_path, chatml_tokenizer):
    rows = [
        {"prompt": "Capital of Zorbia?", "completion": "Quenth.", "label": True},
        {"prompt": "Capital of Zorbia?", "completion": "Paris.", "label": False},
    ]
    prepared = prepare_preferences(_config(_write(tmp_path / "k.jsonl", rows)), chatml_tokenizer, paired=False)
    train = prepared.splits["train"]
    assert sorted(train["label"]) == [False, True] and all(ids for ids in train["completion_ids"])


def test_bad_rows_are_reported_with_their_line_and_the_reason(tmp_path, chatml_tokenizer):
    rows = [
        PAIRS[0],
        {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "Hi", "chosen": "Yes."},  # no rejected
        {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},  # prompt ends badly
        {"prompt": "Hi", "completion": "Yes.", "label": True},  # unpaired row in paired data
    ]
    path = _write(tmp_path / "bad.jsonl", rows)
    prepared = prepare_preferences(_config(path, max_bad_fraction=0.9), chatml_tokenizer, paired=True)
    report = prepared.report
    assert report.dropped["chosen and rejected are the same reply (nothing to prefer)"] == 1
    examples = "\n".join(report.invalid_examples)
    assert f"{path}:3: not preference data" in examples
    assert f"{path}:4: field `prompt` must end with a user turn" in examples
    assert f"{path}:5: an unpaired row" in examples and "use method: kto" in examples
    with pytest.raises(FinetuneError, match=r"bad\.jsonl:3: not preference data.*data\.strict is on"):
        prepare_preferences(_config(path, strict=True), chatml_tokenizer, paired=True)


def test_a_prompt_that_fills_max_length_is_dropped_and_long_replies_are_cut_and_reported(tmp_path, chatml_tokenizer):
    long_prompt = "word " * 80
    rows = [
        PAIRS[0],
        {"prompt": long_prompt, "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Tell me.", "chosen": "a long reply " * 20, "rejected": "No."},
    ]
    path = _write(tmp_path / "long.jsonl", rows)
    dropped = prepare_preferences(_config(path, max_length=48), chatml_tokenizer, paired=True).report
    assert dropped.dropped["longer than data.max_length"] == 1 and dropped.truncated == 0  # data.too_long: drop
    prepared = prepare_preferences(_config(path, max_length=48, too_long="truncate"), chatml_tokenizer, paired=True)
    report = prepared.report
    assert report.dropped["the prompt alone fills data.max_length (no reply token would be trained)"] == 1
    assert report.truncated == 1
    assert all(len(r["prompt_ids"]) + len(r["chosen_ids"]) <= 48 for r in prepared.splits["train"])
    checks = {finding.check: finding for finding in report.findings}
    assert checks["reply ends at end of turn"].level == "warning" and checks["length"].level == "warning"


def test_pairs_built_from_supervised_conversations_with_shuffled_rejections(tmp_path, chatml_tokenizer):
    conversations = [
        {"messages": [{"role": "user", "content": f"Question {n}?"}, {"role": "assistant", "content": f"Answer {n}."}]}
        for n in range(10)
    ]
    path = _write(tmp_path / "sft.jsonl", conversations)
    cfg = DataConfig(
        sources=[{"type": "file", "path": str(path), "rejected": "shuffled"}], validation_split=0, test_split=0
    )
    train = prepare_preferences(cfg, chatml_tokenizer, paired=True).splits["train"]
    assert len(train) == 10
    for row in train:
        number = row["prompt"][-1]["content"].split()[1].rstrip("?")
        assert row["chosen"] == f"Answer {number}." and row["rejected"] != row["chosen"]


def test_preference_rows_in_supervised_data_are_an_error_not_silent_training(tmp_path, chatml_tokenizer):
    path = _write(tmp_path / "kto.jsonl", [{"prompt": "Hi", "completion": "Bad reply.", "label": False}] * 3)
    with pytest.raises(FinetuneError, match="set the recipe's method to dpo, orpo, simpo or kto"):
        prepare_data(_config(path, strict=True), chatml_tokenizer)
