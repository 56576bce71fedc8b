import shutil
from collections import namedtuple

import pytest
from transformers import AutoModelForCausalLM

from finetune import ChatSFTRecipe, FinetuneError, RecipeConfig, preflight
from finetune.config import ModelConfig
from tests.conftest import tiny_recipe


def config(model_dir, data_path, tmp_path, **overrides) -> RecipeConfig:
    return RecipeConfig.from_dict(tiny_recipe(model_dir, data_path, tmp_path / "run", **overrides))


def test_a_usable_recipe_passes_every_check(tiny_llama_dir, facts_jsonl, tmp_path):
    findings = preflight.preflight(config(tiny_llama_dir, facts_jsonl, tmp_path))
    assert {f.check for f in findings} == {"data", "quantization", "context", "disk", "safety", "trackers"}
    assert all(f.ok for f in findings) and any("fits the model's 512 tokens" in f.message for f in findings)


def test_missing_safety_packages_stop_the_run_before_training(tiny_llama_dir, facts_jsonl, tmp_path, monkeypatch):
    """evaluation.safety is on by default and runs after training: its prompt packages are checked before anything."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "garak" else find_spec(name))
    with pytest.raises(FinetuneError) as err:
        preflight.preflight(config(tiny_llama_dir, facts_jsonl, tmp_path, evaluation__safety=True))
    assert (
        "evaluation.safety needs garak: pip install --no-deps garak==0.17.1 (or set evaluation.safety: false)"
        in str(err.value)
    )
    assert preflight.check_safety(config(tiny_llama_dir, facts_jsonl, tmp_path)).ok  # the tiny recipe has it off


def test_missing_data_files_stop_the_run_before_anything_is_loaded_or_written(tiny_llama_dir, facts_jsonl, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, tmp_path / "absent.jsonl", tmp_path / "run")
    recipe["data"]["validation_sources"] = [
        {"type": "file", "path": str(facts_jsonl)},
        {"type": "file", "path": str(tmp_path / "gone")},
    ]
    with pytest.raises(FinetuneError) as err:
        ChatSFTRecipe(**recipe).setup()
    message = str(err.value)
    assert message.startswith("pre-flight checks failed; nothing was loaded or written")
    assert "data.sources[0]: " in message and "absent.jsonl" in message
    assert "data.validation_sources[1]: " in message and "data.validation_sources[0]" not in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_gpt2_dir"])  # max_position_embeddings / n_positions
def test_max_length_longer_than_the_model_context_is_refused(model, facts_jsonl, tmp_path, request):
    model_dir = request.getfixturevalue(model)
    with pytest.raises(
        FinetuneError,
        match=r"data.max_length \(1024\) is longer than the context of .* \(512 tokens\): set data.max_length to 512 or less",
    ):
        preflight.preflight(config(model_dir, facts_jsonl, tmp_path, data__max_length=1024))


def test_unavailable_quantization_is_refused_with_the_alternative(tiny_llama_dir, facts_jsonl, tmp_path, monkeypatch):
    # The real probe: bitsandbytes quantizes and runs both kinds on this machine's CPU.
    assert (
        preflight.quantization_problem("4bit", "cpu") is None and preflight.quantization_problem("8bit", "cpu") is None
    )
    # A bitsandbytes build without 4-bit kernels for this device, simulated at the probe.
    monkeypatch.setattr(
        preflight, "quantization_problem", lambda kind, device: "0.0 lacks 4-bit kernels" if kind == "4bit" else None
    )
    with pytest.raises(FinetuneError) as err:
        preflight.preflight(config(tiny_llama_dir, facts_jsonl, tmp_path, model__quantization="4bit"))
    assert (
        "model.quantization: 4bit is not available on cpu: bitsandbytes 0.0 lacks 4-bit kernels. Use model.quantization: 8bit instead"
        in str(err.value)
    )
    monkeypatch.setattr(
        preflight, "quantization_problem", lambda kind, device: "cannot be imported (No module named 'bitsandbytes')"
    )
    with pytest.raises(FinetuneError, match="8bit is not available .* Use model.quantization: none instead"):
        preflight.preflight(config(tiny_llama_dir, facts_jsonl, tmp_path, model__quantization="8bit"))


def test_too_little_disk_space_is_refused_with_the_estimate_and_the_fixes(
    tiny_llama_dir, facts_jsonl, tmp_path, monkeypatch
):
    cfg = config(tiny_llama_dir, facts_jsonl, tmp_path)
    facts = preflight.model_facts(cfg.model)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert (
        facts.parameters == sum(p.numel() for p in loaded.parameters()) and facts.context == 512 and facts.hidden == 64
    )
    estimate = preflight.estimate_bytes(cfg, facts)
    assert estimate["merged model"] == 4 * facts.parameters and estimate["checkpoints"] == 3 * estimate["adapter"] * 4

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))  # a full disk
    with pytest.raises(FinetuneError) as err:
        preflight.preflight(cfg)
    message = str(err.value)
    assert "the run writes about" in message and "1.0 MB free" in message
    assert "training.save_total_limit" in message and "output.merge: false" in message


def test_the_bundled_gguf_model_is_described_from_its_metadata_without_converting_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))  # nothing converted yet
    facts = preflight.model_facts(ModelConfig(source="smollm2-135m-instruct"))
    assert facts.context == 8192 and facts.hidden == 576 and facts.parameters == 134_515_008
    assert facts.conversion_bytes == 4 * facts.parameters and not (tmp_path / "cache").exists()
