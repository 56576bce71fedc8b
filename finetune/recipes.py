"""Recipes compose the stages; they hold no logic a stage should own.

`ChatSFTRecipe.run()` reads top to bottom as the pipeline: load -> attach LoRA -> data -> evaluate before ->
train -> evaluate after -> save adapter -> merge -> report.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from finetune import adapters, data, evaluation, hub, merging, models, training
from finetune.config import RecipeConfig
from finetune.errors import FinetuneError


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    metrics_before: dict[str, float] | None
    metrics_after: dict[str, float] | None
    train_loss: float | None
    merge_max_logit_diff: float | None


class ChatSFTRecipe:
    """Supervised chat fine-tuning with LoRA/QLoRA, loss on assistant tokens only.

    Build it from a YAML file (`from_yaml`), a `RecipeConfig`, or section keyword arguments
    (`ChatSFTRecipe(model={"source": ...}, training={"max_steps": 20})`). Call `run()` for the whole pipeline,
    or `setup()`, `evaluate()`, `train()`, `save()`, `merge()` one at a time.

    Raises:
        FinetuneError: invalid config, missing files, unusable data or a failed merge check, with the fix.
    """

    def __init__(self, config: RecipeConfig | None = None, **sections: Any) -> None:
        if config is not None and sections:
            raise FinetuneError("pass either a RecipeConfig or section keyword arguments, not both.")
        if config is None:
            raw = {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in sections.items()}
            config = RecipeConfig.from_dict(raw, source="ChatSFTRecipe(...)")
        self.config = config
        self.console = Console()
        self.run_dir = config.run_dir
        self.adapter_dir = self.run_dir / "adapter"
        self.merged_dir = self.run_dir / "merged"
        self.merge_report: merging.MergeReport | None = None
        self.metrics_after: dict[str, float] | None = None  # the trained adapter's scores, reused by merge()

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ChatSFTRecipe:
        return cls(RecipeConfig.from_yaml(path, overrides))

    # ------------------------------------------------------------------ stages

    def setup(self) -> None:
        cfg = self.config
        self._claim_run_dir()
        self._say(f"Loading tokenizer and data for [bold]{cfg.model.source}[/bold]")
        self.tokenizer = models.load_tokenizer(cfg.model)
        self.stop_ids = data.end_of_turn_ids(self.tokenizer)
        self.data = data.prepare_data(cfg.data, self.tokenizer)
        for line in self.data.report.lines():
            self._say(f"  {line}")
        self._say(f"Loading model (quantization: {cfg.model.quantization})")
        base = models.load_model(cfg.model)
        models.configure_generation(base, self.tokenizer, self.stop_ids)
        self.model, trainable = adapters.attach_lora(base, cfg.lora, gradient_checkpointing=cfg.training.gradient_checkpointing)
        self._say(f"  LoRA r={cfg.lora.r} alpha={cfg.lora.lora_alpha:g}: {trainable}")
        self.history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "eval_loss": []}
        self.train_loss: float | None = None

    @property
    def heldout_split(self) -> str:
        return "test" if "test" in self.data.splits else "validation"

    def evaluate(self, label: str = "Scoring") -> evaluation.Evaluation:
        heldout = self.data.splits[self.heldout_split]
        return evaluation.score(self.model, self.tokenizer, heldout, self.config.evaluation, label=label)

    def train(self) -> None:
        self._say("Training")
        started = time.perf_counter()
        self.trainer = training.build_trainer(
            self.model,
            self.tokenizer,
            self.data.splits,
            self.config.training,
            self.run_dir / "checkpoints",
            dtype=models.compute_dtype(self.config.model),
        )
        output = self.trainer.train()
        self.train_loss = float(output.training_loss)
        self.train_seconds = time.perf_counter() - started
        self.history = training.loss_history(self.trainer)

    def save(self) -> Path:
        """Adapter weights plus tokenizer (with the exact chat template) and the recipe that made them."""
        self.model.save_pretrained(self.adapter_dir)
        self.tokenizer.save_pretrained(self.adapter_dir)
        self.config.to_yaml(self.run_dir / "recipe.yaml")
        return self.adapter_dir

    def merge(self, strategy: str | None = None, dtype: str | None = None, out_dir: Path | None = None) -> merging.MergeReport:
        """Merge the saved adapter into a full-precision base (see `finetune.merging`)."""
        self._release_training_model()
        self._say("Merging the adapter into a full-precision base")
        heldout = self.data.splits[self.heldout_split]
        heldout = heldout.select(range(min(len(heldout), self.config.evaluation.max_rows or len(heldout))))
        report = merging.merge_adapter(
            self.config.model,
            self.adapter_dir,
            out_dir or self.merged_dir,
            self.tokenizer,
            probes=heldout["input_ids"][:4],
            stop_ids=self.stop_ids,
            heldout=heldout,
            reference_perplexity=self.metrics_after["perplexity"] if self.metrics_after else None,
            strategy=strategy or self.config.output.merge_strategy,
            dtype=dtype or self.config.output.merge_dtype,
        )
        self.merge_report = report
        for candidate, value in report.fidelity.items():
            self._say(f"  held-out perplexity, {candidate.replace('_', ' ')}: {value:.4f}")
        self._say(f"  merged ({report.strategy}, {report.dtype}); largest logit difference vs base+adapter: {report.max_logit_diff:.2e}")
        return report

    def push(self, repo_id: str, **options: Any) -> hub.PushReport:
        """Publish this run's adapter (or merged model, `merged=True`) to the Hub; see `finetune.hub.push`."""
        return hub.push(self.run_dir, repo_id, **options)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> ChatSFTRecipe:
        """Reopen a finished run (its recipe.yaml, tokenizer and data splits) to merge or inspect it again."""
        run_dir = Path(run_dir)
        if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise FinetuneError(f"{run_dir} is not a finished run folder (expected recipe.yaml and adapter/).")
        recipe = cls.from_yaml(run_dir / "recipe.yaml", [f"output.dir={run_dir}"])
        recipe.tokenizer = models.load_tokenizer(recipe.config.model, folder=recipe.adapter_dir)
        recipe.stop_ids = data.end_of_turn_ids(recipe.tokenizer)
        recipe.data = data.prepare_data(recipe.config.data, recipe.tokenizer)  # same seed, same splits
        return recipe

    def cleanup(self) -> None:
        self._release_training_model()
        shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)

    # ------------------------------------------------------------------ pipeline

    def run(self) -> RunResult:
        self.setup()
        before = self.evaluate("Scoring base model") if self.config.evaluation.before_and_after else None
        self.train()
        after = self.evaluate("Scoring fine-tuned model")
        self.metrics_after = after.metrics
        self.save()
        merge_report = self.merge() if self.config.output.merge else None
        if before:
            self.console.print(evaluation.comparison_table(before.metrics, after.metrics))
        result = RunResult(
            run_dir=self.run_dir,
            adapter_dir=self.adapter_dir,
            merged_dir=merge_report.merged_dir if merge_report else None,
            metrics_before=before.metrics if before else None,
            metrics_after=after.metrics,
            train_loss=self.train_loss,
            merge_max_logit_diff=merge_report.max_logit_diff if merge_report else None,
        )
        samples = {"before": before.samples if before else [], "after": after.samples}
        evaluation.write_report(self.run_dir, summary=self._summary(result), history=self.history, samples=samples)
        hub.write_model_card(self.run_dir)
        hub.write_manifest(self.run_dir)
        self.cleanup()
        self._say(f"Done: {self.run_dir} (adapter/ with model card, {'merged/, ' if merge_report else ''}metrics.json, report.md, run.json)")
        return result

    # ------------------------------------------------------------------ helpers

    def _summary(self, result: RunResult) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "base_model": self.config.model.source,
            "quantization": self.config.model.quantization,
            "train_rows": self.data.report.splits.get("train"),
            "heldout_split": self.heldout_split,
            "train_loss": result.train_loss,
            "train_seconds": round(getattr(self, "train_seconds", 0.0), 1),
            "merge_max_logit_diff": result.merge_max_logit_diff,
            "merge_strategy": self.merge_report.strategy if self.merge_report else None,
            "merge_fidelity": self.merge_report.fidelity if self.merge_report else None,
            "metrics_before": result.metrics_before,
            "metrics_after": result.metrics_after,
            "data": self.data.report.lines(),
        }

    def _claim_run_dir(self) -> None:
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not self.config.output.overwrite:
                raise FinetuneError(
                    f"run folder {self.run_dir} already exists. Choose another `name`, or pass --overwrite "
                    "(output.overwrite: true) to replace it."
                )
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _release_training_model(self) -> None:
        for attribute in ("trainer", "model"):
            if hasattr(self, attribute):
                delattr(self, attribute)
        gc.collect()

    def _say(self, message: str) -> None:
        self.console.print(message)
