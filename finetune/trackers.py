"""Experiment trackers (`training.report_to`): training metrics, the recipe and the before/after scores sent to
TensorBoard, Weights & Biases, MLflow or trackio, each through its own transformers integration.

Entry points: `missing_packages(config)` (pre-flight), `Trackers.for_run(config, run_dir)` (where each tracker writes
and whether it is offline), then, around training, `Trackers.environment()` (the variables the integrations read),
`Trackers.callback()` (the recipe as the run's config) and, after evaluation, `Trackers.log_summary(...)`.

Offline by default: nothing leaves the machine unless the user's tracker is set up for a server. TensorBoard, MLflow
(a file store) and trackio (its SQLite database) write into the run folder's logs/; W&B runs in offline mode when no
API key is configured and says how to upload the run later. Variables the user has set themselves (WANDB_MODE,
MLFLOW_TRACKING_URI, ...) win over these defaults.

Torch-free: the packages are imported only when a trainer is built with them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import RecipeConfig
from finetune.run_folder import RunFolder

# The package each tracker's transformers integration imports, and how to install it.
PACKAGES: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
INSTALL: dict[str, str] = {
    "tensorboard": "pip install 'finetune[trackers]' (or pip install tensorboard==2.21.0)",
    "wandb": "pip install wandb",
    "mlflow": "pip install mlflow",
    "trackio": "pip install trackio",
}
# W&B and trackio group runs by project, MLflow by experiment; a run's name is the recipe's name.
PROJECT = "finetune"


def missing_packages(config: RecipeConfig) -> list[str]:
    """The trackers in `training.report_to` whose package is not installed, each worded with its fix.

    Args:
        config: The recipe whose `training.report_to` is checked.

    Returns:
        One message per missing package (empty when every tracker can start), naming the key and the install command.
    """
    return [
        f"training.report_to: {name} needs the `{PACKAGES[name]}` package, which is not installed: {INSTALL[name]}, "
        f"or remove {name} from training.report_to."
        for name in config.training.report_to
        if importlib.util.find_spec(PACKAGES[name]) is None
    ]


def wandb_has_credentials(environ: Mapping[str, str] = os.environ, home: Path | None = None) -> bool:
    """Whether W&B could reach its server as this user: an API key in the environment or from `wandb login`.

    Args:
        environ: The environment to read `WANDB_API_KEY` and `NETRC` from.
        home: The home folder whose `.netrc` `wandb login` writes to; default the user's.

    Returns:
        True when a key is configured, so the run can be online.
    """
    if environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(environ.get("NETRC") or (home or Path.home()) / ".netrc")
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


@dataclass
class Trackers:
    """Where a run's trackers write, and the environment their transformers integrations read.

    Attributes:
        names: The trackers in `training.report_to`, in order (empty: none).
        log_dir: The folder they write into (`training.logging_dir`, default logs/ in the run folder).
        run_name: The run's name in every tracker (the recipe's name).
        environment_defaults: Variables set while a trainer is built and trains and while the summary is logged,
            unless the user has set them already.
        locations: Per tracker, where its logs are and how to read or upload them (recorded in metrics.json,
            run.json and the model card).
    """

    names: list[str]
    log_dir: Path
    run_name: str
    environment_defaults: dict[str, str] = field(default_factory=dict)
    locations: dict[str, str] = field(default_factory=dict)
    _run_ids: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def for_run(
        cls, config: RecipeConfig, run_dir: Path, *, environ: Mapping[str, str] = os.environ, home: Path | None = None
    ) -> Trackers:
        """The trackers of `config`, writing under `run_dir` (or `training.logging_dir`).

        Args:
            config: The recipe (its `training.report_to`, `training.logging_dir` and `name` are read).
            run_dir: The run folder; the default log folder is its logs/.
            environ: The environment, to leave the user's own settings in place.
            home: The home folder `wandb login` writes its key to (tests point it elsewhere).

        Returns:
            The trackers, with the variables to set and where each one's logs will be.
        """
        chosen = config.training.logging_dir
        log_dir = Path(chosen.format(name=config.name)) if chosen else RunFolder(run_dir).logs
        log_dir = log_dir.absolute()  # the integrations may change directory (MLflow, W&B); the logs must not move
        trackers = cls(names=list(config.training.report_to), log_dir=log_dir, run_name=config.name)
        defaults, locations = trackers.environment_defaults, trackers.locations
        for name in trackers.names:
            if name == "tensorboard":
                folder = Path(environ.get("TENSORBOARD_LOGGING_DIR") or log_dir / "tensorboard")
                defaults["TENSORBOARD_LOGGING_DIR"] = str(folder)
                locations[name] = f"{_shown(folder)} (view: tensorboard --logdir {_shown(folder)})"
            elif name == "wandb":
                folder = Path(environ.get("WANDB_DIR") or log_dir) / "wandb"
                defaults.update(WANDB_DIR=str(folder.parent), WANDB_PROJECT=PROJECT)
                # No key, no network: the run is written offline and uploaded later by the user, never refused.
                offline = environ.get("WANDB_MODE", "") in ("offline", "dryrun") or (
                    "WANDB_MODE" not in environ and not wandb_has_credentials(environ, home)
                )
                if offline:
                    defaults["WANDB_MODE"] = "offline"
                    locations[name] = (
                        f"{_shown(folder)} (offline: no W&B API key; upload with `wandb login` then "
                        f"`wandb sync {_shown(folder)}/offline-run-*`)"
                    )
                else:
                    project = environ.get("WANDB_PROJECT", PROJECT)
                    locations[name] = f"W&B project {project} (online), local copy in {_shown(folder)}"
            elif name == "mlflow":
                uri = environ.get("MLFLOW_TRACKING_URI") or (log_dir / "mlruns").as_uri()
                defaults.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME=PROJECT)
                store = _shown(Path(uri.removeprefix("file://")))
                locations[name] = (
                    f"{store} (view: mlflow ui --backend-store-uri {store})" if uri.startswith("file:") else uri
                )
            elif name == "trackio":
                folder = Path(environ.get("TRACKIO_DIR") or log_dir / "trackio")
                defaults["TRACKIO_DIR"] = str(folder)
                locations[name] = (
                    f"{_shown(folder)} (view: TRACKIO_DIR={_shown(folder)} trackio show --project {PROJECT})"
                )
        return trackers

    def training_arguments(self) -> dict[str, Any]:
        """The transformers TrainingArguments that turn the integrations on.

        Returns:
            `report_to` (the tracker names, or "none"), `run_name` and `project` (trackio's project).
        """
        return {"report_to": list(self.names) or "none", "run_name": self.run_name, "project": PROJECT}

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """Set the integrations' variables for the duration of the block, then restore the environment.

        The variables are read when a trainer is built (TensorBoard), when training starts (W&B, MLflow) and when
        trackio is first imported; set for a block, so a sweep's trials each write into their own run folder.

        Yields:
            Nothing; the environment is restored when the block ends.
        """
        saved = {key: os.environ.get(key) for key in self.environment_defaults}
        for key, value in self.environment_defaults.items():
            os.environ.setdefault(key, value)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def callback(self, recipe: Mapping[str, Any]) -> Any:
        """A transformers TrainerCallback that logs `recipe` as each tracker's run config when training starts.

        Args:
            recipe: The recipe as it runs (`RecipeConfig.model_dump(mode="json")`, decisions applied).

        Returns:
            The callback, to pass to the trainer with the others (after the integrations, which it needs started).
        """
        from transformers import TrainerCallback

        trackers = self

        class LogRecipe(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.is_world_process_zero:
                    trackers._log_recipe(recipe)

        return LogRecipe()

    def _log_recipe(self, recipe: Mapping[str, Any]) -> None:
        flat = _flatten(recipe)
        for name in self.names:
            if name == "tensorboard":
                with _summary_writer(self.environment_defaults["TENSORBOARD_LOGGING_DIR"]) as writer:
                    writer.add_text("recipe", "```yaml\n" + _yaml(recipe) + "\n```", 0)
            elif name == "wandb":
                import wandb

                if wandb.run is not None:
                    wandb.config.update({"recipe": dict(recipe)}, allow_val_change=True)
                    self._run_ids["wandb"] = wandb.run.id
            elif name == "mlflow":
                import mlflow

                run = mlflow.active_run()
                if run is not None:
                    self._run_ids["mlflow"] = run.info.run_id
                    # MLflow parameters are immutable strings of at most 6000 characters, 100 per call; prefixed so
                    # none collides with a TrainingArguments parameter the integration logged.
                    items = [(f"recipe.{key}", str(value)[:6000]) for key, value in flat.items()]
                    for start in range(0, len(items), 100):
                        mlflow.log_params(dict(items[start : start + 100]))
            elif name == "trackio":
                import trackio

                trackio.config.update({"recipe": dict(recipe)}, allow_val_change=True)

    def log_summary(self, values: Mapping[str, float], *, step: int) -> None:
        """Send the run's final values (the before/after scores) to every tracker, as summary values.

        TensorBoard gets them as scalars at the last step (W&B: the run summary; MLflow: metrics of the same run;
        trackio: a last log entry), and the runs the integrations left open are closed.

        Args:
            values: Names (e.g. `after/perplexity`) and numbers; values that are not finite numbers are left out.
            step: The optimizer step they belong to (the last one).
        """
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        with self.environment():
            for name in self.names:
                if name == "tensorboard":
                    with _summary_writer(self.environment_defaults["TENSORBOARD_LOGGING_DIR"]) as writer:
                        for key, value in numbers.items():
                            writer.add_scalar(key, value, step)
                        writer.add_text("summary", json.dumps(numbers, indent=1), step)
                elif name == "wandb":
                    import wandb

                    run = wandb.run or (
                        wandb.init(id=self._run_ids["wandb"], resume="must", project=os.environ["WANDB_PROJECT"])
                        if "wandb" in self._run_ids
                        else None
                    )
                    if run is not None:
                        run.summary.update(numbers)
                        run.finish()
                elif name == "mlflow" and "mlflow" in self._run_ids:
                    import mlflow

                    with mlflow.start_run(run_id=self._run_ids["mlflow"]):
                        mlflow.log_metrics({key.replace("/", "."): value for key, value in numbers.items()}, step=step)
                elif name == "trackio":
                    import trackio

                    trackio.init(project=PROJECT, name=self.run_name, resume="allow")
                    trackio.log(numbers, step=step)
                    trackio.finish()


@contextlib.contextmanager
def _summary_writer(folder: str) -> Iterator[Any]:
    # A writer of our own beside the integration's: it appends another event file to the same folder, which
    # TensorBoard reads as one run. The integration closes its writer when training ends, before evaluation.
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=folder)
    try:
        yield writer
    finally:
        writer.close()


def _shown(path: Path) -> str:
    """A path as a person types it here: relative to the working directory when inside it."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _yaml(recipe: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(recipe), sort_keys=False).strip()


def summary_values(metrics_before: Mapping[str, float] | None, metrics_after: Mapping[str, float]) -> dict[str, float]:
    """The before/after scores as tracker summary names: `before/<metric>` and `after/<metric>`.

    Args:
        metrics_before: The base model's held-out scores, or None when it was not scored.
        metrics_after: The trained model's held-out scores.

    Returns:
        One entry per score and side.
    """
    values = {f"after/{key}": value for key, value in metrics_after.items()}
    values.update({f"before/{key}": value for key, value in (metrics_before or {}).items()})
    return values
