"""Tokenization with loss masks: labels are -100 everywhere except assistant turns (reply, tool calls, reasoning)
and the end-of-turn token that closes them.

Why by hand: TRL's `assistant_only_loss` needs `{% generation %}` markers that most templates (SmolLM2's included)
lack. Here every assistant turn is located by rendering, never by searching for its text: a turn's *prompt* is the
conversation before it rendered with the generation prompt, and its *generation* is what the template adds after
that prompt for the turn itself, up to the end-of-turn token where generation stops. A turn is trained in a sample
only where the sample's tokens start with exactly its prompt's tokens (as inference tokenizes the prompt) followed by
its generation's, so every trained token is one the model produces at inference, after the very tokens it sees there.

The whole conversation is one sample when every turn matches there, as with every prefix-preserving template whose
prompt tokenizes the same with or without a reply after it. Otherwise a turn that does not match gets a sample of
its own that ends with it (`DataReport.samples_added` counts them). Two causes:

- Templates that rewrite earlier turns: Qwen3 and other reasoning models drop the `<think>` block of every
  assistant turn before the latest user message. `data.reasoning` says what later turns see of earlier reasoning:
  `drop` (default) what the template shows at inference, exact as above, at the cost of up to k samples for k
  turns (training earlier turns as the full rendering shows them instead would teach the model to answer without
  reasoning; masking them would waste them); `keep` one sample in which every turn keeps its reasoning, each
  rendered as the template renders a latest turn: cheaper, but later turns see context inference never shows.
- Prompts whose last tokens merge with the reply: with GPT-2-style pre-tokenizers, a prompt ending in "\n\n" is
  one token alone but two before a reply, so a model trained on whole conversations never sees the prompt it gets.
"""

from __future__ import annotations

import re
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
# What templates write to mark turns: <|im_start|>, <|eot_id|>, <start_of_turn>, [INST]. Plain tags such as <think>
# are left out: templates write those as text that tokenizers are meant to split.
_TURN_MARKER = re.compile(r"<\|[^|<>\s]+\|>|<[a-z]+(?:_[a-z]+)+>|\[/?[A-Z]+(?:_[A-Z]+)*\]")


@dataclass(frozen=True)
class TemplateTraits:
    """What a chat template does, learnt once by rendering probes."""

    end_of_turn: str | None  # the special token that closes an assistant turn (where generation stops)
    renders_reasoning_field: bool  # writes an assistant message's `reasoning_content`
    renders_reasoning: bool  # writes the latest turn's reasoning at all (as the field, or as an inline <think> block)
    keeps_earlier_reasoning: bool  # a turn before the latest user message still shows its reasoning
    prompt_merges_with_reply: bool  # the prompt's last tokens differ when a reply follows them


