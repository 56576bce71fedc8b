"""Augmentation of the training split: noisy copies of conversations, reproducible from the seed.

Noise goes into user turns only: the model should learn to read messy prompts, never to write messy replies.
NEFTune (noise on embeddings while training) is the other augmentation; it lives in training.neftune_noise_alpha
because TRL applies it inside the trainer.
"""

from __future__ import annotations

import random
import re
import string
from typing import Any

from finetune.config import AugmentConfig

_WORD_OR_SPACE = re.compile(r"\S+|\s+")


def add_typo(word: str, rng: random.Random) -> str:
    """One character edit: substitute, delete, insert, or swap two neighbours.

    Words shorter than 3 characters are returned unchanged.

    Args:
        word: The word to edit.
        rng: The random generator choosing the position, the kind of edit and any inserted letter.

    Returns:
        The edited word.
    """
    if len(word) < 3:
        return word
    i = rng.randrange(len(word) - 1)
    kind = rng.choice(("substitute", "delete", "insert", "swap"))
    if kind == "substitute":
        return word[:i] + rng.choice(string.ascii_lowercase) + word[i + 1 :]
    if kind == "delete":
        return word[:i] + word[i + 1 :]
    if kind == "insert":
        return word[:i] + rng.choice(string.ascii_lowercase) + word[i:]
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def noisy(text: str, cfg: AugmentConfig, rng: random.Random) -> str:
    """A noisy version of a user message: words deleted, neighbours swapped and typos added at `cfg`'s rates.

    At least one word is always kept; repeated spaces left by deletions are collapsed.

    Args:
        text: The user message.
        cfg: The `data.augment:` section: word_deletions, word_swaps and typos (shares of words).
        rng: The random generator, seeded per row and copy.

    Returns:
        The noisy text.
    """
    pieces = _WORD_OR_SPACE.findall(text)
    words = [i for i, piece in enumerate(pieces) if not piece.isspace()]
    if cfg.word_deletions and len(words) > 1:
        deleted = {i for i in words if rng.random() < cfg.word_deletions}
        if len(deleted) == len(words):  # never delete the whole prompt
            deleted.discard(words[0])
        for i in deleted:
            pieces[i] = ""
        words = [i for i in words if i not in deleted]
    if cfg.word_swaps:
        for a, b in zip(words, words[1:]):
            if rng.random() < cfg.word_swaps:
                pieces[a], pieces[b] = pieces[b], pieces[a]
    if cfg.typos:
        for i in words:
            if rng.random() < cfg.typos:
                pieces[i] = add_typo(pieces[i], rng)
    return re.sub(r"  +", " ", "".join(pieces)).strip()


def augmented_copies(rows: list[dict[str, Any]], cfg: AugmentConfig, seed: int) -> list[dict[str, Any]]:
    """`cfg.copies` noisy copies of each chat conversation (text rows are left alone); copies equal to their original are skipped.

    Args:
        rows: Training conversations (cleaned, validated).
        cfg: The `data.augment:` section: `copies` and the noise rates; only user turns are changed.
        seed: `data.seed`; each copy's randomness depends on it, the copy number and the row's origin only.

    Returns:
        The new rows, their origin marked "(augmented N)".
    """
    copies = []
    for row in rows:
        if not row["messages"]:
            continue
        for copy in range(cfg.copies):
            rng = random.Random(f"{seed}:{copy}:{row['origin']}")  # stable per row, whatever the row order
            messages = [
                {**m, "content": noisy(m["content"], cfg, rng) or m["content"]} if m["role"] == "user" else m
                for m in row["messages"]
            ]
            if messages != row["messages"]:
                copies.append({**row, "messages": messages, "origin": f"{row['origin']} (augmented {copy + 1})"})
    return copies
