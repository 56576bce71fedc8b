"""The chunked output layer (finetune.chunked_loss) computes what each family's own forward computes: the same
logits (Gemma 2's softcapping included), and perplexity in chunks equal to perplexity over the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from finetune import chunked_loss
from finetune.evaluation import nll
from tests.families import FAMILIES, build_tokenizer


@pytest.mark.parametrize("name", list(FAMILIES))
def test_final_hidden_states_through_the_head_are_the_models_logits(name):
    family = FAMILIES[name]
    tokenizer = build_tokenizer(family)
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in family.special_tokens.items()}
    torch.manual_seed(0)
    model = family.build_model(len(tokenizer), ids).eval()
    inputs = {
        "input_ids": torch.randint(0, len(tokenizer), (2, 12)),
        "attention_mask": torch.ones(2, 12, dtype=torch.long),
    }
    with torch.no_grad():
        expected = model(**inputs).logits.float()
        got = chunked_loss.output_logits(model, chunked_loss.final_hidden_states(model, inputs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sharded", [False, True], ids=["chunks-of-5", "in-forward-for-sharded-weights"])
def test_chunked_perplexity_equals_the_full_logits_one(tiny_llama_dir, monkeypatch, sharded):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    torch.manual_seed(1)
    rows = []
    for length in (9, 14, 20):
        ids = torch.randint(0, 1000, (length,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    with torch.no_grad():  # reference: each row alone, full logits
        assistant = every = 0.0
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            every += F.cross_entropy(logits, torch.tensor(row["input_ids"][1:]), reduction="sum").item()
            assistant += F.cross_entropy(logits, torch.tensor(row["labels"][1:]), reduction="sum").item()
    monkeypatch.setattr(chunked_loss, "loss_chunk_positions", lambda vocab: 5)
    if sharded:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    result = nll(model, Dataset.from_list(rows), pad_token_id=0, batch_size=2)
    got_assistant, assistant_tokens, got_every, every_tokens = result.rows.sum(axis=0)
    assert got_every == pytest.approx(every, rel=1e-5) and every_tokens == sum(len(r["input_ids"]) - 1 for r in rows)
    assert got_assistant == pytest.approx(assistant, rel=1e-5)
    assert assistant_tokens == sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