_traits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def template_traits(tokenizer: PreTrainedTokenizerBase) -> TemplateTraits:
    """What this tokenizer's chat template does, learnt by rendering probe conversations (cached per tokenizer while its
    template is unchanged).

    Args:
        tokenizer: The tokenizer with its chat template.

    Returns:
        TemplateTraits: its end-of-turn token, how it renders reasoning, and whether its prompt tokens merge with a
        reply's.
    """
    cached = _traits.get(tokenizer)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    prompt = _apply(tokenizer, _PROBE[:1], generation_prompt=True)
    generation = _apply(tokenizer, _PROBE)[len(prompt) :]
    after_reply = generation[generation.find(_PROBE_REPLY) + len(_PROBE_REPLY) :]
    special = set(tokenizer.all_special_ids)
    # The first special token after the reply: a template may add more after it (Phi-3 ends a whole conversation
    # with EOS), but generation stops at the first one.
    end_of_turn = next(
        (tokenizer.convert_ids_to_tokens(token) for token in _encode(tokenizer, after_reply) if token in special), None
    )
    prompt_ids = _encode(tokenizer, prompt)
    merges = _encode(tokenizer, prompt + _PROBE_REPLY)[: len(prompt_ids)] != prompt_ids
    with_reasoning = [_PROBE[0], {**_PROBE[1], "reasoning_content": _PROBE_REASONING}]
    renders_field = _PROBE_REASONING in _apply(tokenizer, with_reasoning)
    later = [*with_reasoning, {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Done."}]
    renders = renders_field or _PROBE_REASONING in _apply(tokenizer, _reasoning_placed(with_reasoning, False))
    keeps = renders and _PROBE_REASONING in _apply(tokenizer, _reasoning_placed(later, renders_field))
    traits = TemplateTraits(end_of_turn, renders_field, renders, keeps, merges)
    _traits[tokenizer] = (tokenizer.chat_template, traits)
    return traits


def missing_turn_markers(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The turn markers this chat template writes that are not special tokens of the tokenizer, in order of first
    appearance: ChatML's <|im_start|> and <|im_end|> given to a base model whose vocabulary never had them.

    Args:
        tokenizer: The tokenizer with its chat template.

    Returns:
        The marker strings, empty when all are special tokens.
    """
    rendered = _apply(tokenizer, _PROBE) + _apply(tokenizer, _PROBE[:1], generation_prompt=True)
    special = set(tokenizer.all_special_tokens)
    return [marker for marker in dict.fromkeys(_TURN_MARKER.findall(rendered)) if marker not in special]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # add_special_tokens=False: the template already wrote any BOS; adding another would double it.
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _apply(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list | None = None,
    *,
    generation_prompt: bool = False,
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as exc:
        raise FinetuneError(
            f"the chat template rejected a conversation ({exc}); roles in it: {', '.join(m['role'] for m in messages)}."
        ) from exc


def template_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as this template takes them: reasoning stays in `reasoning_content` when the template writes that
    field, and is otherwise put into the content as a <think> block, so it is never silently lost.

    Args:
        tokenizer: The tokenizer with its chat template.
        messages: Stored messages.

    Returns:
        The messages ready for `apply_chat_template`.
    """
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


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: str = "",
    *,
    generation_prompt: bool = False,
) -> str:
    """Stored messages (and tools JSON) rendered as training renders them.

    Args:
        tokenizer: The tokenizer with its chat template.
        messages: Stored messages (see `chat_messages`).
        tools: The tools as JSON text ("" for none).
        generation_prompt: Whether to end with the template's opening of an assistant turn.

    Returns:
        The rendered text.
    """
    return _apply(
        tokenizer, template_messages(tokenizer, messages), chat_tools(tools), generation_prompt=generation_prompt
    )


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: str = "") -> str:
    """The conversation rendered for the assistant's next turn, exactly as training rendered its prompts.

    Args:
        tokenizer: The tokenizer with its chat template.
        messages: The conversation so far (stored messages).
        tools: The tools as JSON text ("" for none).

    Returns:
        The rendered prompt text, ending with the opening of the assistant's turn.
    """
    return render_chat(tokenizer, messages, tools, generation_prompt=True)


@dataclass
class _Turn:
    prompt: str  # the conversation before the turn, with the generation prompt
    generation: str  # what the template writes for the turn after its prompt, through the end-of-turn token
    ending_here: str  # the conversation ending with this turn, as the template renders it
    prompt_ids: list[int]  # the prompt as inference tokenizes it
    generation_ids: list[int]  # the tokens the model generates for the turn

    @property
    def tail(self) -> str:
        """What the template writes after the generation when the conversation ends with this turn."""
        return self.ending_here[len(self.prompt) + len(self.generation) :]


@dataclass
class _Sample:
    input_ids: list[int]
    trained: list[tuple[int, int]]  # token ranges that carry loss, one per trained assistant turn
    turn_messages: list[int]  # for each trained turn: how many messages up to and including it


class _Renderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: str) -> None:
        self.tokenizer, self.messages, self.tools = tokenizer, messages, chat_tools(tools)
        self.end_of_turn = template_traits(tokenizer).end_of_turn

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool = False) -> str:
        return _apply(
            self.tokenizer, template_messages(self.tokenizer, messages), self.tools, generation_prompt=generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        return _encode(self.tokenizer, text)

    def through_end_of_turn(self, text: str) -> str:
        """`text` up to and including the first end-of-turn token, where generation stops (a template may write more
        after it: Phi-3 ends a whole conversation with EOS); without one, up to its trailing whitespace."""
        if self.end_of_turn and self.end_of_turn in text:
            return text[: text.index(self.end_of_turn) + len(self.end_of_turn)]
        return text.rstrip()

    def turn(self, index: int) -> _Turn:
        prompt = self.render(self.messages[:index], generation_prompt=True)
        ending_here = self.render(self.messages[: index + 1])
        if not ending_here.startswith(prompt):
            raise FinetuneError(
                f"the chat template is not prefix-preserving even for the latest turn: a conversation ending with "
                f"assistant turn {index} does not start with the prompt the template writes for that turn, so no "
                "rendering matches what the model sees at inference. Set model.chat_template to a template without "
                "that behaviour, e.g. 'chatml'."
            )
        generation = self.through_end_of_turn(ending_here[len(prompt) :])
        prompt_ids, joint = self.encode(prompt), self.encode(prompt + generation)
        # Where the prompt's last tokens merge with the reply, the model still generates after the prompt's own tokens.
        generation_ids = joint[len(prompt_ids) :] if joint[: len(prompt_ids)] == prompt_ids else self.encode(generation)
        return _Turn(prompt, generation, ending_here, prompt_ids, generation_ids)

    def between(self, previous: int, index: int) -> str:
        """What the template writes after assistant turn `previous`'s end-of-turn token up to the start of turn
        `index`'s generation (the user or tool turns between them, and the generation prompt)."""
        sentinel = {**self.messages[previous], "content": _SENTINEL, "reasoning_content": None}
        alone = self.render([*self.messages[:previous], sentinel])
        context = self.render(
            [*self.messages[:previous], sentinel, *self.messages[previous + 1 : index]], generation_prompt=True
        )
        tail = self.through_end_of_turn(alone[alone.index(_SENTINEL) + len(_SENTINEL) :])
        after = context[context.index(_SENTINEL) + len(_SENTINEL) :]
        if not after.startswith(tail):
            raise FinetuneError(
                "data.reasoning: keep cannot be rendered with this chat template (an assistant turn ends differently "
                "when it is not the latest one); use data.reasoning: drop."
            )
        return after[len(tail) :]


def _trains(ids: list[int], turn: _Turn) -> bool:
    expected = turn.prompt_ids + turn.generation_ids
    return ids[: len(expected)] == expected


def conversation_samples(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: str = "", reasoning: str = "drop"
) -> list[_Sample]:
    """The token ids of one conversation's training samples, and which assistant turns each trains.

    A template that renders earlier turns differently once a conversation goes on (e.g. dropping their reasoning)
    needs more than one sample so every assistant turn is trained as inference shows it.

    Args:
        tokenizer: The tokenizer with the chat template that training uses.
        messages: A validated conversation.
        tools: The row's tools as JSON text ("" for none).
        reasoning: `data.reasoning`: "drop" or "keep".

    Returns:
        The samples (input_ids, trained token ranges, messages covered up to each trained turn), shortest first.
    """
    renderer = _Renderer(tokenizer, messages, tools)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = {i: renderer.turn(i) for i in assistant}
    samples, remaining = [], list(assistant)
    while remaining:
        last = turns[remaining[-1]]
        ids = renderer.encode(last.ending_here)
        if not _trains(ids, last):
            ids = last.prompt_ids + last.generation_ids + renderer.encode(last.tail)
        trained = [i for i in remaining if _trains(ids, turns[i])]
        ranges = [(len(turns[i].prompt_ids), len(turns[i].prompt_ids) + len(turns[i].generation_ids)) for i in trained]
        samples.append(_Sample(ids, ranges, [i + 1 for i in trained]))
        remaining = [i for i in remaining if i not in trained]
        if reasoning == "keep" and remaining and not template_traits(tokenizer).keeps_earlier_reasoning:
            return [_kept_reasoning_sample(renderer, assistant, turns)]
    return samples[::-1]  # shortest first, the whole conversation last


def _kept_reasoning_sample(renderer: _Renderer, assistant: list[int], turns: dict[int, _Turn]) -> _Sample:
    """Every assistant turn as the template renders a latest turn, joined by what the template writes between turns."""
    ids, ranges = list(turns[assistant[0]].prompt_ids), []
    for index, following in zip(assistant, [*assistant[1:], None]):
        turn = turns[index]
        ranges.append((len(ids), len(ids) + len(turn.generation_ids)))
        ids += turn.generation_ids
        ids += renderer.encode(renderer.between(index, following) if following is not None else turn.tail)
    return _Sample(ids, ranges, [i + 1 for i in assistant])


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: str = "", reasoning: str = "drop"
) -> list[dict[str, Any]]:
    """The training samples of one conversation (one for prefix-preserving templates, see the module docstring),
    each with input_ids, labels that are -100 outside trained assistant turns, `turn_ends` (the token position just
    after each trained turn, where the sample may be cut without splitting a turn) and `turn_messages` (how many
    messages the sample covers up to each of those turns).

    Args:
        tokenizer: The tokenizer with the chat template that training uses.
        messages: A validated conversation.
        tools: The row's tools as JSON text ("" for none).
        reasoning: `data.reasoning`: "drop" or "keep" the reasoning of assistant turns.

    Returns:
        The samples, shortest first, the whole conversation last.

    Raises:
        FinetuneError: `reasoning` is not one of REASONING_POLICIES (`data.reasoning`).
    """
    if reasoning not in REASONING_POLICIES:
        raise FinetuneError(f"data.reasoning {reasoning!r}: use one of {', '.join(REASONING_POLICIES)}.")
    out = []
    for sample in conversation_samples(tokenizer, messages, tools, reasoning):
        labels = [IGNORE_INDEX] * len(sample.input_ids)
        for start, end in sample.trained:
            labels[start:end] = sample.input_ids[start:end]
        turn_ends = [end for _, end in sample.trained]
        out.append(
            {
                "input_ids": sample.input_ids,
                "labels": labels,
                "turn_ends": turn_ends,
                "turn_messages": sample.turn_messages,
            }
        )
    return out


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> dict[str, Any]:
    """Raw text for continued pretraining: every token carries loss, and the document ends with EOS.

    Args:
        tokenizer: The model's tokenizer.
        text: The document.

    Returns:
        One sample: input_ids, labels equal to them, turn_ends and turn_messages (one turn covering the whole text).
    """
    ids = list(tokenizer(text).input_ids)
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return {"input_ids": ids, "labels": list(ids), "turn_ends": [len(ids)], "turn_messages": [0]}


def truncate_at_turn(
    tokens: dict[str, Any], messages: list[dict[str, Any]], max_length: int
) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """Keep the longest run of whole turns, ending with a trained assistant turn, that fits in max_length; None if
    the first one does not fit.

    Args:
        tokens: One sample from `tokenize_conversation` (input_ids, labels, turn_ends, turn_messages).
        messages: The messages the sample covers.
        max_length: `data.max_length`, in tokens.

    Returns:
        (the cut sample, the messages it still covers), or None.
    """
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
    """The special token that closes an assistant turn in this template (e.g. <|im_end|>), for generation stops.

    Args:
        tokenizer: The tokenizer with its chat template.

    Returns:
        The id of that token, or an empty list when the template ends a turn with no special token.
    """
    token = template_traits(tokenizer).end_of_turn
    return [tokenizer.convert_tokens_to_ids(token)] if token else []
