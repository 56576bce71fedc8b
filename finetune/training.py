"""Stage 4: supervised fine-tuning through TRL's SFTTrainer on pre-tokenized, pre-masked conversations.

Entry point: `build_trainer(...)`, then `trainer.train()`. We hand TRL finished `input_ids`/`labels` (see
`finetune.data`) and skip its own preparation, so the loss mask is ours for any chat template, and its
collator pads labels by position, never by token id: the real EOS is always trained.

Reliability rests on transformers' own checkpoints (adapter, optimizer, scheduler, RNG states and trainer state,
whose step count makes a resumed run skip the batches already consumed). This module adds what it lacks: telling
complete checkpoints from ones cut short by a crash (`find_checkpoints`), a data order that a resumed run can
reproduce in every epoch, a clean stop on SIGINT/SIGTERM (`StopOnSignal`), a guard against NaN/inf losses, and an
append-only JSON-lines log of the run (`RunLog`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from peft import PeftModel
from transformers import AttentionInterface, EarlyStoppingCallback, PreTrainedTokenizerBase, TrainerCallback
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTConfig, SFTTrainer

from finetune import distributed
from finetune.config import TrainingConfig
from finetune.errors import FinetuneError

# TRL's config still sets the `gradient_checkpointing` alias, so transformers warns on every run; the setting works.
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)


def total_steps(cfg: TrainingConfig, train_rows: int, world_size: int = 1) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    return max(1, math.ceil(cfg.epochs * math.ceil(train_rows / per_step)))


def sft_config(cfg: TrainingConfig, output_dir: Path, *, train_rows: int, has_validation: bool, dtype: torch.dtype) -> SFTConfig:
    steps = total_steps(cfg, train_rows, world_size=distributed.state().num_processes)  # each step uses every process's batch
    # Keeping the best adapter needs a checkpoint at every validation (transformers requires save_steps to be a
    # multiple of eval_steps), so an explicit save_steps sets the default validation cadence in that case.
    keep_best = has_validation and (cfg.keep_best or cfg.early_stopping_patience is not None)
    eval_steps = cfg.eval_steps or (cfg.save_steps if keep_best and cfg.save_steps else max(1, steps // 4))
    # The recipe resolves "auto" with the memory planner before the model is built (planning.needs_checkpointing);
    # a trainer built directly from an unresolved config trains without checkpointing, as attach_lora was told.
    checkpointing = cfg.gradient_checkpointing is True
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
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        report_to="none",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # already enforced by data.max_length
        dataloader_num_workers=0,
        # Multi-process runs: every LoRA weight takes part in every forward pass, so DDP need not search the graph
        # for unused parameters each step (transformers' default when gradient checkpointing is off).
        ddp_find_unused_parameters=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
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
) -> SFTTrainer:
    """`callbacks` come on top of the NaN/inf guard, which every run gets."""
    columns = ["input_ids", "labels"]
    validation = splits["validation"].select_columns(columns) if "validation" in splits else None
    args = sft_config(cfg, output_dir, train_rows=len(splits["train"]), has_validation=validation is not None, dtype=dtype)
    callbacks = [NonFiniteLossGuard(cfg.learning_rate), *callbacks]
    if validation is not None and cfg.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    if cfg.packing:
        use_packed_attention(model)
    trainer_class = _TrainedLogitsSFTTrainer if cfg.skip_untrained_logits else _SFTTrainer
    return trainer_class(
        model=model,
        args=args,
        train_dataset=splits["train"].select_columns(columns),
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def logged_train_loss(trainer: SFTTrainer) -> float | None:
    """Mean training loss over the whole run, from the log (each entry averages the steps since the previous one).

    Used after a resume, where the trainer's own mean covers only the steps run in the resuming process."""
    total = steps = last = 0
    for entry in trainer.state.log_history:
        if "loss" in entry:
            step = int(entry["step"])
            total += entry["loss"] * (step - last)
            steps, last = steps + step - last, step
    return total / steps if steps else None


def loss_history(trainer: SFTTrainer) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of training and validation loss from the trainer's log."""
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


