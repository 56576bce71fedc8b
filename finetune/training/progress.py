"""The training display: one rich line with step, loss, tokens/s and ETA, and a line per validation.

Why by hand: transformers prints each log entry as a raw dict (or, with tqdm, a bar plus nested evaluation bars),
and TRL's `RichProgressCallback` draws a panel with a table per log entry. A run needs one line that says how far it
is, how it is learning and how long it will take.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback


class TrainingProgress(TrainerCallback):
    """Shows `Training ━━━━━━ 12/24 · loss 2.314 · 812 tokens/s · 0:00:31 left` while the trainer runs (main process only).

    Args:
        console: The rich Console to draw on; None for a new one.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress: Progress | None = None
        self.task = None
        self._clock: tuple[float, int] | None = None  # (time, processed tokens) when counting started

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the progress bar at the trainer's current step (on the main process only).

        Args:
            args: The trainer's TrainingArguments.
            state: The trainer's TrainerState (global_step, max_steps, ...).
            control: The TrainerControl to return.
            kwargs: What else the trainer passes (model, tokenizer, ...); unused.

        Returns:
            The same `control`.
        """
        if not state.is_world_process_zero:
            return control
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("· loss {task.fields[loss]} · {task.fields[speed]} ·"),
            TimeElapsedColumn(),
            TextColumn("elapsed,"),
            TimeRemainingColumn(),
            TextColumn("left"),
            console=self.console,
        )
        self.task = self.progress.add_task(
            "Training", total=state.max_steps, completed=state.global_step, loss="-", speed="- tokens/s"
        )
        self.progress.start()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        """Move the bar to the current step.

        Args:
            args: The trainer's TrainingArguments.
            state: The trainer's TrainerState (global_step, max_steps, ...).
            control: The TrainerControl to return.
            kwargs: What else the trainer passes (model, tokenizer, ...); unused.

        Returns:
            The same `control`.
        """
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Show the logged loss and tokens per second (the first interval, warm-up, is not counted); print each
        validation loss.

        Args:
            args: The trainer's TrainingArguments.
            state: The trainer's TrainerState (global_step, max_steps, ...).
            control: The TrainerControl to return.
            logs: The entry the trainer logs.
            kwargs: What else the trainer passes (model, tokenizer, ...); unused.

        Returns:
            The same `control`.
        """
        if self.progress is None or not logs:
            return control
        if "loss" in logs:
            fields = {"loss": f"{logs['loss']:.3f}"}
            tokens = logs.get("num_tokens")
            if isinstance(tokens, (int, float)):
                now = time.perf_counter()
                if self._clock is None:  # the first interval includes warm-up (allocations, first kernels): not counted
                    self._clock = (now, int(tokens))
                elif now > self._clock[0]:
                    fields["speed"] = f"{(tokens - self._clock[1]) / (now - self._clock[0]):,.0f} tokens/s"
            self.progress.update(self.task, **fields)
        if "eval_loss" in logs:
            self.progress.console.print(f"  step {state.global_step}: validation loss {logs['eval_loss']:.4f}")
        return control

    def on_prediction_step(self, args, state, control, **kwargs):
        """Label the bar 'Validating' while the validation split is scored.

        Args:
            args: The trainer's TrainingArguments.
            state: The trainer's TrainerState (global_step, max_steps, ...).
            control: The TrainerControl to return.
            kwargs: What else the trainer passes (model, tokenizer, ...); unused.

        Returns:
            The same `control`.
        """
        if self.progress is not None:
            self.progress.update(self.task, description="Validating")
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        """Label the bar 'Training' again after a validation.

        Args:
            args: The trainer's TrainingArguments.
            state: The trainer's TrainerState (global_step, max_steps, ...).
            control: The TrainerControl to return.
            kwargs: What else the trainer passes (model, tokenizer, ...); unused.

        Returns:
            The same `control`.
        """
        if self.progress is not None:
            self.progress.update(self.task, description="Training")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """Stop the progress bar.

        Args:
            args: The trainer's TrainingArguments.
            state: The trainer's TrainerState (global_step, max_steps, ...).
            control: The TrainerControl to return.
            kwargs: What else the trainer passes (model, tokenizer, ...); unused.

        Returns:
            The same `control`.
        """
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        return control
