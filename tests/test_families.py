"""The family matrix: a tiny model of each popular architecture, with its family's turn tokens and a template that
behaves like the family's (tests/families.py), goes through the recipe: masks checked token by token against
apply_chat_template, train, merge, reload merged/ with plain transformers, generate, stop at the family's
end-of-turn token. Qwen2 trains on tool calls too, Qwen3 on tool calls and reasoning it drops from earlier turns."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import ChatSFTRecipe
from tests.conftest import FACTS
from tests.data.test_reasoning_and_tools import REASONING_CHAT, TOOL_CHAT, TOOLS
from tests.families import FAMILIES, assert_masks_exact, build_model_dir, trained_text

QUESTION = FACTS[0][0]
STEPS = 60  # enough for every family to learn to end its replies (a random model emits end-of-turn ~1% of the time in 40 tokens)


def _rows(name: str) -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    rows += [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": q1},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": q2},
                {"role": "assistant", "content": a2},
            ]
        }
        for (q1, a1), (q2, a2) in zip(FACTS, FACTS[1:])
    ]
    if name in ("qwen2", "qwen3"):  # the families whose templates here speak tools
        rows.append({"messages": TOOL_CHAT, "tools": TOOLS})
    if name == "qwen3":
        rows.append({"messages": REASONING_CHAT})
    return rows


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request, tmp_path_factory):
    """One family trained through the recipe's stages (evaluation and reports are covered elsewhere)."""
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(family.name)
    data = root / "chats.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in _rows(family.name)))
    recipe = ChatSFTRecipe(
        name=family.name,
        model={"source": str(build_model_dir(family, root / "base")), "quantization": "none"},
        lora={"r": 8, "dropout": 0.0},
        data={
            "sources": [{"type": "file", "path": str(data)}],
            "max_length": 512,
            "validation_split": 0,
            "test_split": 0.1,
        },
        training={
            "max_steps": STEPS,
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-2,
            "warmup_ratio": 0,
        },
        evaluation={"before_and_after": False, "max_rows": 4, "safety": False},
        output={"dir": str(root / "run")},
    )
    recipe.setup()
    recipe.train()
    recipe.save()
    report = recipe.merge()
    recipe.cleanup()
    return family, recipe, report


def test_masks_are_exactly_the_assistant_turns_as_apply_chat_template_renders_them(run):
    family, recipe, _ = run
    tokenizer = recipe.tokenizer
    for name, split in recipe.data.splits.items():
        for row in split:
            trained = assert_masks_exact(tokenizer, row["messages"], row["tools"], row, family.end_of_turn)
            pieces = trained_text(tokenizer, row)
            assert len(pieces) == len(trained), row["origin"]
            for index, piece in zip(trained, pieces):
                assert piece.endswith(row["messages"][index]["content"] + family.end_of_turn), (
                    name,
                    row["origin"],
                    piece,
                )
                assert "tool_response" not in piece and QUESTION not in piece
    assert recipe.stop_ids == [tokenizer.convert_tokens_to_ids(family.end_of_turn)]


def test_merged_model_reloads_in_plain_transformers_and_stops_at_the_end_of_turn_token(run):
    family, recipe, report = run
    assert report.max_logit_diff < 1e-3
    tokenizer = AutoTokenizer.from_pretrained(report.merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(report.merged_dir)
    stop = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    assert stop in merged.generation_config.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(recipe.config.model.source), str(recipe.folder.adapter)
    )
    replies = []
    for model in (merged, adapted):
        with torch.inference_mode():
            output = model.generate(
                **prompt, max_new_tokens=40, do_sample=False, eos_token_id=merged.generation_config.eos_token_id
            )
        replies.append(output[0, prompt["input_ids"].shape[1] :].tolist())
    reply = replies[0]
    assert reply[-1] == stop and stop not in reply[:-1] and len(reply) > 1, tokenizer.decode(reply)
    assert replies[1] == reply  # the merged weights answer exactly like base + adapter
