"""Preference tuning through TRL's trainers: DPO (sigmoid or IPO loss), ORPO, SimPO (TRL's CPO trainer with its
SimPO loss) and KTO.

Entry point: `build_preference_trainer(model, tokenizer, splits, config, output_dir, ...)`. The data arrive tokenized
by `finetune.data.preference` (prompt_ids, chosen_ids, rejected_ids; KTO: completion_ids, label), so every trainer
is given those tokens instead of tokenizing text itself: TRL's own tokenization appends EOS after the chat template's
end-of-turn (ORPO/CPO; TRL #4481) and cuts prompts to a common prefix where a template rewrites them.

The reference model (DPO, KTO) is right for LoRA: a fresh adapter is compared with the base (adapters switched off),
and an adapter that continues an SFT run with a frozen copy of that SFT adapter, loaded beside it under the name
"ref" (TRL takes an adapter of that name as the reference; never the bare base, LLaMA-Factory #8459). On CPU the
reference scores each row the first time training reads it and the score is kept (`reference_mode`), so a row is
never scored twice and a row training never reaches is never scored.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset, DatasetDict
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from finetune import compat
from finetune.config import RecipeConfig
from finetune.training.nan_guard import NonFiniteLossGuard
from finetune.training.progress import TrainingProgress
from finetune.training.trainer import Float32Adapters, training_arguments, trl_config

_PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
_UNPAIRED_COLUMNS = ["prompt_ids", "completion_ids", "label"]


def uses_reference(method: str) -> bool:
    """DPO and KTO compare with a reference model; ORPO and SimPO need none.

    Args:
        method: The recipe's method.

    Returns:
        True for "dpo" and "kto".
    """
    return method in ("dpo", "kto")


ReferenceMode = Literal["precompute", "cached", "each_step"]


def reference_mode(config: RecipeConfig) -> ReferenceMode | None:
    """How a DPO or KTO run gets its reference log-probs: `precompute` (every training row scored before the first
    step), `cached` (each row scored the first time it is read, reused at every later read) or `each_step`.

    `auto` is `cached` on CPU: it never scores a row training does not read (precomputing 780 pairs took 1,280 s,
    more than a whole 240 s time-budgeted run) and never scores one twice (a pass per step pays again every epoch).
    On a GPU it is `each_step`, where a second forward is cheap next to keeping scores for every row.

    Args:
        config: The recipe (`method`, `preference.reference_log_probs`).

    Returns:
        The mode, or None for a method without a reference (ORPO, SimPO).
    """
    if not uses_reference(config.method):
        return None
    choice = config.preference.reference_log_probs
    if choice != "auto":
        return choice
    return "each_step" if torch.cuda.is_available() else "cached"


@dataclass
class ReferenceCache:
    """Reference log-probs of each row, computed the first time training or evaluation reads the row and reused at
    every later read; keyed by the row's tokens, so the order and padding of batches do not matter.

    Written here because TRL offers only the two ends: scoring every row before training (`precompute_ref_log_probs`)
    or scoring every batch at every step.

    Attributes:
        scores: A row's key (its tokens) -> its reference log-probs, one per column the trainer reads.
        rows_scored: Rows the reference scored (batches with a new row are scored whole).
        rows_reused: Rows whose reference log-probs came from the cache.
        seconds: Time spent in reference passes.
    """

    scores: dict[bytes, tuple[float, ...]] = field(default_factory=dict)
    rows_scored: int = 0
    rows_reused: int = 0
    seconds: float = 0.0

    def columns(
        self, keys: list[bytes], names: tuple[str, ...], score: Callable[[], tuple[torch.Tensor, ...]]
    ) -> dict[str, torch.Tensor]:
        """The reference columns of a batch: from the cache when every row is in it, else from `score()` (and kept).

        Args:
            keys: One key per row of the batch.
            names: The columns' names.
            score: Runs the reference pass over the batch: one tensor per name, one value per row.

        Returns:
            Column name -> a float32 tensor of one value per row.
        """
        if all(key in self.scores for key in keys):
            self.rows_reused += len(keys)
            values = torch.tensor([self.scores[key] for key in keys], dtype=torch.float32)
        else:
            started = time.perf_counter()
            values = torch.stack([column.detach().float().cpu() for column in score()], dim=1)
            self.seconds += time.perf_counter() - started
            self.rows_scored += len(keys)
            self.scores.update(zip(keys, map(tuple, values.tolist()), strict=True))
        return {name: values[:, column] for column, name in enumerate(names)}

    def summary(self) -> str:
        """One line: rows scored, time, and reads served from the cache.

        Returns:
            The line.
        """
        return (
            f"reference passes scored {self.rows_scored} rows in {self.seconds:.1f} s; "
            f"{self.rows_reused} later reads reused their scores"
        )


@dataclass
class PreferenceTrainer:
    """A preference trainer and what building it took.

    Attributes:
        trainer: The TRL trainer (DPOTrainer, KTOTrainer, ORPOTrainer, or CPOTrainer for SimPO).
        setup_seconds: Seconds spent building it, precomputed reference log-probabilities included.
        reference: How the reference log-probs are computed (see `reference_mode`); None without a reference.
        reference_cache: The scores and their cost in `cached` mode; None otherwise.
    """

    trainer: Any  # the TRL trainer
    setup_seconds: float  # building it, reference log-probs included when they are precomputed
    reference: ReferenceMode | None  # None: the method has no reference model
    reference_cache: ReferenceCache | None  # the scores of `cached` mode


def build_preference_trainer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: DatasetDict,
    config: RecipeConfig,
    output_dir: Path,
    *,
    dtype: torch.dtype,
    callbacks: list[TrainerCallback] | tuple[TrainerCallback, ...] = (),
    reporting: Mapping[str, Any] | None = None,
) -> PreferenceTrainer:
    """The TRL trainer of a preference recipe: DPO, KTO, ORPO, or SimPO (CPO's simpo loss without its
    behaviour-cloning term), with the NaN/inf guard, the float32-adapter hook and the progress display.

    Args:
        model: The peft model from `adapters.attach_lora`.
        tokenizer: Its tokenizer.
        splits: Tokenized preference splits (`data.preference.prepare_preferences`): "train" and maybe "validation".
        config: The recipe: method, training, preference and data.max_length.
        output_dir: Where checkpoints go (a run's checkpoints/).
        dtype: The compute dtype.
        callbacks: More transformers callbacks.
        reporting: Extra settings for the experiment trackers; None for none.

    Returns:
        PreferenceTrainer: the trainer and the seconds building it took.

    Raises:
        ValueError: `config.method` is not a preference method.
        FinetuneError: `training.batch_size` is still "auto".
    """
    method, cfg, preference = config.method, config.training, config.preference
    paired = method != "kto"
    columns = _PAIR_COLUMNS if paired else _UNPAIRED_COLUMNS
    train = splits["train"].select_columns(columns)
    validation = splits["validation"].select_columns(columns) if "validation" in splits else None
    settings = training_arguments(
        cfg, output_dir, train_rows=len(train), has_validation=validation is not None, dtype=dtype, reporting=reporting
    )
    # The length-grouped sampler reads an `input_ids` column these datasets do not have. KTO estimates its KL term
    # from each batch's completions paired with its other prompts, fixed when the data are prepared, so it reads the
    # (already seeded-shuffled) training split in order.
    settings["train_sampling_strategy"] = "sequential" if method == "kto" else "random"
    settings.update(max_length=config.data.max_length, beta=preference.beta_for(method))
    reference = reference_mode(config)
    cache = ReferenceCache() if reference == "cached" else None
    trainer_options: dict[str, Any] = {}
    started = time.perf_counter()
    if method == "dpo":
        args = trl_config(
            DPOConfig,
            **settings,
            loss_type=[preference.loss],
            precompute_ref_log_probs=reference == "precompute",
        )
        trainer_class = _DPOTrainer
        trainer_options["reference_cache"] = cache
    elif method == "kto":
        args = trl_config(
            KTOConfig,
            **settings,
            desirable_weight=preference.desirable_weight,
            undesirable_weight=preference.undesirable_weight,
            precompute_ref_log_probs=reference == "precompute",
        )
        trainer_class = _KTOTrainer
        trainer_options["reference_cache"] = cache
    elif method == "orpo":
        args = trl_config(ORPOConfig, **settings)
        trainer_class = _ORPOTrainer
        train, validation = _with_text(train), _with_text(validation)
    elif method == "simpo":
        # SimPO is CPO's simpo loss without the behaviour-cloning term (cpo_alpha 0), as the SimPO paper trains it.
        args = trl_config(CPOConfig, **settings, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=preference.simpo_gamma)
        trainer_class = _CPOTrainer
        train, validation = _with_text(train), _with_text(validation)
    else:
        raise ValueError(f"not a preference method: {method}")
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=[NonFiniteLossGuard(cfg.learning_rate), *callbacks],
        **trainer_options,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingProgress())
    return PreferenceTrainer(
        trainer=trainer,
        setup_seconds=time.perf_counter() - started,
        reference=reference,
        reference_cache=cache,
    )


def _with_text(dataset: Dataset | None) -> Dataset | None:
    """ORPO's and CPO's trainers run their text preprocessing (prompt extraction, chat template) before tokenizing:
    given empty strings it changes nothing, and `tokenize_row` below ignores the text and takes the tokens."""
    if dataset is None:
        return None
    empty = [""] * len(dataset)
    return dataset.add_column("prompt", empty).add_column("chosen", empty).add_column("rejected", empty)


class _TokenizedPairs:
    """ORPO's and CPO's `tokenize_row`, given finetune's tokens: the sequences and labels their collator takes, with
    no BOS added before a reply and no EOS after the end-of-turn token."""

    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
        prompt = list(feature["prompt_ids"])
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            reply = list(feature[f"{side}_ids"])
            row[f"{side}_input_ids"] = prompt + reply
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
            row[f"{side}_labels"] = [-100] * len(prompt) + reply
        return row


@contextlib.contextmanager
def _quiet_reference_passes() -> Iterator[None]:
    # TRL switches gradient checkpointing off around each reference pass through transformers' deprecated
    # `is_gradient_checkpointing`; the warning is about TRL's code, not the user's, and would print every run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


def _row_key(*rows: tuple[torch.Tensor, torch.Tensor]) -> bytes:
    """A row's cache key: its tokens without padding, of each (ids, attention mask) sequence that makes the row."""
    return b"|".join(ids[mask.bool()].cpu().numpy().tobytes() for ids, mask in rows)


class _WithReference:
    """DPO and KTO run reference passes when built (precomputed log-probs), when training and when evaluating. With a
    ReferenceCache, each batch's reference columns are put in the batch before TRL's loss reads it, as TRL's own
    precomputed columns would be."""

    reference_names: tuple[str, ...]  # the reference columns TRL's loss reads from a batch

    def __init__(self, *args: Any, reference_cache: ReferenceCache | None = None, **kwargs: Any) -> None:
        with _quiet_reference_passes():
            super().__init__(*args, **kwargs)
        self.reference_cache = reference_cache
        if reference_cache is not None:
            compat.read_reference_from_batches(self)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with _quiet_reference_passes():
            return super().train(*args, **kwargs)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.reference_cache is not None:
            keys = self.reference_keys(inputs)
            columns = self.reference_cache.columns(keys, self.reference_names, lambda: self.reference_pass(inputs))
            device = inputs["input_ids"].device
            inputs = {**inputs, **{name: values.to(device) for name, values in columns.items()}}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def reference_keys(self, inputs: dict[str, Any]) -> list[bytes]:
        """One cache key per row of a collated batch."""
        raise NotImplementedError

    def reference_pass(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The reference's scores of a collated batch, one tensor per `reference_names`."""
        raise NotImplementedError


# Float32Adapters: DPO's and KTO's trainers cast a quantized model's adapters to bf16 as SFT's does; ORPO's and CPO's
# do not today, and get the same rule so that no method's adapters depend on it.
class _DPOTrainer(_WithReference, Float32Adapters, compat.TokenizedPreferenceData, DPOTrainer):
    reference_names = ("ref_chosen_logps", "ref_rejected_logps")

    def reference_keys(self, inputs: dict[str, Any]) -> list[bytes]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        pairs = ids.shape[0] // 2  # DPO's batch is [chosen rows, rejected rows]
        return [_row_key((ids[i], mask[i]), (ids[pairs + i], mask[pairs + i])) for i in range(pairs)]

    def reference_pass(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return self.compute_ref_log_probs(self.ref_model or self.model, inputs)


class _KTOTrainer(_WithReference, Float32Adapters, compat.TokenizedPreferenceData, KTOTrainer):
    @property
    def reference_names(self) -> tuple[str, ...]:
        return ("ref_logps", "ref_KL_logps") if self.calculate_KL else ("ref_logps",)

    def reference_keys(self, inputs: dict[str, Any]) -> list[bytes]:
        rows = [(inputs["input_ids"], inputs["attention_mask"])]
        if self.calculate_KL:  # a row's KL term pairs its prompt with another row's completion, fixed per row
            rows.append((inputs["KL_input_ids"], inputs["KL_attention_mask"]))
        return [_row_key(*((ids[i], mask[i]) for ids, mask in rows)) for i in range(rows[0][0].shape[0])]

    def reference_pass(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        logps, kl_logps = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        return (logps, kl_logps) if self.calculate_KL else (logps,)


class _ORPOTrainer(_TokenizedPairs, Float32Adapters, ORPOTrainer):
    pass


class _CPOTrainer(_TokenizedPairs, Float32Adapters, CPOTrainer):
    pass
