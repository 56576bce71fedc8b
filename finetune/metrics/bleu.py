"""Corpus BLEU (0-100) from sacrebleu, one reference per prediction."""

import datasets
import evaluate
import sacrebleu


class Bleu(evaluate.Metric):
    """Corpus BLEU (sacrebleu) of replies against one reference each, as an `evaluate` metric.

    `compute` returns `bleu`.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description="predictions: list[str]; references: list[str], one per prediction.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        # sacrebleu takes reference *streams*: one list per reference set, aligned with predictions.
        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}
