"""Tokenization with loss masks: labels are -100 everywhere except assistant replies and their end-of-turn token.

Why by hand: TRL's `assistant_only_loss` needs `{% generation %}` markers that most templates (SmolLM2's
included) lack. Rendering prefix by prefix works for any template whose rendering of a conversation starts
with the rendering of its beginning, which we check rather than assume.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from finetune.errors import FinetuneError

IGNORE_INDEX = -100


def render_with_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the character spans of each assistant reply plus its end-of-turn marker."""
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


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> dict[str, Any]:
    """input_ids of the rendered conversation, labels that are -100 outside assistant replies, and `turn_ends`:
    the token position just after each assistant reply (where the conversation may be cut without splitting a turn)."""
    text, spans = render_with_spans(tokenizer, messages)
    # add_special_tokens=False: the template already wrote any BOS; adding another would double it.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE_INDEX] * len(encoding.input_ids)
    turn_ends = [0] * len(spans)
    span_index = 0
    for position, (start, end) in enumerate(encoding.offset_mapping):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start and end > start:
            labels[position] = encoding.input_ids[position]
            turn_ends[span_index] = position + 1
    return {"input_ids": list(encoding.input_ids), "labels": labels, "turn_ends": turn_ends}


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> dict[str, Any]:
    """Raw text for continued pretraining: every token carries loss, and the document ends with EOS."""
    ids = list(tokenizer(text).input_ids)
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return {"input_ids": ids, "labels": list(ids), "turn_ends": [len(ids)]}


def truncate_at_turn(tokens: dict[str, Any], messages: list[dict[str, str]], max_length: int) -> tuple[dict[str, Any], list[dict[str, str]]] | None:
    """Keep the longest run of whole turns, ending with an assistant reply, that fits in max_length; None if the
    first reply does not fit."""
    fitting = [i for i, end in enumerate(tokens["turn_ends"]) if end <= max_length]
    if not fitting:
        return None
    keep, end = fitting[-1], tokens["turn_ends"][fitting[-1]]
    assistant_positions = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    cut = {"input_ids": tokens["input_ids"][:end], "labels": tokens["labels"][:end], "turn_ends": tokens["turn_ends"][: keep + 1]}
    return cut, messages[: assistant_positions[keep] + 1]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token(s) that close an assistant turn in this template (e.g. <|im_end|>), for generation stops."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    tokens = tokenize_conversation(tokenizer, probe)
    trained = [t for t in tokens["labels"] if t != IGNORE_INDEX]
    return [trained[-1]] if trained and trained[-1] in tokenizer.all_special_ids else []
