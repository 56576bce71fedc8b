"""Row formats: every supported row becomes OpenAI-style `messages` (or raw `text`), then is validated.

Formats: messages, sharegpt, alpaca, prompt_completion, text. `DataSource.columns` renames odd field names
and `DataSource.roles` odd role names before conversion.

`messages` rows may use OpenAI tool calling: a row-level `tools` list, assistant turns with `tool_calls` (content
may then be empty) and `tool` turns answering them; assistant turns may carry `reasoning_content`. A conversation
is stored as plain JSON types (tool-call arguments and the tools list as JSON text, so rows with different schemas
fit one Arrow table); `chat_messages` and `chat_tools` turn it back into what chat templates take.
"""

from __future__ import annotations

import json
from typing import Any

from finetune.config import DataSource
from finetune.data.report import RowError

ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TURN_FIELDS = ("role", "content", "from", "value")


def detect_format(row: dict[str, Any]) -> str:
    """The chat format of a raw row, from the fields it has: messages, sharegpt, alpaca, prompt_completion or text.

    Args:
        row: A raw row with its columns already renamed (the source's `columns`).

    Returns:
        The format's name.

    Raises:
        RowError: The row is preference data (chosen/rejected, or completion with label), or no format fits.
    """
    # Fields with values decide first (files that mix formats fill the others with null); then any field present,
    # so an empty CSV cell is reported as that field's problem rather than as an unknown format.
    present = {k for k, v in row.items() if v is not None}
    if {"chosen", "rejected"} <= present or {"completion", "label"} <= present:
        # A labelled completion may be a bad reply: trained as a demonstration, it would teach exactly that.
        raise RowError(
            "a preference row (chosen/rejected, or a completion with a label) in supervised data: set the recipe's "
            "method to dpo, orpo, simpo or kto (docs/preference.md)"
        )
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


def to_conversation(row: Any, source: DataSource) -> tuple[str, list[dict[str, Any]], str, str]:
    """(format, messages, text, tools) of one raw row; exactly one of messages/text is non-empty; tools is the
    row's tool list as JSON text ("" without one).

    Args:
        row: A raw row as a source yields it.
        source: Its `data.sources` entry: format, columns, roles.

    Returns:
        (format, messages, text, tools).

    Raises:
        RowError: The row is not an object, is preference data, or is invalid in its format.
    """
    if not isinstance(row, dict):
        raise RowError("a row must be an object with named fields")
    if source.columns:
        row = _rename(row, source.columns)
    fmt = source.format if source.format != "auto" else detect_format(row)
    if fmt in ("preference", "preference_implicit", "unpaired"):
        raise RowError(
            f"format `{fmt}` is preference data: set the recipe's method to dpo, orpo, simpo or kto (docs/preference.md)"
        )
    if fmt == "text":
        return fmt, [], _text(row, "text"), ""
    messages = to_messages(row, fmt, source.roles)
    return fmt, messages, "", tools_json(row.get("tools")) if fmt == "messages" else ""


