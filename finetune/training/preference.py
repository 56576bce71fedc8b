"""Preference tuning through TRL's trainers: DPO (sigmoid or IPO loss), ORPO, SimPO (TRL's CPO trainer with its
SimPO loss) and KTO.

Entry point: `build_preference_trainer(model, tokenizer, splits, config, output_dir, ...)`. The data arrive tokenized
by `finetune.data.preference` (prompt_ids, chosen_ids, rejected_ids; KTO: completion_ids, label), so every trainer
is given those tokens instead of tokenizing text itself: TRL's own tokenization appends EOS after the chat template's
end-of-turn (ORPO/CPO; TRL #4481) and cuts prompts to a common prefix where a template rewrites them.

The reference model (DPO, KTO) is right for LoRA: a fresh adapter is compared with the base (adapters switched off),
and an adapter that continues an SFT run with a frozen copy of that SFT adapter, loaded beside it under the name
"ref" (TRL takes an adapter of that name as the reference; never the bare base, LLaMA-Factory #8459). With
`preference.reference_log_probs` precompute (the default on CPU), the reference scores every training pair once,
before the first step, instead of running a second forward pass at every step.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def precomputes_reference(config: RecipeConfig, train_rows: int) -> bool:
    """Whether the reference log-probs are computed once before training rather than at every step.

    Precomputing costs one reference forward per training row, a reference pass per step one per row read; `auto`
    precomputes on CPU when training reads every row at least once (a run of fewer steps than that pays for rows it
    never reads: 16 DPO steps of 4 pairs over 240 pairs spent 3.7x the reference passes a per-step reference needs),
    and runs it per step on a GPU, where a second forward is cheap next to holding the model twice as long.

    Args:
        config: The recipe (`method`, `preference.reference_log_probs`, the training length and batch).
        train_rows: Rows in the training split.

    Returns:
        True when the reference log-probabilities are computed once before training.
    """
    choice = config.preference.reference_log_probs
    if not uses_reference(config.method) or choice == "each_step":
        return False
    if choice == "precompute":
        return True
    if torch.cuda.is_available():
        return False
    training = config.training
    if training.max_steps is None or training.batch_size == "auto":
        return training.epochs >= 1 or training.batch_size == "auto"
    rows_read = training.max_steps * training.batch_size * training.gradient_accumulation_steps
    return rows_read >= train_rows


@dataclass
class PreferenceTrainer:
    """A preference trainer and what building it took.

    Attributes:
        trainer: The TRL trainer (DPOTrainer, KTOTrainer, ORPOTrainer, or CPOTrainer for SimPO).
        setup_seconds: Seconds spent building it, precomputed reference log-probabilities included.
    """

    trainer: Any  # the TRL trainer
    setup_seconds: float  # building it, reference log-probs included when they are precomputed


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
    started = time.perf_counter()
    if method == "dpo":
        args = trl_config(
            DPOConfig,
            **settings,
            loss_type=[preference.loss],
            precompute_ref_log_probs=precomputes_reference(config, len(train)),
        )
        trainer_class = _DPOTrainer
    elif method == "kto":
        args = trl_config(
            KTOConfig,
            **settings,
            desirable_weight=preference.desirable_weight,
            undesirable_weight=preference.undesirable_weight,
            precompute_ref_log_probs=precomputes_reference(config, len(train)),
        )
        trainer_class = _KTOTrainer
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
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingProgress())
    return PreferenceTrainer(trainer=trainer, setup_seconds=time.perf_counter() - started)


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


class _WithReference:
    """DPO and KTO run reference passes when built (precomputed log-probs), when training and when evaluating."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with _quiet_reference_passes():
            super().__init__(*args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with _quiet_reference_passes():
            return super().train(*args, **kwargs)


# Float32Adapters: DPO's and KTO's trainers cast a quantized model's adapters to bf16 as SFT's does; ORPO's and CPO's
# do not today, and get the same rule so that no method's adapters depend on it.
class _DPOTrainer(_WithReference, Float32Adapters, compat.TokenizedPreferenceData, DPOTrainer):
    pass


class _KTOTrainer(_WithReference, Float32Adapters, compat.TokenizedPreferenceData, KTOTrainer):
    pass


class _ORPOTrainer(_TokenizedPairs, Float32Adapters, ORPOTrainer):
    pass


class _CPOTrainer(_TokenizedPairs, Float32Adapters, CPOTrainer):
    pass
