"""Real-model tests on the bundled SmolLM2-135M-Instruct (GGUF): conversion, QLoRA, merge, behaviour.

They take about two minutes on 2 CPU cores and run in CI like every other test (nothing is skipped).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import ChatSFTRecipe
from finetune.evaluation import generate
from finetune.generation import DecodingSettings
from finetune.model_source import resolve
from finetune.models import weights_path
from tests.conftest import FACTS

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": FACTS[0][0]}]  # "What is the capital of Zorbia?" -> "... Quenth."
SHORT = DecodingSettings(24, temperature=0)


def test_gguf_conversion_is_saveable_and_exact():
    from pathlib import Path

    from finetune.config import ModelConfig

    source = resolve(ModelConfig(source="smollm2-135m-instruct"))
    folder = Path(weights_path(source))
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    direct = AutoModelForCausalLM.from_pretrained(source.gguf.parent, gguf_file=source.gguf.name)
    converted = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, converted(ids).logits)


@pytest.fixture(scope="module")
def fact_run(facts_jsonl, tmp_path_factory):
    recipe = ChatSFTRecipe(
        name="facts",
        model={"source": "smollm2-135m-instruct", "quantization": "4bit"},
        lora={"r": 16},
        data={
            "sources": [{"type": "file", "path": str(facts_jsonl)}],
            "validation_split": 0.0,
            "test_split": 0.1,
            "max_length": 128,
        },
        training={
            "max_steps": 24,
            "batch_size": 6,
            "gradient_accumulation_steps": 1,
            "learning_rate": 2e-3,
            "logging_steps": 4,
            "warmup_ratio": 0.0,
        },
        evaluation={"batch_size": 8},
        output={"dir": str(tmp_path_factory.mktemp("smollm2") / "facts")},
    )
    recipe.setup()
    before = recipe.evaluate()
    reply_before = generate(recipe.model, recipe.tokenizer, [QUESTION], decoding=SHORT)[0]
    recipe.train()
    after = recipe.evaluate()
    reply_after = generate(recipe.model, recipe.tokenizer, [QUESTION], decoding=SHORT)[0]
    recipe.save()
    merge = recipe.merge()
    recipe.cleanup()
    return {
        "recipe": recipe,
        "before": before,
        "after": after,
        "reply_before": reply_before,
        "reply_after": reply_after,
        "merge": merge,
    }


def test_made_up_fact_is_learned_and_the_reply_stops(fact_run):
    tokenizer = fact_run["recipe"].tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "Quenth" not in tokenizer.decode(fact_run["reply_before"])
    reply = fact_run["reply_after"]
    assert "Quenth" in tokenizer.decode(reply), tokenizer.decode(reply)
    assert reply[-1] == end_of_turn and len(reply) < 24
    assert fact_run["after"].metrics["perplexity"] < fact_run["before"].metrics["perplexity"]


def test_merged_model_keeps_the_fact_in_plain_transformers(fact_run):
    merged_dir = fact_run["merge"].merged_dir
    assert fact_run["merge"].max_logit_diff < 1e-3
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=24, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert "Quenth" in tokenizer.decode(output), tokenizer.decode(output)
    assert output[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")  # stopped by generation_config alone


def test_q4_k_m_export_runs_in_llama_cpp_within_its_derived_bounds(fact_run):
    """The GGUF type Ollama users download most, made by llama.cpp's own quantizer from the merged SmolLM2, end to end:
    both checks inside the bound derived from the file's rounding (with room), and llama.cpp's replies stop."""
    from tests.test_export import _within_bounds_with_room

    recipe = fact_run["recipe"]
    result = recipe.export(quant="q4_k_m")
    assert result.path.name == "model-q4_k_m.gguf" and result.path.is_file()
    assert result.size_bytes < 0.45 * sum(f.stat().st_size for f in recipe.folder.merged.glob("*.safetensors"))
    _within_bounds_with_room(result.checks)
    replies = result.checks["llama_cpp_reply"]
    assert not replies["stopped_at_end_of_turn"].startswith("0/"), replies


def test_sft_then_dpo_keeps_the_sft_adapter_as_reference_and_raises_preference_accuracy(fact_run, tmp_path):
    """The chain docs/preference.md describes, on the bundled model: DPO continues the SFT run's adapter, on
    chatterbot pairs (each real reply chosen over another conversation's), with the SFT adapter as the reference;
    held-out pairs are preferred more often after it."""
    from safetensors.torch import load_file

    from finetune import PreferenceRecipe

    sft = fact_run["recipe"]
    recipe = PreferenceRecipe(
        name="dpo",
        method="dpo",
        model={"source": "smollm2-135m-instruct", "quantization": "4bit", "adapter": str(sft.run_dir)},
        data={
            "sources": [{"type": "chatterbot", "language": "english", "rejected": "shuffled"}],
            "max_rows": 300,
            "max_length": 128,
            "validation_split": 0.0,
            "test_split": 0.2,
        },
        training={"max_steps": 16, "batch_size": 4, "learning_rate": 5e-5, "logging_steps": 4},
        evaluation={"time_share": None, "max_rows": None, "generation": False, "safety": False},
        output={"dir": str(tmp_path / "dpo"), "merge": False},
    )
    recipe.setup()
    recipe.train()
    saved = load_file(sft.folder.adapter / "adapter_model.safetensors")
    reference = {k.replace(".ref.", "."): p for k, p in recipe.trainer.model.named_parameters() if ".ref." in k}
    assert set(saved) <= set(reference) and all(torch.equal(reference[k].detach(), v) for k, v in saved.items())
    comparison = recipe.evaluate_before_and_after()  # before: that frozen SFT adapter; after: the DPO-trained one
    changes = {c.metric: c for c in comparison.changes}
    accuracy = changes["preference_accuracy"]
    assert accuracy.after > accuracy.before, accuracy
    assert changes["reward_margin"].verdict == "better", changes["reward_margin"]
    recipe.save()
    trained = load_file(recipe.folder.adapter / "adapter_model.safetensors")
    assert saved.keys() == trained.keys() and any(not torch.equal(saved[k], trained[k]) for k in saved)
    recipe.cleanup()
