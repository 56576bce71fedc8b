import socket

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from finetune.metrics import (
    GENERATION_SCORES,
    PER_REPLY_SCORES,
    load_metric,
    lower_is_better,
    per_reply_scores,
    score_generations,
)
from finetune.metrics.repetition import distinct_ngram_share, repeated_ngram_share, tokens

PREDICTIONS = [
    "the quick brown fox jumps over the lazy dog",
    "the cat sat on the mat",
    "the runners were running fast",
    "hello world",
]
REFERENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a cat was sitting on the mat",
    "the runner ran quickly",
    "completely different words here",
]


def rouge_means(predictions: list[str], references: list[str]) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {key: sum(row[key].fmeasure for row in rows) / len(rows) for key in ("rouge1", "rouge2", "rougeL")}


def test_bleu_matches_sacrebleu() -> None:
    bleu = load_metric("bleu")
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert 0 < expected < 100
    assert bleu.compute(predictions=PREDICTIONS, references=REFERENCES)["bleu"] == pytest.approx(expected)
    assert bleu.compute(predictions=PREDICTIONS[:1], references=REFERENCES[:1])["bleu"] == pytest.approx(100.0)
    assert bleu.compute(predictions=PREDICTIONS[-1:], references=REFERENCES[-1:])["bleu"] == 0.0


def test_rouge_matches_rouge_score() -> None:
    rouge = load_metric("rouge")
    assert rouge.compute(predictions=PREDICTIONS, references=REFERENCES) == pytest.approx(
        rouge_means(PREDICTIONS, REFERENCES)
    )
    perfect = rouge.compute(predictions=PREDICTIONS[:1], references=REFERENCES[:1])
    assert perfect == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    mismatch = rouge.compute(predictions=PREDICTIONS[-1:], references=REFERENCES[-1:])
    assert mismatch == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_uses_stemming() -> None:
    scores = load_metric("rouge").compute(predictions=["runners running"], references=["runner run"])
    assert scores["rouge1"] == pytest.approx(1.0)


def test_token_f1_hand_computed() -> None:
    token_f1 = load_metric("token_f1")
    # Articles dropped: ["cat", "sat"] vs ["cat", "sat", "down"] -> precision 1, recall 2/3, F1 0.8.
    assert token_f1.compute(predictions=["the cat sat"], references=["a cat sat down"]) == pytest.approx(
        {"token_f1": 0.8, "exact_match": 0.0}
    )
    scores = token_f1.compute(
        predictions=["the cat sat", "The Cat, sat!", "hello world"],
        references=["a cat sat down", "cat sat", "goodbye moon"],
    )
    assert scores == pytest.approx({"token_f1": (0.8 + 1.0 + 0.0) / 3, "exact_match": 1 / 3})


def test_exact_match_normalises_case_punctuation_and_articles() -> None:
    scores = load_metric("token_f1").compute(
        predictions=["The cat.", "a  dog", "bird"], references=["cat", "dog!", "birds"]
    )
    assert scores["exact_match"] == pytest.approx(2 / 3)


def test_score_generations_combines_all_metrics() -> None:
    scores = score_generations(PREDICTIONS, REFERENCES)
    assert list(scores) == list(GENERATION_SCORES)
    assert set(scores) == {
        "bleu",
        "rouge1",
        "rouge2",
        "rougeL",
        "token_f1",
        "exact_match",
        "repeated_4gram_share",
        "distinct_2",
    }
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert {key: scores[key] for key in ("rouge1", "rouge2", "rougeL")} == pytest.approx(
        rouge_means(PREDICTIONS, REFERENCES)
    )
    assert scores["exact_match"] == pytest.approx(1 / 4)


LOOPS = [
    "I am a being that is a being that is a being",  # SmolLM2-135M-Instruct's own greedy reply, cut short
    "I'm ready with a glass of wine! I'm ready with a glass of wine!",
]


def test_repetition_on_constructed_replies() -> None:
    being, wine = (tokens(text) for text in LOOPS)
    assert being == "i am a being that is a being that is a being".split()
    # 9 4-grams; "a being that is", "being that is a", "that is a being" come back once each.
    assert repeated_ngram_share(being, 4) == pytest.approx(3 / 9)
    assert distinct_ngram_share(being, 2) == pytest.approx(6 / 11)  # i am, am a, a being, being that, that is, is a
    assert wine[:4] == ["i", "'", "m", "ready"] and len(wine) == 20  # symbols count, so loops of them are seen
    assert repeated_ngram_share(wine, 4) == pytest.approx(7 / 17)  # the second sentence's 7 4-grams are repeats
    assert repeated_ngram_share(tokens("🌟🌟🌟🌟🌟"), 4) == pytest.approx(1 / 2)
    assert repeated_ngram_share(tokens("The capital of Zorbia is Quenth."), 4) == 0.0
    # Too short for an n-gram: nothing repeated.
    assert repeated_ngram_share(tokens("Hi there"), 4) == 0.0 and distinct_ngram_share(tokens("Hi"), 2) == 1.0
    assert lower_is_better("repeated_4gram_share") and not lower_is_better("distinct_2")


def test_per_reply_scores_are_what_the_means_average() -> None:
    predictions, references = [*PREDICTIONS, *LOOPS], [*REFERENCES, "a being", "cheers"]
    rows = per_reply_scores(predictions, references)
    assert list(rows) == list(PER_REPLY_SCORES) and "bleu" not in rows
    assert all(len(values) == len(predictions) for values in rows.values())
    scores = score_generations(predictions, references)
    assert all(scores[name] == sum(values) / len(values) for name, values in rows.items())
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        assert {key: rows[key][index] for key in ("rouge1", "rouge2", "rougeL")} == pytest.approx(
            rouge_means([prediction], [reference])
        )
    assert rows["exact_match"][0] == 1.0 and rows["repeated_4gram_share"][-2:] == [pytest.approx(3 / 9), 7 / 17]
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        per_reply_scores(["a b", "c d"], ["a b"])


def test_length_mismatch_names_both_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        score_generations(["a b", "c d"], ["a b"])


def test_empty_input_rejected() -> None:
    with pytest.raises(ValueError, match="at least one"):
        score_generations([], [])


def test_unknown_metric_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="'meteor'.*bleu, rouge, token_f1"):
        load_metric("meteor")


def test_loads_offline_and_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    # The env vars are read once at import time, so also make any connection attempt fail loudly.
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"metric loading tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    load_metric.cache_clear()
    for name in ("bleu", "rouge", "token_f1"):
        assert load_metric(name) is load_metric(name)
    assert score_generations(["the cat sat"], ["a cat sat down"])["token_f1"] == pytest.approx(0.8)
