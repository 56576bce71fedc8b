"""Tool calls in generated text: the chat template's own tool-call format, learnt by rendering a probe call, and the
parser that turns a reply written in it back into OpenAI `tool_calls`.

Two formats cover the common templates: a JSON object between markers (Qwen2.5, Qwen3, Hermes:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call), and a bare JSON object as the whole
reply (Llama 3.1 custom tools: `{"name": ..., "parameters": {...}}`). Written here because what to parse is defined by
each template, which no library reads back; the JSON itself is parsed by the standard library.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from finetune.data import render_chat, template_traits
from finetune.errors import FinetuneError

# Our own probe strings, never data: finding them in a rendering locates what the template wrote around them.
_NAME = "finetune_probe_function"
_CONTENT = "finetune-probe-content"
_ARGUMENTS = {"finetune_probe_argument": "finetune-probe-value"}
_PROBE_TOOLS = json.dumps(
    [
        {
            "type": "function",
            "function": {
                "name": _NAME,
                "description": "probe",
                "parameters": {"type": "object", "properties": {"finetune_probe_argument": {"type": "string"}}},
            },
        }
    ]
)
_CALL = {"type": "function", "function": {"name": _NAME, "arguments": json.dumps(_ARGUMENTS)}}
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _CONTENT, "tool_calls": [_CALL]}]


@dataclass(frozen=True)
class ToolCallFormat:
    """How the template writes one call: `open` JSON `close`, the JSON holding the name and the arguments."""

    open: str  # "" for a bare JSON reply
    close: str
    name_key: str
    arguments_key: str

    def parse(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content, OpenAI tool_calls) of a generated reply; a reply without a well-formed call is all content.

        Args:
            text: The generated reply.

        Returns:
            (the reply's text outside the calls, the calls as OpenAI tool_calls with JSON-text arguments).
        """
        decoder = json.JSONDecoder()
        if not self.open:
            stripped = text.strip()
            try:
                value, end = decoder.raw_decode(stripped)
            except ValueError:
                return text, []
            call = self._call(value)
            return (text, []) if call is None or stripped[end:].strip() else ("", [call])
        calls, content, position = [], [], 0
        while (start := text.find(self.open, position)) >= 0:
            body = start + len(self.open)
            body += len(text[body:]) - len(text[body:].lstrip())
            try:
                value, end = decoder.raw_decode(text, body)
            except ValueError:
                break
            call = self._call(value)
            after = end + len(text[end:]) - len(text[end:].lstrip())
            if call is None or not text.startswith(self.close, after):
                break
            content.append(text[position:start])
            calls.append(call)
            position = after + len(self.close)
        content.append(text[position:])
        return "".join(content).strip(), calls

    def _call(self, value: Any) -> dict[str, Any] | None:
        if not isinstance(value, dict) or not isinstance(value.get(self.name_key), str):
            return None
        arguments = value.get(self.arguments_key, {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string already
            arguments = _json_or_none(arguments)
        if not isinstance(arguments, dict):
            return None
        return {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": value[self.name_key], "arguments": json.dumps(arguments)},
        }


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def tool_call_format(tokenizer: PreTrainedTokenizerBase) -> ToolCallFormat | None:
    """The template's tool-call format, or None when it does not write tool calls.

    Found by rendering a probe conversation with one tool call through the template.

    Args:
        tokenizer: The tokenizer with its chat template.

    Returns:
        The ToolCallFormat, or None.
    """
    try:
        prompt = render_chat(tokenizer, _PROBE[:1], _PROBE_TOOLS, generation_prompt=True)
        ending = render_chat(tokenizer, _PROBE, _PROBE_TOOLS)
        if _CONTENT not in ending:  # a template that writes only the call (Llama 3.1)
            ending = render_chat(tokenizer, [_PROBE[0], {**_PROBE[1], "content": ""}], _PROBE_TOOLS)
    except FinetuneError:  # a template that refuses tools or tool calls
        return None
    if not ending.startswith(prompt):
        return None
    generation = ending[len(prompt) :]
    if _CONTENT in generation:
        generation = generation[generation.index(_CONTENT) + len(_CONTENT) :]  # the call comes after the reply's text
    end_of_turn = template_traits(tokenizer).end_of_turn
    if end_of_turn and end_of_turn in generation:
        generation = generation[: generation.index(end_of_turn)]
    decoder = json.JSONDecoder()
    for start in (i for i, char in enumerate(generation) if char == "{"):
        try:
            value, end = decoder.raw_decode(generation, start)
        except ValueError:
            continue
        if not isinstance(value, dict):
            continue
        name_key = next((key for key, item in value.items() if item == _NAME), None)
        arguments_key = next(
            (
                key
                for key, item in value.items()
                if item == _ARGUMENTS or (isinstance(item, str) and _json_or_none(item) == _ARGUMENTS)
            ),
            None,
        )
        if name_key and arguments_key:
            return ToolCallFormat(generation[:start].strip(), generation[end:].strip(), name_key, arguments_key)
    return None


class StreamedReply:
    """A reply streamed as it is generated: text is passed on at once, except from the moment it may be starting a
    tool call (a prefix of the open marker, or a bare-JSON reply), which is held until the end and parsed there.

    Args:
        fmt: The chat template's tool-call format.
    """

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.fmt, self.text, self.sent, self.holding = fmt, "", 0, False

    def feed(self, piece: str) -> str:
        """Add generated text; return the content that can be sent now.

        Args:
            piece: The next piece of generated text.

        Returns:
            The text to stream now ("" while text is held).
        """
        self.text += piece
        if self.holding:
            return ""
        if self.fmt.open:
            found = self.text.find(self.fmt.open, self.sent)
            if found >= 0:
                self.holding = True
                safe = found
            else:
                partial = next(
                    (k for k in range(len(self.fmt.open) - 1, 0, -1) if self.text.endswith(self.fmt.open[:k])), 0
                )
                safe = len(self.text) - partial
        elif self.text[: self.sent].strip():  # a bare-JSON call is the whole reply: text came first, so no call
            safe = len(self.text)
        else:
            unsent = self.text[self.sent :].lstrip()
            self.holding = unsent.startswith("{")
            safe = self.sent if self.holding or not unsent else len(self.text)
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to send, tool calls) once generation has ended."""
        rest = self.text[self.sent :]
        content, calls = self.fmt.parse(rest)
        return (content, calls) if calls else (rest, [])