def _rename(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    top = {ours: theirs for ours, theirs in columns.items() if ours not in TURN_FIELDS}
    turn = {ours: theirs for ours, theirs in columns.items() if ours in TURN_FIELDS}
    renamed = {ours: row.get(theirs) for ours, theirs in top.items()}
    renamed.update({k: v for k, v in row.items() if k not in top.values() and k not in renamed})
    if turn:
        for key in ("messages", "conversations"):
            if isinstance(renamed.get(key), list):
                renamed[key] = [
                    {**t, **{o: t.get(th) for o, th in turn.items()}} if isinstance(t, dict) else t
                    for t in renamed[key]
                ]
    return renamed


def to_messages(row: dict[str, Any], fmt: str, roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Convert one row of a known chat format to a list of {role, content} messages.

    Args:
        row: A raw row.
        fmt: "messages", "sharegpt", "alpaca", "prompt_completion", or "auto" to detect it.
        roles: Role names -> standard roles (the source's `roles`), on top of ShareGPT's human/gpt mapping.

    Returns:
        The messages; an alpaca row's `input` is appended to its instruction and its `system` becomes a system turn.

    Raises:
        RowError: A field is missing, of the wrong type, or not valid JSON, or the format is unknown.
    """
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt in ("messages", "sharegpt"):
        field_name, role_key, content_key = (
            ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
        )
        turns = row.get(field_name)
        if isinstance(turns, str):  # CSV and some exports store the list as a JSON string
            try:
                turns = json.loads(turns)
            except json.JSONDecodeError as exc:
                raise RowError(f"field `{field_name}` is a string that is not valid JSON ({exc.msg})") from exc
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
        return [
            {"role": "user", "content": _text(row, "prompt")},
            {"role": "assistant", "content": _text(row, "completion")},
        ]
    raise RowError(f"unknown format {fmt!r}")


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise RowError(f"field `{key}` must be a string (got {type(value).__name__})")
    return value


def _turn(turn: Any, index: int, role_key: str, content_key: str, role_map: dict[str, str]) -> dict[str, Any]:
    where = f"turn {index}"
    if not isinstance(turn, dict):
        raise RowError(f"{where}: must be an object with `{role_key}` and `{content_key}`")
    role, content = turn.get(role_key), turn.get(content_key)
    role = role_map.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise RowError(
            f"{where}: unknown role {role!r} (allowed: {', '.join(ROLES)}; map others with the source's `roles`)"
        )
    message: dict[str, Any] = {"role": role}
    calls = turn.get("tool_calls")
    if role == "assistant" and calls:
        message["tool_calls"] = _tool_calls(calls, where)
        content = "" if content is None else content  # OpenAI sends null content beside tool calls
    if not isinstance(content, str):
        raise RowError(f"{where}: `{content_key}` must be a string")
    message["content"] = content
    reasoning = turn.get("reasoning_content")
    if reasoning is not None:
        if role != "assistant" or not isinstance(reasoning, str):
            raise RowError(f"{where}: `reasoning_content` must be a string, on assistant turns only")
        message["reasoning_content"] = reasoning
    for key in ("tool_call_id", "name"):
        value = turn.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise RowError(f"{where}: `{key}` must be a string")
            message[key] = value
    return message


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI tool calls with their arguments as JSON text; arguments given as an object are accepted too."""
    shape = "a list of {id, type: function, function: {name, arguments}}"
    if not isinstance(calls, list):
        raise RowError(f"{where}: `tool_calls` must be {shape}")
    normalized = []
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise RowError(
                f"{where}: tool_calls[{number}] must look like {{id, type: function, function: {{name, arguments}}}}"
            )
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise RowError(f"{where}: tool_calls[{number}].function.name must be a non-empty string")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise RowError(
                    f"{where}: tool_calls[{number}].function.arguments is not valid JSON ({exc.msg})"
                ) from exc
        else:
            parsed, arguments = arguments, json.dumps(arguments)
        if not isinstance(parsed, dict):
            raise RowError(f"{where}: tool_calls[{number}].function.arguments must be a JSON object")
        entry: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call.get("id") is not None:
            entry["id"] = str(call["id"])
        normalized.append(entry)
    return normalized


def tools_json(tools: Any) -> str:
    """A row's (or request's) `tools`, OpenAI function definitions, checked and stored as JSON text ("" for none);
    also accepted as a JSON string (CSV cells).

    Args:
        tools: None, a list of `{type: function, function: {name, description, parameters}}`, or that list as JSON.

    Returns:
        The tools as JSON text, "" for none.

    Raises:
        RowError: The JSON is invalid, or the value is not such a list (the message names the tool).
    """
    if tools is None:
        return ""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RowError(f"field `tools` is a string that is not valid JSON ({exc.msg})") from exc
    if not isinstance(tools, list):
        raise RowError("field `tools` must be a list of {type: function, function: {name, description, parameters}}")
    for number, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise RowError(f"tools[{number}]: must be {{type: function, function: {{name, description, parameters}}}}")
        function = tool["function"]
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RowError(f"tools[{number}]: `function.name` must be a non-empty string")
        if not isinstance(function.get("parameters", {}), dict):
            raise RowError(f"tools[{number}] ({function['name']}): `function.parameters` must be a JSON schema object")
    return json.dumps(tools) if tools else ""


def validate_messages(messages: list[dict[str, Any]], tools: str = "") -> None:
    """A trainable conversation: an optional system turn, then user and assistant turns alternating, ending with a
    reply. `tools` is the row's tool list as JSON text (as to_conversation returns it). An assistant turn with tool calls is followed by one `tool` turn per call, then by the assistant again
    (or it ends the conversation: the model learns to call).

    Args:
        messages: The conversation's messages.
        tools: The row's tools JSON; when there are tools, every tool call must name one of them.

    Raises:
        RowError: No messages, an empty turn, a misplaced system turn, roles that do not alternate, a tool result
            that answers no open call, a call of an undeclared tool, or no final assistant reply.
    """
    if not messages:
        raise RowError("no messages")
    declared = {tool["function"]["name"] for tool in chat_tools(tools) or []}
    for index, message in enumerate(messages):
        # A tool may return nothing, and a turn that calls tools need not say anything.
        may_be_empty = message["role"] == "tool" or bool(message.get("tool_calls"))
        if not message["content"].strip() and not may_be_empty:
            raise RowError(f"turn {index}: empty content")
        if message["role"] == "system" and index != 0:
            raise RowError(f"turn {index}: a system message may only come first")
    offset = 1 if messages[0]["role"] == "system" else 0
    expected, pending = "user", []  # pending: tool calls of the last assistant turn still without a result
    for index, message in enumerate(messages[offset:], start=offset):
        role = message["role"]
        if role == "tool":
            if expected != "tool":
                raise RowError(f"turn {index}: a tool result must answer an assistant turn's tool_calls")
            call_id = message.get("tool_call_id")
            ids = [call.get("id") for call in pending]
            if call_id is not None and any(ids) and call_id not in ids:
                raise RowError(
                    f"turn {index}: tool_call_id {call_id!r} answers none of the open calls ({', '.join(map(str, ids))})"
                )
            pending.pop(ids.index(call_id) if call_id in ids else 0)
            expected = "tool" if pending else "assistant"
            continue
        if role != expected:
            if expected == "tool":
                raise RowError(
                    f"turn {index}: {len(pending)} tool call(s) of the previous assistant turn have no `tool` result before this {role} turn"
                )
            raise RowError(f"turn {index}: roles must alternate user/assistant, got {role}")
        if role == "assistant":
            for call in message.get("tool_calls") or []:
                name = call["function"]["name"]
                if declared and name not in declared:
                    raise RowError(
                        f"turn {index}: calls `{name}`, which is not in the row's tools ({', '.join(sorted(declared))})"
                    )
            pending = list(message.get("tool_calls") or [])
            expected = "tool" if pending else "user"
        else:
            expected = "assistant"
    if messages[-1]["role"] != "assistant":
        raise RowError("no assistant reply to train on (the last turn must be the assistant's)")


def validate_text(text: str) -> None:
    """Check a raw text row (continued pretraining) has text.

    Args:
        text: The row's text.

    Raises:
        RowError: The text is empty or blank.
    """
    if not text.strip():
        raise RowError("empty text")


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: fields a row lacks removed (Arrow stores them as null, and templates
    test `is defined`), tool-call arguments as objects (templates write them with `tojson`).

    Args:
        messages: Stored messages (role, content, and tool_calls with JSON-text arguments, tool_call_id, ...).

    Returns:
        New message dicts; the input is not changed.
    """
    out = []
    for message in messages:
        clean = {key: value for key, value in message.items() if value is not None}
        if clean.get("tool_calls"):
            clean["tool_calls"] = [
                {
                    **{k: v for k, v in call.items() if v is not None},
                    "function": {
                        "name": call["function"]["name"],
                        "arguments": json.loads(call["function"]["arguments"]),
                    },
                }
                for call in clean["tool_calls"]
            ]
        else:
            clean.pop("tool_calls", None)
        out.append(clean)
    return out


def chat_tools(tools: str) -> list[dict[str, Any]] | None:
    """The stored tools JSON as apply_chat_template's `tools` argument (None without tools).

    Args:
        tools: The tool list as JSON text, as `tools_json` stores it ("" for none).

    Returns:
        The list of OpenAI function definitions, or None.
    """
    return json.loads(tools) if tools else None
