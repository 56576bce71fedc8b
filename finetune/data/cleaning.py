"""Cleaning steps, each switchable (data.clean.*), each counted in the DataReport.

Text steps rewrite every message (or text row): HTML, Unicode, control characters, whitespace, lowercasing,
e-mail/phone scrubbing. Row steps drop whole conversations: blocklist, exact and near duplicates.
Written here with the standard library because each step is a few lines; near-duplicate detection uses
datasketch's MinHash LSH rather than a hand-rolled one.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from finetune.config import CleaningConfig
from finetune.data.report import DataReport
from finetune.errors import FinetuneError

Conversation = dict[str, Any]  # {"messages": [...], "text": str, "origin": str, "source": int}


class _TextOnly(HTMLParser):
    _BREAKS = {"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._BREAKS:
            self.parts.append("\n")


def strip_html(text: str) -> str:
    """Cleaning step "html": HTML tags removed and entities decoded, the text kept.

    Args:
        text: A message's content.

    Returns:
        The text without markup (unchanged when it has no `<` or `&`).
    """
    if "<" not in text and "&" not in text:
        return text
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def normalize_unicode(text: str) -> str:
    """Cleaning step "unicode": Unicode normalised to NFC.

    Args:
        text: A message's content.

    Returns:
        The NFC-normalised text.
    """
    # NFC, not NFKC: NFKC rewrites superscripts, full-width forms and ligatures, which changes meaning in code and maths.
    return unicodedata.normalize("NFC", text)


_INVISIBLE = {"\u200b", "\ufeff", "\u2060", "\u00ad"}  # zero-width space, BOM, word joiner, soft hyphen


def remove_control_chars(text: str) -> str:
    r"""Cleaning step "control_chars": line endings made `\n`, control and invisible characters removed.

    Newlines and tabs are kept.

    Args:
        text: A message's content.

    Returns:
        The text without control characters.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch for ch in text if ch in "\n\t" or (unicodedata.category(ch) != "Cc" and ch not in _INVISIBLE))


_MANY_NEWLINES = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)


def normalize_whitespace(text: str) -> str:
    """Cleaning step "whitespace": non-breaking spaces made plain, trailing spaces and runs of blank lines removed.

    Args:
        text: A message's content.

    Returns:
        The text, stripped at both ends.
    """
    # Indentation and runs of inner spaces are kept: they carry meaning in code and tables.
    text = text.replace("\u00a0", " ")
    return _MANY_NEWLINES.sub("\n\n", _TRAILING_SPACE.sub("", text)).strip()


_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_PHONE_CANDIDATE = re.compile(r"(?<!\w)(?<!\d\.)\+?\(?\d[\d\s().-]{7,}\d(?!\w|\.\d)")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


def scrub_pii(text: str) -> str:
    """Cleaning step "pii": e-mail addresses replaced by [EMAIL] and phone numbers by [PHONE].

    A phone number is 9 to 15 digits written with a leading + or separators; plain integers, decimals, dates and IPv4
    addresses are left alone.

    Args:
        text: A message's content.

    Returns:
        The text with the addresses and numbers replaced.
    """
    text = _EMAIL.sub("[EMAIL]", text)

    def phone(match: re.Match[str]) -> str:
        candidate = match.group(0)
        digits = sum(ch.isdigit() for ch in candidate)
        # A phone number has 9-15 digits and is written with a + or separators; plain long integers, dates and
        # IP addresses are left alone.
        looks_written = candidate.startswith("+") or any(sep in candidate for sep in " -().")
        decimal = re.fullmatch(r"\d+\.\d+", candidate)
        if 9 <= digits <= 15 and looks_written and not decimal and not _IPV4.match(candidate) and "\n" not in candidate:
            return "[PHONE]"
        return candidate

    return _PHONE_CANDIDATE.sub(phone, text)


def text_steps(cfg: CleaningConfig) -> list[tuple[str, Callable[[str], str]]]:
    """The text cleaning steps `data.clean` switches on, in the order they run.

    Args:
        cfg: The `data.clean:` section.

    Returns:
        (step name, function) pairs: html, unicode, control_chars, whitespace, lowercase, pii (those switched on).
    """
    steps: list[tuple[str, Callable[[str], str] | None]] = [
        ("html", strip_html if cfg.html else None),
        ("unicode", normalize_unicode if cfg.unicode else None),
        ("control_chars", remove_control_chars if cfg.control_chars else None),
        ("whitespace", normalize_whitespace if cfg.whitespace else None),
        ("lowercase", str.lower if cfg.lowercase else None),
        ("pii", scrub_pii if cfg.pii else None),
    ]
    return [(name, step) for name, step in steps if step is not None]


