"""Experiment trackers (training.report_to): TensorBoard's event files read back after a real run, where each tracker
writes, W&B offline without a key, missing packages stopped before anything loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from finetune import ChatSFTRecipe, FinetuneError, RecipeConfig, preflight
from finetune.trackers import Trackers, missing_packages, summary_values
from tests.conftest import tiny_recipe


def read_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[str]]]:
    """Every scalar (step, value) series and text entry in a TensorBoard log folder, through TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    texts = {
        tag.removesuffix("/text_summary"): [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)]
        for tag in tags["tensors"]
    }
    return scalars, texts


def test_tensorboard_gets_the_losses_the_recipe_and_the_before_after_scores(tiny_llama_dir, facts_jsonl, tmp_path):
    config = tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run", training__report_to=["tensorboard"])
    config["evaluation"]["generation"] = False
    config["output"]["merge"] = False
    result = ChatSFTRecipe(**config).run()

    logs = result.run_dir / "logs" / "tensorboard"
    assert list(logs.glob("events.out.tfevents.*")), "no event files in the run folder's logs/"
    scalars, texts = read_events(logs)
    # transformers' integration: the training loss at each of the 3 steps (logging_steps 1), the validation loss
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
    assert "eval/loss" in scalars
    # finetune's summary: the held-out scores before and after, at the last step, equal to what the run reports
    assert scalars["after/perplexity"] == [(3, pytest.approx(result.metrics_after["perplexity"], rel=1e-5))]
    assert scalars["before/perplexity"] == [(3, pytest.approx(result.metrics_before["perplexity"], rel=1e-5))]
    # the recipe as it ran is the run's config
    recipe_text = texts["recipe"][0]
    logged = yaml.safe_load(recipe_text.removeprefix("```yaml\n").removesuffix("\n```"))
    assert logged == RecipeConfig.from_yaml(result.run_dir / "recipe.yaml").model_dump(mode="json")

    # The run folder and the card say where the logs went.
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert set(metrics["trackers"]) == {"tensorboard"} and "logs/tensorboard" in metrics["trackers"]["tensorboard"]
    assert json.loads((result.run_dir / "run.json").read_text())["trackers"] == metrics["trackers"]
    assert "- tensorboard: " in (result.run_dir / "adapter" / "README.md").read_text()
    # The integration's variables were set for the run only.
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ


def test_no_tracker_by_default_writes_no_logs(tiny_llama_dir, facts_jsonl, tmp_path):
    config = RecipeConfig.from_dict(tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run"))
    assert config.training.report_to == []
    trackers = Trackers.for_run(config, config.run_dir)
    assert trackers.training_arguments()["report_to"] == "none" and not trackers.environment_defaults


def test_report_to_reads_like_transformers():
    def parsed(value):
        return RecipeConfig.from_dict({"training": {"report_to": value}}).training.report_to

    assert parsed("tensorboard") == ["tensorboard"]
    assert parsed("tensorboard,wandb") == ["tensorboard", "wandb"]
    assert parsed("none") == [] and parsed(None) == []
    with pytest.raises(FinetuneError, match="training.report_to.0"):
        parsed(["tensorbord"])


def test_wandb_runs_offline_without_a_key_and_says_how_to_sync(tmp_path):
    config = RecipeConfig.from_dict({"name": "chat", "training": {"report_to": ["wandb", "mlflow", "trackio"]}})
    run_dir = tmp_path / "runs" / "chat"
    offline = Trackers.for_run(config, run_dir, environ={}, home=tmp_path)
    assert offline.environment_defaults["WANDB_MODE"] == "offline"
    assert offline.environment_defaults["WANDB_DIR"] == str(run_dir / "logs")
    assert "wandb sync" in offline.locations["wandb"] and "offline-run-*" in offline.locations["wandb"]
    # MLflow and trackio write into the run folder too: no server unless the user names one.
    assert offline.environment_defaults["MLFLOW_TRACKING_URI"] == (run_dir / "logs" / "mlruns").as_uri()
    assert offline.environment_defaults["TRACKIO_DIR"] == str(run_dir / "logs" / "trackio")

    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password KEY\n")
    logged_in = Trackers.for_run(config, run_dir, environ={}, home=tmp_path)
    assert "WANDB_MODE" not in logged_in.environment_defaults and "(online)" in logged_in.locations["wandb"]
    server = Trackers.for_run(config, run_dir, environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, home=tmp_path)
    assert server.environment_defaults["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_environment_is_set_for_the_block_and_the_users_own_settings_win(tmp_path, monkeypatch):
    config = RecipeConfig.from_dict({"training": {"report_to": ["tensorboard", "wandb"]}})
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    trackers = Trackers.for_run(config, tmp_path / "run", environ={"WANDB_PROJECT": "mine"}, home=tmp_path)
    with trackers.environment():
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str((tmp_path / "run" / "logs" / "tensorboard").absolute())
        assert os.environ["WANDB_PROJECT"] == "mine"
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ and os.environ["WANDB_PROJECT"] == "mine"


def test_a_missing_tracker_package_stops_the_run_before_anything_loads(
    tiny_llama_dir, facts_jsonl, tmp_path, monkeypatch
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    config = RecipeConfig.from_dict(
        tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run", training__report_to=["tensorboard", "wandb"])
    )
    assert missing_packages(config) == [
        "training.report_to: wandb needs the `wandb` package, which is not installed: pip install wandb, or remove "
        "wandb from training.report_to."
    ]
    with pytest.raises(FinetuneError, match="pip install wandb"):
        preflight.preflight(config)
    assert not (tmp_path / "run").exists()


def test_summary_values_name_each_side():
    assert summary_values({"perplexity": 9.0}, {"perplexity": 7.0}) == {
        "after/perplexity": 7.0,
        "before/perplexity": 9.0,
    }
    assert summary_values(None, {"perplexity": 7.0}) == {"after/perplexity": 7.0}
