"""Recipes compose the stages; they hold no logic a stage should own.

`ChatSFTRecipe.run()` reads top to bottom as the pipeline: load -> attach LoRA -> data -> train -> evaluate
(before and after, on the same rows) -> save adapter -> merge -> report.
"""

from __future__ import annotations

import gc
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers import TrainerCallback, set_seed

from finetune import (
    adapters,
    atomic,
    data,
    distributed,
    evaluation,
    export,
    hub,
    merging,
    models,
    planning,
    preflight,
    safety,
    training,
)
from finetune.config import ExportFormat, RecipeConfig, choices
from finetune.errors import FinetuneError, Interrupted, argument
from finetune.run_folder import RunFolder

# Settings that may change between an interrupted run and its resume: they do not touch what training computes.
_RESUME_MAY_CHANGE = ("name", "output.", "evaluation.", "data.num_proc", "training.save_total_limit")


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
    or `setup()`, `evaluate()`, `train()`, `save()`, `merge()` one at a time; `export()` writes GGUF for llama.cpp.

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
        self.folder = RunFolder.of(config)
        self.merge_report: merging.MergeReport | None = None
        self.metrics_after: dict[str, float] | None = None  # the trained adapter's scores, reused by merge()
        self.evaluated_rows: int | None = None  # how many held-out conversations they cover

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ChatSFTRecipe:
        return cls(RecipeConfig.from_yaml(path, overrides))

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    # ------------------------------------------------------------------ stages

    def setup(self, resume: bool = False) -> None:
        """Pre-flight checks, run folder, tokenizer, data, model and LoRA. `resume=True` continues the run in the
        run folder from its newest complete checkpoint instead of starting one (see `run`)."""
        cfg = self.config
        distributed.init()  # joins the process group of `accelerate launch` / `torchrun`, if any
        for finding in preflight.preflight(cfg):  # blocking problems raise here, before anything is loaded or written
            self._say(f"  pre-flight {finding.message}" + ("" if finding.ok else " [yellow](not checked)[/yellow]"))
        self.resume_from: Path | None = None
        if resume:
            self.resume_from = distributed.on_main(self._resume_point)
        else:
            distributed.on_main(
                lambda: self._claim_run_dir(replace=False)
            )  # refuse early; an old run is replaced only once the data has proved usable
        self._say(f"Loading tokenizer and data for [bold]{cfg.model.source}[/bold]")
        self.tokenizer = models.load_tokenizer(cfg.model)
        self.stop_ids = data.end_of_turn_ids(self.tokenizer)
        self.data = data.prepare_data(cfg.data, self.tokenizer)
        if not resume:
            distributed.on_main(self._claim_run_dir)
        self._open_log(resume)
        for line in self.data.report.lines():
            self._say(f"  {line}")
        for finding in self.data.report.findings:  # serious ones already stopped the run unless data.audit is 'warn'
            if finding.level in ("warning", "serious"):
                self._say(f"  [yellow]audit {finding.level}[/yellow] {finding.check}: {finding.message}")
        self._say(f"Loading model (quantization: {cfg.model.quantization})")
        base = models.load_model(cfg.model)
        models.configure_generation(base, self.tokenizer, self.stop_ids)
        set_seed(cfg.training.seed)  # LoRA's initial weights (and new tokens' embedding rows): same seed, same run
        self.new_tokens = models.fit_vocabulary(base, self.tokenizer)
        if self.new_tokens:
            self._say(
                f"  added tokens {', '.join(self.tokenizer.convert_ids_to_tokens(self.new_tokens))}: embedding rows trained with LoRA"
            )
        if cfg.training.gradient_checkpointing == "auto":
            needed, memory = planning.needs_checkpointing(
                cfg, train=self.data.splits["train"], added_tokens=len(self.new_tokens)
            )
            cfg.training.gradient_checkpointing = needed  # recipe.yaml records what ran
            self._say(f"  memory plan: {memory.summary()}; gradient checkpointing {'on' if needed else 'off'}")
        self.model, trainable = adapters.attach_lora(
            base, cfg.lora, gradient_checkpointing=cfg.training.gradient_checkpointing, new_tokens=self.new_tokens
        )
        self._say(f"  LoRA r={cfg.lora.r} alpha={cfg.lora.lora_alpha:g}: {trainable}")
        self.history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "eval_loss": []}
        self.train_loss: float | None = None

    @property
    def heldout_split(self) -> str:
        return "test" if "test" in self.data.splits else "validation"

    def evaluate(self, label: str = "Scoring") -> evaluation.Evaluation:
        """Score the model as it is now on the held-out split (no time budget)."""
        heldout = self.data.splits[self.heldout_split]
        return evaluation.score(self.model, self.tokenizer, heldout, self.config.evaluation, label=label)

    def evaluate_before_and_after(self) -> evaluation.Comparison:
        """After training: the trained model and its base (adapters off) on the same held-out conversations, within
        evaluation.time_share of the training time (see `finetune.evaluation.before_and_after`)."""
        train_seconds = getattr(self, "train_seconds", None)
        cfg = self.config.evaluation
        comparison = evaluation.before_and_after(
            self.model,
            self.tokenizer,
            self.data.splits[self.heldout_split],
            cfg,
            train_seconds=train_seconds,
            # A harmless request the model was trained to answer says nothing about over-refusal: left out.
            safety_prompts=safety.safety_prompts(cfg, exclude=self._trained_user_turns()) if cfg.safety else None,
            system_prompt=self.config.data.system_prompt,
        )
        self.comparison = comparison
        self.metrics_after = comparison.after.metrics
        self.evaluated_rows = len(comparison.rows)
        for line in comparison.lines(train_seconds, self.config.evaluation.time_share):
            self._say(f"  {line}")
        return comparison

    def _trained_user_turns(self) -> list[str]:
        return [
            message["content"]
            for messages in self.data.splits["train"]["messages"]
            for message in messages
            if message["role"] == "user" and message["content"]
        ]

    def train(self, callbacks: Sequence[TrainerCallback] = ()) -> None:
        """Train, saving a checkpoint every `training.save_steps`. SIGINT/SIGTERM saves one more and raises
        `Interrupted`; a NaN/inf loss raises `NonFiniteLoss` before the bad step reaches the weights.
        `callbacks` are extra transformers TrainerCallbacks (a sweep's pruning hook)."""
        resume_from = getattr(self, "resume_from", None)
        self._say(f"Training (resuming from {resume_from})" if resume_from else "Training")
        started = time.perf_counter()
        stop = training.StopOnSignal()
        self.trainer = training.build_trainer(
            self.model,
            self.tokenizer,
            self.data.splits,
            self.config.training,
            self.folder.checkpoints,
            dtype=models.compute_dtype(self.config.model),
            callbacks=[stop, self.log, *callbacks],
        )
        try:
            with stop:
                output = self.trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except training.NonFiniteLoss as exc:
            self.log.event("stopped", reason="non-finite loss", step=self.trainer.state.global_step)
            raise exc from None
        if stop.signal is not None:
            self._interrupted(stop.signal)
        # After a resume, the trainer's own mean covers only the steps run in this process.
        self.train_loss = training.logged_train_loss(self.trainer) if resume_from else float(output.training_loss)
        self.train_seconds = time.perf_counter() - started
        self.history = training.loss_history(self.trainer)

    def save(self) -> Path:
        """Adapter weights plus tokenizer (with the exact chat template), replacing any previous adapter/ at once.
        Only the main process writes; in a multi-process run the others wait until it has."""
        state_dict = None
        if distributed.weights_sharded() and hasattr(self, "trainer"):
            # FSDP / DeepSpeed ZeRO-3 slices are put back together first, by every process at once.
            state_dict = self.trainer.accelerator.get_state_dict(self.trainer.model_wrapped)
        return distributed.on_main(lambda: self._write_adapter(state_dict))

    def _write_adapter(self, state_dict: dict[str, Any] | None) -> Path:
        with atomic.replacing_dir(self.folder.adapter) as partial:
            # The trained rows of added tokens are in the adapter; peft would otherwise add the whole resized embedding.
            self.model.save_pretrained(partial, state_dict=state_dict, save_embedding_layers=False)
            self.tokenizer.save_pretrained(partial)
        return self.folder.adapter

    def merge(
        self, strategy: str | None = None, dtype: str | None = None, out_dir: Path | None = None
    ) -> merging.MergeReport:
        """Merge the saved adapter into a full-precision base (see `finetune.merging`). Merging a finished run into
        its own merged/ again also updates its metrics.json, report, model cards and run.json to the new weights."""
        self._release_training_model()
        self._say("Merging the adapter into a full-precision base")
        started = time.perf_counter()
        heldout = self.data.splits[self.heldout_split]
        # The rows the run scored, so the adapter's own perplexity is comparable with the merged candidates'.
        rows = self.evaluated_rows or self.config.evaluation.max_rows or len(heldout)
        heldout = heldout.select(range(min(len(heldout), rows)))
        report = distributed.on_main(
            lambda: merging.merge_adapter(
                self.config.model,
                self.folder.adapter,
                out_dir or self.folder.merged,
                self.tokenizer,
                probes=heldout["input_ids"][:4],
                stop_ids=self.stop_ids,
                heldout=heldout,
                reference_perplexity=self.metrics_after["perplexity"] if self.metrics_after else None,
                strategy=strategy or self.config.output.merge_strategy,
                select=self.config.output.merge_select,
                dtype=dtype or self.config.output.merge_dtype,
            )
        )  # one merged copy, written by the main process
        self.merge_report = report
        self.merge_seconds = time.perf_counter() - started
        for candidate, value in report.fidelity.items():
            self._say(f"  held-out perplexity, {candidate.replace('_', ' ')}: {value:.4f}")
        self._say(f"  kept {report.reason}")
        self._say(
            f"  merged ({report.strategy}, {report.dtype}) in {self.merge_seconds:.1f} s; largest logit difference vs "
            f"base+adapter: {report.max_logit_diff:.2e}"
        )
        if out_dir is None and self.folder.is_finished():
            distributed.on_main(lambda: self._record_merge(report))
        return report

    def export(
        self, format: str = "gguf", quant: str = "f16", adapter_only: bool = False, check_rows: int = 3
    ) -> export.ExportResult:
        """Export the merged model (or with `adapter_only` the LoRA adapter) for llama.cpp, Ollama and LM Studio,
        verified on `check_rows` held-out conversations before it is kept (see `finetune.export`)."""
        if format not in choices(ExportFormat):
            raise FinetuneError(
                f"{argument('format', format)}: unknown export format; choose one of {', '.join(choices(ExportFormat))}."
            )
        replies = evaluation.reply_prompts(self.data.splits[self.heldout_split])
        conversations = [m for m, tools in replies if not tools and len(m) > 1 and m[-1]["role"] == "assistant"]
        prompts = [data.render_prompt(self.tokenizer, messages[:-1]) for messages in conversations[:check_rows]]
        self._say(
            f"Exporting {'the adapter' if adapter_only else 'the merged model'} as GGUF ({quant}), checked on {len(prompts)} held-out prompts"
        )
        result = export.export_gguf(
            self.folder,
            self.config.model,
            self.tokenizer,
            prompts,
            stop_ids=self.stop_ids,
            quant=quant,
            adapter_only=adapter_only,
            system_prompt=self.config.data.system_prompt,
        )
        for line in result.lines():
            self._say(f"  {line}")
        return result

    def push(self, repo_id: str, **options: Any) -> hub.PushReport:
        """Publish this run's adapter (or merged model, `merged=True`) to the Hub; see `finetune.hub.push`."""
        return distributed.on_main(lambda: hub.push(self.run_dir, repo_id, **options))

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> ChatSFTRecipe:
        """Reopen a finished run (its recipe.yaml, tokenizer and data splits) to merge or inspect it again."""
        folder = RunFolder(Path(run_dir))
        folder.require_adapter()
        recipe = cls(folder.read_config({"output.dir": str(folder.path)}))
        recipe.tokenizer = models.load_tokenizer(recipe.config.model, folder=folder.adapter)
        recipe.stop_ids = data.end_of_turn_ids(recipe.tokenizer)
        recipe.data = data.prepare_data(recipe.config.data, recipe.tokenizer)  # same seed, same splits
        if folder.is_finished():  # the rows it scored and the adapter's score on them: a merge compares against these
            metrics = folder.read_metrics()
            recipe.evaluated_rows = metrics.get("evaluation_rows")
            recipe.metrics_after = metrics.get("metrics_after") if recipe.evaluated_rows else None
        return recipe

    def cleanup(self) -> None:
        self._release_training_model()
        distributed.on_main(lambda: shutil.rmtree(self.folder.checkpoints, ignore_errors=True))

    # ------------------------------------------------------------------ pipeline

    def run(self, resume: bool = False) -> RunResult:
        """The whole pipeline. `resume=True` continues an interrupted run of this recipe in its run folder from
        the newest complete checkpoint, with the same data order and the same final weights as an uninterrupted
        run; it refuses a recipe that differs from the run's in anything that changes training."""
        self.setup(resume=resume)
        self.train()
        comparison = self.evaluate_before_and_after()
        before, after = comparison.before, comparison.after
        self.save()
        merge_report = self.merge() if self.config.output.merge else None
        if before:
            self._say(evaluation.comparison_table(comparison.changes))
            for warning in safety.warnings(comparison.changes):  # again, below the table, where it is read
                self._say(f"[bold red]{warning}[/bold red]")
        result = RunResult(
            run_dir=self.run_dir,
            adapter_dir=self.folder.adapter,
            merged_dir=merge_report.merged_dir if merge_report else None,
            metrics_before=before.metrics if before else None,
            metrics_after=after.metrics,
            train_loss=self.train_loss,
            merge_max_logit_diff=merge_report.max_logit_diff if merge_report else None,
        )
        samples = {"before": before.samples if before else [], "after": after.samples}
        if comparison.safety_prompts:
            samples["safety"] = comparison.safety_samples()
        distributed.on_main(lambda: self._write_report(result, samples))
        self.log.event("finished")
        self.cleanup()
        self._say(
            f"Done: {self.run_dir} (adapter/ with model card, {'merged/, ' if merge_report else ''}metrics.json, report.md, run.json)"
        )
        return result

    # ------------------------------------------------------------------ helpers

    def _write_report(self, result: RunResult, samples: dict[str, list[dict[str, str]]]) -> None:
        evaluation.write_report(self.run_dir, summary=self._summary(result), history=self.history, samples=samples)
        self._write_card_and_manifest()

    def _record_merge(self, report: merging.MergeReport) -> None:
        """A finished run merged again: metrics.json, report, cards and run.json describe the new merged/."""
        summary = self.folder.read_metrics()
        history, samples = summary.pop("history", {}), summary.pop("samples", {})
        summary.update(
            merge_strategy=report.strategy,
            merge_reason=report.reason,
            merge_max_logit_diff=report.max_logit_diff,
            merge_fidelity=report.fidelity,
        )
        evaluation.write_report(self.run_dir, summary=summary, history=history, samples=samples)
        self._write_card_and_manifest()

    def _write_card_and_manifest(self) -> None:
        hub.write_model_card(self.run_dir)
        hub.write_manifest(self.run_dir)

    def _summary(self, result: RunResult) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "base_model": self.config.model.source,
            "quantization": self.config.model.quantization,
            "train_rows": self.data.report.splits.get("train"),
            "added_tokens": self.tokenizer.convert_ids_to_tokens(getattr(self, "new_tokens", [])),
            "heldout_split": self.heldout_split,
            "train_loss": result.train_loss,
            "train_seconds": round(getattr(self, "train_seconds", 0.0), 1),
            **self.comparison.summary(getattr(self, "train_seconds", None)),
            "merge_seconds": round(getattr(self, "merge_seconds", 0.0), 1) if self.merge_report else None,
            "merge_max_logit_diff": result.merge_max_logit_diff,
            "merge_strategy": self.merge_report.strategy if self.merge_report else None,
            "merge_reason": self.merge_report.reason if self.merge_report else None,
            "merge_fidelity": self.merge_report.fidelity if self.merge_report else None,
            "metrics_before": result.metrics_before,
            "metrics_after": result.metrics_after,
            "data": self.data.report.lines(),
            "data_audit": [finding.__dict__ for finding in self.data.report.findings],
        }

    def _claim_run_dir(self, replace: bool = True) -> None:
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not self.config.output.overwrite:
                raise FinetuneError(
                    f"run folder {self.run_dir} already exists. Choose another `name`, or set output.overwrite: true "
                    f"({argument('overwrite')}) to replace it."
                )
            if not replace:
                return
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _resume_point(self) -> Path | None:
        """Check that this recipe may continue the run in its folder; the newest complete checkpoint, if any."""
        resume = argument("resume")
        saved_path = self.folder.recipe
        if not saved_path.is_file():
            raise FinetuneError(
                f"{resume}: {self.run_dir} holds no run to resume (no recipe.yaml there). Start it without {resume}."
            )
        saved = RecipeConfig.from_yaml(saved_path)
        changed = _training_differences(saved, self.config)
        if changed:
            raise FinetuneError(
                f"{resume}: this recipe differs from the one that started {self.run_dir}, in settings that change "
                "what training computes (a resumed run must end exactly where the uninterrupted one would):\n  "
                + "\n  ".join(changed)
                + f"\nResume with the run's own recipe ({saved_path}), or start a new run: another `name`, or "
                "output.overwrite: true."
            )
        found = training.find_checkpoints(self.folder.checkpoints)
        for folder in found.incomplete:  # cut short by a crash: never loaded, and in the way of the resumed saves
            self._say(f"  ignoring incomplete checkpoint {folder.name} (the process died while writing it); removed")
            shutil.rmtree(folder)
        if found.latest is not None:
            self._say(f"  resuming from {found.latest} (step {found.step})")
        elif self.folder.is_finished():
            raise FinetuneError(
                f"{resume}: the run in {self.run_dir} already finished (metrics.json written, checkpoints removed); "
                "there is nothing to resume. To train it again, set output.overwrite: true."
            )
        else:
            self._say("  no complete checkpoint yet (the run stopped before its first one): training starts at step 0")
        return found.latest

    def _open_log(self, resume: bool) -> None:
        """recipe.yaml (so a killed run can be resumed) and train_log.jsonl, which a resumed run appends to."""
        distributed.on_main(lambda: self.config.to_yaml(self.folder.recipe))
        self.log = training.RunLog(self.folder.train_log)
        fingerprint = training.data_fingerprint(self.data.splits["train"])
        if resume:
            started = next((e for e in self.log.events() if e["event"] == "start"), None)
            if started is not None and started.get("train_sha256") != fingerprint:
                raise FinetuneError(
                    f"{argument('resume')}: the training data differ from those the run in {self.run_dir} started "
                    "with (the data files changed since), so resuming would not continue the same run. Restore the "
                    "data, or start again with output.overwrite: true."
                )
        self.log.event(
            "resume" if resume else "start",
            checkpoint=str(self.resume_from) if self.resume_from else None,
            train_rows=len(self.data.splits["train"]),
            train_sha256=fingerprint,
        )

    def _interrupted(self, received: signal.Signals) -> None:
        step = self.trainer.state.global_step
        saved = training.find_checkpoints(self.folder.checkpoints).latest
        self.log.event("interrupted", signal=received.name, step=step, checkpoint=str(saved))
        raise Interrupted(
            f"{received.name} received: training stopped after step {step} of {self.trainer.state.max_steps} and saved "
            f"{saved}. Resume it with the run's own recipe, {self.folder.recipe}, and {argument('resume')}.",
            exit_code=128 + received.value,
        )

    def _release_training_model(self) -> None:
        for attribute in ("trainer", "model"):
            if hasattr(self, attribute):
                delattr(self, attribute)
        gc.collect()

    def _say(self, message: Any) -> None:
        if distributed.is_main():  # one console log, however many processes run
            self.console.print(message)


def _training_differences(saved: RecipeConfig, current: RecipeConfig) -> list[str]:
    """`key: run value -> this value` for each setting that differs and changes what training computes."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    before, after = flat(saved.model_dump(mode="json")), flat(current.model_dump(mode="json"))
    keys = sorted(set(before) | set(after))
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in keys
        if before.get(key) != after.get(key) and not key.startswith(_RESUME_MAY_CHANGE)
    ]