class _SFTTrainer(SFTTrainer):
    """SFTTrainer with float32 adapter weights and a data order a resumed run can reproduce."""

    def __init__(self, model: PeftModel, *args: Any, **kwargs: Any) -> None:
        # TRL casts the adapters of a quantized model to bf16 (after the QLoRA paper), so AdamW then updates bf16
        # weights: a step smaller than half a bf16 spacing (2^-9 relative) rounds away, which late in a decaying
        # schedule is most of them (TRL already exempts DoRA magnitudes for this reason, trl#7268). peft's own default
        # keeps adapters in float32 and casts their inputs; we put that back, at the same initial values. It costs
        # 8 bytes per adapter weight (weight and optimizer state), and on CPU it also saves the casts to and from
        # bf16 in every adapted layer. Measured on SmolLM2-135M in 4-bit: held-out loss after 4 steps 3.820 with
        # float32 adapters, 3.823 with bf16 ones.
        adapter_weights = {name: param.data for name, param in model.named_parameters() if param.requires_grad}
        super().__init__(model, *args, **kwargs)
        for name, param in self.model.named_parameters():
            if name in adapter_weights and param.dtype != adapter_weights[name].dtype:
                param.data = adapter_weights[name]

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            return _EpochSeededLengthSampler(sampler.batch_size, sampler.lengths, self.args.data_seed or self.args.seed)
        return sampler  # the "random" strategy already gets accelerate's (seed + epoch) sampler


