"""ROUGE-1/2/L F-measure (0-1) from rouge_score with stemming, averaged over rows."""

import datasets
import evaluate
from rouge_score import rouge_scorer

ROUGE_TYPES = ["rouge1", "rouge2", "rougeL"]


class Rouge(evaluate.Metric):
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge_score, stemmed), each the mean over replies, as an `evaluate`
    metric: `compute` returns rouge1, rouge2 and rougeL.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list[str]; references: list[str], one per prediction.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def per_row(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        """Each reply's F-measures, the values `compute` averages (for intervals over replies).

        Args:
            predictions: The generated replies.
            references: The reference reply of each, in the same order.

        Returns:
            rouge1, rouge2 and rougeL -> one F-measure per reply.
        """
        scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=True)
        rows = [scorer.score(target=ref, prediction=pred) for pred, ref in zip(predictions, references)]
        return {key: [row[key].fmeasure for row in rows] for key in ROUGE_TYPES}

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        # A plain mean, not rouge_score's BootstrapAggregator: deterministic and easy to check by hand.
        return {key: sum(values) / len(values) for key, values in self.per_row(predictions, references).items()}
