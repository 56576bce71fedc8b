import csv
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from finetune import FinetuneError, RecipeConfig
from finetune.cli import FLAGS, app
from finetune.sweeps import SearchSpace, sweep
from tests.conftest import tiny_recipe

REPO = Path(__file__).resolve().parent.parent

# A learning rate that learns and one that cannot: after the first validation (taken while the warmup step still
# has a learning rate of 0, so every trial scores the same), the useless one trails and must be pruned.
SPACE = {
    "parameters": {"training.learning_rate": {"choices": [0.005, 1.0e-9]}},
    "pruning": {"startup_trials": 1, "first_validation": 1},
}


@pytest.fixture(scope="module")
def swept(tiny_llama_dir, facts_jsonl, tmp_path_factory):
    """Two trials, a trial killed mid-run, then `finetune sweep --trials 3`, which must run exactly one more."""
    root = tmp_path_factory.mktemp("sweep")
    config = tiny_recipe(tiny_llama_dir, facts_jsonl, root / "tiny", training__max_steps=3, training__eval_steps=1)
    recipe_path, space_path = root / "recipe.yaml", root / "space.yaml"
    recipe_path.write_text(yaml.safe_dump(config))
    space_path.write_text(yaml.safe_dump(SPACE))
    first = sweep(RecipeConfig.from_yaml(recipe_path), trials=2, space=space_path)
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{first.sweep_dir / 'study.db'}")
    study.ask()  # what a process killed during a trial leaves behind: a trial forever RUNNING
    resumed = CliRunner().invoke(app, ["sweep", str(recipe_path), "--trials", "3", "--space", str(space_path)])
    assert resumed.exit_code == 0, resumed.output
    return first, resumed, optuna.load_study(study_name="sweep", storage=f"sqlite:///{first.sweep_dir / 'study.db'}")


def test_an_interrupted_sweep_runs_only_the_missing_trials(swept):
    first, resumed, study = swept
    assert first.completed + first.pruned == 2
    assert "2 of 3 trials already finished" in " ".join(resumed.output.split())  # rich wraps long lines
    states = [trial.state for trial in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the killed one, not counted and not retried as such
    assert len(study.trials) == 4 and states[-1] in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def test_trials_whose_validation_loss_trails_are_pruned(swept):
    _, _, study = swept
    pruned = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.PRUNED]
    completed = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    assert pruned, [(t.params, t.state) for t in study.trials]
    assert all(trial.params["training.learning_rate"] == 1e-9 for trial in pruned)
    # Stopped early: fewer steps and validations than a run to the end (3 steps, one validation each).
    assert all(trial.user_attrs["steps"] < 3 and len(trial.intermediate_values) < 3 for trial in pruned)
    assert all(trial.user_attrs["steps"] == 3 and len(trial.intermediate_values) == 3 for trial in completed)


def test_results_table_plots_and_a_best_recipe_that_runs(swept, tmp_path):
    _, _, study = swept
    sweep_dir = swept[0].sweep_dir
    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and rows[0]["state"] == "complete"  # best first
    finished = [float(row["eval_loss"]) for row in rows if row["state"] == "complete"]
    assert float(rows[0]["eval_loss"]) == min(finished) == pytest.approx(study.best_value)
    assert f"| {rows[0]['trial']} | complete |" in (sweep_dir / "results.md").read_text()
    for plot in ("optimization_history.png", "intermediate_values.png"):
        assert (sweep_dir / plot).read_bytes()[:4] == b"\x89PNG"
    assert not list(sweep_dir.glob("trial-*"))  # trial folders are scratch space

    best = RecipeConfig.from_yaml(sweep_dir / "best_recipe.yaml")
    assert best.training.learning_rate == study.best_params["training.learning_rate"] == 0.005
    assert best.name == "tiny-best" and best.evaluation.before_and_after  # the recipe's own settings, not a trial's
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(sweep_dir / "best_recipe.yaml"),
            "--set",
            f"output.dir={tmp_path / 'best'}",
            "--set",
            "output.merge=false",
            "--set",
            "evaluation.generation=false",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "best" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_sweep_folder_refuses_a_different_sweep(swept):
    config = RecipeConfig.from_yaml(swept[0].sweep_dir.parent / "recipe.yaml", ["lora.r=4"])
    with pytest.raises(FinetuneError, match="different recipe.*`out="):
        sweep(config, trials=3, space=SearchSpace.model_validate(SPACE))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("parameters:\n  lora.rank: {choices: [4, 8]}\n", "`lora.rank` is not a recipe key"),
        (
            "parameters:\n  training.learning_rate: {low: 0.01, high: 0.001}\n",
            r"space.yaml:2: `parameters.training.learning_rate`.*low < high",
        ),
        ("parameters:\n  training.learning_rate: {low: 0, high: 0.1, log: true}\n", "log-scale range needs low > 0"),
        ("parameters:\n  lora.dropout: {low: 0, high: 1.5}\n", r"`lora.dropout` = 1.5 makes an invalid recipe"),
        (
            "parameters:\n  lora.r: {low: 0.5, high: 8}\n",
            r"`lora.r` = 0 makes an invalid recipe",
        ),  # integer field: 0.5 -> 0
        ("parameters:\n  training.epochs: {choices: [1, 2]}\n", "no effect while the recipe sets training.max_steps"),
        ("parameters:\n  lora.r: {choices: [4], low: 1}\n", "either `low` and `high`"),
        ("pruning: {patience: 2}\n", r"`pruning.patience`: Extra inputs are not permitted"),
    ],
)
def test_a_bad_space_file_is_refused_before_any_trial(space, message, tmp_path, tiny_llama_dir, facts_jsonl):
    path = tmp_path / "space.yaml"
    path.write_text(space)
    config = RecipeConfig.from_dict(tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run"))
    with pytest.raises(FinetuneError, match=message):
        sweep(config, trials=3, space=path)
    assert not (tmp_path / "run-sweep").exists()


def test_sweep_needs_validation_data_and_a_known_metric(tmp_path, tiny_llama_dir, facts_jsonl):
    config = RecipeConfig.from_dict(
        tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run", data__validation_split=0.0)
    )
    with pytest.raises(FinetuneError, match="validation data"):
        sweep(config, trials=3)
    result = CliRunner().invoke(
        app, ["sweep", str(REPO / "recipes" / "quickstart.yaml"), "--trials", "2", "--metric", "accuracy"]
    )
    assert isinstance(result.exception, FinetuneError)  # finetune.cli.main prints it and exits 2
    assert "--metric accuracy: choose one of eval_loss, perplexity" in result.exception.render(FLAGS)
