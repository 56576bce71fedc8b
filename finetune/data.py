"""Stage 3: load conversations, validate and normalise them, split them, and tokenize them with loss masks.

Entry point: `prepare_data(cfg, tokenizer)`. Every source becomes OpenAI-style `messages`; every invalid row
is counted with its file and line; labels are -100 everywhere except the assistant replies and their
end-of-turn token, for any chat template that renders conversations prefix by prefix.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset, DatasetDict, load_dataset
from transformers import PreTrainedTokenizerBase

from finetune.config import DataConfig, DataSource
from finetune.errors import FinetuneError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RowError(ValueError):
    """One invalid row; the message names the field and the problem."""


@dataclass
class DataReport:
    """What happened to every row, so nothing is dropped silently."""

    rows_read: int = 0
    invalid: Counter = field(default_factory=Counter)
    invalid_examples: list[str] = field(default_factory=list)
    duplicates: int = 0
    leaked_into_heldout: int = 0
    too_long_dropped: int = 0
    truncated: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    trained_token_share: float = 0.0

    def lines(self) -> list[str]:
        out = [f"{self.rows_read} conversations read"]
        for reason, count in self.invalid.most_common():
            out.append(f"{count} skipped: {reason}")
        out += [f"  e.g. {example}" for example in self.invalid_examples[:3]]
        if self.duplicates:
            out.append(f"{self.duplicates} exact duplicates removed")
        if self.leaked_into_heldout:
            out.append(f"{self.leaked_into_heldout} training conversations removed because held-out data contains them")
        if self.too_long_dropped:
            out.append(f"{self.too_long_dropped} dropped as longer than data.max_length")
        if self.truncated:
            out.append(f"{self.truncated} truncated to data.max_length")
        out.append("splits: " + ", ".join(f"{name} {count}" for name, count in self.splits.items()))
        out.append(f"{self.trained_token_share:.1%} of training tokens carry loss (assistant replies)")
        return out


@dataclass
class PreparedData:
    splits: DatasetDict  # train / validation / test; columns: messages, origin, input_ids, labels
    report: DataReport


# ---------------------------------------------------------------- formats


def detect_format(row: dict[str, Any]) -> str:
    keys = {k for k, v in row.items() if v is not None}
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    raise RowError(
        f"unknown row format (fields: {', '.join(sorted(keys)) or 'none'}); expected `messages`, `conversations`, "
        "`instruction`+`output`, or `prompt`+`completion`"
    )


def to_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """Convert one row of a known format to a list of {role, content} messages."""
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt == "messages":
        turns = row.get("messages")
        if not isinstance(turns, list):
            raise RowError("field `messages` must be a list of {role, content} objects")
        return [_turn(t, i, "role", "content", None) for i, t in enumerate(turns)]
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise RowError("field `conversations` must be a list of {from, value} objects")
        return [_turn(t, i, "from", "value", _SHAREGPT_ROLES) for i, t in enumerate(turns)]
    if fmt == "alpaca":
        prompt = _text(row, "instruction")
        extra = row.get("input")
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]
        return ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + messages
    if fmt == "prompt_completion":
        return [{"role": "user", "content": _text(row, "prompt")}, {"role": "assistant", "content": _text(row, "completion")}]
    raise RowError(f"unknown format {fmt!r}")


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise RowError(f"field `{key}` must be a string (got {type(value).__name__})")
    return value


def _turn(turn: Any, index: int, role_key: str, content_key: str, role_map: dict[str, str] | None) -> dict[str, str]:
    where = f"turn {index}"
    if not isinstance(turn, dict):
        raise RowError(f"{where}: must be an object with `{role_key}` and `{content_key}`")
    role, content = turn.get(role_key), turn.get(content_key)
    if role_map is not None:
        role = role_map.get(role, role)
    if role not in ROLES:
        raise RowError(f"{where}: unknown role {role!r} (allowed: {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise RowError(f"{where}: `{content_key}` must be a string")
    return {"role": role, "content": content}


def validate_messages(messages: list[dict[str, str]]) -> None:
    """A trainable conversation: optional system turn, then user/assistant alternating, ending with a reply."""
    if not messages:
        raise RowError("no messages")
    for index, message in enumerate(messages):
        if not message["content"].strip():
            raise RowError(f"turn {index}: empty content")
        if message["role"] == "system" and index != 0:
            raise RowError(f"turn {index}: a system message may only come first")
    dialogue = messages[1:] if messages[0]["role"] == "system" else messages
    for index, message in enumerate(dialogue):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowError(f"turn {index + len(messages) - len(dialogue)}: roles must alternate user/assistant, got {message['role']}")
    if not dialogue or dialogue[-1]["role"] != "assistant":
        raise RowError("no assistant reply to train on (the last turn must be the assistant's)")


# ---------------------------------------------------------------- sources


def _read_source(source: DataSource) -> list[tuple[str, Any]]:
    """Rows of one source as (origin, raw row) pairs; origin is `file:line` for error messages."""
    if source.type == "chatterbot":
        return _read_chatterbot(source)
    path = Path(source.path or "").expanduser()
    if not path.is_file():
        raise FinetuneError(f"data.sources: file `{source.path}` not found.")
    if path.suffix not in (".jsonl", ".json"):
        raise FinetuneError(f"data.sources: `{path}`: unsupported file type {path.suffix!r}; use .jsonl or .json.")
    try:
        rows = load_dataset("json", data_files=str(path), split="train").to_list()
    except Exception as exc:  # datasets wraps parse errors in several types; find the line ourselves
        raise FinetuneError(_locate_json_error(path) or f"`{path}`: could not be read as JSON ({exc}).") from None
    if path.suffix == ".jsonl":
        lines = [n for n, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1) if text.strip()]
        return [(f"{path}:{lines[i] if i < len(lines) else i + 1}", row) for i, row in enumerate(rows)]
    return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]


def _locate_json_error(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        return f"{path}: not UTF-8 text (byte {exc.start}). Re-save the file as UTF-8."
    if path.suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"{path}:{exc.lineno}: invalid JSON ({exc.msg})."
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                return f"{path}:{number}: invalid JSON ({exc.msg}). Each line of a .jsonl file must be one JSON object."
    return None


def chatterbot_files(source: DataSource) -> list[Path]:
    """The chatterbot-corpus YAML files a source selects (all categories of its language by default)."""
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError("data.sources: type 'chatterbot' needs the chatterbot-corpus package. Fix: pip install chatterbot-corpus==1.3.3")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / source.language
    available = sorted(p.stem for p in folder.glob("*.yml"))
    if not available:
        raise FinetuneError(f"data.sources: chatterbot language `{source.language}` not found in {folder.parent}.")
    unknown = sorted(set(source.categories or []) - set(available))
    if unknown:
        raise FinetuneError(f"data.sources: unknown chatterbot categories {unknown}; available: {', '.join(available)}.")
    return [folder / f"{category}.yml" for category in source.categories or available]


def _read_chatterbot(source: DataSource) -> list[tuple[str, Any]]:
    """chatterbot-corpus YAML: each conversation is a list of strings, alternating user and assistant."""
    rows = []
    for file in chatterbot_files(source):
        category = file.stem
        for index, turns in enumerate(yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", [])):
            if len(turns) % 2:  # a trailing question has no reply to learn from
                turns = turns[:-1]
            messages = [{"role": ROLES[1 + i % 2], "content": str(text)} for i, text in enumerate(turns)]
            rows.append((f"chatterbot:{source.language}/{category}.yml#{index}", {"messages": messages}))
    return rows


def load_conversations(cfg: DataConfig, report: DataReport, sources: list[DataSource] | None = None) -> Dataset:
    """Sources (default: cfg.sources) as one Dataset of validated, de-duplicated conversations (messages, origin)."""
    kept, seen = [], set()
    for source in sources or cfg.sources:
        for origin, row in _read_source(source):
            report.rows_read += 1
            try:
                if not isinstance(row, dict):
                    raise RowError("a row must be a JSON object")
                messages = to_messages(row, source.format)
                if cfg.system_prompt and messages and messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
                validate_messages(messages)
            except RowError as exc:
                if cfg.strict:
                    raise FinetuneError(f"{origin}: {exc}. (data.strict is on; set it to false to skip bad rows.)") from None
                reason = str(exc).split(": ", 1)[-1] if str(exc).startswith("turn ") else str(exc)
                report.invalid[reason] += 1
                report.invalid_examples.append(f"{origin}: {exc}")
                continue
            key = json.dumps(messages, sort_keys=True)
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            kept.append({"messages": messages, "origin": origin})
    bad = sum(report.invalid.values())
    if report.rows_read and bad / report.rows_read > cfg.max_bad_fraction:
        raise FinetuneError(
            f"{bad} of {report.rows_read} rows are invalid (more than data.max_bad_fraction={cfg.max_bad_fraction}). "
            "First problems:\n  " + "\n  ".join(report.invalid_examples[:5])
        )
    if not kept:
        raise FinetuneError("data.sources: no valid conversations found.")
    return Dataset.from_list(kept)


def split_conversations(dataset: Dataset, cfg: DataConfig) -> DatasetDict:
    """Seeded shuffle, optional cap, then disjoint train/validation/test splits (one conversation, one split).

    A split that comes from its own files (validation_sources, test_sources) is not carved out of `dataset`.
    """
    order = list(range(len(dataset)))
    random.Random(cfg.seed).shuffle(order)
    if cfg.max_rows:
        order = order[: cfg.max_rows]
    n = len(order)
    n_test = max(1, round(n * cfg.test_split)) if cfg.test_split and not cfg.test_sources else 0
    n_val = max(1, round(n * cfg.validation_split)) if cfg.validation_split and not cfg.validation_sources else 0
    if n - n_test - n_val < 1:
        raise FinetuneError(f"only {n} conversations: too few to hold out {n_test} for test and {n_val} for validation.")
    splits = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return DatasetDict({name: dataset.select(indices) for name, indices in splits.items() if indices})


# ---------------------------------------------------------------- masks


def render_with_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the character spans of each assistant reply plus its end-of-turn marker.

    Why by hand: TRL's `assistant_only_loss` needs `{% generation %}` markers that most templates (SmolLM2's
    included) lack. Rendering prefix by prefix works for any template whose rendering of a conversation
    starts with the rendering of its beginning, which we check rather than assume.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        with_reply = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (with_reply.startswith(prompt) and full.startswith(with_reply)):
            raise FinetuneError(
                "the chat template is not prefix-preserving (rendering a conversation changes how earlier turns look), "
                "so assistant tokens cannot be located. Set model.chat_template to a template without that behaviour, e.g. 'chatml'."
            )
        # Trailing whitespace after the end-of-turn token belongs to the template, not to the reply.
        spans.append((len(prompt), len(with_reply.rstrip())))
    return full, spans


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """input_ids of the rendered conversation and labels that are -100 outside assistant replies."""
    text, spans = render_with_spans(tokenizer, messages)
    # add_special_tokens=False: the template already wrote any BOS; adding another would double it.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE_INDEX] * len(encoding.input_ids)
    span_index = 0
    for position, (start, end) in enumerate(encoding.offset_mapping):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start and end > start:
            labels[position] = encoding.input_ids[position]
    return {"input_ids": list(encoding.input_ids), "labels": labels}


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token(s) that close an assistant turn in this template (e.g. <|im_end|>), for generation stops."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    tokens = tokenize_conversation(tokenizer, probe)
    trained = [t for t in tokens["labels"] if t != IGNORE_INDEX]
    return [trained[-1]] if trained and trained[-1] in tokenizer.all_special_ids else []


def tokenize_splits(conversations: DatasetDict, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, report: DataReport) -> DatasetDict:
    def encode(row: dict[str, Any]) -> dict[str, Any]:
        return tokenize_conversation(tokenizer, row["messages"])

    tokenized = DatasetDict()
    for name, split in conversations.items():
        encoded = split.map(encode, desc=f"Tokenizing {name}")
        lengths = [len(ids) for ids in encoded["input_ids"]]
        too_long = [i for i, length in enumerate(lengths) if length > cfg.max_length]
        if too_long and cfg.too_long == "error":
            first = too_long[0]
            raise FinetuneError(
                f"{encoded[first]['origin']}: {lengths[first]} tokens, longer than data.max_length={cfg.max_length}. "
                "Raise max_length, or set data.too_long to 'drop' or 'truncate'."
            )
        if too_long and cfg.too_long == "drop":
            report.too_long_dropped += len(too_long)
            encoded = encoded.select(sorted(set(range(len(encoded))) - set(too_long)))
        elif too_long:
            report.truncated += len(too_long)
            encoded = encoded.map(lambda row: {k: row[k][: cfg.max_length] for k in ("input_ids", "labels")})
            encoded = encoded.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]))
        if len(encoded) == 0:
            raise FinetuneError(f"the {name} split is empty after applying data.max_length={cfg.max_length}.")
        tokenized[name] = encoded
        report.splits[name] = len(encoded)
    labels = tokenized["train"]["labels"] if "train" in tokenized else []
    total = sum(len(row) for row in labels)
    report.trained_token_share = sum(sum(1 for t in row if t != IGNORE_INDEX) for row in labels) / max(total, 1)
    return tokenized


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    report = DataReport()
    conversations = split_conversations(load_conversations(cfg, report), cfg)
    for name, sources in (("validation", cfg.validation_sources), ("test", cfg.test_sources)):
        if sources:
            conversations[name] = load_conversations(cfg, report, sources)
    # A held-out conversation that also sits in the training split would flatter every metric.
    heldout = {json.dumps(m, sort_keys=True) for name in ("validation", "test") if name in conversations for m in conversations[name]["messages"]}
    train = conversations["train"]
    leaked = [i for i, m in enumerate(train["messages"]) if json.dumps(m, sort_keys=True) in heldout]
    if leaked:
        report.leaked_into_heldout = len(leaked)
        conversations["train"] = train.select(sorted(set(range(len(train))) - set(leaked)))
    return PreparedData(splits=tokenize_splits(conversations, tokenizer, cfg, report), report=report)
