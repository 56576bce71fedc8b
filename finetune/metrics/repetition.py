"""Repetition within one generated reply: how much of it repeats itself verbatim (a loop) and how varied it is.

Plain Python, imported normally (no reference reply is needed, so nothing to load through `evaluate`). A reply is
split into lowercased words and single symbols (`tokens`), so a loop of emoji or punctuation counts too.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    """Lowercased words and single non-space symbols, e.g. "I'm ready!" -> ["i", "'", "m", "ready", "!"].

    Args:
        text: A reply.

    Returns:
        Its tokens, in order.
    """
    return _TOKEN.findall(text.lower())


def repeated_ngram_share(sequence: Sequence[Hashable], n: int = 4) -> float:
    """Share of the sequence's n-grams that already occurred earlier in it (0 = no repeat; a loop tends to 1).

    Sequences too short for one n-gram repeat nothing: 0.

    Args:
        sequence: Tokens (e.g. from `tokens`).
        n: The n-gram length.

    Returns:
        A share between 0 and 1.
    """
    grams = [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]
    seen: set[tuple[Hashable, ...]] = set()
    repeated = 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams) if grams else 0.0


def distinct_ngram_share(sequence: Sequence[Hashable], n: int = 2) -> float:
    """Distinct n-grams / n-grams of the sequence (distinct-n within one reply; 1 = nothing repeats).

    Sequences too short for one n-gram repeat nothing: 1.

    Args:
        sequence: Tokens (e.g. from `tokens`).
        n: The n-gram length.

    Returns:
        A share between 0 and 1.
    """
    grams = [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def per_reply(predictions: Sequence[str]) -> dict[str, list[float]]:
    """`repeated_4gram_share` (lower is better) and `distinct_2` (higher is better) of each reply.

    Args:
        predictions: The generated replies.

    Returns:
        repeated_4gram_share and distinct_2 -> one value per reply.
    """
    split = [tokens(text) for text in predictions]
    return {
        "repeated_4gram_share": [repeated_ngram_share(words, 4) for words in split],
        "distinct_2": [distinct_ngram_share(words, 2) for words in split],
    }
