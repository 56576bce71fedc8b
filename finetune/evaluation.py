"""Stage 5: score a model on held-out conversations and report before/after.

Entry points: `perplexity(model, dataset, ...)` and `write_report(...)`. Perplexity uses the same labels as
training (assistant tokens only), plus an all-token variant, computed in length-sorted batches.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from rich.table import Table
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune import atomic, chunked_loss, distributed, models
from finetune.adapters import load_adapter
from finetune.config import DataConfig, EvaluationConfig, ModelConfig
from finetune.data import IGNORE_INDEX, end_of_turn_ids, prepare_data, render_prompt
from finetune.errors import FinetuneError, argument
from finetune.generation import DecodingSettings, generate_kwargs
from finetune.metrics import lower_is_better, score_generations
from finetune.run_folder import RunFolder, is_adapter


@dataclass
class NLL:
    """Summed negative log-likelihood and token counts, over assistant tokens and over all tokens; sums add up."""

    assistant: float = 0.0
    assistant_tokens: int = 0
    every: float = 0.0
    every_tokens: int = 0

    def __add__(self, other: NLL) -> NLL:
        return NLL(*(a + b for a, b in zip(self.totals(), other.totals())))

    def totals(self) -> tuple[float, int, float, int]:
        return self.assistant, self.assistant_tokens, self.every, self.every_tokens

    def metrics(self) -> dict[str, float]:
        return {
            "perplexity": math.exp(self.assistant / max(self.assistant_tokens, 1)),
            "perplexity_all_tokens": math.exp(self.every / max(self.every_tokens, 1)),
            "scored_tokens": self.assistant_tokens,
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
    """The sums behind `perplexity`, computed in length-sorted batches (see there for `across_processes`)."""
    if across_processes:
        dataset = distributed.shard(dataset)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = sorted(zip(dataset["input_ids"], dataset["labels"]), key=lambda row: len(row[0]))
    sums = {"assistant": 0.0, "all": 0.0}
    counts = {"assistant": 0, "all": 0}
    for start in tqdm(
        range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False, disable=not distributed.is_main()
    ):
        batch = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(ids)] = 1
        input_ids, labels, attention = input_ids.to(device), labels.to(device), attention.to(device)
        real = attention[:, 1:] == 1  # position i predicts token i + 1
        targets = input_ids[:, 1:][real]
        if distributed.weights_sharded():  # the output layer's weights are whole only inside the forward (FSDP, ZeRO-3)
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1][real].float()
            token_nll = F.cross_entropy(logits, targets, reduction="none")
        else:
            # Through the output layer in chunks (finetune.chunked_loss): the whole batch's logits would be
            # rows x tokens x vocabulary floats (4 GiB for 16 rows of 256 tokens over Gemma 3's vocabulary).
            hidden = chunked_loss.final_hidden_states(model, {"input_ids": input_ids, "attention_mask": attention})[
                :, :-1
            ][real]
            token_nll = chunked_loss.token_nll(model, hidden, targets)
        assistant = labels[:, 1:][real] != IGNORE_INDEX  # labels are the input tokens wherever they are set
        sums["assistant"] += token_nll[assistant].sum().item()
        sums["all"] += token_nll.sum().item()
        counts["assistant"] += int(assistant.sum())
        counts["all"] += len(token_nll)
    model.train(was_training)
    total = NLL(sums["assistant"], counts["assistant"], sums["all"], counts["all"])
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
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [render_prompt(tokenizer, c, t) for c, t in zip(conversations, tools or [""] * len(conversations))]
    replies: list[list[int]] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
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
            output = model.generate(**batch, **generate_kwargs(decoding, model.generation_config, prompt_length=width))
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
    metrics: dict[str, float]
    samples: list[dict[str, str]] = field(default_factory=list)  # prompt, reference, prediction


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
    """
    rows = heldout.select(range(min(cfg.max_rows or len(heldout), len(heldout))))
    metrics = _nll(model, tokenizer, rows, cfg, label).metrics()
    prompts = reply_prompts(heldout, cfg.generation_rows) if cfg.generation else None
    if not prompts:
        return Evaluation(metrics)
    scores, samples = _generation(model, tokenizer, prompts, cfg)
    return Evaluation({**metrics, **scores}, samples)


# Of a budgeted evaluation, the share perplexity may take when replies are generated too (generation, one token at a
# time, is the expensive part and gets the rest).
_PERPLEXITY_SHARE = 0.4
# A budget never cuts below one batch of conversations to score, nor below this many replies to generate.
_MIN_GENERATIONS = 8