# ---------------------------------------------------------------- checkpoints

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# transformers writes trainer_state.json after the weights, optimizer, scheduler and RNG states, so a checkpoint
# whose trainer_state.json parses and names the folder's step was written to the end.
_CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoints of a run folder: the newest one a run can resume from, and those cut short by a crash."""

    latest: Path | None
    step: int  # of `latest`; 0 when there is none
    incomplete: list[Path] = field(default_factory=list)


def checkpoint_is_complete(folder: Path) -> bool:
    match = _CHECKPOINT.match(folder.name)
    if not match or not all((folder / name).is_file() for name in _CHECKPOINT_FILES):
        return False
    if not any(folder.glob("rng_state*.pth")):
        return False
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == int(match.group(1))


def find_checkpoints(output_dir: Path) -> Checkpoints:
    folders = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if output_dir.is_dir() else []
    folders.sort(key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))
    complete = [p for p in folders if checkpoint_is_complete(p)]
    latest = complete[-1] if complete else None
    return Checkpoints(
        latest=latest,
        step=int(_CHECKPOINT.match(latest.name).group(1)) if latest else 0,
        incomplete=[p for p in folders if p not in complete],
    )


# ---------------------------------------------------------------- interrupts


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
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


# ---------------------------------------------------------------- NaN / inf guard


class NonFiniteLoss(FinetuneError):
    """The loss became NaN or infinite; the step that produced it was not applied."""


class NonFiniteLossGuard(TrainerCallback):
    """Stop a run whose loss turns NaN or infinite before the bad update reaches the weights or a checkpoint.

    Each optimizer step, the gradients of the trainable (LoRA) weights are checked just before the optimizer
    applies them: a NaN/inf loss always yields non-finite gradients, and raising there leaves the weights and
    every saved checkpoint as they were. The logged loss is checked too (fp16 runs skip the gradient check: their
    grad scaler expects overflowing steps and skips them itself).
    """

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return control
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            raise self._error(args, state.global_step + 1, "its gradients are NaN or infinite")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            raise self._error(args, state.global_step, f"the logged loss is {loss}")
        return control

    def _error(self, args, step: int, what: str) -> NonFiniteLoss:
        found = find_checkpoints(Path(args.output_dir))
        kept = f"The last good checkpoint is kept: {found.latest}." if found.latest else "No checkpoint had been saved yet."
        return NonFiniteLoss(
            f"training stopped at step {step}: {what}, so the loss is no longer a number. Nothing from this step "
            f"was applied or saved. {kept} Usual causes and fixes: a learning rate too high (training.learning_rate "
            f"is {self.learning_rate:g}; try 3-10x lower, or a longer training.warmup_ratio), fp16 overflow (set "
            "model.compute_dtype: bfloat16, or float32), or broken data rows (check the data report). Resuming "
            "would replay the same steps, so fix the cause and start again with --overwrite."
        )


# ---------------------------------------------------------------- run log


class RunLog(TrainerCallback):
    """Append-only JSON-lines log of a run (`train_log.jsonl`): every trainer log entry plus run events.

    Opened in append mode, so a resumed run adds to the log of the run it continues; each line is flushed at
    once, so the log is current up to the moment a process dies.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def event(self, event: str, **fields: Any) -> None:
        self._write({"event": event, **fields})

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._write({"step": state.global_step, **(logs or {})})
        return control

    def events(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.path.read_text().splitlines() if self.path.is_file() else []:
            try:
                entries.append(json.loads(line))
            except ValueError:  # the last line of a process killed while writing it
                continue
        return [entry for entry in entries if isinstance(entry, dict) and "event" in entry]

    def _write(self, entry: dict[str, Any]) -> None:
        if not distributed.is_main():  # one log per run, however many processes train it
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")


def data_fingerprint(split: Dataset) -> str:
    """sha256 of a tokenized split (ids and labels, in order): a resumed run must train on the very same rows."""
    digest = hashlib.sha256()
    # Arrow batches, not Python lists: bounded memory and ~5x faster on large splits (10M tokens: 0.2 s).
    for batch in split.select_columns(["input_ids", "labels"]).with_format("arrow").iter(batch_size=4096):
        for name in ("input_ids", "labels"):
            digest.update(pc.list_value_length(batch[name]).to_numpy().astype(np.int64).tobytes())
            digest.update(pc.list_flatten(batch[name]).to_numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- speed: attention per packed conversation

PACKED_ATTENTION = "finetune_packed_sdpa"


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa run once per conversation of a packed row, causal within each, so none attends to another.

    For a packed row transformers hands sdpa a block-diagonal (tokens x tokens) mask, which sdpa cannot skip:
    on 2 CPU cores, attention over 8 packed conversations of 256 tokens took 4.7x as long as per conversation
    (measured, forward + backward), and the mask costs memory in every layer. The padding-free collator already
    gives the boundaries (`cu_seq_lens_q`). Anything else (padded batches, generation with a cache) goes to
    transformers' sdpa unchanged.
    """
    bounds = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    edges = bounds.tolist()
    parts = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **{**kwargs, "is_causal": True})[0]
        for a, b in zip(edges[:-1], edges[1:])
    ]
    return torch.cat(parts, dim=1), None


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # padded batches and generation still need sdpa's mask


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a model that uses sdpa to the per-conversation variant (flash attention already works per conversation)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if base.config._attn_implementation == "sdpa":
        base.set_attn_implementation(PACKED_ATTENTION)


# ---------------------------------------------------------------- speed: logits only where the loss is taken


def trained_logits_loss(model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean next-token loss over labelled tokens, running the output layer only at the positions that predict one.

    Returns (loss, logits, targets) with logits (K, vocab) for the K labelled tokens. transformers' boolean
    `logits_to_keep` selects the hidden states before the model's own head, so scaling and softcapping still apply.
    """
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position i predicts token i + 1
    targets = labels[:, 1:][keep[:, :-1]]
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits.float()
    total = F.cross_entropy(logits, targets, reduction="sum")
    # Like transformers: with gradient accumulation, divide by the labelled tokens of the whole optimizer step.
    denominator = targets.numel() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(denominator, device=total.device).clamp(min=1), logits, targets


class _TrainedLogitsSFTTrainer(_SFTTrainer):
    """SFTTrainer whose loss projects through the output layer only at positions that carry loss.

    TRL's loss projects every position onto the vocabulary (in tiles; off CUDA it also recomputes them in
    backward and derives the entropy from them). For a small model with a large vocabulary that projection is
    among the largest matmuls of a step, yet prompt positions carry no loss. Token accuracy is still logged;
    entropy is not (it would need the full distribution at every position).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # only compute_metrics needs the full logits; TRL's path builds them
            return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss, logits, targets = trained_logits_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the token count is global
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            counts = torch.stack([(logits.argmax(-1) == targets).sum(), torch.tensor(targets.numel(), device=logits.device)])
        correct, labelled = self.accelerator.gather_for_metrics(counts.unsqueeze(0)).sum(0).tolist()
        self._metrics[mode]["mean_token_accuracy"].append(correct / labelled if labelled else 0.0)
        if mode == "train":  # TRL's running count of processed tokens (padding excluded)
            real = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(inputs["input_ids"].numel())
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(real.to(logits.device).unsqueeze(0)).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

