"""A guard against NaN/inf losses: the run stops before a bad update reaches the weights or a checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from finetune.errors import FinetuneError
from finetune.training.checkpoints import find_checkpoints


class NonFiniteLoss(FinetuneError):
    """The loss became NaN or infinite; the step that produced it was not applied."""


class NonFiniteLossGuard(TrainerCallback):
    """Stop a run whose loss turns NaN or infinite before the bad update reaches the weights or a checkpoint.

    Each optimizer step, the gradients of the trainable (LoRA) weights are checked just before the optimizer
    applies them: a NaN/inf loss always yields non-finite gradients, and raising there leaves the weights and
    every saved checkpoint as they were. The logged loss is checked too (fp16 runs skip the gradient check: their
    grad scaler expects overflowing steps and skips them itself).

    Args:
        learning_rate: `training.learning_rate`, quoted in the error's advice.
    """

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        """Before each optimizer step: check the trainable weights' gradients are finite (skipped under fp16).

        Args:
            args: The trainer's TrainingArguments.
            state: The trainer's TrainerState (global_step, max_steps, ...).
            control: The TrainerControl to return.
            model: The model being trained.
            kwargs: What else the trainer passes (model, tokenizer, ...); unused.

        Returns:
            The same `control`.

        Raises:
            NonFiniteLoss: (a FinetuneError) A gradient is NaN or infinite; the message names the step, the last
                good checkpoint and the usual fixes (`training.learning_rate`, `model.compute_dtype`).
        """
        if args.fp16 or model is None:
            return control
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            raise self._error(args, state.global_step + 1, "its gradients are NaN or infinite")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """On each log entry: check the logged training loss is finite.

        Args:
            args: The trainer's TrainingArguments.
            state: The trainer's TrainerState (global_step, max_steps, ...).
            control: The TrainerControl to return.
            logs: The entry the trainer logs.
            kwargs: What else the trainer passes (model, tokenizer, ...); unused.

        Returns:
            The same `control`.

        Raises:
            NonFiniteLoss: (a FinetuneError) The logged loss is NaN or infinite.
        """
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            raise self._error(args, state.global_step, f"the logged loss is {loss}")
        return control

    def _error(self, args, step: int, what: str) -> NonFiniteLoss:
        found = find_checkpoints(Path(args.output_dir))
        kept = (
            f"The last good checkpoint is kept: {found.latest}."
            if found.latest
            else "No checkpoint had been saved yet."
        )
        return NonFiniteLoss(
            f"training stopped at step {step}: {what}, so the loss is no longer a number. Nothing from this step "
            f"was applied or saved. {kept} Usual causes and fixes: a learning rate too high (training.learning_rate "
            f"is {self.learning_rate:g}; try 3-10x lower, or a longer training.warmup_ratio), fp16 overflow (set "
            "model.compute_dtype: bfloat16, or float32), or broken data rows (check the data report). Resuming "
            "would replay the same steps, so fix the cause and start again with output.overwrite: true."
        )
