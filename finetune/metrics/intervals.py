"""How sure a before/after change is: paired bootstrap intervals over the held-out rows both models were scored on.

Entry point: `compare(before, after)`. Every score is an aggregate of per-row statistics (`RowScores`): a mean over
rows (ROUGE, token F1, exact match, repetition), exp(summed NLL / summed tokens) (perplexity), or sacrebleu's corpus
BLEU from summed n-gram counts. The bootstrap resamples rows with replacement, the same rows for both models
(paired: a hard conversation is hard for both, so the noise it adds cancels in the change), recomputes both
aggregates, and takes the 2.5th and 97.5th percentiles of the difference. A change is called better or worse only
when that interval excludes zero; otherwise it is "no clear change", with the number of rows it rests on.

scipy's `bootstrap` does paired resampling of one statistic, but not of aggregates over several per-row arrays
(perplexity's NLL and token counts, BLEU's counts) that must be resampled together; the loop below is short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0  # the same resamples on every run: the interval of a given pair of score sets never changes

Aggregate = Literal["mean", "perplexity", "bleu"]
Verdict = Literal["better", "worse", "no clear change", "unchanged"]


@dataclass(frozen=True)
class RowScores:
    """One metric's per-row statistics and how they combine into the metric.

    `values` is (rows,) for a mean, (rows, 2) of summed NLL and token count for perplexity, and (rows, 10) of
    sacrebleu's statistics (4 n-gram match counts, 4 n-gram totals, hypothesis length, reference length) for BLEU."""

    aggregate: Aggregate
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def score(self, rows: np.ndarray | None = None) -> float:
        """The metric over all rows, or over a resample of them.

        Args:
            rows: Row indices to aggregate (repeats allowed); None for every row once.

        Returns:
            The metric's value.
        """
        values = self.values if rows is None else self.values[rows]
        return _aggregate(self.aggregate, values)


def _aggregate(kind: Aggregate, values: np.ndarray) -> float:
    if kind == "mean":
        return float(values.mean())
    if kind == "perplexity":
        totals = values.sum(axis=0)
        return float(np.exp(totals[0] / max(totals[1], 1)))
    import sacrebleu

    totals = values.sum(axis=0)
    correct, total = [int(x) for x in totals[:4]], [int(x) for x in totals[4:8]]
    return float(sacrebleu.BLEU.compute_bleu(correct, total, int(totals[8]), int(totals[9])).score)


def _resampled(scores: RowScores, samples: np.ndarray) -> np.ndarray:
    """The metric on each resample (a row of row indices), vectorised where the aggregate allows."""
    if scores.aggregate == "mean":
        return scores.values[samples].mean(axis=1)
    if scores.aggregate == "perplexity":
        totals = scores.values[samples].sum(axis=1)
        return np.exp(totals[:, 0] / np.maximum(totals[:, 1], 1))
    return np.array([scores.score(sample) for sample in samples])


def bleu_rows(predictions: list[str], references: list[str]) -> RowScores:
    """Per-reply sacrebleu statistics whose sums give exactly `sacrebleu.corpus_bleu(predictions, [references])`.

    Args:
        predictions: The generated replies.
        references: The reference reply of each, in the same order.

    Returns:
        RowScores with the "bleu" aggregate: (replies, 10) statistics.
    """
    import sacrebleu

    scorer = sacrebleu.BLEU()
    rows = []
    for prediction, reference in zip(predictions, references):
        stats = scorer.corpus_score([prediction], [[reference]])
        rows.append([*stats.counts, *stats.totals, stats.sys_len, stats.ref_len])
    return RowScores("bleu", np.array(rows, dtype=np.float64).reshape(-1, 10))


def generation_rows(predictions: list[str], references: list[str]) -> dict[str, RowScores]:
    """Per-reply statistics of every generation score (`finetune.metrics.score_generations`).

    Args:
        predictions: The generated replies.
        references: The reference reply of each, in the same order.

    Returns:
        Score name -> RowScores: bleu's statistics, and each per-reply score's values (aggregate "mean").
    """
    from finetune.metrics import per_reply_scores

    rows = {"bleu": bleu_rows(predictions, references)}
    rows.update(
        {
            name: RowScores("mean", np.array(values))
            for name, values in per_reply_scores(predictions, references).items()
        }
    )
    return rows


