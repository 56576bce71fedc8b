"""The benchmark harness's arithmetic: ratios, time to the baseline's loss, targets and tables (the runs themselves
are benchmarks, not tests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_speed():
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_speed"] = module
    spec.loader.exec_module(module)
    return module


def run(variant, seconds, tokens, trained, assistant, rss, curve, checkpointing=False):
    return {
        "variant": variant, "train_seconds": seconds, "tokens": tokens, "positions": tokens * 2 if variant == "baseline" else tokens,
        "trained_tokens": trained, "assistant_tokens": assistant, "peak_rss_gib": rss, "peak_cuda_gib": None,
        "gradient_checkpointing": checkpointing, "matmul_params": 1_000_000, "curve": curve,
        "val_loss": curve[-1]["val_loss"], "val_loss_all_tokens": curve[-1]["val_loss"],
    }


def test_ratios_targets_and_time_to_the_baseline_loss(train_speed):
    baseline = train_speed.summarize(run("baseline", 100.0, 5000, 4800, 1500, 4.0, [
        {"step": 0, "train_seconds": 0, "val_loss": 4.0}, {"step": 4, "train_seconds": 50, "val_loss": 3.6},
        {"step": 8, "train_seconds": 100, "val_loss": 3.5}], checkpointing=True), tflops=1.0)
    library = train_speed.summarize(run("library", 25.0, 5000, 1500, 1500, 3.0, [
        {"step": 0, "train_seconds": 0, "val_loss": 4.0}, {"step": 4, "train_seconds": 12, "val_loss": 3.55},
        {"step": 8, "train_seconds": 25, "val_loss": 3.2}]), tflops=1.0)
    assert baseline["padding_share"] == pytest.approx(0.5) and library["padding_share"] == 0
    # utilisation: tokens x FLOPs per token (6 with checkpointing, else 4) x params / time / rate
    assert baseline["utilisation"] == pytest.approx(5000 * 6e6 / 100 / 1e12)
    result = train_speed.compare(baseline, library)
    ratios, targets = result["ratios"], result["targets"]
    assert ratios["wall_time"] == pytest.approx(0.25) and ratios["peak_memory"] == pytest.approx(0.75)
    assert ratios["assistant_tokens_per_s"] == pytest.approx(4.0)
    assert ratios["trained_tokens_per_s"] == pytest.approx(1500 / 25 / (4800 / 100))
    # first validation of (b) at or below (a)'s final 3.5 is at step 8 (25 s): no interpolation
    assert ratios["time_to_baseline_val_loss"] == pytest.approx(0.25)
    assert targets["assistant-reply tokens/s >= 1.5x"] and not targets["loss-carrying tokens/s >= 1.5x"]
    never = train_speed.time_to_reach(library["curve"], 3.0)
    assert never is None


def test_lever_table_has_a_row_per_run_relative_to_all_on(train_speed):
    curve = [{"step": 0, "train_seconds": 0, "val_loss": 4.0}, {"step": 4, "train_seconds": 10, "val_loss": 3.5}]
    entry = {"all levers on": train_speed.summarize(run("library", 10.0, 1000, 300, 300, 3.0, curve), 1.0)}
    for label, _ in train_speed.LEVERS:
        entry[label] = train_speed.summarize(run("library", 15.0, 1000, 300, 300, 3.5, curve), 1.0)
    payload = {
        "machine": {"cpu": "test", "cores": 2, "torch_threads": 2, "memory_gib": 1, "gpu": None, "load_average_1min": 0,
                    "python": "3", "torch": "2", "transformers": "5", "trl": "1"},
        "matmul_tflops": 0.2, "matmul_dtype": "float32", "command": "python benchmarks/train_speed.py --levers",
        "settings": {"model": "m", "lora_r": 16, "steps": 4, "batch_size": 8, "max_length": 256},
        "results": {"none": entry},
    }
    table = train_speed.levers_markdown(payload)
    assert table.count("| 1.50x |") == len(train_speed.LEVERS) and "| all levers on | 10.0 |" in table


def test_child_arguments_drop_the_parents_quantization_list(train_speed):
    argv = ["--steps", "4", "--quantization", "4bit", "none", "--set", "lora.r=8"]
    assert train_speed._without(argv, "--quantization") == ["--steps", "4", "--set", "lora.r=8"]
