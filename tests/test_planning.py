"""The memory planner: shapes from configs, the estimate against a measured peak, fit verdicts and suggestions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune import planning
from finetune.cli import app
from finetune.config import RecipeConfig
from finetune.errors import FinetuneError
from tests.conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def smollm2_shape() -> planning.ModelShape:
    from transformers import LlamaConfig

    return planning.ModelShape.from_config(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            tie_word_embeddings=True,
        )
    )


def test_shape_counts_the_published_parameter_counts(tiny_gpt2_dir):
    from transformers import AutoConfig

    assert smollm2_shape().params == pytest.approx(134_515_008, rel=1e-4)  # SmolLM2-135M
    gpt2 = planning.ModelShape.from_config(AutoConfig.from_pretrained(tiny_gpt2_dir))
    assert gpt2.gpt2_like and gpt2.intermediate == 4 * gpt2.hidden
    assert [name for name, _, _ in gpt2.block_linears()] == ["c_attn", "c_proj", "c_fc", "c_proj"]


def test_estimate_matches_a_measured_training_peak(tiny_llama_dir, tmp_path):
    """Train the tiny model in a fresh process (benchmarks/memory_plan.py) and compare its peak RSS."""
    result = tmp_path / "result.json"
    overrides = [
        f"model.source={tiny_llama_dir}",
        "model.quantization=none",
        "lora.r=8",
        "data.max_length=512",
        "training.batch_size=4",
    ]
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "memory_plan.py"),
            "--steps",
            "2",
            "--result",
            str(result),
            "--child",
            *overrides,
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    measured = json.loads(result.read_text())
    # The logits of 2048 positions over a 50k vocabulary dominate this model's activations.
    assert measured["estimate"]["logits"] > measured["estimate"]["activations"]
    assert measured["estimate_gib"] == pytest.approx(measured["measured_gib"], rel=0.25)


def test_checkpointing_and_4bit_shrink_the_estimate():
    shape = smollm2_shape()
    base = RecipeConfig.from_dict({"model": {"quantization": "none"}, "data": {"max_length": 512}})
    parts, _, _ = planning.estimate(shape, planning._resolved(base, checkpointing=False), "cpu")
    checkpointed, _, _ = planning.estimate(shape, planning._resolved(base, checkpointing=True), "cpu")
    quantized, _, _ = planning.estimate(
        shape, planning._resolved(base.with_overrides(["model.quantization=4bit"]), checkpointing=False), "cpu"
    )
    assert checkpointed["activations"] < parts["activations"] / 10
    assert quantized["weights"] < parts["weights"] / 3
    levers_off, _, _ = planning.estimate(
        shape,
        planning._resolved(base, checkpointing=False).with_overrides(["training.skip_untrained_logits=false"]),
        "cpu",
    )
    assert levers_off["logits"] != parts["logits"]


def test_a_plan_that_does_not_fit_names_the_cheapest_change():
    shape = smollm2_shape()
    config = RecipeConfig.from_dict(
        {
            "model": {"quantization": "none"},
            "data": {"max_length": 256},
            "training": {"batch_size": 8, "gradient_accumulation_steps": 1, "gradient_checkpointing": False},
        }
    )
    full = planning.plan(config, "24GB", shape=shape)
    assert full.fits and not full.suggestion
    half = planning.plan(config.with_overrides(["training.batch_size=4"]), "24GB", shape=shape)
    between = f"{(full.total + half.total) / 2 / planning.GiB:.3f}GB"
    tight = planning.plan(config, between, shape=shape)
    assert not tight.fits
    # Halving the micro-batch and doubling accumulation keeps the same training; it comes before anything else.
    assert tight.suggestion == ["training.batch_size=4", "training.gradient_accumulation_steps=2"]
    assert tight.suggestion_total == half.total
    smallest = planning.plan(config.with_overrides(["training.batch_size=1"]), "24GB", shape=shape)
    below = f"{smallest.total * 0.9 / planning.GiB:.3f}GB"
    assert planning.plan(config, below, shape=shape).suggestion[0] == "training.gradient_checkpointing=true"
    hopeless = planning.plan(config, "0.5GB", shape=shape)
    assert not hopeless.fits and not hopeless.suggestion


def test_auto_checkpointing_turns_on_only_when_needed():
    shape = smollm2_shape()
    config = RecipeConfig.from_dict({"model": {"quantization": "4bit"}, "data": {"max_length": 1024}})
    assert config.training.gradient_checkpointing == "auto"
    assert not planning.plan(config, "24GB", shape=shape).settings["checkpointing"]
    assert planning.plan(config, "4GB", shape=shape).settings["checkpointing"]


def test_data_batch_replaces_the_worst_case():
    config = RecipeConfig.from_dict({"training": {"batch_size": 2}, "data": {"max_length": 100}})
    split = {"input_ids": [[1] * 10, [1] * 30, [1] * 20], "labels": [[-100] * 5 + [1] * 5, [-100] * 30, [1] * 20]}
    packed = planning.Batch.from_data(split, config)
    assert (packed.tokens, packed.squared_lengths, packed.trained_share) == (50, 30**2 + 20**2, pytest.approx(20 / 50))
    padded = planning.Batch.from_data(split, config.with_overrides(["training.packing=false"]))
    assert padded.tokens == 60
    assert planning.Batch.worst_case(config).tokens == 200


def test_device_strings():
    assert planning.parse_device("24GB") == ("cuda", 24 * planning.GiB)
    assert planning.parse_device("cpu")[0] == "cpu"
    with pytest.raises(FinetuneError, match="24GB"):
        planning.parse_device("tpu")


def test_cli_plan_prints_the_parts_and_exits_1_when_it_does_not_fit(tiny_llama_dir, facts_jsonl, tmp_path):
    import yaml

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run")))
    runner = CliRunner()
    fits = runner.invoke(app, ["plan", str(recipe), "--device", "24GB"])
    assert fits.exit_code == 0, fits.output
    for part in ("weights", "lora", "gradients", "optimizer", "activations", "logits", "peak"):
        assert part in fits.output
    assert "fits" in fits.output
    short = runner.invoke(app, ["plan", str(recipe), "--device", "0.1GB"])
    assert short.exit_code == 1 and "does NOT fit" in short.output


def _auto(effective: int | None = 16, **training) -> RecipeConfig:
    return RecipeConfig.from_dict(
        {
            "model": {"quantization": "4bit", "compute_dtype": "bfloat16"},
            "data": {"max_length": 1024},
            "training": {"batch_size": "auto", "effective_batch_size": effective, **training},
        }
    )


@pytest.mark.parametrize("device", ["8GB", "12GB", "24GB", "cpu:6GB"])
def test_auto_batch_is_the_largest_that_fits_and_keeps_the_effective_batch(device):
    shape = smollm2_shape()
    config = _auto(gradient_checkpointing=False)
    choice = planning.choose_batch_size(config, device, shape=shape)
    kind, budget = planning.parse_device(device)
    usable = budget * planning.AUTO_BATCH_MEMORY_SHARE

    def peak(size: int) -> int:
        concrete = config.with_overrides({"training.batch_size": size})
        return sum(planning.estimate(shape, concrete, kind)[0].values())

    assert choice.batch_size * choice.gradient_accumulation_steps == 16
    assert peak(choice.batch_size) == choice.estimate <= usable
    larger = [size for size in (2, 4, 8, 16) if size > choice.batch_size]
    assert larger and peak(larger[0]) > usable and choice.larger == (larger[0], peak(larger[0]))
    assert f"{choice.batch_size} conversations per batch x {choice.gradient_accumulation_steps}" in choice.lines()[0]


def test_auto_batch_limits_and_checkpointing():
    shape = smollm2_shape()
    # A big device: the effective batch bounds the batch (no accumulation left); without one, AUTO_BATCH_LIMIT does.
    roomy = planning.choose_batch_size(_auto(), "80GB", shape=shape)
    assert (roomy.batch_size, roomy.gradient_accumulation_steps, roomy.larger) == (16, 1, None)
    unbounded = planning.choose_batch_size(_auto(None, gradient_accumulation_steps=2), "500GB", shape=shape)
    assert (unbounded.batch_size, unbounded.gradient_accumulation_steps) == (planning.AUTO_BATCH_LIMIT, 2)
    # Only divisors of the effective batch are tried, so it is kept exactly.
    odd = planning.choose_batch_size(_auto(12), "24GB", shape=shape)
    assert 12 % odd.batch_size == 0 and odd.batch_size * odd.gradient_accumulation_steps == 12
    # gradient_checkpointing auto: off while any batch fits without it, on when not even one conversation does.
    assert not planning.choose_batch_size(_auto(), "8GB", shape=shape).gradient_checkpointing
    tight = planning.choose_batch_size(_auto(), "3GB", shape=shape)
    assert tight.fits and tight.gradient_checkpointing and tight.batch_size >= 1
    hopeless = planning.choose_batch_size(_auto(), "0.5GB", shape=shape)
    assert not hopeless.fits and hopeless.batch_size == 1 and "may run out of memory" in hopeless.lines()[1]
    # finetune plan shows the choice and plans the batch it made.
    shown = planning.plan(_auto(), "12GB", shape=shape)
    assert shown.notes == planning.choose_batch_size(_auto(), "12GB", shape=shape).lines()


def test_auto_batch_fits_the_measured_peak_of_a_tiny_model(tiny_llama_dir, tmp_path):
    """A CPU budget between the estimates of batches 2 and 4: auto takes 2, and training at 2 (measured in a fresh
    process by benchmarks/memory_plan.py on full-length conversations) peaks within that budget."""
    config = RecipeConfig.from_dict(
        {
            "model": {"source": str(tiny_llama_dir), "quantization": "none"},
            "lora": {"r": 8},
            "data": {"max_length": 512},
            "training": {"batch_size": "auto", "effective_batch_size": 8, "gradient_checkpointing": False},
        }
    )
    shape = planning.model_shape(config)

    def peak(size: int) -> int:
        return sum(planning.estimate(shape, config.with_overrides({"training.batch_size": size}), "cpu")[0].values())

    budget = (peak(2) + peak(4)) / 2 / planning.AUTO_BATCH_MEMORY_SHARE
    choice = planning.choose_batch_size(config, f"cpu:{budget / planning.GiB:.4f}GB", shape=shape)
    assert (choice.batch_size, choice.gradient_accumulation_steps) == (2, 4)

    result = tmp_path / "result.json"
    overrides = [
        f"model.source={tiny_llama_dir}",
        "model.quantization=none",
        "lora.r=8",
        "data.max_length=512",
        "training.batch_size=2",
        "training.gradient_checkpointing=false",
    ]
    command = [sys.executable, str(ROOT / "benchmarks" / "memory_plan.py"), "--steps", "2", "--result", str(result)]
    subprocess.run([*command, "--child", *overrides], check=True, cwd=ROOT, capture_output=True)
    measured = json.loads(result.read_text())
    assert measured["estimate_gib"] * planning.GiB == pytest.approx(choice.estimate, rel=0.02)
    assert measured["measured_gib"] * planning.GiB <= budget
    assert measured["estimate_gib"] == pytest.approx(measured["measured_gib"], rel=0.25)


@pytest.mark.parametrize(
    ("bfloat16_gflops", "quantization", "expected"), [(400, "4bit", 2), (120, "4bit", 4), (400, "none", 4)]
)
def test_auto_compute_dtype_is_planned_as_the_run_decides_it_on_cpu(
    monkeypatch, bfloat16_gflops, quantization, expected
):
    """`finetune plan` with compute_dtype auto on CPU plans the dtype a run picks: bf16 activations for a quantized
    base where the probe finds bf16 fast, float32 where it is slow and for an unquantized base."""
    from finetune import precision
    from tests.test_precision import probe

    monkeypatch.setattr(precision, "cached_probe", lambda cache=None: probe(100, bfloat16_gflops))
    config = RecipeConfig.from_dict({"model": {"quantization": quantization, "compute_dtype": "auto"}})
    auto = planning.plan(config, "cpu", shape=smollm2_shape())
    assert auto.settings["compute_bytes"] == expected
    decided = "bfloat16" if expected == 2 else "float32"
    pinned = planning.plan(config.with_overrides({"model.compute_dtype": decided}), "cpu", shape=smollm2_shape())
    assert auto.total == pinned.total
