"""Augmentation: user turns only, training split only, reproducible from the seed; NEFTune reaches the trainer."""

import json
import random

from finetune.config import AugmentConfig, DataConfig, DataSource, TrainingConfig
from finetune.data import prepare_data
from finetune.data.augment import add_typo, noisy
from finetune.training import sft_config

QUESTIONS = [f"could you please tell me what the number {i} looks like when written in words" for i in range(30)]


def _prepare(tmp_path, tokenizer, seed=1, **augment):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": q, "completion": f"It is {i}."}) for i, q in enumerate(QUESTIONS)))
    cfg = DataConfig(sources=[DataSource(path=str(path))], augment=AugmentConfig(**augment), seed=seed, max_length=128)
    return prepare_data(cfg, tokenizer)


def test_each_noise_kind_changes_words_as_described():
    rng = random.Random(0)
    assert len(add_typo("keyboard", rng)) in (7, 8, 9) and add_typo("ab", rng) == "ab"
    text = "one two three four five six seven eight"
    assert sorted(noisy(text, AugmentConfig(word_swaps=1.0), random.Random(0)).split()) == sorted(text.split())
    deleted = noisy(text, AugmentConfig(word_deletions=0.5), random.Random(0)).split()
    assert 0 < len(deleted) < 8 and all(word in text.split() for word in deleted)
    assert (
        noisy("solo", AugmentConfig(word_deletions=1.0), random.Random(0)) == "solo"
    )  # never deletes the whole prompt


def test_copies_are_reproducible_touch_only_user_turns_and_only_train(tmp_path, chatml_tokenizer):
    first = _prepare(tmp_path, chatml_tokenizer, typos=0.3, word_swaps=0.2, word_deletions=0.1, copies=2)
    again = _prepare(tmp_path, chatml_tokenizer, typos=0.3, word_swaps=0.2, word_deletions=0.1, copies=2)
    other_seed = _prepare(tmp_path, chatml_tokenizer, seed=2, typos=0.3, word_swaps=0.2, word_deletions=0.1, copies=2)
    plain = _prepare(tmp_path, chatml_tokenizer)
    train = first.splits["train"]
    assert train["messages"] == again.splits["train"]["messages"]
    copies = [row for row in train if "(augmented" in row["origin"]]
    assert len(copies) == first.report.augmented > len(plain.splits["train"])  # close to 2 per original
    originals = {row["messages"][1]["content"]: row["messages"][0]["content"] for row in plain.splits["train"]}
    for row in copies:
        reply = row["messages"][1]["content"]
        assert reply in originals and row["messages"][0]["content"] != originals[reply]  # prompt noisy, reply clean
    for name in ("validation", "test"):
        assert first.splits[name]["messages"] == plain.splits[name]["messages"]

    def noisy_prompts(prepared):
        return [r["messages"][0]["content"] for r in prepared.splits["train"] if "(augmented" in r["origin"]]

    assert noisy_prompts(first) != noisy_prompts(other_seed)


def test_neftune_alpha_reaches_the_trainer(tmp_path):
    args = sft_config(
        TrainingConfig(neftune_noise_alpha=5.0), tmp_path, train_rows=10, has_validation=False, dtype=None
    )
    assert args.neftune_noise_alpha == 5.0
