"""Paired bootstrap intervals: a real difference is called, pure noise is not, and every aggregate is recomputed
exactly from its per-row statistics."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from finetune.metrics.intervals import Change, RowScores, bleu_rows, compare, paired_change, recorded_changes


def _perplexity_rows(nll_per_token: np.ndarray, tokens: np.ndarray) -> RowScores:
    return RowScores("perplexity", np.stack([nll_per_token * tokens, tokens], axis=1))


def test_a_real_improvement_is_called_better_with_an_interval_that_excludes_zero():
    generator = np.random.default_rng(1)
    tokens = generator.integers(5, 40, size=60).astype(float)
    base = generator.normal(3.0, 0.5, size=60)
    before = _perplexity_rows(base, tokens)
    after = _perplexity_rows(base - 0.3 + generator.normal(0, 0.1, size=60), tokens)  # every row a little better
    change = paired_change("perplexity", before, after, lower_is_better=True)
    assert change.verdict == "better" and change.high < 0 and change.low < change.change < change.high
    assert change.before == pytest.approx(np.exp((base * tokens).sum() / tokens.sum()))
    assert change.text().startswith(f"{change.change:+.1%} (better; 95% CI ")


def test_the_same_change_on_a_higher_is_better_metric_is_worse():
    values = np.linspace(0.2, 0.8, 40)
    change = paired_change("rougeL", RowScores("mean", values), RowScores("mean", values - 0.05), lower_is_better=False)
    assert change.verdict == "worse" and change.change == pytest.approx(-0.05 / values.mean())


def test_pure_noise_is_no_clear_change_and_says_how_many_rows():
    generator = np.random.default_rng(2)
    before = generator.uniform(0, 1, size=16)
    after = before + generator.normal(0, 0.2, size=16)  # no shift, only noise
    change = paired_change("token_f1", RowScores("mean", before), RowScores("mean", after), lower_is_better=False)
    assert change.verdict == "no clear change" and change.low < 0 < change.high
    assert "no clear change (n=16; 95% CI" in change.text()


def test_under_no_change_the_interval_calls_a_change_about_one_time_in_twenty():
    """Coverage: 200 experiments where the two models are equally good; a 95% interval should call about 5% of them
    (a wrong interval, e.g. unpaired or too narrow, calls far more)."""
    generator = np.random.default_rng(3)
    called = 0
    for _ in range(200):
        difficulty = generator.uniform(0.2, 0.8, size=40)  # rows differ a lot; the models only by noise
        before = difficulty + generator.normal(0, 0.05, size=40)
        after = difficulty + generator.normal(0, 0.05, size=40)
        change = paired_change("rouge1", RowScores("mean", before), RowScores("mean", after), lower_is_better=False)
        called += change.verdict != "no clear change"
    assert 2 <= called <= 22, called  # 5% of 200 = 10; the binomial's 99.9% range is about 2-22


def test_pairing_tells_a_small_consistent_change_that_row_difficulty_would_hide():
    generator = np.random.default_rng(4)
    difficulty = generator.uniform(0, 1, size=50)
    change = paired_change(
        "token_f1", RowScores("mean", difficulty), RowScores("mean", difficulty + 0.02), lower_is_better=False
    )
    assert change.verdict == "better"  # an unpaired comparison of two spreads this wide could not tell 0.02


def test_identical_scores_are_unchanged_and_a_zero_before_is_an_absolute_change():
    same = RowScores("mean", np.array([0.1, 0.2, 0.3]))
    assert paired_change("rouge1", same, same, lower_is_better=False).text() == "unchanged"
    zero = paired_change(
        "exact_match", RowScores("mean", np.zeros(30)), RowScores("mean", np.ones(30)), lower_is_better=False
    )
    assert not zero.relative and zero.text() == "+1 (better; 95% CI +1 to +1)"


def test_bleu_from_per_reply_statistics_is_sacrebleus_corpus_bleu():
    predictions = ["the cat sat on the mat", "a dog barked loudly at night", "hello", "it is raining again today"]
    references = ["the cat sat on a mat", "the dog barked at night", "hello there", "it is raining today"]
    rows = bleu_rows(predictions, references)
    assert rows.score() == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert rows.score(np.array([0, 0, 1])) == pytest.approx(
        sacrebleu.corpus_bleu(
            [predictions[0], predictions[0], predictions[1]], [[references[0]] * 2 + [references[1]]]
        ).score
    )


def test_compare_keeps_order_and_round_trips_through_metrics_json():
    before = {
        "perplexity": _perplexity_rows(np.full(20, 3.0), np.full(20, 10.0)),
        "rouge1": RowScores("mean", np.full(20, 0.5)),
    }
    after = {
        "perplexity": _perplexity_rows(np.full(20, 2.0), np.full(20, 10.0)),
        "rouge1": RowScores("mean", np.full(20, 0.5)),
    }
    changes = compare(before, after)
    assert [c.metric for c in changes] == ["perplexity", "rouge1"]
    assert changes[0].verdict == "better" and changes[1].verdict == "unchanged"
    assert recorded_changes({"changes": [c.as_dict() for c in changes]}) == changes
    assert all(isinstance(c, Change) for c in changes)


def test_rows_must_be_the_same_for_both_models():
    with pytest.raises(ValueError, match="same rows"):
        paired_change("rouge1", RowScores("mean", np.zeros(3)), RowScores("mean", np.zeros(4)), lower_is_better=False)


def test_a_negative_score_that_rises_reads_as_a_rise():
    before = np.linspace(-12, -8, 30)
    change = paired_change(
        "chosen_logp", RowScores("mean", before), RowScores("mean", before + 1), lower_is_better=False
    )
    assert change.verdict == "better" and change.change == pytest.approx(0.1) and change.low > 0
    absolute = paired_change(
        "reward_margin", RowScores("mean", before), RowScores("mean", before + 1), lower_is_better=False, relative=False
    )
    assert not absolute.relative and absolute.text().startswith("+1 (better; 95% CI +1 to +1)")