@dataclass
class Comparison:
    """The trained model and the base it started from, scored on the same held-out rows."""

    before: Evaluation | None
    after: Evaluation
    rows: Dataset  # the conversations scored for perplexity (a merge check scores the same ones)
    generated: int
    seconds: float
    budget: float | None  # seconds allowed, or None without evaluation.time_share

    def summary(self, train_seconds: float | None) -> dict[str, Any]:
        share = self.seconds / train_seconds if train_seconds else None
        return {
            "evaluation_rows": len(self.rows),
            "evaluation_generations": self.generated,
            "evaluation_seconds": round(self.seconds, 1),
            "evaluation_share_of_training": round(share, 3) if share is not None else None,
        }

    def line(self, train_seconds: float | None, time_share: float | None) -> str:
        summary = self.summary(train_seconds)
        share = summary["evaluation_share_of_training"]
        of = f" = {share:.0%} of the {train_seconds:.0f} s of training" if share is not None else ""
        limit = f" (evaluation.time_share {time_share:.0%})" if time_share else ""
        passes = "before and after" if self.before else "after training"
        return (
            f"evaluation ({passes}): {len(self.rows)} conversations scored, {self.generated} replies generated, "
            f"{self.seconds:.1f} s{of}{limit}"
        )


def before_and_after(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    heldout: Dataset,
    cfg: EvaluationConfig,
    *,
    train_seconds: float | None,
) -> Comparison:
    """Score the trained model and (cfg.before_and_after) its base on the same held-out conversations.

    The base is the same model with its adapters switched off, so nothing is loaded again; LoRA starts as an exact
    no-op, so this is the model as it was before training. With `cfg.time_share`, scoring and generation together
    take about that share of `train_seconds`: a first batch of each is timed and the number of conversations (taken
    in the split's seeded order, so they are a fair sample) is cut to what fits, never below one batch.
    """
    started = time.perf_counter()
    budget = cfg.time_share * train_seconds if cfg.time_share and train_seconds else None
    passes = 2 if cfg.before_and_after else 1
    prompts = reply_prompts(heldout, cfg.generation_rows) if cfg.generation else []
    rows = heldout.select(range(min(cfg.max_rows or len(heldout), len(heldout))))

    # Perplexity: time the first batch of the trained model, keep the rows that fit, score them with and without LoRA.
    first = rows.select(range(min(cfg.batch_size, len(rows))))
    clock = time.perf_counter()
    after_nll = _nll(model, tokenizer, first, cfg, "Scoring fine-tuned model")
    if budget is not None:
        allowed = budget * (_PERPLEXITY_SHARE if prompts else 1.0) / passes
        count = rows_within(allowed, time.perf_counter() - clock, [len(ids) for ids in rows["input_ids"]], len(first))
        rows = rows.select(range(min(distributed.gather([count]))))  # every process keeps the same rows
    if len(rows) > len(first):
        after_nll = after_nll + _nll(
            model, tokenizer, rows.select(range(len(first), len(rows))), cfg, "Scoring fine-tuned model"
        )
    before_nll = None
    if cfg.before_and_after:
        with model.disable_adapter():
            before_nll = _nll(model, tokenizer, rows, cfg, "Scoring base model")

    # Generation: time a first batch on the slower model (the base stops less often), then fit the rest.
    before = Evaluation(before_nll.metrics()) if before_nll else None
    after = Evaluation(after_nll.metrics())
    if prompts:

        def replies(conversations: list[Prompt], base: bool) -> tuple[dict[str, float], list[dict[str, str]]]:
            with model.disable_adapter() if base else nullcontext():
                return _generation(model, tokenizer, conversations, cfg)

        timed_base = cfg.before_and_after
        size = min(len(prompts), max(cfg.batch_size, _MIN_GENERATIONS))
        clock = time.perf_counter()
        timed = replies(prompts[:size], base=timed_base)
        if budget is not None:
            allowed = max(0.0, budget - (time.perf_counter() - started)) / passes
            batches = int(allowed // max(time.perf_counter() - clock, 1e-9))
            prompts = prompts[: min(distributed.gather([max(size, batches * size)]))]
        if len(prompts) > size:
            timed = _joined(timed, replies(prompts[size:], base=timed_base))
        if timed_base:
            before.metrics.update(timed[0])
            before.samples = timed[1]
            timed = replies(prompts, base=False)
        after.metrics.update(timed[0])
        after.samples = timed[1]
    return Comparison(before, after, rows, len(prompts), time.perf_counter() - started, budget)


def rows_within(seconds: float, first_seconds: float, lengths: list[int], first_rows: int) -> int:
    """How many of `lengths` (tokens per conversation, in order) fit in `seconds` when the first `first_rows` of
    them took `first_seconds`: time is taken as proportional to tokens. Never fewer than `first_rows`."""
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
    reply, and a reply that only calls tools has no text to compare with."""
    tools = heldout["tools"] if "tools" in heldout.column_names else [""] * len(heldout)
    return [(m, t) for m, t in zip(heldout["messages"], tools) if m and (m[-1]["content"] or "").strip()][:limit]


def _generation(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[Prompt], cfg: EvaluationConfig
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Replies to each conversation's last turn, scored against the real last reply: (scores, samples)."""
    split = not distributed.weights_sharded()
    share = distributed.shard(conversations) if split else conversations
    replies = generate(
        model,
        tokenizer,
        [c[:-1] for c, _ in share],
        tools=[tools for _, tools in share],
        decoding=DecodingSettings.for_evaluation(cfg),
        batch_size=cfg.batch_size,
    )
    predictions = [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in replies]
    predictions = distributed.gather(predictions) if split else predictions
    references = [c[-1]["content"] for c, _ in conversations]
    samples = [
        {"prompt": c[-2]["content"] or "", "reference": reference, "prediction": prediction}
        for (c, _), reference, prediction in zip(conversations, references, predictions)
    ]
    return score_generations(predictions, references), samples


def _joined(first: tuple[dict[str, float], list[dict[str, str]]], rest: tuple[dict[str, float], list[dict[str, str]]]):
    """Generation results of two parts as one: samples concatenated, scores recomputed over all of them."""
    samples = first[1] + rest[1]
    return score_generations([s["prediction"] for s in samples], [s["reference"] for s in samples]), samples


def evaluate_checkpoint(
    model_cfg: ModelConfig, data_cfg: DataConfig, cfg: EvaluationConfig, adapter: Path | None = None
) -> Evaluation:
    """Score any model (optionally with a LoRA adapter) on every valid conversation of a data config."""
    tokenizer = models.load_tokenizer(model_cfg)
    if adapter is not None:
        if not is_adapter(adapter):
            raise FinetuneError(
                f"{argument('adapter', adapter)}: no adapter_config.json there; pass a run's adapter/ folder."
            )
        if (adapter / "tokenizer_config.json").is_file():  # the adapter's own tokenizer carries its chat template
            tokenizer = models.load_tokenizer(model_cfg, folder=adapter)
    model = models.load_model(model_cfg)
    models.fit_vocabulary(
        model, tokenizer, for_adapter=adapter is not None
    )  # rows for tokens training added; the adapter holds their trained values
    if adapter is not None:
        model = load_adapter(model, adapter)
    models.configure_generation(model, tokenizer, end_of_turn_ids(tokenizer))
    heldout = prepare_data(data_cfg, tokenizer, split=False).splits["test"]
    return score(model, tokenizer, heldout, cfg, label="Scoring")


def comparison_rows(before: dict[str, float], after: dict[str, float]) -> list[tuple[str, float, float, str]]:
    rows = []
    for metric, old in before.items():
        if metric not in after or metric == "scored_tokens":
            continue
        new = after[metric]
        if new == old:
            rows.append((metric, old, new, "unchanged"))
            continue
        better = (new < old) if lower_is_better(metric) else (new > old)
        change = f"{(new - old) / abs(old):+.1%}" if old else f"{new - old:+.4g}"  # no relative change from zero
        rows.append((metric, old, new, f"{change} ({'better' if better else 'worse'})"))
    return rows


def comparison_table(before: dict[str, float], after: dict[str, float]) -> Table:
    table = Table(title="Held-out evaluation: base vs fine-tuned")
    for column in ("metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric, old, new, change in comparison_rows(before, after):
        table.add_row(metric, f"{old:.4g}", f"{new:.4g}", change)
    return table


def write_report(
    run_dir: Path,
    *,
    summary: dict[str, Any],
    history: dict[str, list[tuple[int, float]]],
    samples: dict[str, list[dict[str, str]]] | None = None,
) -> None:
    """metrics.json, report.md and PNG plots (loss curves, before/after bars) in the run folder."""
    run = RunFolder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Each file replaces its previous version in one rename: a crash mid-write leaves the last good report.
    atomic.write_text(run.metrics, json.dumps({**summary, "history": history, "samples": samples or {}}, indent=2))
    before, after = summary.get("metrics_before") or {}, summary.get("metrics_after") or {}
    lines = [f"# Run report: {summary.get('name', run_dir.name)}", ""]
    if before and after:
        lines += ["| metric | before | after | change |", "|---|---:|---:|---:|"]
        lines += [f"| {m} | {o:.4g} | {n:.4g} | {c} |" for m, o, n, c in comparison_rows(before, after)]
        lines.append("")
    for key, value in summary.items():
        if key not in ("metrics_before", "metrics_after", "name") and not isinstance(value, (dict, list)):
            lines.append(f"- **{key}**: {value}")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    if before and after:
        lines += ["![before and after](metrics.png)", ""]
    if samples:
        lines += _samples_markdown(samples)
    atomic.write_text(run.report, "\n".join(lines))
    _plot(run_dir, history, before, after)


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


def _plot(
    run_dir: Path, history: dict[str, list[tuple[int, float]]], before: dict[str, float], after: dict[str, float]
) -> None:
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
    metrics = [row for row in comparison_rows(before, after)]
    if not metrics:
        return
    columns = min(4, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(3 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    for ax, (metric, old, new, change) in zip(axes.flat, metrics):
        ax.bar(["before", "after"], [old, new], color=["#999999", "#2a7ab0"])
        ax.set_title(f"{metric}\n{change}", fontsize=9)
    figure.tight_layout()
    with atomic.replacing_file(run_dir / "metrics.png") as partial:
        figure.savefig(partial, dpi=100, format="png")
