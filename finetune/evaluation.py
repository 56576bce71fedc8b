"""Stage 5: score a model on held-out conversations and report before/after.

Entry points: `perplexity(model, dataset, ...)` and `write_report(...)`. Perplexity uses the same labels as
training (assistant tokens only), plus an all-token variant, computed in length-sorted batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from rich.table import Table
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune import atomic, chunked_loss, distributed, models, precision, safety
from finetune.adapters import as_before_training, load_trained
from finetune.config import DataConfig, EvaluationConfig, ModelConfig
from finetune.data import IGNORE_INDEX, end_of_turn_ids, prepare_data, render_prompt
from finetune.errors import FinetuneError, argument
from finetune.generation import DecodingSettings, generate_kwargs
from finetune.metrics import intervals, score_generations
from finetune.metrics.intervals import (
    INTERVAL_NOTE,
    Change,
    RowScores,
    comparison_markdown,
    generation_rows,
    recorded_changes,
)
from finetune.run_folder import RunFolder, is_adapter
from finetune.safety import SafetyReplies


@dataclass
class NLL:
    """Negative log-likelihood and token counts of each scored conversation, over assistant tokens and over all
    tokens: rows (conversations) x (assistant NLL, assistant tokens, all-token NLL, all tokens). Adding two appends
    their rows; the metrics sum them, and the rows give before/after changes their intervals."""

    rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))

    def __add__(self, other: NLL) -> NLL:
        return NLL(np.concatenate([self.rows, other.rows]))

    def __len__(self) -> int:
        return len(self.rows)

    def metrics(self) -> dict[str, float]:
        """The perplexity metrics of all rows together.

        Returns:
            perplexity (assistant tokens), perplexity_all_tokens and scored_tokens (assistant tokens scored).
        """
        assistant, assistant_tokens, every, every_tokens = self.rows.sum(axis=0)
        return {
            "perplexity": math.exp(assistant / max(assistant_tokens, 1)),
            "perplexity_all_tokens": math.exp(every / max(every_tokens, 1)),
            "scored_tokens": int(assistant_tokens),
        }

    def row_scores(self) -> dict[str, RowScores]:
        """The per-row statistics behind the perplexities, for bootstrap intervals of a change.

        Returns:
            Metric name -> RowScores of the (NLL, tokens) pairs of each row.
        """
        return {
            "perplexity": RowScores("perplexity", self.rows[:, :2]),
            "perplexity_all_tokens": RowScores("perplexity", self.rows[:, 2:]),
        }


def perplexity(
    model: PreTrainedModel,
    dataset: Dataset,
    *,
    pad_token_id: int,
    batch_size: int = 8,
    desc: str = "Scoring",
    across_processes: bool = False,
) -> dict[str, float]:
    """exp(mean NLL) over assistant tokens (`perplexity`) and over all tokens (`perplexity_all_tokens`).

    `across_processes=True` (every process must call it then): each process scores its share of the rows and the sums are
    added up, so every process returns the numbers one process would have computed alone.

    Args:
        model: The causal language model (a peft model included); it is put in eval mode and back afterwards.
        dataset: Tokenized conversations with input_ids and labels (-100 where no loss is taken).
        pad_token_id: The id batches are padded with.
        batch_size: Conversations per forward pass.
        desc: The progress bar's label.
        across_processes: Whether every process of a multi-process run calls this for its share of the rows.

    Returns:
        perplexity, perplexity_all_tokens and scored_tokens (see `NLL.metrics`).
    """
    return nll(
        model, dataset, pad_token_id=pad_token_id, batch_size=batch_size, desc=desc, across_processes=across_processes
    ).metrics()


@torch.inference_mode()
def nll(
    model: PreTrainedModel,
    dataset: Dataset,
    *,
    pad_token_id: int,
    batch_size: int = 8,
    desc: str = "Scoring",
    across_processes: bool = False,
) -> NLL:
    """The per-conversation sums behind `perplexity`, in the dataset's order (computed in length-sorted batches; see
    `perplexity` for `across_processes`, where the rows come back in process order).

    Args:
        model: The causal language model (a peft model included); it is put in eval mode and back afterwards.
        dataset: Tokenized conversations with input_ids and labels (-100 where no loss is taken).
        pad_token_id: The id batches are padded with.
        batch_size: Conversations per forward pass.
        desc: The progress bar's label.
        across_processes: Whether every process of a multi-process run calls this for its share of the rows.

    Returns:
        The NLL record: one row of sums per conversation.
    """
    if across_processes:
        dataset = distributed.shard(dataset)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, all_labels = dataset["input_ids"], dataset["labels"]
    order = sorted(range(len(ids)), key=lambda index: len(ids[index]))
    per_row = np.zeros((len(ids), 4))
    with precision.autocast_like(model):  # as training computed (finetune.precision)
        for start in tqdm(
            range(0, len(order), batch_size),
            desc=desc,
            unit="batch",
            leave=False,
            disable=not distributed.is_main(),
        ):
            batch = order[start : start + batch_size]
            width = max(len(ids[index]) for index in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, index in enumerate(batch):
                input_ids[i, : len(ids[index])] = torch.tensor(ids[index])
                labels[i, : len(all_labels[index])] = torch.tensor(all_labels[index])
                attention[i, : len(ids[index])] = 1
            input_ids, labels, attention = input_ids.to(device), labels.to(device), attention.to(device)
            real = attention[:, 1:] == 1  # position i predicts token i + 1
            targets = input_ids[:, 1:][real]
            if (
                distributed.weights_sharded()
            ):  # the output layer's weights are whole only inside the forward (FSDP, ZeRO-3)
                logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1][real].float()
                token_nll = F.cross_entropy(logits, targets, reduction="none")
            else:
                # Through the output layer in chunks (finetune.chunked_loss): the whole batch's logits would be
                # rows x tokens x vocabulary floats (4 GiB for 16 rows of 256 tokens over Gemma 3's vocabulary).
                hidden = chunked_loss.final_hidden_states(model, {"input_ids": input_ids, "attention_mask": attention})[
                    :, :-1
                ][real]
                token_nll = chunked_loss.token_nll(model, hidden, targets)
            row = torch.arange(len(batch), device=device)[:, None].expand_as(real)[real]
            assistant = (labels[:, 1:][real] != IGNORE_INDEX).to(
                token_nll.dtype
            )  # labels are the input tokens where set
            sums = torch.zeros((len(batch), 4), dtype=torch.float64, device=device)
            sums[:, 0].index_add_(0, row, (token_nll * assistant).double())
            sums[:, 1].index_add_(0, row, assistant.double())
            sums[:, 2].index_add_(0, row, token_nll.double())
            sums[:, 3].index_add_(0, row, torch.ones_like(token_nll, dtype=torch.float64))
            per_row[batch] = sums.cpu().numpy()
    model.train(was_training)
    total = NLL(per_row)
    if across_processes:
        total = sum(distributed.gather([total]), NLL())
    return total


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, Any]]],
    *,
    tools: list[str] | None = None,
    decoding: DecodingSettings = DecodingSettings(max_new_tokens=64, temperature=0),
    batch_size: int = 8,
) -> list[list[int]]:
    """Replies (token ids, end-of-turn token included when reached) to each conversation's last turn, greedy with
    the repetition guard by default (`finetune.generation`).

    `tools`: each conversation's tool list as JSON text ("" for none). Batched with left padding so every prompt
    ends where generation starts; the KV cache is on by default.

    Args:
        model: The causal language model; put in eval mode and back afterwards.
        tokenizer: Its tokenizer with the chat template the prompts are rendered with.
        conversations: Messages whose last turn is answered (the reply to score, if any, already removed).
        tools: Each conversation's tools JSON; None for none.
        decoding: How to decode: greedy (temperature 0) with up to 64 new tokens by default.
        batch_size: Prompts per `generate` call.

    Returns:
        Each reply's token ids, in the order of `conversations`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [render_prompt(tokenizer, c, t) for c, t in zip(conversations, tools or [""] * len(conversations))]
    replies: list[list[int]] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with precision.autocast_like(model):  # as training computed (finetune.precision)
            for start in tqdm(
                range(0, len(prompts), batch_size),
                desc="Generating replies",
                unit="batch",
                leave=False,
                disable=not distributed.is_main(),
            ):
                batch = tokenizer(
                    prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                width = batch["input_ids"].shape[1]
                output = model.generate(
                    **batch, **generate_kwargs(decoding, model.generation_config, prompt_length=width)
                )
                eos = model.generation_config.eos_token_id
                stops = {eos} if isinstance(eos, int) else set(eos or [])
                for row in output[:, width:].tolist():
                    end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
                    replies.append(row[:end])
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


@dataclass
class Evaluation:
    """The scores of one model on held-out data.

    Attributes:
        metrics: Metric name -> value (perplexity, generation scores, preference and safety rates).
        samples: Generated replies beside the reference: dicts with prompt, reference and prediction.
        rows: Metric name -> the per-row statistics behind it (for before/after intervals).
        safety: The replies to the safety prompts, when they were asked; their rates are in `metrics` and `rows`.
    """

    metrics: dict[str, float]
    samples: list[dict[str, str]] = field(default_factory=list)  # prompt, reference, prediction
    rows: dict[str, RowScores] = field(default_factory=dict)  # the per-row statistics behind each metric
    safety: SafetyReplies | None = None  # replies to the safety prompts, whose rates are in metrics and rows

    def with_safety(self, replies: SafetyReplies) -> Evaluation:
        """These scores plus the safety rates (`finetune.safety`) of `replies`.

        Args:
            replies: The replies to the safety prompts.

        Returns:
            A new Evaluation with the safety rates added to metrics and rows.
        """
        rows = replies.rows()
        metrics = {name: scores.score() for name, scores in rows.items()}
        return Evaluation({**self.metrics, **metrics}, self.samples, {**self.rows, **rows}, replies)


@dataclass(frozen=True)
class Replies:
    """Generated replies to held-out prompts beside the real replies; scores are computed from all of them."""

    samples: list[dict[str, str]]  # prompt, reference, prediction

    def __add__(self, other: Replies) -> Replies:
        return Replies(self.samples + other.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def scores(self) -> dict[str, float]:
        """The generation metrics of all the replies together (BLEU, ROUGE, token F1, exact match, repetition).

        Returns:
            Metric name -> value.
        """
        return score_generations(*self._texts())

    def row_scores(self) -> dict[str, RowScores]:
        """The per-row statistics behind the generation metrics, for bootstrap intervals of a change.

        Returns:
            Metric name -> RowScores.
        """
        return generation_rows(*self._texts())

    def _texts(self) -> tuple[list[str], list[str]]:
        return [s["prediction"] for s in self.samples], [s["reference"] for s in self.samples]


def _evaluation(scored: NLL, replies: Replies | None, preferences: dict[str, RowScores] | None = None) -> Evaluation:
    rows = {**scored.row_scores(), **(preferences or {})}
    metrics = {**scored.metrics(), **{name: row_scores.score() for name, row_scores in (preferences or {}).items()}}
    if replies is None or not len(replies):
        return Evaluation(metrics, rows=rows)
    return Evaluation({**metrics, **replies.scores()}, replies.samples, {**rows, **replies.row_scores()})


def preference_rows(chosen: NLL, rejected: NLL | None, labels: list[bool] | None = None) -> dict[str, RowScores]:
    """Per-row preference scores from the NLL of each held-out reply (per token, so a longer reply is not scored
    lower for its length): for pairs, whether and by how much the chosen reply beats the rejected one; for KTO's
    labelled replies, the log-probability of the good and of the bad ones.

    Args:
        chosen: NLL of each row's chosen reply (or, for KTO, its one reply).
        rejected: NLL of each row's rejected reply; None for KTO's unpaired rows.
        labels: For KTO, whether each row's reply is a good one; unused for pairs.

    Returns:
        preference_accuracy, reward_margin, chosen_logp and rejected_logp for pairs; desirable_logp and
        undesirable_logp (those present) for labelled replies.
    """
    chosen_logp = -chosen.rows[:, 0] / np.maximum(chosen.rows[:, 1], 1)
    if rejected is not None:
        rejected_logp = -rejected.rows[:, 0] / np.maximum(rejected.rows[:, 1], 1)
        return {
            "preference_accuracy": RowScores("mean", (chosen_logp > rejected_logp).astype(float)),
            "reward_margin": RowScores("mean", chosen_logp - rejected_logp),
            "chosen_logp": RowScores("mean", chosen_logp),
            "rejected_logp": RowScores("mean", rejected_logp),
        }
    good = np.array(labels, dtype=bool)
    out = {}
    if good.any():
        out["desirable_logp"] = RowScores("mean", chosen_logp[good])
    if (~good).any():
        out["undesirable_logp"] = RowScores("mean", chosen_logp[~good])
    return out


def _rejected_rows(rows: Dataset) -> Dataset:
    """Held-out pairs as the rejected conversations, for the same NLL as the chosen ones."""
    prompts, replies = rows["prompt_ids"], rows["rejected_ids"]
    return Dataset.from_dict(
        {
            "input_ids": [prompt + reply for prompt, reply in zip(prompts, replies)],
            "labels": [[IGNORE_INDEX] * len(prompt) + reply for prompt, reply in zip(prompts, replies)],
        }
    )


def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    heldout: Dataset,
    cfg: EvaluationConfig,
    *,
    label: str = "Scoring",
) -> Evaluation:
    """Perplexity on held-out conversations and, if enabled, generation metrics on their last assistant turn.

    In a multi-process run every process calls this: each scores and generates for its share of the rows, and
    every process gets the metrics of all of them. With sharded weights (FSDP, DeepSpeed) every forward pass is a
    collective step, so there each process runs every row instead (and generate() keeps the processes in step).

    Args:
        model: The model to score.
        tokenizer: Its tokenizer with the chat template.
        heldout: Tokenized held-out conversations (at most `evaluation.max_rows` are scored).
        cfg: The `evaluation:` section: max_rows, batch_size, generation, generation_rows and decoding.
        label: The progress bar's label.

    Returns:
        The Evaluation: metrics, sample replies and per-row statistics.
    """
    rows = heldout.select(range(min(cfg.max_rows or len(heldout), len(heldout))))
    prompts = reply_prompts(heldout, cfg.generation_rows) if cfg.generation else []
    replies = _generation(model, tokenizer, prompts, cfg) if prompts else None
    return _evaluation(_nll(model, tokenizer, rows, cfg, label), replies)


# Of a budgeted evaluation, the share perplexity may take when replies are generated too (generation, one token at a
# time, is the expensive part and gets the rest).
_PERPLEXITY_SHARE = 0.4
# With evaluation.safety, the share of the budget kept for the safety sets, which run last on whatever is left.
# 0.4: three sets of prompts answered before and after cost about as much as the held-out replies and perplexity
# together at the default sizes (docs/safety.md).
_SAFETY_SHARE = 0.4


@dataclass(frozen=True)
class EvaluationCost:
    """What the before/after evaluation took against what it was allowed.

    It is planned within `budget` from measured costs (a first batch of each kind is timed, then only what fits is
    run). The one way past the budget is its smallest sample: one batch of conversations scored and one batch of
    replies generated, before and after, is always run; `minimum_seconds` is what that took."""

    seconds: float
    budget: float | None  # None: no evaluation.time_share
    minimum_seconds: float
    requested_rows: int  # conversations evaluation.max_rows asked to score
    requested_replies: int  # replies evaluation.generation_rows asked to generate
    requested_safety: int = 0  # prompts per safety set evaluation.safety_prompts asked for (0: no safety evaluation)

    @property
    def over_budget(self) -> float:
        return max(0.0, self.seconds - self.budget) if self.budget is not None else 0.0


@dataclass
class Comparison:
    """The trained model and the base it started from, scored on the same held-out rows, and each metric's change
    with its 95% paired bootstrap interval (`finetune.metrics.intervals`)."""

    before: Evaluation | None
    after: Evaluation
    rows: Dataset  # the conversations scored for perplexity (a merge check scores the same ones)
    generated: int
    cost: EvaluationCost
    changes: list[Change] = field(default_factory=list)
    safety_skipped: str | None = None  # why evaluation.safety was on but the safety sets were not answered

    @property
    def safety_prompts(self) -> dict[str, int]:
        """Prompts answered per safety set (the same ones before and after); empty without a safety evaluation."""
        return self.after.safety.counts() if self.after.safety is not None else {}

    def summary(self, train_seconds: float | None) -> dict[str, Any]:
        """What metrics.json records about the evaluation: its size, time and budget, the changes and safety.

        Args:
            train_seconds: How long training took, for the evaluation's share of it; None when unknown.

        Returns:
            A JSON-ready dict.
        """
        share = self.cost.seconds / train_seconds if train_seconds else None
        return {
            "evaluation_rows": len(self.rows),
            "evaluation_generations": self.generated,
            "evaluation_seconds": round(self.cost.seconds, 1),
            "evaluation_budget_seconds": round(self.cost.budget, 1) if self.cost.budget is not None else None,
            "evaluation_share_of_training": round(share, 3) if share is not None else None,
            "changes": [change.as_dict() for change in self.changes],
            "safety": safety.summary(self.safety_prompts, self.changes, skipped=self.safety_skipped),
        }

    def safety_samples(self) -> dict[str, list[dict[str, str]]]:
        """Each safety prompt with the base's and the fine-tuned model's reply (metrics.json keeps them all)."""
        if self.after.safety is None:
            return {}
        before = self.before.safety.replies if self.before is not None and self.before.safety else {}
        return {
            rate: [
                {
                    "prompt": row["prompt"],
                    **({"before": before[rate][i]["reply"]} if before else {}),
                    "after": row["reply"],
                }
                for i, row in enumerate(rows)
            ]
            for rate, rows in self.after.safety.replies.items()
        }

    def lines(self, train_seconds: float | None, time_share: float | None) -> list[str]:
        """What the run prints about its evaluation: its size and cost, and when it went over its budget or was too
        small to tell a change, why and which setting to raise.

        Args:
            train_seconds: How long training took; None when unknown.
            time_share: `evaluation.time_share`, shown beside the time taken.

        Returns:
            The lines to print, first the size and cost.
        """
        cost = self.cost
        of = f" = {cost.seconds / train_seconds:.0%} of the {train_seconds:.0f} s of training" if train_seconds else ""
        limit = f" (evaluation.time_share {time_share:.0%})" if cost.budget is not None else " (no time budget)"
        passes = "before and after" if self.before else "after training"
        answered = self.safety_prompts
        asked = f", {'/'.join(map(str, answered.values()))} safety prompts answered" if answered else ""
        lines = [
            f"evaluation ({passes}): {len(self.rows)} conversations scored, {self.generated} replies generated"
            f"{asked}, {cost.seconds:.1f} s{of}{limit}"
        ]
        if cost.over_budget > 0:
            sets = ", and of each safety set" if answered else ""
            lines.append(
                f"evaluation went {cost.over_budget:.1f} s over its {cost.budget:.1f} s budget: its smallest sample (one "
                f"batch of conversations and of replies{sets}, {passes}) took {cost.minimum_seconds:.1f} s. Raise "
                "evaluation.time_share, or lower evaluation.batch_size for a smaller sample."
            )
        if self.safety_skipped:
            lines.append(f"safety not evaluated: {self.safety_skipped}")
        lines += safety.warnings(self.changes)
        unclear_safety = [c.metric for c in self.changes if c.verdict == "no clear change" and c.metric in answered]
        if unclear_safety:
            least = min(answered.values())
            if least < cost.requested_safety:
                fix = (
                    f"the time budget allowed {least} of {cost.requested_safety} prompts per set: raise "
                    "evaluation.time_share, or set it to null"
                )
            else:
                fix = f"{least} prompts per set were answered: raise evaluation.safety_prompts"
            lines.append(f"too few safety prompts to tell a change in {', '.join(unclear_safety)}: {fix}.")
        unclear = [c.metric for c in self.changes if c.verdict == "no clear change" and c.metric not in answered]
        if unclear:
            cut = len(self.rows) < cost.requested_rows or self.generated < cost.requested_replies
            if cut:
                fix = (
                    f"the time budget allowed {len(self.rows)} of {cost.requested_rows} conversations and "
                    f"{self.generated} of {cost.requested_replies} replies: raise evaluation.time_share, or set it to "
                    "null to evaluate all of them"
                )
            else:
                fix = (
                    f"{len(self.rows)} conversations and {self.generated} replies were evaluated: raise "
                    "evaluation.max_rows / evaluation.generation_rows, or hold out more (data.test_split, "
                    "data.test_sources)"
                )
            lines.append(f"too few held-out rows to tell a change in {', '.join(unclear)}: {fix}.")
        return lines


def before_and_after(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    heldout: Dataset,
    cfg: EvaluationConfig,
    *,
    train_seconds: float | None,
    safety_prompts: dict[str, list[str]] | None = None,
    system_prompt: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Comparison:
    """Score the trained model and (cfg.before_and_after) its base on the same held-out conversations, and with
    `cfg.safety` on the same safety prompts (`safety_prompts`, default `finetune.safety.safety_prompts(cfg)`; asked
    with `system_prompt` when the run trains with one).

    The model before training is the same model with its adapters switched off (or, where the run continued a
    trained adapter, with the frozen copy of it: `adapters.as_before_training`), so nothing is loaded again; LoRA
    starts as an exact no-op, so this is the model as it was. Held-out preference data add each pair's rejected reply
    and the preference scores (`preference_rows`). With `cfg.time_share`, scoring and generation together
    take about that share of `train_seconds` (see `EvaluationCost` for the one way past it): a first batch of each is
    timed and the conversations (taken in the split's seeded order, so they are a fair sample) are cut to what fits.
    The safety sets run last, on what is left (at least `_SAFETY_SHARE` of the budget is kept for them); when not even
    one batch of each fits, they are left out and `Comparison.safety_skipped` says why.
    `clock` measures the time (a test passes a simulated one).

    Args:
        model: The trained peft model.
        tokenizer: Its tokenizer with the trained chat template.
        heldout: Tokenized held-out conversations (the test split), in their seeded order.
        cfg: The `evaluation:` section.
        train_seconds: How long training took, the base of `evaluation.time_share`; None for no time budget.
        safety_prompts: Safety set name -> prompts; None for `finetune.safety.safety_prompts(cfg)`.
        system_prompt: `data.system_prompt`, asked before each safety prompt when set.
        clock: A function returning seconds, to measure the time taken.

    Returns:
        The Comparison: both Evaluations, the rows scored, what it cost, and each metric's change.
    """
    started = clock()
    budget = cfg.time_share * train_seconds if cfg.time_share and train_seconds else None
    passes = 2 if cfg.before_and_after else 1
    if cfg.safety and safety_prompts is None:
        safety_prompts = safety.safety_prompts(cfg)
    safety_prompts = {rate: items for rate, items in (safety_prompts or {}).items() if items} if cfg.safety else {}
    # The held-out scores' part of the budget; the safety sets get the rest.
    held_out_budget = budget * (1 - _SAFETY_SHARE) if budget is not None and safety_prompts else budget
    prompts = reply_prompts(heldout, cfg.generation_rows) if cfg.generation else []
    requested_replies = len(prompts)
    rows = heldout.select(range(min(cfg.max_rows or len(heldout), len(heldout))))
    requested_rows = len(rows)

    # Held-out preference pairs score their rejected replies too (the chosen ones are the conversations' replies).
    paired = "rejected_ids" in heldout.column_names
    sequences = 2 if paired else 1

    # Perplexity: time the first batch of the trained model, keep the rows that fit, score them before and after.
    first = rows.select(range(min(cfg.batch_size, len(rows))))
    timer = clock()
    after_nll = _nll(model, tokenizer, first, cfg, "Scoring fine-tuned model")
    first_seconds = clock() - timer
    minimum = first_seconds * passes * sequences
    if held_out_budget is not None:
        allowed = held_out_budget * (_PERPLEXITY_SHARE if prompts else 1.0) / (passes * sequences)
        count = rows_within(allowed, first_seconds, [len(ids) for ids in rows["input_ids"]], len(first))
        rows = rows.select(range(min(distributed.gather([count]))))  # every process keeps the same rows
    if len(rows) > len(first):
        after_nll = after_nll + _nll(
            model, tokenizer, rows.select(range(len(first), len(rows))), cfg, "Scoring fine-tuned model"
        )
    after_rejected = _nll(model, tokenizer, _rejected_rows(rows), cfg, "Scoring rejected replies") if paired else None
    before_nll = before_rejected = None
    if cfg.before_and_after:
        with as_before_training(model):
            before_nll = _nll(model, tokenizer, rows, cfg, "Scoring the model before training")
            if paired:
                before_rejected = _nll(model, tokenizer, _rejected_rows(rows), cfg, "Scoring rejected replies")
    labels = rows["label"] if "label" in rows.column_names else None
    preference = paired or labels is not None

    # Generation: time a first batch on the slower model (the base stops less often), then fit the rest.
    before_replies = after_replies = None
    batch_seconds = None  # one batch of replies on the slower model, of cfg.max_new_tokens tokens at most
    if prompts:

        def replies(conversations: list[Prompt], base: bool) -> Replies:
            with as_before_training(model) if base else nullcontext():
                return _generation(model, tokenizer, conversations, cfg)

        timed_base = cfg.before_and_after
        size = min(len(prompts), cfg.batch_size)
        timer = clock()
        timed = replies(prompts[:size], base=timed_base)
        batch_seconds = clock() - timer
        minimum += batch_seconds * passes
        if held_out_budget is not None:
            # Each further batch costs itself and its twin in the other pass; the first batch's twin is still due.
            left = held_out_budget - (clock() - started) - batch_seconds * (passes - 1)
            more = int(max(0.0, left) // max(batch_seconds * passes, 1e-9))
            prompts = prompts[: min(distributed.gather([size * (1 + more)]))]
        if len(prompts) > size:
            timed = timed + replies(prompts[size:], base=timed_base)
        if timed_base:
            before_replies = timed
            timed = replies(prompts, base=False)
        after_replies = timed
    before = (
        _evaluation(
            before_nll, before_replies, preference_rows(before_nll, before_rejected, labels) if preference else None
        )
        if before_nll is not None
        else None
    )
    after = _evaluation(
        after_nll, after_replies, preference_rows(after_nll, after_rejected, labels) if preference else None
    )

    skipped = None
    if safety_prompts:
        answered = _safety_pass(
            model,
            tokenizer,
            safety_prompts,
            cfg,
            left=budget - (clock() - started) if budget is not None else None,
            passes=passes,
            estimate=batch_seconds * cfg.safety_max_new_tokens / cfg.max_new_tokens if batch_seconds else None,
            system_prompt=system_prompt,
            clock=clock,
        )
        if isinstance(answered, str):
            skipped = answered
        else:
            safety_before, safety_after, smallest = answered
            minimum += smallest
            after = after.with_safety(safety_after)
            if before is not None and safety_before is not None:
                before = before.with_safety(safety_before)
    elif cfg.safety:
        skipped = "no safety prompts were given (every one was excluded)."
    cost = EvaluationCost(
        seconds=clock() - started,
        budget=budget,
        minimum_seconds=minimum,
        requested_rows=requested_rows,
        requested_replies=requested_replies,
        requested_safety=cfg.safety_prompts if cfg.safety else 0,
    )
    changes = intervals.compare(before.rows, after.rows) if before is not None else []
    return Comparison(before, after, rows, len(prompts), cost, changes, skipped)


def _safety_pass(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: dict[str, list[str]],
    cfg: EvaluationConfig,
    *,
    left: float | None,
    passes: int,
    estimate: float | None,
    system_prompt: str | None,
    clock: Callable[[], float],
) -> tuple[SafetyReplies | None, SafetyReplies, float] | str:
    """The safety sets answered before (adapters off) and after, within `left` seconds: (before, after, seconds its
    smallest sample took), or why they were left out.

    Its smallest sample is one batch of each set, before and after. `estimate` (one batch's seconds, from the held-out
    replies) says up front whether that fits; it is then run and timed on the slower model (the base), and further
    batches of every set are added while they and their twins in the other pass fit. A set's prompts are taken in
    their seeded order, so a shorter sample is a fair one."""
    size = cfg.batch_size
    if left is not None and estimate is not None and estimate * len(prompts) * passes > left:
        return (
            f"its smallest sample (one batch of {size} prompts from each of the {len(prompts)} safety sets, "
            f"{'before and after' if passes == 2 else 'after training'}) would take about "
            f"{estimate * len(prompts) * passes:.0f} s, and {max(left, 0.0):.0f} s of the evaluation budget were left. "
            "Raise evaluation.time_share, or set it to null to evaluate all of them; or measure the saved adapter "
            "afterwards with `finetune eval --safety`."
        )
    base = passes == 2

    def answer(chosen: dict[str, list[str]], before: bool) -> SafetyReplies:
        with as_before_training(model) if before else nullcontext():
            return safety.safety_replies(model, tokenizer, chosen, cfg, system_prompt=system_prompt)

    first = {rate: items[:size] for rate, items in prompts.items()}
    timer = clock()
    timed = answer(first, before=base)
    first_seconds = clock() - timer
    if left is not None:
        # Every further round (one batch of each set) costs itself and its twin in the other pass; the first round's
        # twin is still due.
        rest = left - first_seconds * passes
        more = int(max(0.0, rest) // max(first_seconds * passes, 1e-9))
        count = min(distributed.gather([size * (1 + more)]))  # every process answers the same prompts
        prompts = {rate: items[:count] for rate, items in prompts.items()}
    rest_prompts = {rate: items[size:] for rate, items in prompts.items()}
    if any(rest_prompts.values()):
        timed = timed + answer(rest_prompts, before=base)
    if not base:
        return None, timed, first_seconds
    return timed, answer(prompts, before=False), first_seconds * passes


def rows_within(seconds: float, first_seconds: float, lengths: list[int], first_rows: int) -> int:
    """How many of `lengths` (tokens per conversation, in order) fit in `seconds` when the first `first_rows` of
    them took `first_seconds`: time is taken as proportional to tokens. Never fewer than `first_rows`.

    Args:
        seconds: The time allowed.
        first_seconds: What the first `first_rows` conversations took.
        lengths: Tokens of each conversation, in the order they are taken.
        first_rows: How many conversations the timed first batch held.

    Returns:
        The number of conversations to take from the start of `lengths`.
    """
    per_token = first_seconds / max(sum(lengths[:first_rows]), 1)
    spent, count = 0.0, 0
    for length in lengths:
        spent += length * per_token
        if spent > seconds:
            break
        count += 1
    return max(first_rows, count)


def _nll(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Dataset, cfg: EvaluationConfig, desc: str
) -> NLL:
    split = not distributed.weights_sharded()
    return nll(
        model, rows, pad_token_id=tokenizer.pad_token_id, batch_size=cfg.batch_size, desc=desc, across_processes=split
    )


# A held-out conversation ending in the reply to generate, with its tools as JSON text ("" for none).
Prompt = tuple[list[dict[str, Any]], str]


def reply_prompts(heldout: Dataset, limit: int | None = None) -> list[Prompt]:
    """Held-out conversations whose last reply can be generated and compared, at most `limit`: raw text rows have no
    reply, and a reply that only calls tools has no text to compare with.

    Args:
        heldout: Held-out conversations (messages and, when present, tools columns).
        limit: The most to return; None for all.

    Returns:
        (messages, tools JSON) pairs; the last message of each is the reference reply.
    """
    tools = heldout["tools"] if "tools" in heldout.column_names else [""] * len(heldout)
    return [(m, t) for m, t in zip(heldout["messages"], tools) if m and (m[-1]["content"] or "").strip()][:limit]


def reply_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, Any]]],
    cfg: EvaluationConfig,
    *,
    tools: list[str] | None = None,
    max_new_tokens: int | None = None,
) -> list[str]:
    """The decoded reply to each conversation's last turn, decoded as `cfg` says (`DecodingSettings.for_evaluation`,
    `max_new_tokens` in place of cfg.max_new_tokens when given). In a multi-process run each process generates its
    share and every process gets all replies, in order.

    Args:
        model: The model to generate with.
        tokenizer: Its tokenizer with the chat template.
        conversations: Messages whose last turn is answered.
        cfg: The `evaluation:` section: decoding and batch_size.
        tools: Each conversation's tools JSON; None for none.
        max_new_tokens: The longest reply in tokens, in place of `evaluation.max_new_tokens`; None to keep it.

    Returns:
        The replies as text, special tokens removed and stripped, in the order of `conversations`.
    """
    split = not distributed.weights_sharded()
    pairs = list(zip(conversations, tools or [""] * len(conversations)))
    share = distributed.shard(pairs) if split else pairs
    decoding = DecodingSettings.for_evaluation(cfg)
    if max_new_tokens is not None:
        decoding = dataclasses.replace(decoding, max_new_tokens=max_new_tokens)
    replies = generate(
        model,
        tokenizer,
        [c for c, _ in share],
        tools=[t for _, t in share],
        decoding=decoding,
        batch_size=cfg.batch_size,
    )
    texts = [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in replies]
    return distributed.gather(texts) if split else texts


