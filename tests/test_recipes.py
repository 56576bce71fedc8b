import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import ChatSFTRecipe, FinetuneError, RecipeConfig
from finetune.data import tokenize_conversation
from tests.conftest import FACTS, tiny_recipe

PROBE = [{"role": "user", "content": "What is the capital of Zorbia?"}, {"role": "assistant", "content": "Quenth."}]


@pytest.fixture(scope="module")
def llama_run(tiny_llama_dir, facts_jsonl, tmp_path_factory):
    recipe = ChatSFTRecipe(**tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path_factory.mktemp("runs") / "llama"))
    return recipe, recipe.run()


def test_run_leaves_adapter_merged_model_metrics_and_report(llama_run):
    _, result = llama_run
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/chat_template.jinja",
                 "merged/config.json", "merged/model.safetensors", "merged/chat_template.jinja", "merged/generation_config.json",
                 "metrics.json", "report.md", "loss_curves.png", "metrics.png", "recipe.yaml", "run.json",
                 "adapter/README.md", "adapter/run.json"):
        assert (result.run_dir / name).is_file(), name
    assert not (result.run_dir / "checkpoints").exists()
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["metrics_before"] == result.metrics_before and set(result.metrics_after) >= {"perplexity", "perplexity_all_tokens"}
    assert len(metrics["history"]["train_loss"]) == 3
    assert "| perplexity |" in (result.run_dir / "report.md").read_text()
    # A few steps at a high learning rate on a random tiny model must move held-out perplexity.
    assert result.metrics_after["perplexity"] != result.metrics_before["perplexity"]


def test_training_changed_every_adapter_matrix(llama_run):
    _, result = llama_run
    from safetensors.torch import load_file

    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero


def test_merged_model_matches_base_plus_adapter_in_plain_transformers(llama_run, tiny_llama_dir):
    _, result = llama_run
    assert result.merge_max_logit_diff < 1e-3
    tokenizer = AutoTokenizer.from_pretrained(result.merged_dir)
    ids = torch.tensor([tokenize_conversation(tokenizer, PROBE)["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), result.adapter_dir)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-4)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in merged.generation_config.eos_token_id


def test_qlora_on_gpt2_merges_into_full_precision(tiny_gpt2_dir, facts_jsonl, tmp_path):
    config = tiny_recipe(tiny_gpt2_dir, facts_jsonl, tmp_path / "gpt2", model__quantization="4bit")
    config["evaluation"]["before_and_after"] = False
    result = ChatSFTRecipe(**config).run()
    assert result.metrics_before is None and result.metrics_after["perplexity"] > 1
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert merged.dtype == torch.float32 and not getattr(merged, "is_quantized", False)
    assert result.merge_max_logit_diff < 1e-3


def test_existing_run_folder_is_never_overwritten_silently(tiny_llama_dir, facts_jsonl, tmp_path):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("previous work")
    recipe = ChatSFTRecipe(**tiny_recipe(tiny_llama_dir, facts_jsonl, run_dir))
    with pytest.raises(FinetuneError, match="already exists.*--overwrite"):
        recipe.run()
    assert (run_dir / "keep.txt").read_text() == "previous work"


def test_recipe_from_yaml_with_overrides(tiny_llama_dir, facts_jsonl, tmp_path):
    path = tmp_path / "r.yaml"
    RecipeConfig.from_dict(tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "y")).to_yaml(path)
    recipe = ChatSFTRecipe.from_yaml(path, ["training.max_steps=1", "lora.r=2"])
    assert recipe.config.training.max_steps == 1 and recipe.config.lora.r == 2
    with pytest.raises(FinetuneError, match="either a RecipeConfig or section keyword arguments"):
        ChatSFTRecipe(recipe.config, lora={"r": 4})
    with pytest.raises(FinetuneError, match="unknown key `lora.rank`"):
        ChatSFTRecipe(lora={"rank": 4})


def test_early_stopping_stops_a_run_whose_validation_loss_rises_and_keeps_the_best(tiny_llama_dir, facts_jsonl, tmp_path):
    # Validation contradicts the training facts, so learning them makes validation loss rise.
    contradicting = tmp_path / "contradicting.jsonl"
    contradicting.write_text("\n".join(json.dumps({"prompt": q, "completion": "Nobody knows that."}) for q, _ in FACTS) + "\n")
    config = tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "early", training__max_steps=40, training__eval_steps=1,
                         training__early_stopping_patience=2, training__learning_rate=5e-3)
    config["data"]["validation_sources"] = [{"type": "file", "path": str(contradicting)}]
    config["evaluation"].update(before_and_after=False, generation=False)
    config["output"]["merge"] = False
    recipe = ChatSFTRecipe(**config)
    recipe.setup()
    recipe.train()
    state = recipe.trainer.state
    eval_losses = [loss for _, loss in recipe.history["eval_loss"]]
    assert state.global_step < 40, eval_losses
    assert eval_losses[-1] > min(eval_losses) and state.best_metric == min(eval_losses)
    best_step = eval_losses.index(min(eval_losses)) + 1
    assert state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert recipe.trainer.evaluate()["eval_loss"] == pytest.approx(min(eval_losses), rel=1e-5)  # best adapter restored
    recipe.cleanup()


def test_early_stopping_without_validation_is_a_config_error():
    with pytest.raises(FinetuneError, match="early_stopping_patience needs validation data"):
        RecipeConfig.from_dict({"training": {"early_stopping_patience": 2}, "data": {"validation_split": 0}})
