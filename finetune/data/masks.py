"""Tokenization with loss masks: labels are -100 everywhere except assistant turns (reply, tool calls, reasoning)
and the end-of-turn token that closes them.

Why by hand: TRL's `assistant_only_loss` needs `{% generation %}` markers that most templates (SmolLM2's included)
lack. Here every assistant turn is located by rendering, never by searching for its text: the model's *prompt* for
a turn is the conversation before it rendered with the generation prompt, and its *generation* is what the template
adds after that prompt for the turn itself, up to the end-of-turn token where generation stops. A turn is trained in
a rendering only where that rendering starts with exactly its prompt followed by its generation, so every trained
token is one the model produces at inference, after the very context it sees there.

Templates that rewrite earlier turns (Qwen3 and other reasoning models drop the `<think>` block of every assistant
turn before the latest user message) render a conversation differently from its prefixes. `data.reasoning` says
what the context of a later turn shows of earlier reasoning:

- `drop` (default): what the template shows at inference. The whole conversation is one sample when each turn
  matches there (every prefix-preserving template); otherwise the turns that do not match (in Qwen3: each earlier
  turn, whose reasoning the full rendering removes) get a sample of their own that ends with them. Exact, at the
  cost of up to k samples for k assistant turns. Training earlier turns as the full rendering shows them instead
  would teach the model to answer without reasoning; masking them would waste them.
- `keep`: one sample in which every earlier turn keeps its reasoning, each turn rendered as the template renders a
  latest turn. Cheaper, but later turns then see context the template never shows at inference.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from finetune.data.formats import chat_messages, chat_tools
from finetune.errors import FinetuneError

IGNORE_INDEX = -100
REASONING_POLICIES = ("drop", "keep")
# Our own probe strings, never data: finding them in a rendering locates what the template wrote around them.
_PROBE_REPLY = "finetune-probe-reply"
_PROBE_REASONING = "finetune-probe-reasoning"
_SENTINEL = "finetune-turn-sentinel"
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]


@dataclass(frozen=True)
class TemplateTraits:
    """What a chat template does, learnt once by rendering probes."""

    end_of_turn: str | None  # the special token that closes an assistant turn (where generation stops)
    renders_reasoning_field: bool  # writes an assistant message's `reasoning_content`
    keeps_earlier_reasoning: bool  # a turn before the latest user message still shows its reasoning


_traits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def template_traits(tokenizer: PreTrainedTokenizerBase) -> TemplateTraits:
    cached = _traits.get(tokenizer)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    prompt = _apply(tokenizer, _PROBE[:1], generation_prompt=True)
    generation = _apply(tokenizer, _PROBE)[len(prompt) :]
    reply_end = generation.find(_PROBE_REPLY) + len(_PROBE_REPLY)
    encoding = tokenizer(generation, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    # The first special token after the reply: a template may add more after it (Phi-3 ends a whole conversation
    # with EOS), but generation stops at the first one.
    end_of_turn = next(
        (generation[a:b] for token, (a, b) in zip(encoding.input_ids, encoding.offset_mapping) if a >= reply_end and token in special),
        None,
    )
    with_reasoning = [_PROBE[0], {**_PROBE[1], "reasoning_content": _PROBE_REASONING}]
    renders_field = _PROBE_REASONING in _apply(tokenizer, with_reasoning)
    later = [*with_reasoning, {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Done."}]
    traits = TemplateTraits(end_of_turn, renders_field, _PROBE_REASONING in _apply(tokenizer, _reasoning_placed(later, renders_field)))
    _traits[tokenizer] = (tokenizer.chat_template, traits)
    return traits


def _apply(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list | None = None, *, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as exc:
        raise FinetuneError(f"the chat template rejected a conversation ({exc}); roles in it: {', '.join(m['role'] for m in messages)}.") from None


def template_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as this template takes them: reasoning stays in `reasoning_content` when the template writes that
    field, and is otherwise put into the content as a <think> block, so it is never silently lost."""
    return _reasoning_placed(chat_messages(messages), template_traits(tokenizer).renders_reasoning_field)


def _reasoning_placed(messages: list[dict[str, Any]], as_field: bool) -> list[dict[str, Any]]:
    if as_field:
        return messages
    out = []
    for message in messages:
        message = dict(message)
        reasoning = message.pop("reasoning_content", None)
        if reasoning:
            content = message["content"]
            message["content"] = f"<think>\n{reasoning.strip()}\n</think>" + (f"\n\n{content}" if content else "")
        out.append(message)
    return out


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: str = "") -> str:
    """The conversation rendered for the assistant's next turn, exactly as training rendered its prompts."""
    return _apply(tokenizer, template_messages(tokenizer, messages), chat_tools(tools), generation_prompt=True)


@dataclass
class _Sample:
    text: str
    spans: list[tuple[int, int]]  # character spans that carry loss, one per trained assistant turn
    turn_messages: list[int]  # for each trained turn: how many messages up to and including it


