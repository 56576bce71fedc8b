"""Stage 4: supervised fine-tuning through TRL's SFTTrainer on pre-tokenized, pre-masked conversations.

Entry point: `build_trainer(...)`, then `trainer.train()`. We hand TRL finished `input_ids`/`labels` (see
`finetune.data`) and skip its own preparation, so the loss mask is ours for any chat template, and its
collator pads labels by position, never by token id: the real EOS is always trained.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from datasets import DatasetDict
from peft import PeftModel
from transformers import EarlyStoppingCallback, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from finetune.config import TrainingConfig

# TRL's config still sets the `gradient_checkpointing` alias, so transformers warns on every run; the setting works.
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)


def total_steps(cfg: TrainingConfig, train_rows: int, world_size: int = 1) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    return max(1, math.ceil(cfg.epochs * math.ceil(train_rows / per_step)))


def sft_config(cfg: TrainingConfig, output_dir: Path, *, train_rows: int, has_validation: bool, dtype: torch.dtype) -> SFTConfig:
    steps = total_steps(cfg, train_rows)
    eval_steps = cfg.eval_steps or max(1, steps // 4)
    # Keeping the best adapter needs a checkpoint at every validation; adapters are small, so this is cheap.
    keep_best = has_validation and (cfg.keep_best or cfg.early_stopping_patience is not None)
    on_cuda = torch.cuda.is_available()
    return SFTConfig(
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
        gradient_checkpointing=cfg.gradient_checkpointing,  # TRL's default is on; ours is off (see config help)
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if keep_best else "no",
        save_steps=eval_steps,
        save_only_model=True,
        save_total_limit=2,  # the best and the latest
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not on_cuda,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        report_to="none",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # already enforced by data.max_length
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
    )


def build_trainer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: DatasetDict,
    cfg: TrainingConfig,
    output_dir: Path,
    *,
    dtype: torch.dtype,
) -> SFTTrainer:
    columns = ["input_ids", "labels"]
    validation = splits["validation"].select_columns(columns) if "validation" in splits else None
    args = sft_config(cfg, output_dir, train_rows=len(splits["train"]), has_validation=validation is not None, dtype=dtype)
    callbacks = []
    if validation is not None and cfg.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"].select_columns(columns),
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def loss_history(trainer: SFTTrainer) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of training and validation loss from the trainer's log."""
    history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "eval_loss": []}
    for entry in trainer.state.log_history:
        for key, series in (("loss", "train_loss"), ("eval_loss", "eval_loss")):
            if key in entry:
                history[series].append((int(entry["step"]), float(entry[key])))
    return history
