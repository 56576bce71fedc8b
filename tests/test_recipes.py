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
    for name in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/chat_template.jinja",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/chat_template.jinja",
        "merged/generation_config.json",
        "metrics.json",
        "report.md",
        "loss_curves.png",
        "metrics.png",
        "recipe.yaml",
        "run.json",
        "adapter/README.md",
        "adapter/run.json",
    ):
        assert (result.run_dir / name).is_file(), name
    assert not (result.run_dir / "checkpoints").exists()
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["metrics_before"] == result.metrics_before and set(result.metrics_after) >= {
        "perplexity",
        "perplexity_all_tokens",
    }
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
    ids = torch.tensor([tokenize_conversation(tokenizer, PROBE)[-1]["input_ids"]])
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
    with pytest.raises(FinetuneError, match="already exists.*output.overwrite: true"):
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


def test_early_stopping_stops_a_run_whose_validation_loss_rises_and_keeps_the_best(
    tiny_llama_dir, facts_jsonl, tmp_path
):
    # Validation contradicts the training facts, so learning them makes validation loss rise.
    contradicting = tmp_path / "contradicting.jsonl"
    contradicting.write_text(
        "\n".join(json.dumps({"prompt": q, "completion": "Nobody knows that."}) for q, _ in FACTS) + "\n"
    )
    config = tiny_recipe(
        tiny_llama_dir,
        facts_jsonl,
        tmp_path / "early",
        training__max_steps=40,
        training__eval_steps=1,
        training__early_stopping_patience=2,
        training__learning_rate=5e-3,
    )
    config["data"]["validation_sources"] = [{"type": "file", "path": str(contradicting)}]
    config["evaluation"].update(before_and_after=False, generation=False)
    config["output"]["merge"] = False
    recipe = ChatSFTRecipe(**config)
    recipe.setup()
    recipe.train()
    state = recipe.trainer.state
    eval_losses = [loss for _, loss in recipe.state.training.history["eval_loss"]]
    assert state.global_step < 40, eval_losses
    assert eval_losses[-1] > min(eval_losses) and state.best_metric == min(eval_losses)
    best_step = eval_losses.index(min(eval_losses)) + 1
    assert state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert recipe.trainer.evaluate()["eval_loss"] == pytest.approx(min(eval_losses), rel=1e-5)  # best adapter restored
    recipe.cleanup()


def test_early_stopping_without_validation_is_a_config_error():
    with pytest.raises(FinetuneError, match="early_stopping_patience needs validation data"):
        RecipeConfig.from_dict({"training": {"early_stopping_patience": 2}, "data": {"validation_split": 0}})


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_crash_while_saving_leaves_the_previous_outputs_intact(llama_run, tiny_llama_dir, tmp_path, monkeypatch):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path / "run"
    shutil.copytree(llama_run[1].run_dir, run_dir)
    merged_before, adapter_before = _tree(run_dir / "merged"), _tree(run_dir / "adapter")

    # `finetune merge` again, SIGKILLed after the new weights are written but before the folder is complete.
    child = (
        "import os, signal, sys\n"
        "from transformers import PreTrainedTokenizerBase\n"
        "PreTrainedTokenizerBase.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from finetune.cli import main\n"
        "sys.argv = ['finetune', 'merge', sys.argv[1]]\n"
        "main()\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", child, str(run_dir)],
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (run_dir / "merged.partial" / "model.safetensors").is_file()  # it died mid-save ...
    assert _tree(run_dir / "merged") == merged_before  # ... and the previous merged model is untouched

    # The adapter: a save that fails half-way (here: the disk fills while writing the tokenizer) changes nothing.
    recipe = ChatSFTRecipe.from_run_dir(run_dir)  # its model is the trained adapter, loaded again from adapter/
    with torch.no_grad():
        for name, weight in recipe.model.named_parameters():
            if "lora_B" in name:
                weight.add_(1.0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recipe.tokenizer, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        recipe.save()
    assert _tree(run_dir / "adapter") == adapter_before and not (run_dir / "adapter.partial").exists()
    monkeypatch.undo()
    recipe.save()
    assert _tree(run_dir / "adapter")["adapter_model.safetensors"] != adapter_before["adapter_model.safetensors"]


def test_resume_refuses_a_changed_recipe_and_a_finished_run(llama_run, tiny_llama_dir, facts_jsonl, tmp_path):
    _, result = llama_run
    finished = ChatSFTRecipe(RecipeConfig.from_yaml(result.run_dir / "recipe.yaml"))
    with pytest.raises(
        FinetuneError, match="already finished .* nothing to resume. To train it again, set output.overwrite: true"
    ):
        finished.run(resume=True)

    run_dir = tmp_path / "started"
    run_dir.mkdir()
    RecipeConfig.from_dict(tiny_recipe(tiny_llama_dir, facts_jsonl, run_dir)).to_yaml(run_dir / "recipe.yaml")
    changed = tiny_recipe(tiny_llama_dir, facts_jsonl, run_dir, training__learning_rate=5e-4, lora__r=4)
    changed["evaluation"]["max_rows"] = 3  # scoring does not change training: allowed to differ
    with pytest.raises(FinetuneError) as err:
        ChatSFTRecipe(**changed).run(resume=True)
    message = str(err.value)
    assert "lora.r: 8 -> 4" in message and "training.learning_rate: 0.001 -> 0.0005" in message
    assert "evaluation" not in message and f"Resume with the run's own recipe ({run_dir / 'recipe.yaml'})" in message


def test_resume_refuses_training_data_that_changed_since_the_run_started(tiny_llama_dir, facts_jsonl, tmp_path):
    import shutil

    data = tmp_path / "facts.jsonl"
    shutil.copyfile(facts_jsonl, data)
    config = tiny_recipe(tiny_llama_dir, data, tmp_path / "run")
    ChatSFTRecipe(**config).setup()  # the run starts (and, say, dies before its first checkpoint)
    data.write_text("".join(data.read_text().splitlines(keepends=True)[1:]))  # then a row disappears
    with pytest.raises(FinetuneError, match="the training data differ from those the run in .* started with"):
        ChatSFTRecipe(**config).setup(resume=True)


def test_a_stage_called_too_early_names_the_stage_to_call_first(tiny_llama_dir, facts_jsonl, tmp_path):
    recipe = ChatSFTRecipe(**tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "early-call"))
    for stage in (recipe.train, recipe.evaluate, recipe.evaluate_before_and_after, recipe.save, recipe.merge):
        with pytest.raises(FinetuneError, match=r"call setup\(\) first"):
            stage()
    with pytest.raises(FinetuneError, match=r"call setup\(\) first"):
        recipe.tokenizer  # noqa: B018 - reading it is what is tested
    with pytest.raises(FinetuneError, match=r"call train\(\) first"):
        recipe.trainer  # noqa: B018


