"""The run folder: the one place that knows its layout and reads it back.

    runs/NAME/
      recipe.yaml       the exact configuration; written first, so an interrupted run can be resumed
      train_log.jsonl   every training log entry and run event (start, interrupted, resume, finished)
      checkpoints/      resumable checkpoints while training; removed when the run finishes
      adapter/          LoRA weights + tokenizer with the trained chat template (+ README.md, run.json, recipe.yaml)
      merged/           the adapter merged into a full-precision base (+ README.md, run.json, recipe.yaml)
      metrics.json      before/after metrics, loss history, data report; its presence marks a finished run
      report.md         the same as tables, beside loss_curves.png and metrics.png
      run.json          the manifest: versions, hashes of data and weights, recipe, metrics
      logs/             what the experiment trackers of training.report_to wrote (tensorboard/, wandb/, mlruns/, trackio/)
      inspect/          what `finetune data inspect` wrote
      export/           what `finetune export` wrote: model-<quant>.gguf (or adapter.gguf), Modelfile, export.json

Torch-free, so the CLI, the card writer and the planner can read a run without loading a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import RecipeConfig
from finetune.errors import FinetuneError

RECIPE = "recipe.yaml"
MANIFEST = "run.json"
MODEL_CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(folder: Path) -> bool:
    """A peft adapter folder (a run's adapter/, or one saved anywhere else).

    Args:
        folder: Any folder.

    Returns:
        True when `folder` holds an adapter_config.json.
    """
    return (folder / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class RunFolder:
    """One run's folder (runs/NAME/ by default) and the paths of everything in it (the layout above).

    Its properties name the files and folders (`recipe`, `train_log`, `checkpoints`, `adapter`, `merged`, `metrics`,
    `report`, `manifest`, `logs`, `inspect`, `export`, ...); the methods tell what exists and read it back.

    Attributes:
        path: The run folder itself (`output.dir`/`output.run_name` of the recipe).
    """

    path: Path

    @classmethod
    def of(cls, config: RecipeConfig) -> RunFolder:
        """The run folder a configuration writes to.

        Args:
            config: The recipe configuration; its `run_dir` is the folder.

        Returns:
            The RunFolder at `config.run_dir` (it need not exist yet).
        """
        return cls(config.run_dir)

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def logs(self) -> Path:
        """Where the experiment trackers write by default (training.logging_dir unset)."""
        return self.path / "logs"

    @property
    def inspect(self) -> Path:
        return self.path / "inspect"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def modelfile(self) -> Path:
        """The Ollama Modelfile of the newest export."""
        return self.export / "Modelfile"

    @property
    def export_record(self) -> Path:
        """export.json: every GGUF file in export/ with the checks it passed."""
        return self.export / "export.json"

    @property
    def weight_folders(self) -> tuple[Path, Path]:
        """adapter/ and merged/: the folders that are published, each carrying a card, run.json and recipe.yaml."""
        return self.adapter, self.merged

    def has_recipe(self) -> bool:
        """Whether the folder holds recipe.yaml, written first by every run.

        Returns:
            True when recipe.yaml is a file.
        """
        return self.recipe.is_file()

    def has_adapter(self) -> bool:
        """Whether the run saved its adapter (adapter/adapter_config.json exists).

        Returns:
            True when adapter/ is a peft adapter folder.
        """
        return is_adapter(self.adapter)

    def has_merged(self) -> bool:
        """Whether the run has a merged model (merged/config.json exists).

        Returns:
            True when merged/ holds a full model.
        """
        return (self.merged / "config.json").is_file()

    def is_finished(self) -> bool:
        """Whether the run finished: metrics.json is written last.

        Returns:
            True when metrics.json is a file.
        """
        return self.metrics.is_file()

    def read_config(self, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
        """The configuration the run was made with, read from its recipe.yaml.

        Args:
            overrides: `key=value` strings applied on top, as `--set` does on the command line.

        Returns:
            The validated RecipeConfig.

        Raises:
            FinetuneError: The folder has no recipe.yaml (it was not made by `finetune run`), or the recipe or an
                override
                is invalid.
        """
        if not self.has_recipe():
            raise FinetuneError(
                f"{self.path}: no {RECIPE}, so this is not a run folder made by `finetune run`. Pass a folder like runs/NAME."
            )
        return RecipeConfig.from_yaml(self.recipe, overrides)

    def read_metrics(self) -> dict[str, Any]:
        """The run's metrics.json: before/after metrics, loss history and data report.

        Returns:
            The parsed metrics.json.

        Raises:
            FinetuneError: The folder has no metrics.json: the run did not finish.
        """
        if not self.is_finished():
            raise FinetuneError(
                f"{self.path}: no {self.metrics.name}; the run did not finish. Run the recipe again to completion."
            )
        return json.loads(self.metrics.read_text(encoding="utf-8"))

    def require_adapter(self) -> None:
        """A run that got as far as saving its adapter (merging, exporting and publishing start from it).

        Raises:
            FinetuneError: The folder has no recipe.yaml or no adapter/, so it is not a finished run folder.
        """
        if not self.has_recipe() or not self.has_adapter():
            raise FinetuneError(f"{self.path} is not a finished run folder (expected {RECIPE} and adapter/).")
