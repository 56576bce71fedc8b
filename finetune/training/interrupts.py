"""A clean stop on SIGINT/SIGTERM: finish the step, save a checkpoint, stop (`StopOnSignal`)."""

from __future__ import annotations

import signal
import threading
from typing import Any

from transformers import TrainerCallback


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM while training: finish the current optimizer step, save a checkpoint, stop.

    Use as a context manager around `trainer.train()`; afterwards `signal` holds the signal received, if any.
    The first signal puts the previous handlers back, so a second Ctrl-C aborts at once (the checkpoint being
    written is then incomplete, and a resume skips it).
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _handle(self, signum: int, frame: object) -> None:
        self.signal = signal.Signals(signum)
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        """After each optimizer step: when a signal came, ask the trainer to save a checkpoint and stop.

        Args:
            args: The trainer's TrainingArguments.
            state: The trainer's TrainerState (global_step, max_steps, ...).
            control: The TrainerControl to return.
            kwargs: What else the trainer passes (model, tokenizer, ...); unused.

        Returns:
            `control`, with should_save and should_training_stop set after a signal.
        """
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
