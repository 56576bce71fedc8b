"""SQuAD-style token F1 and exact match (0-1), averaged over rows."""

# Written by hand: the only packaged implementation is the Hub's "squad" metric, unreachable offline.
import collections
import re
import string

import datasets
import evaluate

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lowercased, punctuation and the articles a/an/the removed, spaces collapsed.

    Args:
        text: A reply.

    Returns:
        The normalised text.
    """
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split())


def f1(prediction: str, reference: str) -> float:
    """Token F1 of a reply against its reference, over their normalised words (SQuAD's definition).

    When either side has no words, F1 is 1 if both have none, else 0.

    Args:
        prediction: The generated reply.
        reference: The reference reply.

    Returns:
        F1 between 0 and 1.
    """
    pred_tokens = normalize(prediction).split()
    ref_tokens = normalize(reference).split()
    # SQuAD v2 convention: if either side is empty, F1 is 1 only when both are.
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((collections.Counter(pred_tokens) & collections.Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


class TokenF1(evaluate.Metric):
    """Token F1 and exact match (SQuAD's definitions), each the mean over replies, as an `evaluate` metric:
    `compute` returns token_f1 and exact_match.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Rajpurkar et al., 2016. SQuAD: 100,000+ Questions for Machine Comprehension of Text.",
            inputs_description="predictions: list[str]; references: list[str], one per prediction.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def per_row(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        """Each reply's F1 and exact match (0 or 1), the values `compute` averages (for intervals over replies).

        Args:
            predictions: The generated replies.
            references: The reference reply of each, in the same order.

        Returns:
            token_f1 and exact_match -> one value per reply.
        """
        pairs = list(zip(predictions, references))
        return {
            "token_f1": [f1(pred, ref) for pred, ref in pairs],
            "exact_match": [float(normalize(pred) == normalize(ref)) for pred, ref in pairs],
        }

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        return {key: sum(values) / len(values) for key, values in self.per_row(predictions, references).items()}