class _Renderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: str) -> None:
        self.tokenizer, self.messages, self.tools = tokenizer, messages, chat_tools(tools)
        self.end_of_turn = template_traits(tokenizer).end_of_turn

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool = False) -> str:
        return _apply(self.tokenizer, template_messages(self.tokenizer, messages), self.tools, generation_prompt=generation_prompt)

    def through_end_of_turn(self, text: str) -> str:
        """`text` up to and including the first end-of-turn token, where generation stops (a template may write more
        after it: Phi-3 ends a whole conversation with EOS); without one, up to its trailing whitespace."""
        if self.end_of_turn and self.end_of_turn in text:
            return text[: text.index(self.end_of_turn) + len(self.end_of_turn)]
        return text.rstrip()

    def turn(self, index: int) -> tuple[str, str, str]:
        """(prompt, generation, rendering of the conversation ending with this turn) for assistant turn `index`."""
        prompt = self.render(self.messages[:index], generation_prompt=True)
        ending_here = self.render(self.messages[: index + 1])
        if not ending_here.startswith(prompt):
            raise FinetuneError(
                f"the chat template is not prefix-preserving even for the latest turn: a conversation ending with "
                f"assistant turn {index} does not start with the prompt the template writes for that turn, so no "
                "rendering matches what the model sees at inference. Set model.chat_template to a template without "
                "that behaviour, e.g. 'chatml'."
            )
        return prompt, self.through_end_of_turn(ending_here[len(prompt) :]), ending_here

    def between(self, previous: int, index: int) -> str:
        """What the template writes after assistant turn `previous`'s end-of-turn token up to the start of turn
        `index`'s generation (the user or tool turns between them, and the generation prompt)."""
        sentinel = {**self.messages[previous], "content": _SENTINEL, "reasoning_content": None}
        alone = self.render([*self.messages[:previous], sentinel])
        context = self.render([*self.messages[:previous], sentinel, *self.messages[previous + 1 : index]], generation_prompt=True)
        tail = self.through_end_of_turn(alone[alone.index(_SENTINEL) + len(_SENTINEL) :])
        after = context[context.index(_SENTINEL) + len(_SENTINEL) :]
        if not after.startswith(tail):
            raise FinetuneError(
                "data.reasoning: keep cannot be rendered with this chat template (an assistant turn ends differently "
                "when it is not the latest one); use data.reasoning: drop."
            )
        return after[len(tail) :]


def conversation_samples(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: str = "", reasoning: str = "drop") -> list[_Sample]:
    renderer = _Renderer(tokenizer, messages, tools)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = {i: renderer.turn(i) for i in assistant}
    samples, remaining = [], list(assistant)
    while remaining:
        text = turns[remaining[-1]][2]
        trained = [i for i in remaining if text.startswith(turns[i][0] + turns[i][1])]
        spans = [(len(turns[i][0]), len(turns[i][0]) + len(turns[i][1])) for i in trained]
        samples.append(_Sample(text, spans, [i + 1 for i in trained]))
        remaining = [i for i in remaining if i not in trained]
        if reasoning == "keep" and remaining:
            return [_kept_reasoning_sample(renderer, assistant, turns)]
    return samples[::-1]  # shortest first, the whole conversation last


def _kept_reasoning_sample(renderer: _Renderer, assistant: list[int], turns: dict[int, tuple[str, str, str]]) -> _Sample:
    """Every assistant turn as the template renders a latest turn, joined by what the template writes between turns."""
    text, spans = turns[assistant[0]][0], []
    for index, following in zip(assistant, [*assistant[1:], None]):
        prompt, generation, ending_here = turns[index]
        spans.append((len(text), len(text) + len(generation)))
        text += generation
        text += renderer.between(index, following) if following is not None else ending_here[len(prompt) + len(generation) :]
    return _Sample(text, spans, [i + 1 for i in assistant])


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: str = "", reasoning: str = "drop") -> list[dict[str, Any]]:
    """The training samples of one conversation (one for prefix-preserving templates, see `data.reasoning`), each
    with input_ids, labels that are -100 outside trained assistant turns, `turn_ends` (the token position just after
    each trained turn, where the sample may be cut without splitting a turn) and `turn_messages` (how many messages
    the sample covers up to each of those turns)."""
    if reasoning not in REASONING_POLICIES:
        raise FinetuneError(f"data.reasoning {reasoning!r}: use one of {', '.join(REASONING_POLICIES)}.")
    out = []
    for sample in conversation_samples(tokenizer, messages, tools, reasoning):
        # add_special_tokens=False: the template already wrote any BOS; adding another would double it.
        encoding = tokenizer(sample.text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [IGNORE_INDEX] * len(encoding.input_ids)
        turn_ends = [0] * len(sample.spans)
        span_index = 0
        for position, (start, end) in enumerate(encoding.offset_mapping):
            while span_index < len(sample.spans) and start >= sample.spans[span_index][1]:
                span_index += 1
            if span_index < len(sample.spans) and sample.spans[span_index][0] <= start and end > start:
                labels[position] = encoding.input_ids[position]
                turn_ends[span_index] = position + 1
        out.append({"input_ids": list(encoding.input_ids), "labels": labels, "turn_ends": turn_ends, "turn_messages": sample.turn_messages})
    return out


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> dict[str, Any]:
    """Raw text for continued pretraining: every token carries loss, and the document ends with EOS."""
    ids = list(tokenizer(text).input_ids)
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return {"input_ids": ids, "labels": list(ids), "turn_ends": [len(ids)], "turn_messages": [0]}


def truncate_at_turn(tokens: dict[str, Any], messages: list[dict[str, Any]], max_length: int) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """Keep the longest run of whole turns, ending with a trained assistant turn, that fits in max_length; None if
    the first one does not fit."""
    fitting = [i for i, end in enumerate(tokens["turn_ends"]) if end <= max_length]
    if not fitting:
        return None
    keep = fitting[-1]
    end = tokens["turn_ends"][keep]
    cut = {
        "input_ids": tokens["input_ids"][:end],
        "labels": tokens["labels"][:end],
        "turn_ends": tokens["turn_ends"][: keep + 1],
        "turn_messages": tokens["turn_messages"][: keep + 1],
    }
    return cut, messages[: tokens["turn_messages"][keep]]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token that closes an assistant turn in this template (e.g. <|im_end|>), for generation stops."""
    token = template_traits(tokenizer).end_of_turn
    return [tokenizer.convert_tokens_to_ids(token)] if token else []