def test_the_callers_config_is_never_changed_and_decisions_are_recorded(tiny_llama_dir, facts_jsonl, tmp_path):
    config = RecipeConfig.from_dict(tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "decided"))
    assert config.training.gradient_checkpointing == "auto"
    recipe = ChatSFTRecipe(config)
    result = recipe.run()
    assert config.training.gradient_checkpointing == "auto"  # the caller's object, untouched
    decided = result.decisions["training.gradient_checkpointing"]
    assert isinstance(decided, bool) and recipe.config.training.gradient_checkpointing == decided
    assert RecipeConfig.from_yaml(result.run_dir / "recipe.yaml").training.gradient_checkpointing == decided
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["decisions"] == {"training.gradient_checkpointing": decided}


def test_batch_size_auto_is_decided_printed_recorded_and_resumable(tiny_llama_dir, facts_jsonl, tmp_path, capsys):
    from finetune import planning
    from finetune.recipes import _training_differences

    config = tiny_recipe(
        tiny_llama_dir, facts_jsonl, tmp_path / "auto", training__batch_size="auto", training__effective_batch_size=8
    )
    config["evaluation"].update(before_and_after=False, generation=False)
    config["output"]["merge"] = False
    config = RecipeConfig.from_dict(config)
    recipe = ChatSFTRecipe(config)
    result = recipe.run()
    # The tiny model fits a batch of 8 in any machine's free memory, so auto takes the whole effective batch.
    expected = planning.choose_batch_size(config, train=recipe.data.splits["train"])
    assert (expected.batch_size, expected.gradient_accumulation_steps) == (8, 1)
    decided = {
        "training.batch_size": 8,
        "training.gradient_accumulation_steps": 1,
        "training.gradient_checkpointing": False,
    }
    assert result.decisions == decided
    assert json.loads((result.run_dir / "metrics.json").read_text())["decisions"] == decided
    ran = RecipeConfig.from_yaml(result.run_dir / "recipe.yaml")
    assert (ran.training.batch_size, ran.training.gradient_accumulation_steps, ran.training.effective_batch_size) == (
        8,
        1,
        8,
    )
    assert "| batch size x accumulation | 8 x 1 |" in (result.run_dir / "adapter" / "README.md").read_text()
    printed = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "batch size auto: 8 conversations per batch x 1 accumulation step = 8 per optimizer step" in printed
    assert config.training.batch_size == "auto"  # the caller's config is untouched...
    assert not _training_differences(ran, config)  # ...and still matches the run's recipe for --resume


def test_every_stage_works_again_after_merge(llama_run):
    """merge() releases the training model; evaluate, save, export's inputs and a second merge still work, the
    trained adapter loaded again from adapter/ (one loader: adapters.load_trained)."""
    recipe, result = llama_run
    assert recipe.state.model is None  # released by merge() and cleanup()
    scores = recipe.evaluate()
    assert scores.metrics["perplexity"] == pytest.approx(result.metrics_after["perplexity"], rel=1e-4)
    before = (result.adapter_dir / "adapter_model.safetensors").read_bytes()
    recipe.save()
    from safetensors.torch import load

    saved, again = load(before), load((result.adapter_dir / "adapter_model.safetensors").read_bytes())
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert recipe.merge(out_dir=result.run_dir / "merged-again").max_logit_diff < 1e-3
