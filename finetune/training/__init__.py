"""Stage 4: supervised fine-tuning through TRL's SFTTrainer on pre-tokenized, pre-masked conversations.

Entry point: `build_trainer(...)` (trainer.py), then `trainer.train()`. Reliability rests on transformers' own
checkpoints; this stage adds what they lack: telling complete checkpoints from ones cut short by a crash
(checkpoints.py), a data order a resumed run can reproduce in every epoch (trainer.py), a clean stop on
SIGINT/SIGTERM (interrupts.py), a guard against NaN/inf losses (nan_guard.py) and an append-only JSON-lines log of the
run (run_log.py). speed.py holds the levers inside a step; progress.py the one-line training display.
"""

from finetune.training.checkpoints import Checkpoints, checkpoint_is_complete, find_checkpoints
from finetune.training.interrupts import StopOnSignal
from finetune.training.nan_guard import NonFiniteLoss, NonFiniteLossGuard
from finetune.training.progress import TrainingProgress
from finetune.training.run_log import RunLog, data_fingerprint
from finetune.training.speed import PACKED_ATTENTION, packed_sdpa_attention, trained_logits_loss, use_packed_attention
from finetune.training.trainer import build_trainer, logged_train_loss, loss_history, sft_config, total_steps

__all__ = [
    "PACKED_ATTENTION",
    "Checkpoints",
    "NonFiniteLoss",
    "NonFiniteLossGuard",
    "RunLog",
    "StopOnSignal",
    "TrainingProgress",
    "build_trainer",
    "checkpoint_is_complete",
    "data_fingerprint",
    "find_checkpoints",
    "logged_train_loss",
    "loss_history",
    "packed_sdpa_attention",
    "sft_config",
    "total_steps",
    "trained_logits_loss",
    "use_packed_attention",
]
