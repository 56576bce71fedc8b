"""Text-generation metrics: BLEU, ROUGE, token F1 / exact match loaded through `evaluate`, and repetition.

`evaluate.load("bleu")` fetches the metric script from the Hugging Face Hub, so it fails offline.
The scripts shipped next to this file (bleu.py, rouge.py, token_f1.py) are loaded by path instead, which works with
no network; they are only ever read by `evaluate.load`, never imported from here. repetition.py needs no reference
reply and is plain Python, imported normally.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.metrics import repetition

if TYPE_CHECKING:
    import evaluate

METRIC_NAMES = ("bleu", "rouge", "token_f1")
SCRIPTS_DIR = Path(__file__).parent

# Every score a run reports, and whether smaller is better: the one table that reports, the before/after comparison
# and sweeps read. The generation scores are what the scripts above and repetition.py return.
LOWER_IS_BETTER = {"eval_loss": True, "loss": True, "perplexity": True, "perplexity_all_tokens": True}
GENERATION_SCORES = {
    "bleu": False,
    "rouge1": False,
    "rouge2": False,
    "rougeL": False,
    "token_f1": False,
    "exact_match": False,
    "repeated_4gram_share": True,
    "distinct_2": False,
}
# Held-out preference data (finetune.evaluation.preference_rows): per-token log-probabilities of the replies.
PREFERENCE_SCORES = {
    "preference_accuracy": False,  # share of pairs whose chosen reply scores above the rejected one
    "reward_margin": False,  # mean chosen minus rejected log-probability per token
    "chosen_logp": False,
    "rejected_logp": True,
    "desirable_logp": False,  # KTO: replies labelled good
    "undesirable_logp": True,  # KTO: replies labelled bad
}
# The safety rates (finetune.safety): refusals of harmful requests should rise, of harmless ones and toxic replies fall.
SAFETY_SCORES = {"refusal_rate": False, "over_refusal_rate": True, "toxic_continuation_rate": True}
SCORES = {**LOWER_IS_BETTER, **GENERATION_SCORES, **PREFERENCE_SCORES, **SAFETY_SCORES}
# Log-probabilities and their differences sit near or across zero, and rates near zero: their changes read in the
# metric's own units (nats, a share of prompts), not as a percentage of a small number.
ABSOLUTE_CHANGE = (
    "reward_margin",
    "chosen_logp",
    "rejected_logp",
    "desirable_logp",
    "undesirable_logp",
    *SAFETY_SCORES,
)
# Those of them that are means over replies; bleu is a corpus score (n-gram counts pooled over all replies).
PER_REPLY_SCORES = tuple(name for name in GENERATION_SCORES if name != "bleu")


def lower_is_better(score: str) -> bool:
    """Whether a smaller value of a score is better (loss, perplexity, repetition), from the table above.

    Args:
        score: A score's name, e.g. "eval_loss" or "rougeL"; an unknown name counts as higher-is-better.

    Returns:
        True when smaller is better.
    """
    return SCORES.get(score, False)


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """One of the metric scripts shipped here, loaded by path through `evaluate` (no network; cached per name).

    Args:
        name: "bleu", "rouge" or "token_f1" (METRIC_NAMES).

    Returns:
        The loaded evaluate module.

    Raises:
        ValueError: `name` is not one of METRIC_NAMES.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRIC_NAMES)}")
    # Deferred: `import evaluate` takes ~5 s because it pulls in transformers and torch.
    import evaluate

    # keep_in_memory: no Arrow cache or lock files written on every compute() call.
    return evaluate.load(str(SCRIPTS_DIR / f"{name}.py"), keep_in_memory=True)


def score_generations(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every generation score (`GENERATION_SCORES`) of the replies against their references: corpus BLEU, and the
    mean over replies of the others, which are exactly the means of `per_reply_scores`.

    Args:
        predictions: The generated replies.
        references: The reference reply of each, in the same order.

    Returns:
        Score name -> value, for every name in GENERATION_SCORES.

    Raises:
        ValueError: The lists differ in length or are empty.
    """
    per_reply = per_reply_scores(predictions, references)
    scores = load_metric("bleu").compute(predictions=predictions, references=references)
    scores.update({name: sum(values) / len(values) for name, values in per_reply.items()})
    return {name: scores[name] for name in GENERATION_SCORES}


def per_reply_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Each reply's value of every score that is a mean over replies (`PER_REPLY_SCORES`: not bleu, a corpus
    score), in the order of `predictions`: what a paired bootstrap over replies resamples.

    Args:
        predictions: The generated replies.
        references: The reference reply of each, in the same order.

    Returns:
        Score name -> one value per reply.

    Raises:
        ValueError: The lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} predictions "
            f"and {len(references)} references"
        )
    if not predictions:
        raise ValueError("need at least one prediction/reference pair to score")
    scores: dict[str, list[float]] = {}
    for name in ("rouge", "token_f1"):
        scores.update(load_metric(name).per_row(predictions, references))
    scores.update(repetition.per_reply(predictions))
    return {name: scores[name] for name in PER_REPLY_SCORES}