@dataclass(frozen=True)
class Change:
    """A metric before and after, and the 95% paired bootstrap interval of the change."""

    metric: str
    before: float
    after: float
    rows: int  # how many held-out rows both were scored on
    relative: bool  # change and interval as fractions of `before` (False where a resample's before is zero)
    change: float
    low: float
    high: float
    verdict: Verdict

    def text(self) -> str:
        """e.g. "-47.7% (better; 95% CI -52.1% to -43.0%)" or "-13.3%: no clear change (n=16; 95% CI -40% to +15%)"."""
        if self.verdict == "unchanged":
            return "unchanged"
        interval = f"95% CI {self._number(self.low)} to {self._number(self.high)}"
        if self.verdict == "no clear change":
            return f"{self._number(self.change)}: no clear change (n={self.rows}; {interval})"
        return f"{self._number(self.change)} ({self.verdict}; {interval})"

    def _number(self, value: float) -> str:
        return f"{value:+.1%}" if self.relative else f"{value:+.4g}"

    def as_dict(self) -> dict[str, float | int | str | bool]:
        """The change as a JSON-ready dict of its fields (what metrics.json records; `Change(**d)` reads it back).

        Returns:
            Field name -> value.
        """
        return {**self.__dict__}


def paired_change(
    metric: str, before: RowScores, after: RowScores, *, lower_is_better: bool, relative: bool = True
) -> Change:
    """The change of one metric from `before` to `after`, scored on the same rows in the same order; as a share of
    the before score where `relative` (and every resample's before score is non-zero), else in the metric's units.

    The interval is the central 95% of RESAMPLES paired bootstrap resamples of the rows (seeded, so it never changes);
    the verdict is "better" or "worse" only when it excludes zero, "unchanged" when the rows' values are identical.

    Args:
        metric: The metric's name.
        before: Its per-row statistics before training.
        after: Its per-row statistics after training, on the same rows.
        lower_is_better: Whether a decrease is an improvement.
        relative: Whether to express the change as a share of the before score.

    Returns:
        The Change.

    Raises:
        ValueError: `before` and `after` differ in rows or aggregate.
    """
    if len(before) != len(after) or before.aggregate != after.aggregate:
        raise ValueError(f"{metric}: before and after must be scored on the same rows ({len(before)} vs {len(after)})")
    old, new = before.score(), after.score()
    rows = len(before)
    if np.array_equal(before.values, after.values):
        return Change(metric, old, new, rows, relative and old != 0, 0.0, 0.0, 0.0, "unchanged")
    samples = np.random.default_rng(SEED).integers(0, rows, (RESAMPLES, rows))
    resampled_before, resampled_after = _resampled(before, samples), _resampled(after, samples)
    relative = relative and bool(np.all(resampled_before != 0))
    if relative:  # against the before score's size, so a negative score that rises reads as a rise
        changes = (resampled_after - resampled_before) / np.abs(resampled_before)
        change = (new - old) / abs(old)
    else:
        changes, change = resampled_after - resampled_before, new - old
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(changes, [tail, 100 - tail])
    if low > 0 or high < 0:  # the interval excludes no change
        improved = (high < 0) if lower_is_better else (low > 0)
        verdict: Verdict = "better" if improved else "worse"
    else:
        verdict = "no clear change"
    return Change(metric, old, new, rows, relative, float(change), float(low), float(high), verdict)


def comparison_markdown(changes: list[Change]) -> list[str]:
    """The same table in Markdown (report.md, the model card).

    Args:
        changes: Each metric's change.

    Returns:
        The table's lines.
    """
    lines = ["| metric | before | after | change (95% interval) |", "|---|---:|---:|---:|"]
    lines += [f"| {c.metric} | {c.before:.4g} | {c.after:.4g} | {c.text()} |" for c in changes]
    return lines


def recorded_changes(summary: dict[str, Any]) -> list[Change]:
    """The changes a run's metrics.json records.

    Args:
        summary: The parsed metrics.json.

    Returns:
        Its Changes, none when it has no "changes".
    """
    return [Change(**change) for change in summary.get("changes") or []]


# What the intervals are, wherever the table appears.
INTERVAL_NOTE = (
    "Changes come with 95% paired bootstrap intervals over the held-out rows both models were scored on (2,000 "
    "resamples); a change is called better or worse only when its interval excludes no change."
)


def compare(before: dict[str, RowScores], after: dict[str, RowScores]) -> list[Change]:
    """Every metric both sides have, in `before`'s order, with its interval.

    Args:
        before: Metric name -> per-row statistics before training.
        after: Metric name -> per-row statistics after training, on the same rows.

    Returns:
        One Change per metric, relative except for the scores in ABSOLUTE_CHANGE.
    """
    from finetune.metrics import ABSOLUTE_CHANGE, lower_is_better

    return [
        paired_change(
            name, scores, after[name], lower_is_better=lower_is_better(name), relative=name not in ABSOLUTE_CHANGE
        )
        for name, scores in before.items()
        if name in after
    ]
