"""The trainer: TRL's SFTTrainer configured from `TrainingConfig`, on pre-tokenized, pre-masked conversations.

Entry point: `build_trainer(...)`, then `trainer.train()`. We hand TRL finished `input_ids`/`labels` (see
`finetune.data`) and skip its own preparation, so the loss mask is ours for any chat template, and its
collator pads labels by position, never by token id: the real EOS is always trained.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from peft import PeftModel
from transformers import EarlyStoppingCallback, PreTrainedTokenizerBase, PrinterCallback, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTConfig, SFTTrainer

from finetune import compat, distributed
from finetune.config import TrainingConfig
from finetune.errors import FinetuneError
from finetune.training.nan_guard import NonFiniteLossGuard
from finetune.training.progress import TrainingProgress
from finetune.training.speed import trained_logits_loss, use_packed_attention


def total_steps(cfg: TrainingConfig, train_rows: int, world_size: int = 1) -> int:
    """The number of optimizer steps a run takes: `training.max_steps`, else the epochs over the training rows.

    Args:
        cfg: The `training:` section (max_steps, epochs, a number batch_size, gradient_accumulation_steps).
        train_rows: Rows in the training split.
        world_size: Training processes; each step takes a batch from every process.

    Returns:
        The step count, at least 1.
    """
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    return max(1, math.ceil(cfg.epochs * math.ceil(train_rows / per_step)))


def training_arguments(
    cfg: TrainingConfig,
    output_dir: Path,
    *,
    train_rows: int,
    has_validation: bool,
    dtype: torch.dtype,
    reporting: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The transformers TrainingArguments every finetune trainer shares (SFT and the preference methods).

    Args:
        cfg: The `training:` section.
        output_dir: Where checkpoints go (a run's checkpoints/).
        train_rows: Rows in the training split, for the step count.
        has_validation: Whether there is a validation split (validation and keeping the best adapter need one).
        dtype: The compute dtype; bf16 or fp16 mixed precision follows it on CUDA.
        reporting: Extra settings for the experiment trackers (`report_to`, logging folder, run name); None for none.

    Returns:
        Keyword arguments for a TRL config class (see `trl_config`).

    Raises:
        FinetuneError: `training.batch_size` is "auto": only the recipe resolves it, with the memory planner.
    """
    if cfg.batch_size == "auto":
        raise FinetuneError(
            "training.batch_size: auto is decided by the recipe from the memory planner (Recipe.setup, or "
            "planning.choose_batch_size); a trainer built directly needs a number: set training.batch_size."
        )
    steps = total_steps(
        cfg, train_rows, world_size=distributed.state().num_processes
    )  # each step uses every process's batch
    # Keeping the best adapter needs a checkpoint at every validation (transformers requires save_steps to be a
    # multiple of eval_steps), so an explicit save_steps sets the default validation cadence in that case.
    keep_best = has_validation and (cfg.keep_best or cfg.early_stopping_patience is not None)
    eval_steps = cfg.eval_steps or (cfg.save_steps if keep_best and cfg.save_steps else max(1, steps // 4))
    # The recipe resolves "auto" with the memory planner before the model is built (planning.plan_without_checkpointing);
    # a trainer built directly from an unresolved config trains without checkpointing, as attach_lora was told.
    checkpointing = cfg.gradient_checkpointing is True
    on_cuda = torch.cuda.is_available()
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        lr_scheduler_type=cfg.lr_scheduler,
        # This transformers/TRL pair rejects warmup_ratio, so the ratio becomes a step count here.
        warmup_steps=math.ceil(cfg.warmup_ratio * steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optimizer,
        gradient_checkpointing=checkpointing,  # TRL's default is on; ours only when memory needs it (see config help)
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=eval_steps,
        # Full checkpoints (optimizer, scheduler, RNG states too) so a resumed run continues exactly; transformers
        # also saves one at the last step, so a run that dies after training resumes without training again.
        save_strategy="steps",
        save_steps=cfg.save_steps or eval_steps,
        save_only_model=False,
        save_total_limit=cfg.save_total_limit,  # the newest ones; the best one is kept on top of these
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not on_cuda,
        # Mixed precision: the forward under autocast in the compute dtype, LoRA weights and optimizer state float32
        # (Float32Adapters); on CPU too where the compute dtype is bf16 (finetune.precision).
        bf16=dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        # The trackers in training.report_to, through their transformers integrations; the recipe adds where they
        # write and the run's name (finetune.trackers), a trainer built directly gets transformers' defaults.
        **(reporting or {"report_to": list(cfg.report_to) or "none"}),
        disable_tqdm=True,  # TrainingProgress shows one line instead of tqdm bars and raw log dicts
        dataloader_num_workers=0,
        # Multi-process runs: every LoRA weight takes part in every forward pass, so DDP need not search the graph
        # for unused parameters each step (transformers' default when gradient checkpointing is off).
        ddp_find_unused_parameters=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
    )
    return settings


def trl_config(config_class: type, **settings: Any) -> Any:
    """A TRL config (SFTConfig, DPOConfig, ...) from settings.

    Args:
        config_class: The TRL config class.
        settings: Its keyword arguments.

    Returns:
        The config, built without TRL's deprecation warning about `gradient_checkpointing`.
    """
    with warnings.catch_warnings():
        # TRL's config still sets the `gradient_checkpointing` alias, so transformers warns on every run; the setting works.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
        return config_class(**settings)


def sft_config(
    cfg: TrainingConfig,
    output_dir: Path,
    *,
    train_rows: int,
    has_validation: bool,
    dtype: torch.dtype,
    reporting: Mapping[str, Any] | None = None,
) -> SFTConfig:
    """TRL's SFTConfig for a run: `training_arguments`, with the data taken as already tokenized and no length limit
    of TRL's own; `training.packing` turns on padding-free batches.

    Args:
        cfg: The `training:` section.
        output_dir: Where checkpoints go (a run's checkpoints/).
        train_rows: Rows in the training split, for the step count.
        has_validation: Whether there is a validation split (validation and keeping the best adapter need one).
        dtype: The compute dtype; bf16 or fp16 mixed precision follows it on CUDA.
        reporting: Extra settings for the experiment trackers (`report_to`, logging folder, run name); None for none.

    Returns:
        The SFTConfig.

    Raises:
        FinetuneError: `training.batch_size` is still "auto".
    """
    settings = training_arguments(
        cfg, output_dir, train_rows=train_rows, has_validation=has_validation, dtype=dtype, reporting=reporting
    )
    return trl_config(
        SFTConfig,
        **settings,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # already enforced by data.max_length
        # The collator then concatenates a batch into one row with restarting position ids, from which
        # transformers builds a block-diagonal causal mask (sdpa/eager) or varlen boundaries (flash attention).
        padding_free=cfg.packing,
        neftune_noise_alpha=cfg.neftune_noise_alpha,
    )


def build_trainer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: DatasetDict,
    cfg: TrainingConfig,
    output_dir: Path,
    *,
    dtype: torch.dtype,
    callbacks: list[TrainerCallback] | tuple[TrainerCallback, ...] = (),
    reporting: Mapping[str, Any] | None = None,
) -> SFTTrainer:
    """The SFT trainer of a run: TRL's SFTTrainer over the tokenized splits, with finetune's checkpoint, sampler and
    float32-adapter hooks, and the training progress display.

    `callbacks` come on top of the NaN/inf guard, which every run gets; early stopping is added with a validation split
    and `training.early_stopping_patience`.

    Args:
        model: The peft model from `adapters.attach_lora`.
        tokenizer: Its tokenizer, saved with every checkpoint.
        splits: The tokenized splits: "train" and, when present, "validation".
        cfg: The `training:` section.
        output_dir: Where checkpoints go (a run's checkpoints/).
        dtype: The compute dtype; bf16 or fp16 mixed precision follows it on CUDA.
        callbacks: More transformers callbacks (the run log, the signal handler, ...).
        reporting: Extra settings for the experiment trackers; None for none.

    Returns:
        The SFTTrainer, ready for `train()`.

    Raises:
        FinetuneError: `training.batch_size` is still "auto" (see `training_arguments`).
    """
    columns = ["input_ids", "labels"]
    validation = splits["validation"].select_columns(columns) if "validation" in splits else None
    args = sft_config(
        cfg,
        output_dir,
        train_rows=len(splits["train"]),
        has_validation=validation is not None,
        dtype=dtype,
        reporting=reporting,
    )
    callbacks = [NonFiniteLossGuard(cfg.learning_rate), *callbacks]
    if validation is not None and cfg.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    if cfg.packing:
        use_packed_attention(model)
    trainer_class = _TrainedLogitsSFTTrainer if cfg.skip_untrained_logits else _SFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=splits["train"].select_columns(columns),
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log entry as a dict; TrainingProgress shows them
    trainer.add_callback(TrainingProgress())
    return trainer


def logged_train_loss(trainer: SFTTrainer) -> float | None:
    """Mean training loss over the whole run, from the log (each entry averages the steps since the previous one).

    Used after a resume, where the trainer's own mean covers only the steps run in the resuming process.

    Args:
        trainer: A trainer that has trained.

    Returns:
        The mean loss, or None when no loss was logged.
    """
    total = steps = last = 0
    for entry in trainer.state.log_history:
        if "loss" in entry:
            step = int(entry["step"])
            total += entry["loss"] * (step - last)
            steps, last = steps + step - last, step
    return total / steps if steps else None


def loss_history(trainer: SFTTrainer) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of training and validation loss from the trainer's log.

    Args:
        trainer: A trainer that has trained.

    Returns:
        "train_loss" and "eval_loss" -> (step, value) points.
    """
    history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "eval_loss": []}
    for entry in trainer.state.log_history:
        for key, series in (("loss", "train_loss"), ("eval_loss", "eval_loss")):
            if key in entry:
                history[series].append((int(entry["step"]), float(entry[key])))
    return history


# ---------------------------------------------------------------- resumable data order


class _EpochSeededLengthSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler, shuffled by its own generator seeded with (seed + epoch).

    The stock one draws from the global RNG, whose state at the start of a later epoch depends on every dropout
    mask before it, which a resumed run cannot replay: it would skip batches of a different order than the one it
    had consumed. Seeding per epoch makes each epoch's order a function of the seed alone.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:  # accelerate's data loader calls this at the start of every epoch
        self.generator.manual_seed(self.seed + epoch)


class Float32Adapters:
    """Mixed in before any TRL trainer (SFT, DPO, KTO, ORPO, CPO): the adapter weights train in the dtype they were
    attached in (float32), whatever the trainer does to them while it is built.

    TRL's SFT, DPO and KTO trainers cast the adapters of a quantized model to bf16 (after the QLoRA paper), so AdamW
    then updates bf16 weights: a step smaller than half a bf16 spacing (2^-9 relative) rounds away, which late in a
    decaying schedule is most of them (TRL already exempts DoRA magnitudes for this reason, trl#7268). peft's own
    default keeps adapters in float32 and casts their inputs; we put that back, at the same initial values. It costs
    8 bytes per adapter weight (weight and optimizer state), and on CPU it also saves the casts to and from bf16 in
    every adapted layer. Measured on SmolLM2-135M in 4-bit: held-out loss after 4 steps 3.820 with float32 adapters,
    3.823 with bf16 ones. A reference copy of the adapter that DPO or KTO makes while being built is frozen, so it
    is never cast and keeps the values it was copied with.

    Args:
        model: The peft model to train.
        args: The trainer class's other positional arguments.
        kwargs: The trainer class's keyword arguments.
    """

    def __init__(self, model: PeftModel, *args: Any, **kwargs: Any) -> None:
        adapter_weights = {name: param.data for name, param in model.named_parameters() if param.requires_grad}
        super().__init__(model, *args, **kwargs)
        for name, param in self.model.named_parameters():
            if name in adapter_weights and param.dtype != adapter_weights[name].dtype:
                param.data = adapter_weights[name]


class _SFTTrainer(compat.TrainerHooks, Float32Adapters, SFTTrainer):
    """SFTTrainer with float32 adapter weights and a data order a resumed run can reproduce."""

    @contextlib.contextmanager
    def checkpoint_saving(self) -> Iterator[None]:
        # A vocabulary resized for added tokens makes peft write the whole embedding and output matrices into every
        # checkpoint (2 x 671 MB for Gemma 3's 262k rows); the rows training changes are in the adapter already.
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            yield
            return
        # Only the adapter being trained: a reference copy (adapters.REFERENCE_ADAPTER) is the run's starting point.
        model.save_pretrained = functools.partial(
            type(model).save_pretrained, model, save_embedding_layers=False, selected_adapters=["default"]
        )
        try:
            yield
        finally:
            del model.save_pretrained

    def train_sampler(self, sampler: Any) -> Any:
        if type(sampler) is LengthGroupedSampler:
            return _EpochSeededLengthSampler(sampler.batch_size, sampler.lengths, self.args.data_seed or self.args.seed)
        return sampler  # the "random" strategy already gets accelerate's (seed + epoch) sampler


class _TrainedLogitsSFTTrainer(_SFTTrainer):
    """SFTTrainer whose loss projects through the output layer only at positions that carry loss, in chunks.

    TRL's loss projects every position onto the vocabulary (in tiles; off CUDA it also recomputes them in
    backward and derives the entropy from them). For a small model with a large vocabulary that projection is
    among the largest matmuls of a step, yet prompt positions carry no loss. Token accuracy is still logged;
    entropy is not (it would need the full distribution at every position).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # only compute_metrics needs the full logits; TRL's path builds them
            return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss, hits, labelled = trained_logits_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the token count is global
        mode = "train" if model.training else "eval"
        counts = torch.stack([hits.detach(), torch.tensor(labelled, device=hits.device)])
        correct, labelled = self.accelerator.gather_for_metrics(counts.unsqueeze(0)).sum(0).tolist()
        compat.log_metric(self, mode, "mean_token_accuracy", correct / labelled if labelled else 0.0)
        if mode == "train":  # TRL's running count of processed tokens (padding excluded)
            real = (
                inputs["attention_mask"].sum()
                if "attention_mask" in inputs
                else torch.tensor(inputs["input_ids"].numel())
            )
            compat.add_train_tokens(
                self, int(self.accelerator.gather_for_metrics(real.to(hits.device).unsqueeze(0)).sum())
            )
        compat.set_logged_metric(self, mode, "num_tokens", compat.train_tokens(self))
        return loss
