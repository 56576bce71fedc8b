"""Recipes compose the stages; they hold no logic a stage should own.

`ChatSFTRecipe.run()` reads top to bottom as the pipeline: load -> attach LoRA -> data -> train -> evaluate
(before and after, on the same rows) -> save adapter -> merge -> report.

What the stages produce lives in one declared place, `RecipeState`: each field is None until the stage that fills it
has run, and a stage called too early says which one to call first.
"""

from __future__ import annotations

import gc
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftModel
from rich.console import Console
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, set_seed

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
    precision,
    preflight,
    safety,
    trackers,
    training,
)
from finetune.config import PAIRED_METHODS, ExportFormat, RecipeConfig, choices
from finetune.data.preference import add_refusal_pairs, prepare_preferences
from finetune.errors import FinetuneError, Interrupted, argument
from finetune.run_folder import RunFolder, is_adapter
from finetune.training import preference as preference_training

# Settings that may change between an interrupted run and its resume: they do not touch what training computes.
_RESUME_MAY_CHANGE = (
    "name",
    "output.",
    "evaluation.",
    "data.num_proc",
    "training.save_total_limit",
    "training.report_to",
    "training.logging_dir",
)


@dataclass
class RunResult:
    """What `Recipe.run()` returns: where the run's outputs are, and its scores before and after training.

    Attributes:
        run_dir: The run folder.
        adapter_dir: The saved adapter (run_dir/adapter).
        merged_dir: The merged model, or None when `output.merge` is off.
        metrics_before: The base model's held-out metrics, or None without `evaluation.before_and_after`.
        metrics_after: The trained model's held-out metrics.
        train_loss: Mean training loss, or None when none was logged.
        merge_max_logit_diff: Largest logit difference between the merged model and base + adapter; None unmerged.
        decisions: What `auto` settings became (e.g. "training.batch_size": 8).
    """

    run_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    metrics_before: dict[str, float] | None
    metrics_after: dict[str, float] | None
    train_loss: float | None
    merge_max_logit_diff: float | None
    # What `auto` settings became: gradient checkpointing, the batch size and its accumulation steps.
    decisions: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunInputs:
    """What every later stage reads: the tokenizer (chat template included), its end-of-turn ids, the prepared data,
    and the ids of tokens training added to the vocabulary (trained beside LoRA)."""

    tokenizer: PreTrainedTokenizerBase
    stop_ids: list[int]
    data: data.PreparedData
    new_tokens: list[int] = field(default_factory=list)

    @property
    def heldout_split(self) -> str:
        return "test" if "test" in self.data.splits else "validation"

    @property
    def heldout(self) -> Any:
        return self.data.splits[self.heldout_split]


@dataclass
class TrainingOutcome:
    """What `Recipe.train()` returns.

    Attributes:
        loss: Mean training loss (after a resume: over the logged steps of the whole run); None when none was logged.
        seconds: Wall-clock seconds training took.
        history: "train_loss" and "eval_loss" -> (optimizer step, value) points.
    """

    loss: float | None  # mean training loss (after a resume: over the logged steps of the whole run)
    seconds: float
    history: dict[str, list[tuple[int, float]]]  # train_loss and eval_loss by optimizer step


@dataclass
class RecipeState:
    """Everything a recipe's stages have produced; each field stays None until its stage has run."""

    inputs: RunInputs | None = None  # setup(), or from_run_dir()
    model: PeftModel | None = None  # setup(); merge() and cleanup() release it, a later stage reloads it from adapter/
    log: training.RunLog | None = None  # setup()
    resume_from: Path | None = None  # setup(resume=True): the checkpoint training continues from
    decisions: dict[str, Any] = field(default_factory=dict)  # setup(): what `auto` settings became
    trackers: trackers.Trackers | None = None  # setup(): where training.report_to's trackers write
    trainer: Trainer | None = None  # train()
    training: TrainingOutcome | None = None  # train()
    reference_cache: preference_training.ReferenceCache | None = None  # train(): dpo/kto's scores of cached mode
    comparison: evaluation.Comparison | None = None  # evaluate_before_and_after()
    recorded: dict[str, Any] | None = None  # from_run_dir(): the finished run's metrics.json
    merge: merging.MergeReport | None = None  # merge()
    merge_seconds: float | None = None  # merge()


