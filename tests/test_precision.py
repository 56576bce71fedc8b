"""finetune.precision: what `model.compute_dtype: auto` resolves to, and bf16 mixed precision on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune import ChatSFTRecipe, RecipeConfig, precision
from tests.conftest import tiny_recipe


def probe(float32: float, bfloat16: float, native: tuple[str, ...] = ("avx512_bf16",)) -> precision.MatmulProbe:
    return precision.MatmulProbe(
        cpu="test CPU",
        native_bf16=native,
        threads=2,
        torch_version=torch.__version__,
        float32_gflops=float32,
        bfloat16_gflops=bfloat16,
    )


@pytest.mark.parametrize(
    ("measured", "expected"),
    [
        (probe(120, 1200, ("avx512_bf16", "amx_bf16")), torch.bfloat16),  # Intel Xeon with AMX (issue 27's numbers)
        (probe(90, 200), torch.bfloat16),  # AMD Zen 4: 2.2x
        (probe(100, 130), torch.float32),  # native but barely faster: not worth bf16's precision
        (probe(100, 300, native=()), torch.float32),  # no native bf16: never, whatever a noisy probe says
    ],
)
def test_auto_on_cpu_picks_bf16_only_where_the_cpu_computes_it_natively_and_faster(measured, expected):
    choice = precision.choose_compute_dtype("auto", cuda=False, probe=measured)
    assert choice.dtype == expected
    assert choice.reason.startswith("auto: ")
    if measured.native_bf16:
        assert f"{measured.speedup:.1f}x" in choice.reason  # the run says what was measured


def test_auto_keeps_an_unquantized_base_in_float32_on_cpu():
    choice = precision.choose_compute_dtype("auto", quantization="none", cuda=False, probe=probe(100, 1000))
    assert choice.dtype == torch.float32 and "unquantized" in choice.reason


def test_an_explicit_setting_and_a_gpu_need_no_probe():
    assert precision.choose_compute_dtype("float32", probe=probe(1, 100)).dtype == torch.float32
    assert precision.choose_compute_dtype("bfloat16").reason == "model.compute_dtype: bfloat16"
    assert precision.choose_compute_dtype("auto", cuda=True).dtype in (torch.bfloat16, torch.float16)


def test_the_probe_measures_once_per_machine_and_again_when_the_machine_changes(tmp_path, monkeypatch):
    cache = tmp_path / "probe.json"
    calls = []

    def measure() -> precision.MatmulProbe:
        calls.append(1)
        return probe(100, 250)

    monkeypatch.setattr(precision, "measure_matmuls", measure)
    first = precision.cached_probe(cache)
    assert precision.cached_probe(cache) == first and len(calls) == 1  # read back, not measured again
    entry = json.loads(cache.read_text())
    entry["key"]["threads"] += 1  # another thread count measures differently
    cache.write_text(json.dumps(entry))
    precision.cached_probe(cache)
    assert len(calls) == 2
    cache.write_text("{not json")  # a damaged cache is measured again, never an error
    assert precision.cached_probe(cache) == first and len(calls) == 3


def test_the_real_probe_measures_this_cpu():
    measured = precision.measure_matmuls()
    assert measured.float32_gflops > 0 and measured.bfloat16_gflops > 0
    assert measured.threads == torch.get_num_threads() and measured.cpu


def test_bf16_training_on_cpu_is_mixed_precision_and_merges_to_the_base_dtype(tiny_llama_dir, facts_jsonl, tmp_path):
    """bf16 on CPU: the forward under autocast, LoRA weights and AdamW state float32, evaluation under the same
    autocast, merged/ in the base checkpoint's float32; the decided dtype is what the run prints and records."""
    config = tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run", training__max_steps=4)
    config["model"]["compute_dtype"] = "bfloat16"
    recipe = ChatSFTRecipe(**config)
    recipe.setup()
    model = recipe.state.model
    assert precision.loaded_dtype(model) == torch.bfloat16
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    recipe.train()
    trainer = recipe.state.trainer
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    states = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert all(p.dtype == torch.float32 for _, p in model.named_parameters() if p.requires_grad)
    seen = {"mlp": [], "head": []}
    inner = model.base_model.model
    handles = [
        inner.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen["mlp"].append(o.dtype)),
        inner.lm_head.register_forward_hook(lambda m, i, o: seen["head"].append(o.dtype)),
    ]
    recipe.evaluate_before_and_after()
    for handle in handles:
        handle.remove()
    assert seen["mlp"] and set(seen["mlp"]) == {torch.bfloat16}  # evaluation computed as training did
    assert seen["head"]
    recipe.save()
    recipe.merge()
    merged = load_file(recipe.folder.merged / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float32}


def test_auto_is_decided_once_printed_and_recorded(tiny_llama_dir, facts_jsonl, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cached_probe", lambda cache=None: probe(90, 200))
    config = tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run", training__max_steps=1)
    config["model"].update(compute_dtype="auto", quantization="4bit")
    recipe = ChatSFTRecipe(**config)
    lines = []
    monkeypatch.setattr(recipe, "_say", lines.append)
    recipe.setup()
    assert any(line.startswith("  compute dtype: bfloat16 (auto: bf16 matmul 2.2x") for line in lines), lines
    assert recipe.state.decisions["model.compute_dtype"] == "bfloat16"
    assert RecipeConfig.from_yaml(recipe.folder.recipe).model.compute_dtype == "bfloat16"
    assert precision.loaded_dtype(recipe.state.model) == torch.bfloat16
    model = recipe.state.model
    inner = model.base_model.model
    logits = []
    handle = inner.lm_head.register_forward_hook(lambda m, i, o: logits.append(o.dtype))
    recipe.evaluate_before_and_after()
    handle.remove()
    assert logits and set(logits) == {torch.float32}  # a quantized base's logits stay float32 (precision.py says why)