def _generation(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[Prompt], cfg: EvaluationConfig
) -> Replies:
    """Replies to each conversation's last turn, beside the real last reply."""
    predictions = reply_texts(
        model, tokenizer, [c[:-1] for c, _ in conversations], cfg, tools=[tools for _, tools in conversations]
    )
    return Replies(
        [
            {"prompt": c[-2]["content"] or "", "reference": c[-1]["content"], "prediction": prediction}
            for (c, _), prediction in zip(conversations, predictions)
        ]
    )


def evaluate_checkpoint(
    model_cfg: ModelConfig, data_cfg: DataConfig | None, cfg: EvaluationConfig, adapter: Path | None = None
) -> Evaluation:
    """Score any model (optionally with a LoRA adapter) on every valid conversation of a data config, and with
    `cfg.safety` on the safety sets too (`cfg.safety_prompts` of each, no time budget; `Evaluation.safety` holds the
    replies). `data_cfg` None: the safety sets only.

    What `finetune eval` runs: the model is loaded as `model_cfg` says, with the adapter's own tokenizer (and chat
    template) when it has one.

    Args:
        model_cfg: The `model:` section: which model, quantization, chat template.
        data_cfg: The `data:` section of the conversations to score (all rows, no split); None for safety only.
        cfg: The `evaluation:` section.
        adapter: A LoRA adapter folder to apply over the model; None for the model alone.

    Returns:
        The Evaluation.

    Raises:
        FinetuneError: Neither data nor `evaluation.safety` was given, `adapter` holds no adapter_config.json, or
            the model or data cannot be loaded.
    """
    if data_cfg is None and not cfg.safety:
        raise FinetuneError(
            f"{argument('data_cfg', None)}: nothing to evaluate: give conversations to score, or turn on "
            "evaluation.safety."
        )
    tokenizer = models.load_tokenizer(model_cfg)
    if adapter is not None:
        if not is_adapter(adapter):
            raise FinetuneError(
                f"{argument('adapter', adapter)}: no adapter_config.json there; pass a run's adapter/ folder."
            )
        if (adapter / "tokenizer_config.json").is_file():  # the adapter's own tokenizer carries its chat template
            tokenizer = models.load_tokenizer(model_cfg, folder=adapter)
    model = models.load_model(model_cfg)
    if adapter is not None:
        model = load_trained(model, tokenizer, adapter)
    else:
        models.fit_vocabulary(model, tokenizer)  # a template's turn markers the base lacks (chatml on a base model)
    models.configure_generation(model, tokenizer, end_of_turn_ids(tokenizer))
    result = Evaluation({})
    if data_cfg is not None:
        heldout = prepare_data(data_cfg, tokenizer, split=False).splits["test"]
        result = score(model, tokenizer, heldout, cfg, label="Scoring")
    if cfg.safety:
        prompts = safety.safety_prompts(cfg)
        system_prompt = data_cfg.system_prompt if data_cfg is not None else None
        result = result.with_safety(safety.safety_replies(model, tokenizer, prompts, cfg, system_prompt=system_prompt))
    return result