class Recipe:
    """A LoRA/QLoRA fine-tuning recipe: the stages every method shares. `ChatSFTRecipe` trains on conversations,
    `PreferenceRecipe` on preferences; `Recipe.from_yaml(...)`, `Recipe(config)`'s subclasses and `finetune run`
    pick the one the recipe's `method` names.

    Build it from a YAML file (`from_yaml`), a `RecipeConfig`, or section keyword arguments
    (`ChatSFTRecipe(model={"source": ...}, training={"max_steps": 20})`). Call `run()` for the whole pipeline, or the
    stages one at a time: `setup()` first, then `train()`, `evaluate_before_and_after()`, `save()`, `merge()`, in
    that order; `evaluate()`, `save()`, `export()` and `push()` also work after `merge()` (the trained adapter is
    loaded again from adapter/ when the training model was released). `from_run_dir()` reopens a finished run.

    Args:
        config: The recipe's configuration; the recipe works on a copy of it.
        sections: Instead of `config`, its sections as keyword arguments (model=, lora=, data=, training=, ...), each
            a dict or a section model.

    Raises:
        FinetuneError: invalid config, missing files, unusable data, a stage called before the one it needs, or a
            failed merge check, with the fix. When built: both `config` and sections given, or a `method` this class
            does not train.
    """

    METHODS: tuple[str, ...] = ()  # the `method` values a subclass trains

    def __init__(self, config: RecipeConfig | None = None, **sections: Any) -> None:
        if config is not None and sections:
            raise FinetuneError("pass either a RecipeConfig or section keyword arguments, not both.")
        if config is None:
            raw = {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in sections.items()}
            config = RecipeConfig.from_dict(raw, source=f"{type(self).__name__}(...)")
        if config.method not in self.METHODS:
            raise FinetuneError(
                f"method `{config.method}` is trained by {recipe_class(config.method).__name__}, not "
                f"{type(self).__name__}: use that class, or finetune.Recipe.from_yaml / finetune run, which pick it."
            )
        # A copy: decisions (an `auto` made concrete) are applied to the recipe's config, never to the caller's.
        self.config = config.model_copy(deep=True)
        self.console = Console()
        self.folder = RunFolder.of(config)
        self.state = RecipeState()

    @classmethod
    def for_config(cls, config: RecipeConfig) -> Recipe:
        """The recipe that trains `config.method` (this class itself, when it is a concrete one).

        Args:
            config: The recipe configuration.

        Returns:
            A recipe of the class that trains its method, built on it.
        """
        return (recipe_class(config.method) if cls is Recipe else cls)(config)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """The recipe a YAML file describes, of the class its `method` names.

        Args:
            path: The YAML recipe file.
            overrides: `section.key=value` strings applied on top (as `--set` does).

        Returns:
            The recipe (nothing run yet).

        Raises:
            FinetuneError: The file is missing or invalid, an override is malformed, or the method is not this class's.
        """
        return cls.for_config(RecipeConfig.from_yaml(path, overrides))

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> Recipe:
        """Reopen a finished run (its recipe.yaml, tokenizer and data splits) to merge, evaluate or export it again;
        the trained adapter is loaded from adapter/ when a stage needs the model.

        Args:
            run_dir: The run folder (runs/NAME).

        Returns:
            The recipe with its tokenizer and data prepared (the same splits, by the same seed).

        Raises:
            FinetuneError: The folder has no recipe.yaml or adapter/, or its data cannot be prepared again.
        """
        folder = RunFolder(Path(run_dir))
        folder.require_adapter()
        recipe = cls.for_config(folder.read_config({"output.dir": str(folder.path)}))
        tokenizer = models.load_tokenizer(recipe.config.model, folder=folder.adapter)
        recipe.state.inputs = RunInputs(
            tokenizer=tokenizer,
            stop_ids=data.end_of_turn_ids(tokenizer),
            data=recipe._prepare_data(tokenizer),  # same seed, same splits
        )
        if folder.is_finished():  # the rows it scored and the adapter's score on them: a merge compares against these
            recipe.state.recorded = folder.read_metrics()
        return recipe

    # ------------------------------------------------------------------ what a method changes

    def _prepare_data(self, tokenizer: PreTrainedTokenizerBase, *, enforce_audit: bool = True) -> data.PreparedData:
        raise NotImplementedError

    def _build_trainer(
        self, inputs: RunInputs, callbacks: list[TrainerCallback], reporting: dict[str, Any] | None
    ) -> Trainer:
        raise NotImplementedError

    # ------------------------------------------------------------------ what the stages produced

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._inputs("tokenizer").tokenizer

    @property
    def stop_ids(self) -> list[int]:
        return self._inputs("stop_ids").stop_ids

    @property
    def data(self) -> data.PreparedData:
        return self._inputs("data").data

    @property
    def new_tokens(self) -> list[int]:
        return self._inputs("new_tokens").new_tokens

    @property
    def heldout_split(self) -> str:
        return self._inputs("heldout_split").heldout_split

    @property
    def model(self) -> PeftModel:
        """The model with its adapter: the one being trained, or after merge() (or in a reopened run) the trained
        adapter loaded again from adapter/ over the base as training saw it."""
        if self.state.model is None:
            inputs = self._inputs("model")
            if not self.folder.has_adapter():
                raise FinetuneError("there is no model yet: call setup() first.")
            self._say(f"Loading the trained adapter from {self.folder.adapter}")
            base = models.load_model(self.config.model)
            models.configure_generation(base, inputs.tokenizer, inputs.stop_ids)
            self.state.model = adapters.load_trained(base, inputs.tokenizer, self.folder.adapter)
        return self.state.model

    @property
    def trainer(self) -> Trainer:
        if self.state.trainer is None:
            raise FinetuneError("there is no trainer yet: call train() first.")
        return self.state.trainer

    @property
    def merge_report(self) -> merging.MergeReport | None:
        return self.state.merge

    @property
    def evaluated_rows(self) -> int | None:
        """How many held-out conversations the before/after scores cover (this run's, or a reopened run's)."""
        if self.state.comparison is not None:
            return len(self.state.comparison.rows)
        return (self.state.recorded or {}).get("evaluation_rows")

    @property
    def metrics_after(self) -> dict[str, float] | None:
        """The trained adapter's held-out scores, which a merge compares its candidates with."""
        if self.state.comparison is not None:
            return self.state.comparison.after.metrics
        recorded = self.state.recorded or {}
        return recorded.get("metrics_after") if recorded.get("evaluation_rows") else None

    # ------------------------------------------------------------------ stages

    def setup(self, resume: bool = False) -> None:
        """Pre-flight checks, run folder, tokenizer, data, model and LoRA. `resume=True` continues the run in the
        run folder from its newest complete checkpoint instead of starting one (see `run`).

        With `training.batch_size: auto` or `training.gradient_checkpointing: auto`, the memory planner decides them
        here
        (`RunResult.decisions`).

        Args:
            resume: Whether to continue the run in the run folder instead of starting a new one.

        Raises:
            FinetuneError: A pre-flight check fails, the run folder exists (without `output.overwrite`), there is
                nothing
                to resume or the recipe differs from the run's, or the model or data cannot be loaded.
        """
        cfg = self.config
        distributed.init()  # joins the process group of `accelerate launch` / `torchrun`, if any
        for finding in preflight.preflight(cfg):  # blocking problems raise here, before anything is loaded or written
            self._say(f"  pre-flight {finding.message}" + ("" if finding.ok else " [yellow](not checked)[/yellow]"))
        self.state = RecipeState()
        if resume:
            self.state.resume_from = distributed.on_main(self._resume_point)
        else:
            # Refuse early; an old run is replaced only once the data has proved usable.
            distributed.on_main(lambda: self._claim_run_dir(replace=False))
        self._say(f"Loading tokenizer and data for [bold]{cfg.model.source}[/bold]")
        tokenizer = models.load_tokenizer(cfg.model)
        inputs = RunInputs(
            tokenizer=tokenizer, stop_ids=data.end_of_turn_ids(tokenizer), data=self._prepare_data(tokenizer)
        )
        if not resume:
            distributed.on_main(self._claim_run_dir)
        self.state.log = self._open_log(inputs, resume)
        self.state.trackers = trackers.Trackers.for_run(cfg, self.run_dir)
        for name, where in self.state.trackers.locations.items():
            self._say(f"  {name}: {where}")
        for line in inputs.data.report.lines():
            self._say(f"  {line}")
        for finding in inputs.data.report.findings:  # serious ones already stopped the run unless data.audit is 'warn'
            if finding.level in ("warning", "serious"):
                self._say(f"  [yellow]audit {finding.level}[/yellow] {finding.check}: {finding.message}")
        self._say(f"Loading model (quantization: {cfg.model.quantization})")
        choice = precision.choose_compute_dtype(cfg.model.compute_dtype, quantization=cfg.model.quantization)
        if cfg.model.compute_dtype == "auto":
            self._decide("model.compute_dtype", choice.name)
        self._say(f"  compute dtype: {choice.name} ({choice.reason})")
        cfg = self.config
        base = models.load_model(cfg.model)
        models.configure_generation(base, tokenizer, inputs.stop_ids)
        set_seed(cfg.training.seed)  # LoRA's initial weights (and new tokens' embedding rows): same seed, same run
        inputs.new_tokens = models.fit_vocabulary(base, tokenizer)
        if inputs.new_tokens:
            added = ", ".join(tokenizer.convert_ids_to_tokens(inputs.new_tokens))
            self._say(f"  added tokens {added}: embedding rows trained with LoRA")
        if cfg.training.batch_size == "auto":
            # The largest batch that fits (accumulation keeping effective_batch_size), checkpointing with it if auto.
            choice = planning.choose_batch_size(
                cfg, train=inputs.data.splits["train"], added_tokens=len(inputs.new_tokens)
            )
            self._decide("training.batch_size", choice.batch_size)
            self._decide("training.gradient_accumulation_steps", choice.gradient_accumulation_steps)
            if cfg.training.gradient_checkpointing == "auto":
                self._decide("training.gradient_checkpointing", choice.gradient_checkpointing)
            for line in choice.lines():
                self._say(f"  {line}")
        elif cfg.training.gradient_checkpointing == "auto":
            memory = planning.plan_without_checkpointing(
                cfg, train=inputs.data.splits["train"], added_tokens=len(inputs.new_tokens)
            )
            needed = not memory.fits  # checkpointing only where training does not fit without it
            self._decide("training.gradient_checkpointing", needed)
            self._say(f"  memory plan: {memory.summary()}; gradient checkpointing {'on' if needed else 'off'}")
        continued = self._continued_adapter()
        self.state.model = adapters.attach_lora(
            base,
            self.config.lora,
            gradient_checkpointing=self.config.training.gradient_checkpointing,
            new_tokens=inputs.new_tokens,
            continue_from=continued,
        )
        if continued is not None and not preference_training.uses_reference(self.config.method):
            adapters.keep_reference(self.state.model)  # DPO's and KTO's trainers make this copy themselves
        self.state.inputs = inputs
        trainable = adapters.trainable_parameters(self.state.model)
        if continued is None:
            self._say(f"  LoRA r={cfg.lora.r} alpha={cfg.lora.lora_alpha:g}: {trainable}")
        else:
            self._say(
                f"  continuing the adapter in {continued} ({trainable}); a frozen copy is the model before training"
            )

    def train(self, callbacks: Sequence[TrainerCallback] = ()) -> TrainingOutcome:
        """Train, saving a checkpoint every `training.save_steps`. SIGINT/SIGTERM saves one more and raises
        `Interrupted`; a NaN/inf loss raises `NonFiniteLoss` before the bad step reaches the weights.
        `callbacks` are extra transformers TrainerCallbacks (a sweep's pruning hook).

        Args:
            callbacks: Extra transformers TrainerCallbacks.

        Returns:
            TrainingOutcome: mean loss, seconds, loss history.

        Raises:
            FinetuneError: setup() was not called first.
            Interrupted: SIGINT or SIGTERM stopped training after a checkpoint was saved (exit code 130 / 143).
            NonFiniteLoss: The loss became NaN or infinite.
        """
        inputs = self._inputs("train")
        if self.state.model is None or self.state.log is None:
            raise FinetuneError("train() needs the model setup() attaches LoRA to: call setup() first.")
        resume_from = self.state.resume_from
        self._say(f"Training (resuming from {resume_from})" if resume_from else "Training")
        started = time.perf_counter()
        stop = training.StopOnSignal()
        tracked = self.state.trackers or trackers.Trackers.for_run(self.config, self.run_dir)
        extra = [stop, self.state.log, *callbacks]
        if tracked.names:  # the recipe as it runs (decisions applied) becomes each tracker's run config
            extra.insert(2, tracked.callback(self.config.model_dump(mode="json")))
        try:
            with tracked.environment(), stop:
                trainer = self.state.trainer = self._build_trainer(inputs, extra, tracked.training_arguments())
                output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except training.NonFiniteLoss:
            self.state.log.event("stopped", reason="non-finite loss", step=trainer.state.global_step)
            raise
        if stop.signal is not None:
            self._interrupted(stop.signal)
        self.state.training = TrainingOutcome(
            # After a resume, the trainer's own mean covers only the steps run in this process.
            loss=training.logged_train_loss(trainer) if resume_from else float(output.training_loss),
            seconds=time.perf_counter() - started,
            history=training.loss_history(trainer),
        )
        return self.state.training

    def evaluate(self, label: str = "Scoring") -> evaluation.Evaluation:
        """Score the model as it is now on the held-out split (no time budget).

        Args:
            label: The progress bar's label.

        Returns:
            The Evaluation.

        Raises:
            FinetuneError: setup() was not called first (or the run was not reopened with `from_run_dir`).
        """
        inputs = self._inputs("evaluate")
        return evaluation.score(self.model, inputs.tokenizer, inputs.heldout, self.config.evaluation, label=label)

    def evaluate_before_and_after(self) -> evaluation.Comparison:
        """The trained model and its base (adapters off) on the same held-out conversations, within
        evaluation.time_share of the training time (see `finetune.evaluation.before_and_after`)."""
        inputs = self._inputs("evaluate_before_and_after")
        train_seconds = self.state.training.seconds if self.state.training else None
        cfg = self.config.evaluation
        comparison = evaluation.before_and_after(
            self.model,
            inputs.tokenizer,
            inputs.heldout,
            cfg,
            train_seconds=train_seconds,
            # A harmless request the model was trained to answer says nothing about over-refusal: left out.
            safety_prompts=safety.safety_prompts(cfg, exclude=self._trained_user_turns()) if cfg.safety else None,
            system_prompt=self.config.data.system_prompt,
        )
        self.state.comparison = comparison
        for line in comparison.lines(train_seconds, self.config.evaluation.time_share):
            self._say(f"  {line}")
        tracked = self.state.trackers
        if tracked is not None and tracked.names:
            values = trackers.summary_values(
                comparison.before.metrics if comparison.before else None, comparison.after.metrics
            )
            step = self.state.trainer.state.global_step if self.state.trainer is not None else 0
            distributed.on_main(lambda: tracked.log_summary(values, step=step))
        return comparison

    def _trained_user_turns(self) -> list[str]:
        return [
            message["content"]
            for messages in self._inputs("evaluation").data.splits["train"]["messages"]
            for message in messages
            if message["role"] == "user" and message["content"]
        ]

    def save(self) -> Path:
        """Adapter weights plus tokenizer (with the exact chat template), replacing any previous adapter/ at once.
        Only the main process writes; in a multi-process run the others wait until it has."""
        inputs = self._inputs("save")
        model = self.model
        state_dict = None
        if distributed.weights_sharded() and self.state.trainer is not None:
            # FSDP / DeepSpeed ZeRO-3 slices are put back together first, by every process at once.
            state_dict = self.state.trainer.accelerator.get_state_dict(self.state.trainer.model_wrapped)

        def write() -> Path:
            with atomic.replacing_dir(self.folder.adapter) as partial:
                # The trained rows of added tokens are in the adapter; peft would otherwise add the whole embedding.
                model.save_pretrained(
                    partial, state_dict=state_dict, save_embedding_layers=False, selected_adapters=["default"]
                )
                inputs.tokenizer.save_pretrained(partial)
            return self.folder.adapter

        return distributed.on_main(write)

    def merge(
        self, strategy: str | None = None, dtype: str | None = None, out_dir: Path | None = None
    ) -> merging.MergeReport:
        """Merge the saved adapter into a full-precision base (see `finetune.merging`). The training model is
        released first to make room. Merging a finished run into its own merged/ again also updates its
        metrics.json, report, model cards and run.json to the new weights.

        Args:
            strategy: The base to merge into ("auto", "full_precision", "nf4_roundtrip"); None for
                `output.merge_strategy`.
            dtype: The merged weights' dtype ("auto", "float32", "bfloat16", "float16"); None for `output.merge_dtype`.
            out_dir: Where to write the merged model; None for the run's merged/.

        Returns:
            The MergeReport: folder, strategy, dtype, the check against base + adapter.

        Raises:
            FinetuneError: setup() was not called first (or the run was not reopened with `from_run_dir`), there is no
                saved
                adapter, or the merged model fails its check.
        """
        inputs = self._inputs("merge")
        self.folder.require_adapter()
        self._release_training_model()
        self._say("Merging the adapter into a full-precision base")
        started = time.perf_counter()
        # The rows the run scored, so the adapter's own perplexity is comparable with the merged candidates'.
        heldout = inputs.heldout
        rows = self.evaluated_rows or self.config.evaluation.max_rows or len(heldout)
        heldout = heldout.select(range(min(len(heldout), rows)))
        after = self.metrics_after
        report = distributed.on_main(
            lambda: merging.merge_adapter(
                self.config.model,
                self.folder.adapter,
                out_dir or self.folder.merged,
                inputs.tokenizer,
                probes=heldout["input_ids"][:4],
                stop_ids=inputs.stop_ids,
                heldout=heldout,
                reference_perplexity=after["perplexity"] if after else None,
                strategy=strategy or self.config.output.merge_strategy,
                select=self.config.output.merge_select,
                dtype=dtype or self.config.output.merge_dtype,
            )
        )  # one merged copy, written by the main process
        self.state.merge = report
        self.state.merge_seconds = time.perf_counter() - started
        for candidate, value in report.fidelity.items():
            self._say(f"  held-out perplexity, {candidate.replace('_', ' ')}: {value:.4f}")
        self._say(f"  kept {report.reason}")
        self._say(
            f"  merged ({report.strategy}, {report.dtype}) in {self.state.merge_seconds:.1f} s; largest logit "
            f"difference vs base+adapter: {report.max_logit_diff:.2e}"
        )
        if out_dir is None and self.folder.is_finished():
            distributed.on_main(lambda: self._record_merge(report))
        return report

    def export(
        self, format: str = "gguf", quant: str = "f16", adapter_only: bool = False, check_rows: int = 3
    ) -> export.ExportResult:
        """Export the merged model (or with `adapter_only` the LoRA adapter) for llama.cpp, Ollama and LM Studio,
        verified on `check_rows` held-out conversations before it is kept (see `finetune.export`).

        Args:
            format: The export format; only "gguf".
            quant: The GGUF weight type (f16, bf16, q8_0, ..., q4_0; see ExportQuant).
            adapter_only: Whether to write the LoRA adapter as a llama.cpp LoRA GGUF instead of the merged model.
            check_rows: How many held-out prompts the exported file must answer as the model does.

        Returns:
            The ExportResult: the files written and the checks they passed.

        Raises:
            FinetuneError: `format` is unknown, setup() was not called first, or the export fails or its check does.
        """
        if format not in choices(ExportFormat):
            raise FinetuneError(
                f"{argument('format', format)}: unknown export format; choose one of {', '.join(choices(ExportFormat))}."
            )
        inputs = self._inputs("export")
        replies = evaluation.reply_prompts(inputs.heldout)
        conversations = [m for m, tools in replies if not tools and len(m) > 1 and m[-1]["role"] == "assistant"]
        prompts = [data.render_prompt(inputs.tokenizer, messages[:-1]) for messages in conversations[:check_rows]]
        what = "the adapter" if adapter_only else "the merged model"
        self._say(f"Exporting {what} as GGUF ({quant}), checked on {len(prompts)} held-out prompts")
        result = export.export_gguf(
            self.folder,
            self.config.model,
            inputs.tokenizer,
            prompts,
            stop_ids=inputs.stop_ids,
            quant=quant,
            adapter_only=adapter_only,
            system_prompt=self.config.data.system_prompt,
        )
        for line in result.lines():
            self._say(f"  {line}")
        return result

    def push(self, repo_id: str, **options: Any) -> hub.PushReport:
        """Publish this run's adapter (or merged model, `merged=True`) to the Hub; see `finetune.hub.push`.

        Args:
            repo_id: The Hub repository ("user/name").
            options: More keyword arguments of `finetune.hub.push` (private, merged, dry_run, revision, ...).

        Returns:
            The PushReport.

        Raises:
            FinetuneError: The run cannot be published as asked (see `finetune.hub.push`).
        """
        return distributed.on_main(lambda: hub.push(self.run_dir, repo_id, **options))

    def cleanup(self) -> None:
        """Release the training model and remove the run's checkpoints (a finished run needs neither)."""
        self._release_training_model()
        distributed.on_main(lambda: shutil.rmtree(self.folder.checkpoints, ignore_errors=True))

    # ------------------------------------------------------------------ pipeline

    def run(self, resume: bool = False) -> RunResult:
        """The whole pipeline. `resume=True` continues an interrupted run of this recipe in its run folder from
        the newest complete checkpoint, with the same data order and the same final weights as an uninterrupted
        run; it refuses a recipe that differs from the run's in anything that changes training.

        Args:
            resume: Whether to continue an interrupted run instead of starting one.

        Returns:
            RunResult: folders, scores before and after, and the decisions taken.

        Raises:
            FinetuneError: Any stage's problem (see `setup`, `train`, `merge`), with the fix.
        """
        self.setup(resume=resume)
        trained = self.train()
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
            train_loss=trained.loss,
            merge_max_logit_diff=merge_report.max_logit_diff if merge_report else None,
            decisions=dict(self.state.decisions),
        )
        samples = {"before": before.samples if before else [], "after": after.samples}
        if comparison.safety_prompts:
            samples["safety"] = comparison.safety_samples()
        distributed.on_main(lambda: self._write_report(result, samples))
        self.state.log.event("finished")
        self.cleanup()
        merged = "merged/, " if merge_report else ""
        self._say(f"Done: {self.run_dir} (adapter/ with model card, {merged}metrics.json, report.md, run.json)")
        return result

    # ------------------------------------------------------------------ helpers

    def _continued_adapter(self) -> Path | None:
        """The trained adapter model.adapter names (a run folder or an adapter folder), or None for a fresh one."""
        named = self.config.model.adapter
        if named is None:
            return None
        folder = Path(named).expanduser()
        run = RunFolder(folder)
        if run.has_adapter():
            return run.adapter
        if is_adapter(folder):
            return folder
        raise FinetuneError(
            f"model.adapter `{named}`: no trained adapter there (no adapter_config.json, nor a run folder with "
            "adapter/). Give the run folder of a finished run (runs/NAME) or its adapter/ folder."
        )

    def _inputs(self, stage: str) -> RunInputs:
        if self.state.inputs is None:
            raise FinetuneError(
                f"{stage} needs the tokenizer and data: call setup() first (or reopen a finished run with "
                "ChatSFTRecipe.from_run_dir(run_dir))."
            )
        return self.state.inputs

    def _decide(self, key: str, value: Any) -> None:
        """An `auto` setting made concrete: applied to this recipe's config (never the caller's), written into the
        run's recipe.yaml (what ran), and returned in RunResult.decisions."""
        self.config = self.config.with_overrides({key: value}, source="a decision of the recipe")
        self.state.decisions[key] = value
        distributed.on_main(lambda: self.config.to_yaml(self.folder.recipe))

    def _write_report(self, result: RunResult, samples: dict[str, list[dict[str, str]]]) -> None:
        history = self.state.training.history if self.state.training else {}
        evaluation.write_report(self.run_dir, summary=self._summary(result), history=history, samples=samples)
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
        inputs, state = self._inputs("the report"), self.state
        train_seconds = state.training.seconds if state.training else None
        merge = state.merge
        return {
            "name": self.config.name,
            "method": self.config.method,
            "base_model": self.config.model.source,
            "continued_adapter": self.config.model.adapter,
            "quantization": self.config.model.quantization,
            "train_rows": inputs.data.report.splits.get("train"),
            "added_tokens": inputs.tokenizer.convert_ids_to_tokens(inputs.new_tokens),
            "heldout_split": inputs.heldout_split,
            "train_loss": result.train_loss,
            "train_seconds": round(train_seconds or 0.0, 1),
            "decisions": result.decisions,
            "trackers": dict(state.trackers.locations) if state.trackers else {},
            **(state.comparison.summary(train_seconds) if state.comparison else {}),
            "merge_seconds": round(state.merge_seconds or 0.0, 1) if merge else None,
            "merge_max_logit_diff": result.merge_max_logit_diff,
            "merge_strategy": merge.strategy if merge else None,
            "merge_reason": merge.reason if merge else None,
            "merge_fidelity": merge.fidelity if merge else None,
            "metrics_before": result.metrics_before,
            "metrics_after": result.metrics_after,
            "data": inputs.data.report.lines(),
            "data_audit": [finding.__dict__ for finding in inputs.data.report.findings],
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

    def _open_log(self, inputs: RunInputs, resume: bool) -> training.RunLog:
        """recipe.yaml (so a killed run can be resumed) and train_log.jsonl, which a resumed run appends to."""
        distributed.on_main(lambda: self.config.to_yaml(self.folder.recipe))
        log = training.RunLog(self.folder.train_log)
        fingerprint = training.data_fingerprint(inputs.data.splits["train"])
        if resume:
            started = next((e for e in log.events() if e["event"] == "start"), None)
            if started is not None and started.get("train_sha256") != fingerprint:
                raise FinetuneError(
                    f"{argument('resume')}: the training data differ from those the run in {self.run_dir} started "
                    "with (the data files changed since), so resuming would not continue the same run. Restore the "
                    "data, or start again with output.overwrite: true."
                )
        log.event(
            "resume" if resume else "start",
            checkpoint=str(self.state.resume_from) if self.state.resume_from else None,
            train_rows=len(inputs.data.splits["train"]),
            train_sha256=fingerprint,
        )
        return log

    def _interrupted(self, received: signal.Signals) -> None:
        step = self.trainer.state.global_step
        saved = training.find_checkpoints(self.folder.checkpoints).latest
        self.state.log.event("interrupted", signal=received.name, step=step, checkpoint=str(saved))
        raise Interrupted(
            f"{received.name} received: training stopped after step {step} of {self.trainer.state.max_steps} and saved "
            f"{saved}. Resume it with the run's own recipe, {self.folder.recipe}, and {argument('resume')}.",
            exit_code=128 + received.value,
        )

    def _release_training_model(self) -> None:
        self.state.trainer = None
        self.state.model = None
        gc.collect()

    def _say(self, message: Any) -> None:
        if distributed.is_main():  # one console log, however many processes run
            self.console.print(message)


class ChatSFTRecipe(Recipe):
    """Supervised chat fine-tuning with LoRA/QLoRA, loss on assistant tokens only (method: sft)."""

    METHODS = ("sft",)

    def _prepare_data(self, tokenizer: PreTrainedTokenizerBase, *, enforce_audit: bool = True) -> data.PreparedData:
        return data.prepare_data(self.config.data, tokenizer, enforce_audit=enforce_audit)

    def _build_trainer(
        self, inputs: RunInputs, callbacks: list[TrainerCallback], reporting: dict[str, Any] | None
    ) -> Trainer:
        return training.build_trainer(
            self.state.model,
            inputs.tokenizer,
            inputs.data.splits,
            self.config.training,
            self.folder.checkpoints,
            dtype=models.compute_dtype(self.config.model),
            callbacks=callbacks,
            reporting=reporting,
        )


class PreferenceRecipe(Recipe):
    """Preference tuning with LoRA/QLoRA through TRL's trainers (method: dpo, orpo, simpo or kto; see
    `finetune.training.preference`), on data prepared by `finetune.data.preference`. After an SFT run, set
    model.adapter to it: training continues that adapter, and a frozen copy of it is the reference model."""

    METHODS = ("dpo", "orpo", "simpo", "kto")

    def _prepare_data(self, tokenizer: PreTrainedTokenizerBase, *, enforce_audit: bool = True) -> data.PreparedData:
        return prepare_preferences(
            self.config.data, tokenizer, paired=self.config.method in PAIRED_METHODS, enforce_audit=enforce_audit
        )

    def setup(self, resume: bool = False) -> None:
        """`Recipe.setup`, then, with `data.safety_mix`, the refusal pairs: HarmBench requests, a refusal chosen over
        the reply the model gives before this training (`finetune.safety.refusal_pairs`), added to the training split.

        Args:
            resume: Whether to continue the run in the run folder instead of starting a new one.

        Raises:
            FinetuneError: As `Recipe.setup`.
        """
        super().setup(resume)
        cfg, inputs = self.config, self._inputs("setup")
        if not cfg.data.safety_mix:
            return
        count = safety.mix_count(cfg.data.safety_mix, len(inputs.data.splits["train"]))
        self._say(f"Safety mix: asking the model {count} HarmBench requests for its own replies")
        pairs = safety.refusal_pairs(
            self.state.model,
            inputs.tokenizer,
            count,
            cfg.data.seed,
            cfg.evaluation,
            paired=cfg.method in PAIRED_METHODS,
            system_prompt=cfg.data.system_prompt,
        )
        inputs.data = add_refusal_pairs(inputs.data, pairs.rows, inputs.tokenizer, cfg.data)
        self._say(
            f"  {inputs.data.report.safety_mix} refusal rows (a refusal preferred over the model's own reply) added to "
            f"the training split ({pairs.already_refused} requests already refused, left out), replies generated in "
            f"{pairs.seconds:.1f} s; training split {len(inputs.data.splits['train'])}"
        )

    def train(self, callbacks: Sequence[TrainerCallback] = ()) -> TrainingOutcome:
        """`Recipe.train`, then, for DPO and KTO with cached reference scores, what the reference passes cost.

        Args:
            callbacks: Extra transformers TrainerCallbacks.

        Returns:
            TrainingOutcome: mean loss, seconds, loss history.
        """
        outcome = super().train(callbacks)
        cache = self.state.reference_cache
        if cache is not None and self.state.log is not None:
            self._say(f"  {cache.summary()}")
            self.state.log.event(
                "reference", rows_scored=cache.rows_scored, rows_reused=cache.rows_reused, seconds=cache.seconds
            )
        return outcome

    def _build_trainer(
        self, inputs: RunInputs, callbacks: list[TrainerCallback], reporting: dict[str, Any] | None
    ) -> Trainer:
        choice = self.config.preference.reference_log_probs
        mode = preference_training.reference_mode(self.config)
        if choice == "auto" and mode is not None:
            self._decide("preference.reference_log_probs", mode)
        built = preference_training.build_preference_trainer(
            self.state.model,
            inputs.tokenizer,
            inputs.data.splits,
            self.config,
            self.folder.checkpoints,
            dtype=models.compute_dtype(self.config.model),
            callbacks=callbacks,
            reporting=reporting,
        )
        if built.reference is not None:
            reference = "the frozen SFT adapter" if self.config.model.adapter else "the base (adapters off)"
            how = {
                "precompute": f"all {len(inputs.data.splits['train'])} training rows scored before training in "
                f"{built.setup_seconds:.1f} s",
                "cached": "each row scored the first time it is read and reused after",
                "each_step": "a reference pass at every step",
            }[built.reference]
            if choice != "auto":
                why = f"preference.reference_log_probs: {choice}"
            else:
                why = "auto on a GPU, where a second forward is cheap" if mode == "each_step" else "auto on CPU"
            self._say(f"  reference log-probs from {reference}: {how} ({why})")
        self.state.reference_cache = built.reference_cache
        return built.trainer


def recipe_class(method: str) -> type[Recipe]:
    """The recipe class that trains `method`.

    Args:
        method: The recipe's `method`: "sft", or a preference method.

    Returns:
        ChatSFTRecipe for "sft", else PreferenceRecipe.
    """
    return ChatSFTRecipe if method == "sft" else PreferenceRecipe


def _training_differences(saved: RecipeConfig, current: RecipeConfig) -> list[str]:
    """`key: run value -> this value` for each setting that differs and changes what training computes. A setting
    this recipe leaves at `auto` matches the run's recipe.yaml, which records what `auto` was decided to be."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    before, after = flat(saved.model_dump(mode="json")), flat(current.model_dump(mode="json"))
    keys = sorted(set(before) | set(after))
    # Decided with batch_size: auto, so whatever the run recorded matches too.
    decided = {"training.gradient_accumulation_steps"} if after.get("training.batch_size") == "auto" else set()
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in keys
        if before.get(key) != after.get(key)
        and after.get(key) != "auto"
        and key not in decided
        and not key.startswith(_RESUME_MAY_CHANGE)
    ]
