"""Text-generation metrics (BLEU, ROUGE, token F1 / exact match) loaded through `evaluate`.

`evaluate.load("bleu")` fetches the metric script from the Hugging Face Hub, so it fails offline.
The scripts shipped next to this file are loaded by path instead, which works with no network.
They are only ever read by `evaluate.load`, never imported from here.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

METRIC_NAMES = ("bleu", "rouge", "token_f1")
SCRIPTS_DIR = Path(__file__).parent

# Every score a run reports, and whether smaller is better: the one table that reports, the before/after comparison
# and sweeps read. The generation scores are what the scripts above return.
LOWER_IS_BETTER = {"eval_loss": True, "loss": True, "perplexity": True, "perplexity_all_tokens": True}
GENERATION_SCORES = ("bleu", "rouge1", "rouge2", "rougeL", "token_f1", "exact_match")
SCORES = {**LOWER_IS_BETTER, **{name: False for name in GENERATION_SCORES}}


def lower_is_better(score: str) -> bool:
    return SCORES.get(score, False)


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRIC_NAMES)}")
    # Deferred: `import evaluate` takes ~5 s because it pulls in transformers and torch.
    import evaluate

    # keep_in_memory: no Arrow cache or lock files written on every compute() call.
    return evaluate.load(str(SCRIPTS_DIR / f"{name}.py"), keep_in_memory=True)


def score_generations(predictions: list[str], references: list[str]) -> dict[str, float]:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} predictions "
            f"and {len(references)} references"
        )
    if not predictions:
        raise ValueError("need at least one prediction/reference pair to score")
    scores: dict[str, float] = {}
    for name in METRIC_NAMES:
        scores.update(load_metric(name).compute(predictions=predictions, references=references))
    return scores
