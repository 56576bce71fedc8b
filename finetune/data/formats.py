"""Row formats: every supported row becomes OpenAI-style `messages` (or raw `text`), then is validated.

Formats: messages, sharegpt, alpaca, prompt_completion, text. `DataSource.columns` renames odd field names
and `DataSource.roles` odd role names before conversion.
"""

from __future__ import annotations

import json
from typing import Any

from finetune.config import DataSource
from finetune.data.report import RowError

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TURN_FIELDS = ("role", "content", "from", "value")


def detect_format(row: dict[str, Any]) -> str:
    # Fields with values decide first (files that mix formats fill the others with null); then any field present,
    # so an empty CSV cell is reported as that field's problem rather than as an unknown format.
    present = {k for k, v in row.items() if v is not None}
    for keys in (present, set(row)):
        if "messages" in keys:
            return "messages"
        if "conversations" in keys:
            return "sharegpt"
        if {"instruction", "output"} <= keys:
            return "alpaca"
        if {"prompt", "completion"} <= keys:
            return "prompt_completion"
        if keys == {"text"}:
            return "text"
    keys = present
    raise RowError(
        f"unknown row format (fields: {', '.join(sorted(keys)) or 'none'}); expected `messages`, `conversations`, "
        "`instruction`+`output`, `prompt`+`completion` or `text` (map other field names with the source's `columns`)"
    )


def to_conversation(row: Any, source: DataSource) -> tuple[str, list[dict[str, str]], str]:
    """(format, messages, text) of one raw row; exactly one of messages/text is non-empty."""
    if not isinstance(row, dict):
        raise RowError("a row must be an object with named fields")
    if source.columns:
        row = _rename(row, source.columns)
    fmt = source.format if source.format != "auto" else detect_format(row)
    if fmt == "text":
        return fmt, [], _text(row, "text")
    messages = to_messages(row, fmt, source.roles)
    return fmt, messages, ""


def _rename(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    top = {ours: theirs for ours, theirs in columns.items() if ours not in TURN_FIELDS}
    turn = {ours: theirs for ours, theirs in columns.items() if ours in TURN_FIELDS}
    renamed = {ours: row.get(theirs) for ours, theirs in top.items()}
    renamed.update({k: v for k, v in row.items() if k not in top.values() and k not in renamed})
    if turn:
        for key in ("messages", "conversations"):
            if isinstance(renamed.get(key), list):
                renamed[key] = [
                    {**t, **{o: t.get(th) for o, th in turn.items()}} if isinstance(t, dict) else t for t in renamed[key]
                ]
    return renamed


def to_messages(row: dict[str, Any], fmt: str, roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Convert one row of a known chat format to a list of {role, content} messages."""
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt in ("messages", "sharegpt"):
        field_name, role_key, content_key = ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
        turns = row.get(field_name)
        if isinstance(turns, str):  # CSV and some exports store the list as a JSON string
            try:
                turns = json.loads(turns)
            except json.JSONDecodeError as exc:
                raise RowError(f"field `{field_name}` is a string that is not valid JSON ({exc.msg})") from None
        if not isinstance(turns, list):
            raise RowError(f"field `{field_name}` must be a list of {{{role_key}, {content_key}}} objects")
        role_map = {**(_SHAREGPT_ROLES if fmt == "sharegpt" else {}), **(roles or {})}
        return [_turn(t, i, role_key, content_key, role_map) for i, t in enumerate(turns)]
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


def _turn(turn: Any, index: int, role_key: str, content_key: str, role_map: dict[str, str]) -> dict[str, str]:
    where = f"turn {index}"
    if not isinstance(turn, dict):
        raise RowError(f"{where}: must be an object with `{role_key}` and `{content_key}`")
    role, content = turn.get(role_key), turn.get(content_key)
    role = role_map.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise RowError(f"{where}: unknown role {role!r} (allowed: {', '.join(ROLES)}; map others with the source's `roles`)")
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


def validate_text(text: str) -> None:
    if not text.strip():
        raise RowError("empty text")