def clean_conversation(
    row: Conversation, steps: list[tuple[str, Callable[[str], str]]], report: DataReport
) -> Conversation:
    """Apply the text steps to every message (or the text), counting each step that changed the row.

    Args:
        row: A conversation (messages, text, tools, origin).
        steps: The steps from `text_steps`.
        report: The data report; `report.cleaned[step]` counts the rows each step changed.

    Returns:
        The cleaned row (a new dict when anything changed).
    """
    for name, step in steps:
        messages = [_cleaned_message(m, step) for m in row["messages"]]
        text = step(row["text"]) if row["text"] else row["text"]
        if messages != row["messages"] or text != row["text"]:
            report.cleaned[name] += 1
            row = {**row, "messages": messages, "text": text}
    return row


def _cleaned_message(message: dict[str, Any], step: Callable[[str], str]) -> dict[str, Any]:
    # Tool-call arguments are JSON for a program, not prose, so they are left as they are.
    cleaned = {**message, "content": step(message["content"])}
    if message.get("reasoning_content"):
        cleaned["reasoning_content"] = step(message["reasoning_content"])
    return cleaned


def load_blocklist(cfg: CleaningConfig) -> re.Pattern[str] | None:
    """The `data.clean.blocklist` terms as one case-insensitive whole-word pattern.

    Args:
        cfg: The `data.clean:` section; `blocklist` is a list of terms or a file with one term a line (# comments).

    Returns:
        The pattern, or None when there is no blocklist or it holds no terms.

    Raises:
        FinetuneError: `data.clean.blocklist` names a file that does not exist.
    """
    if cfg.blocklist is None:
        return None
    terms = cfg.blocklist
    if isinstance(terms, str):
        path = Path(terms).expanduser()
        if not path.is_file():
            raise FinetuneError(
                f"data.clean.blocklist: file `{terms}` not found (give a file with one term per line, or a list of terms)."
            )
        terms = [
            line.strip()
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")
        ]
    if not terms:
        return None
    return re.compile(
        r"(?<!\w)(?:" + "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)) + r")(?!\w)", re.IGNORECASE
    )


def all_text(row: Conversation) -> str:
    """All of a conversation's text: a raw text row's text, or its messages' contents joined by newlines.

    Args:
        row: A conversation.

    Returns:
        The text.
    """
    return row["text"] or "\n".join(m["content"] for m in row["messages"])


def exact_key(row: Conversation) -> str:
    """A key equal for two rows exactly when their messages, text and tools are equal (for exact duplicates).

    Args:
        row: A conversation.

    Returns:
        The key: the row's messages, text and tools as sorted JSON.
    """
    return json.dumps([row["messages"], row["text"], row.get("tools", "")], sort_keys=True)


def drop_near_duplicates(rows: list[Conversation], threshold: float, seed: int) -> tuple[list[Conversation], list[str]]:
    """Keep the first of every group of conversations whose word 3-gram sets have Jaccard similarity >= threshold.

    Returns the kept rows and, for each dropped row, "origin ~ origin of the kept row it resembles".

    Similarity is estimated with MinHash (128 permutations) and candidates found with LSH.

    Args:
        rows: The conversations, in order; the first of a group is kept.
        threshold: `data.clean.near_duplicates`: the Jaccard similarity from which two rows count as duplicates.
        seed: The MinHash seed.
    """
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    kept, dropped, signatures = [], [], {}
    for index, row in enumerate(rows):
        words = re.findall(r"\w+", all_text(row).lower())
        shingles = {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}
        signature = MinHash(num_perm=128, seed=seed)
        signature.update_batch([s.encode("utf-8") for s in shingles])
        # LSH finds candidates; the estimated Jaccard confirms them, so the threshold means what it says.
        match = next((key for key in lsh.query(signature) if signature.jaccard(signatures[key]) >= threshold), None)
        if match is not None:
            dropped.append(f"{row['origin']} ~ {rows[int(match)]['origin']}")
            continue
        lsh.insert(str(index), signature)
        signatures[str(index)] = signature
        kept.append(row)
    return kept, dropped