def comparison_table(changes: list[Change]) -> Table:
    """The before/after table the run prints: each change with its 95% interval, and better or worse only when the
    interval excludes no change.

    Args:
        changes: Each metric's change, as `Comparison.changes` holds them.

    Returns:
        A rich Table.
    """
    table = Table(title="Held-out evaluation: base vs fine-tuned (95% paired bootstrap intervals)")
    for column in ("metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for change in changes:
        table.add_row(change.metric, f"{change.before:.4g}", f"{change.after:.4g}", change.text())
    return table


def write_report(
    run_dir: Path,
    *,
    summary: dict[str, Any],
    history: dict[str, list[tuple[int, float]]],
    samples: dict[str, list[dict[str, str]]] | None = None,
) -> None:
    """metrics.json, report.md and PNG plots (loss curves, before/after bars) in the run folder.

    Each file replaces its previous version atomically.

    Args:
        run_dir: The run folder.
        summary: What metrics.json records (metrics before and after, changes, evaluation size, data report, ...).
        history: Series name -> (step, value) points of the loss curves.
        samples: "before"/"after" -> sample replies (prompt, reference, prediction); None for none.
    """
    run = RunFolder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Each file replaces its previous version in one rename: a crash mid-write leaves the last good report.
    atomic.write_text(run.metrics, json.dumps({**summary, "history": history, "samples": samples or {}}, indent=2))
    changes = recorded_changes(summary)
    lines = [f"# Run report: {summary.get('name', run_dir.name)}", ""]
    if changes:
        lines += comparison_markdown(changes)
        lines += ["", INTERVAL_NOTE, ""]
    if "safety" in summary:
        lines += ["## Safety", "", *safety.markdown(summary["safety"], changes), ""]
    for key, value in summary.items():
        if key not in ("metrics_before", "metrics_after", "name") and not isinstance(value, (dict, list)):
            lines.append(f"- **{key}**: {value}")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    if changes:
        lines += ["![changes with their 95% intervals](metrics.png)", ""]
    if samples:
        lines += _samples_markdown(samples)
    atomic.write_text(run.report, "\n".join(lines))
    _plot(run_dir, history, changes)


def _samples_markdown(samples: dict[str, list[dict[str, str]]], limit: int = 5) -> list[str]:
    """Side by side: a few held-out prompts, their reference reply, and each model's reply."""
    stages = [stage for stage in ("before", "after") if samples.get(stage)]
    if not stages:
        return []

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")[:200]

    lines = [
        "## Sample replies",
        "",
        "| prompt | reference | " + " | ".join(stages) + " |",
        "|---" * (2 + len(stages)) + "|",
    ]
    for index, row in enumerate(samples[stages[0]][:limit]):
        replies = [cell(samples[stage][index]["prediction"]) for stage in stages]
        lines.append(f"| {cell(row['prompt'])} | {cell(row['reference'])} | " + " | ".join(replies) + " |")
    return [*lines, ""]


def _plot(run_dir: Path, history: dict[str, list[tuple[int, float]]], changes: list[Change]) -> None:
    # matplotlib's object API draws into files without pyplot, so the caller's backend and open figures are untouched.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for series, points in history.items():
        if points:
            axes.plot(*zip(*points), marker="o" if len(points) < 20 else None, label=series.replace("_", " "))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (assistant tokens)")
    axes.set_title("Loss curves")
    axes.legend()
    figure.tight_layout()
    with atomic.replacing_file(run_dir / "loss_curves.png") as partial:
        figure.savefig(partial, dpi=100, format="png")
    if not changes:
        return
    # One line per metric: the change and its 95% interval; green better, red worse, grey no clear change.
    colours = {"better": "#2a9d3a", "worse": "#c0392b", "no clear change": "#888888", "unchanged": "#888888"}
    figure = Figure(figsize=(7, 0.45 * len(changes) + 1.4))
    axes = figure.subplots()
    for y, change in enumerate(reversed(changes)):
        scale = 100 if change.relative else 1
        axes.errorbar(
            change.change * scale,
            y,
            # A skewed bootstrap can leave the point estimate just outside its percentile interval: no negative bar.
            xerr=[[max(0.0, change.change - change.low) * scale], [max(0.0, change.high - change.change) * scale]],
            fmt="o",
            color=colours[change.verdict],
            capsize=3,
        )
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(changes)))
    axes.set_yticklabels(
        [f"{c.metric} ({'%' if c.relative else 'abs.'}, n={c.rows})" for c in reversed(changes)], fontsize=8
    )
    axes.set_xlabel("change after fine-tuning (95% paired bootstrap interval)")
    axes.set_title("Held-out metrics: fine-tuned vs base")
    figure.tight_layout()
    with atomic.replacing_file(run_dir / "metrics.png") as partial:
        figure.savefig(partial, dpi=100, format="png")
