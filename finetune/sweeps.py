"""Hyperparameter sweeps: Optuna tries recipe values, each trial a run scored on the validation split.

Entry point: `sweep(config, trials=N, space=..., metric=...)`, also reached as `finetune sweep RECIPE --trials N`.
Each trial is the recipe with sampled values (learning rate, LoRA r/alpha/dropout, epochs, weight decay by default;
any recipe key through a space file), run without before-scoring, generation (unless the metric needs it) or merging. Its validation losses go to a median pruner, which stops a trial that trails
the others at the same point. The score comes from the validation split, never the test split, so the test split
still gives an unbiased before/after for the final run.

The study lives in `SWEEP_DIR/study.db` (SQLite), so a sweep that is interrupted continues where it stopped when
started again with the same recipe, space and metric. Outputs: `results.md`, `results.csv`,
`optimization_history.png`, `intermediate_values.png` and `best_recipe.yaml`, a recipe ready for `finetune run`.
"""

from __future__ import annotations

import csv
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import TrainerCallback

from finetune import evaluation
from finetune.config import RecipeConfig, _key_lines
from finetune.errors import FinetuneError, argument
from finetune.metrics import GENERATION_SCORES, SCORES, lower_is_better
from finetune.recipes import ChatSFTRecipe

# The scores a trial can be ranked by: the Trainer's validation loss, and what `evaluation.score` reports.
METRICS = tuple(name for name in SCORES if name != "loss")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parameter(_Strict):
    """One recipe key to search: a range (`low`, `high`, optionally `log`) or a list of `choices`."""

    low: float | None = Field(None, description="Smallest value of a range.")
    high: float | None = Field(None, description="Largest value of a range.")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates, weight decay).")
    # Optuna stores only these types as parameter values.
    choices: list[bool | int | float | str] | None = Field(None, min_length=1, description="Try only these values.")

    @model_validator(mode="after")
    def _range_or_choices(self) -> Parameter:
        is_range = self.low is not None or self.high is not None
        if is_range == (self.choices is not None):
            raise ValueError("give either `low` and `high` (a range) or `choices` (a list), not both and not neither")
        if is_range:
            if self.low is None or self.high is None or self.low >= self.high:
                raise ValueError(f"a range needs low < high (got low={self.low}, high={self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"a log-scale range needs low > 0 (got {self.low})")
        elif self.log:
            raise ValueError("`log` applies to ranges, not to choices")
        return self


class Pruning(_Strict):
    """The `pruning:` section of a search space: when trials that trail earlier ones are stopped early.

    Every field has its default and description.
    """

    enabled: bool = Field(True, description="Stop trials whose validation loss trails the median of earlier trials.")
    startup_trials: int = Field(
        3, ge=0, description="Trials that always run to the end, to learn what a median run looks like."
    )
    first_validation: int = Field(
        2,
        ge=1,
        description="First validation (1 = the first one) at which a trial may be stopped; the first losses are noisy.",
    )


def _default_parameters() -> dict[str, Parameter]:
    return {
        "training.learning_rate": Parameter(low=1e-5, high=1e-3, log=True),
        "lora.r": Parameter(choices=[8, 16, 32, 64]),
        "lora.alpha": Parameter(choices=[8, 16, 32, 64, 128]),
        "lora.dropout": Parameter(low=0.0, high=0.1),
        "training.epochs": Parameter(choices=[1, 2, 3]),
        "training.weight_decay": Parameter(low=0.0, high=0.1),
    }


class SearchSpace(_Strict):
    """What a sweep varies (`parameters`: dotted recipe key -> range or choices) and how it prunes."""

    parameters: dict[str, Parameter] = Field(default_factory=_default_parameters, min_length=1)
    pruning: Pruning = Field(default_factory=Pruning)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        """Read and validate a search space file (docs/tuning.md).

        Args:
            path: The YAML file: a mapping with `parameters` and optionally `pruning`.

        Returns:
            The SearchSpace.

        Raises:
            FinetuneError: The file does not exist, is not valid YAML or not such a mapping, or a parameter is invalid.
        """
        path = Path(path)
        if not path.is_file():
            raise FinetuneError(f"{argument('space', path)}: file not found.")
        text = path.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise FinetuneError(
                f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML ({getattr(exc, 'problem', exc)})."
            ) from exc
        if not isinstance(raw, dict):
            raise FinetuneError(f"{path}: a search space is a mapping with `parameters` (and optionally `pruning`).")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            lines = _key_lines(text)
            problems = []
            for error in exc.errors():
                dotted = ".".join(str(part) for part in error["loc"])
                where = f"{path}:{lines[dotted]}" if dotted in lines else str(path)
                problems.append(f"{where}: `{dotted or 'space'}`: {error['msg']}.")
            raise FinetuneError("Invalid search space:\n  " + "\n  ".join(problems)) from exc

    def check(self, config: RecipeConfig, source: str) -> None:
        """Fail before any trial runs if a key does not exist, or a value at the edge of its range is invalid.

        Args:
            config: The recipe the trials start from.
            source: What error messages name as the space's origin.

        Raises:
            FinetuneError: A key is not a recipe key, `training.epochs` is searched while the recipe sets
                `training.max_steps`, or a value at a range's edge makes an invalid recipe.
        """
        for key, parameter in self.parameters.items():
            section, _, field = key.partition(".")
            owner = RecipeConfig.model_fields.get(section)
            if not field or owner is None or field not in getattr(owner.annotation, "model_fields", {}):
                raise FinetuneError(
                    f"{source}: `{key}` is not a recipe key. Use `section.key`, e.g. training.learning_rate or lora.r "
                    "(docs/configuration.md lists them all)."
                )
            if key == "training.epochs" and config.training.max_steps:
                raise FinetuneError(
                    f"{source}: `training.epochs` has no effect while the recipe sets training.max_steps "
                    f"({config.training.max_steps}). Remove it from the space, or drop training.max_steps."
                )
            edges = parameter.choices if parameter.choices is not None else [parameter.low, parameter.high]
            for value in edges:
                if parameter.choices is None and _is_int_field(key):
                    value = int(value)
                try:
                    config.with_overrides({key: value}, source="sweep")
                except FinetuneError as exc:
                    raise FinetuneError(f"{source}: `{key}` = {value!r} makes an invalid recipe:\n{exc}") from exc


def _is_int_field(key: str) -> bool:
    """Ranges over integer fields (lora.r, training.max_steps) sample integers."""
    section, _, field = key.partition(".")
    return RecipeConfig.model_fields[section].annotation.model_fields[field].annotation in (int, int | None)


@dataclass
class SweepResult:
    """What `sweep` returns: the best trial and how many ran.

    Attributes:
        sweep_dir: The sweep folder.
        metric: The metric trials were ranked by.
        direction: "minimize" or "maximize".
        best_value: The best trial's metric value.
        best_params: The best trial's searched values, by recipe key.
        best_trial: The best trial's number.
        best_recipe: The recipe file of the best trial, ready to run.
        completed: Trials that finished.
        pruned: Trials stopped early.
    """

    sweep_dir: Path
    metric: str
    direction: str  # "minimize" or "maximize"
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    best_recipe: Path
    completed: int
    pruned: int


class _ReportValidationLoss(TrainerCallback):
    """Report each validation loss to Optuna and stop the trial as soon as the pruner says it trails the others.

    Validations are numbered 1, 2, ... rather than by optimizer step, so trials of different lengths (epochs is
    searched) are compared at the same share of their run: by default a run validates about four times.
    """

    def __init__(self, trial: Any, sign: float) -> None:
        self.trial = trial
        self.sign = sign  # Optuna compares intermediate values in the study's direction; a loss must go down
        self.validations = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        import optuna

        self.validations += 1
        loss = (metrics or {})["eval_loss"]
        self.trial.report(self.sign * loss, step=self.validations)
        if self.trial.should_prune():
            self.trial.set_user_attr("steps", state.global_step)
            raise optuna.TrialPruned(f"validation loss {loss:.4f} at step {state.global_step} trails earlier trials")
        return control


def sweep(
    config: RecipeConfig,
    *,
    trials: int,
    space: SearchSpace | str | Path | None = None,
    metric: str = "eval_loss",
    out: str | Path | None = None,
) -> SweepResult:
    """Run (or continue) an Optuna sweep of `trials` finished trials over `space`, ranked by `metric`.

    Raises:
        FinetuneError: no validation data, an unknown metric or space key, a space value that makes an invalid
            recipe, or a sweep folder that holds a different sweep.

    Args:
        config: The recipe every trial starts from.
        trials: Finished trials wanted (an interrupted sweep counts those already done).
        space: A SearchSpace or its YAML file; None for the default space.
        metric: What ranks trials, on the validation split (e.g. eval_loss, perplexity, rougeL).
        out: The sweep folder; None for the run folder + "-sweep".

    Returns:
        The SweepResult.
    """
    import optuna
    from rich.console import Console

    if trials < 1:
        raise FinetuneError(f"{argument('trials', trials)}: a sweep needs at least one trial.")
    if metric not in METRICS:
        raise FinetuneError(f"{argument('metric', metric)}: choose one of {', '.join(METRICS)}.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FinetuneError(
            "a sweep runs its trials one after another in one process: start it without `accelerate launch`."
        )
    if not (config.data.validation_split or config.data.validation_sources):
        raise FinetuneError(
            "a sweep ranks trials on validation data, and this recipe has none: set data.validation_split > 0 "
            "(e.g. 0.1) or data.validation_sources."
        )
    source = str(space) if isinstance(space, (str, Path)) else "search space"
    if space is None:
        space = SearchSpace()
        if config.training.max_steps:  # epochs would have no effect; the recipe fixes the length of every trial
            space.parameters.pop("training.epochs")
    elif not isinstance(space, SearchSpace):
        space = SearchSpace.from_yaml(space)
    space.check(config, source)

    sweep_dir = Path(out) if out is not None else Path(f"{config.run_dir}-sweep")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    direction = "minimize" if lower_is_better(metric) else "maximize"
    settings = {"metric": metric, "space": space.model_dump(mode="json"), "recipe": config.model_dump(mode="json")}
    with _optuna_warnings_only():  # one line per trial is printed below instead of optuna's own log
        study = optuna.create_study(
            study_name="sweep",
            storage=f"sqlite:///{(sweep_dir / 'study.db').resolve()}",
            load_if_exists=True,
            direction=direction,
            sampler=optuna.samplers.TPESampler(seed=config.training.seed),
            pruner=optuna.pruners.MedianPruner(
                n_startup_trials=space.pruning.startup_trials, n_warmup_steps=space.pruning.first_validation
            )
            if space.pruning.enabled
            else optuna.pruners.NopPruner(),
        )
        _check_same_sweep(study, settings, sweep_dir)
        console = Console()
        finished = _finished(study)
        if finished:
            console.print(f"Continuing the sweep in {sweep_dir}: {len(finished)} of {trials} trials already finished.")
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # Left RUNNING by a process that was killed; nothing else writes to this sweep folder.
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
            console.print(f"Trial {stale.number} was cut off by the interruption: recorded as failed, not counted.")

        def objective(trial: optuna.Trial) -> float:
            values = {}
            for key, parameter in space.parameters.items():
                if parameter.choices is not None:
                    values[key] = trial.suggest_categorical(key, parameter.choices)
                elif _is_int_field(key):
                    values[key] = trial.suggest_int(key, int(parameter.low), int(parameter.high), log=parameter.log)
                else:
                    values[key] = trial.suggest_float(key, parameter.low, parameter.high, log=parameter.log)
            shown = ", ".join(
                f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in values.items()
            )
            console.rule(f"Trial {trial.number}: {shown}")
            value = _run_trial(
                config,
                values,
                metric,
                trial,
                sweep_dir / f"trial-{trial.number:03d}",
                sign=1.0 if direction == "minimize" else -1.0,
            )
            console.print(f"Trial {trial.number}: {metric} = {value:.4g}")
            return value

        remaining = trials - len(finished)
        if remaining > 0:
            study.optimize(objective, n_trials=remaining, catch=())
        return _write_outputs(study, config, metric, sweep_dir, console)


def _run_trial(
    config: RecipeConfig, values: dict[str, Any], metric: str, trial: Any, trial_dir: Path, *, sign: float
) -> float:
    # A short run: nothing scored before training, no generation unless the metric needs it, no merge.
    trial_config = config.with_overrides(
        {
            **values,
            "name": f"{config.name}-trial-{trial.number}",
            "output.dir": str(trial_dir),
            "output.overwrite": True,
            "output.merge": False,
            "evaluation.before_and_after": False,
            "evaluation.generation": metric in GENERATION_SCORES,
        },
        source="sweep",
    )
    recipe = ChatSFTRecipe(trial_config)
    try:
        recipe.setup()
        if "validation" not in recipe.data.splits:
            raise FinetuneError(
                "the data left no validation rows to rank trials on: raise data.validation_split or add data.validation_sources."
            )
        pruning = _ReportValidationLoss(trial, sign)
        trained = recipe.train(callbacks=[pruning])
        trial.set_user_attr("train_seconds", round(trained.seconds, 1))
        trial.set_user_attr("steps", recipe.trainer.state.global_step)
        if metric == "eval_loss":
            recipe.trainer.remove_callback(pruning)  # the final score is not one of the intermediate values
            return float(recipe.trainer.evaluate()["eval_loss"])
        validation = recipe.data.splits["validation"]
        return float(
            evaluation.score(
                recipe.model, recipe.tokenizer, validation, trial_config.evaluation, label="Scoring"
            ).metrics[metric]
        )
    finally:
        recipe.cleanup()
        shutil.rmtree(trial_dir, ignore_errors=True)  # the trial's value lives in the study; its weights are not kept


@contextmanager
def _optuna_warnings_only() -> Iterator[None]:
    """Optuna's log level lowered for the sweep only: the caller's process gets its own setting back."""
    import optuna

    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def _finished(study: Any) -> list[Any]:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


def _check_same_sweep(study: Any, settings: dict[str, Any], sweep_dir: Path) -> None:
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
        return
    changed = [name for name in ("metric", "space", "recipe") if stored.get(name) != settings[name]]
    if changed:
        raise FinetuneError(
            f"{sweep_dir} holds a sweep with a different {' and '.join(changed)}, so its trials cannot be compared with "
            f"new ones. Choose another folder ({argument('out', 'FOLDER')}), or delete {sweep_dir} to start over."
        )


def _write_outputs(study: Any, config: RecipeConfig, metric: str, sweep_dir: Path, console: Any) -> SweepResult:
    import optuna

    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        raise FinetuneError(
            f"no trial of the sweep in {sweep_dir} finished (all were pruned or failed), so there is no best one."
        )
    best = study.best_trial
    best_config = config.with_overrides({**best.params, "name": f"{config.name}-best"}, source="sweep")
    if "{name}" not in config.output.dir:  # a fixed folder: keep the best run beside it, not over it
        best_config = best_config.with_overrides({"output.dir": f"{config.output.dir}-best"}, source="sweep")
    best_recipe = sweep_dir / "best_recipe.yaml"
    header = (
        f"# Best of {len(completed)} finished trials of the sweep in {sweep_dir}: {metric} = {best.value:.6g} (trial {best.number}).\n"
        f"# Run it with: finetune run {best_recipe}\n"
    )
    best_recipe.write_text(header + yaml.safe_dump(best_config.model_dump(mode="json"), sort_keys=False))

    keys = list(dict.fromkeys(key for trial in study.trials for key in trial.params))
    rows = _table_rows(study, metric, keys)
    with (sweep_dir / "results.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)  # full precision; the Markdown table rounds

    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    header_row, *body = rows
    lines = [
        f"# Sweep: {config.name}",
        "",
        f"Best: trial {best.number}, {metric} = {best.value:.6g} ({study.direction.name.lower()}). "
        f"Ready recipe: [best_recipe.yaml](best_recipe.yaml).",
        "",
        "| " + " | ".join(header_row) + " |",
        "|" + "---|" * len(header_row),
        *("| " + " | ".join(cell(value) for value in row) + " |" for row in body),
        "",
        "![optimization history](optimization_history.png)",
        "",
        "![validation loss per trial](intermediate_values.png)",
        "",
    ]
    (sweep_dir / "results.md").write_text("\n".join(lines))
    _plot(study, metric, sweep_dir)
    pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
    console.print(
        f"Best of {len(completed)} finished trials ({pruned} pruned): trial {best.number}, {metric} = {best.value:.4g}\n"
        f"  {', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in best.params.items())}\n"
        f"Written: {sweep_dir}/results.md, results.csv, optimization_history.png, intermediate_values.png, best_recipe.yaml"
    )
    return SweepResult(
        sweep_dir=sweep_dir,
        metric=metric,
        direction=study.direction.name.lower(),
        best_value=float(best.value),
        best_params=dict(best.params),
        best_trial=best.number,
        best_recipe=best_recipe,
        completed=len(completed),
        pruned=pruned,
    )


def _table_rows(study: Any, metric: str, keys: list[str]) -> list[list[Any]]:
    """One row per trial, best first: finished trials by score, then pruned ones, then failed ones."""
    import optuna

    order = {optuna.trial.TrialState.COMPLETE: 0, optuna.trial.TrialState.PRUNED: 1}
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1

    def rank(trial: Any) -> tuple[int, float]:
        return order.get(trial.state, 2), sign * trial.value if trial.value is not None else 0.0

    rows: list[list[Any]] = [
        ["trial", "state", metric, *keys, "validations", "last_validation_loss", "steps", "seconds"]
    ]
    for trial in sorted(study.trials, key=rank):
        seconds = round(trial.duration.total_seconds(), 1) if trial.duration else None
        reported = trial.intermediate_values
        last_loss = sign * reported[max(reported)] if reported else None  # undo the pruner's sign for maximized metrics
        rows.append(
            [
                trial.number,
                trial.state.name.lower(),
                trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None,
                *(trial.params.get(key) for key in keys),
                len(reported),
                last_loss,
                trial.user_attrs.get("steps"),
                seconds,
            ]
        )
    return rows


def _plot(study: Any, metric: str, sweep_dir: Path) -> None:
    import matplotlib.pyplot as plt  # optuna draws with pyplot; savefig works on whatever backend the user has
    import optuna
    from optuna.visualization.matplotlib import plot_intermediate_values, plot_optimization_history

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", optuna.exceptions.ExperimentalWarning
        )  # the matplotlib backend is "experimental"
        for name, plot in (
            ("optimization_history", plot_optimization_history),
            ("intermediate_values", plot_intermediate_values),
        ):
            axes = plot(study)
            if name == "optimization_history":
                axes.set_ylabel(f"{metric} (validation split)")
            else:
                axes.set_title("Validation loss during each trial")
                axes.set_xlabel("validation (1 = first)")
                minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
                axes.set_ylabel("validation loss" if minimize else "-(validation loss), as reported to the pruner")
            axes.figure.set_size_inches(7, 4.5)
            axes.figure.tight_layout()
            axes.figure.savefig(sweep_dir / f"{name}.png", dpi=100)
            plt.close(axes.figure)
