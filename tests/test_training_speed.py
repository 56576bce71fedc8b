"""Speed levers of finetune.training: padding-free packing keeps conversations apart and leaves the loss as it
was; the output layer run only where loss is taken gives the same loss and gradients as the full projection."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finetune import adapters, training
from finetune.config import LoraConfig, TrainingConfig
from finetune.data import tokenize_conversation
from finetune.training.trainer import _TrainedLogitsSFTTrainer
from tests.conftest import FACTS

CONVERSATIONS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in FACTS[:3]] + [
    [
        {"role": "system", "content": "You answer questions about invented places."},
        {"role": "user", "content": FACTS[3][0]},
        {"role": "assistant", "content": FACTS[3][1]},
        {"role": "user", "content": FACTS[4][0]},
        {"role": "assistant", "content": FACTS[4][1]},
    ]
]


@pytest.fixture(scope="module")
def rows(chatml_tokenizer):
    return [
        {k: v for k, v in tokenize_conversation(chatml_tokenizer, c)[-1].items() if k in ("input_ids", "labels")}
        for c in CONVERSATIONS
    ]


@pytest.fixture()
def lora_model(tiny_llama_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = adapters.attach_lora(model, LoraConfig(r=8, dropout=0.0), gradient_checkpointing=False)
    # LoRA B starts at zero, which would make every adapter gradient but B's vanish; give it values.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def collate(rows, chatml_tokenizer, padding_free):
    return DataCollatorForLanguageModeling(pad_token_id=chatml_tokenizer.pad_token_id or 0, padding_free=padding_free)(
        rows
    )


def test_packed_batch_has_the_loss_of_the_padded_batch(lora_model, rows, chatml_tokenizer):
    lora_model.eval()
    padded = collate(rows, chatml_tokenizer, padding_free=False)
    packed = collate(rows, chatml_tokenizer, padding_free=True)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        # Reference: each conversation alone, no padding, weighted by its labelled tokens (= one batch's mean).
        total, count = 0.0, 0
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += lora_model(input_ids=ids, labels=labels).loss.item() * n
            count += n
        alone = total / count
        padded_loss = lora_model(**padded).loss.item()
        packed_loss, _, _ = training.trained_logits_loss(lora_model, packed)
    assert padded_loss == pytest.approx(alone, abs=1e-5)
    assert packed_loss.item() == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", training.PACKED_ATTENTION])
def test_packed_conversations_never_attend_to_each_other(lora_model, rows, chatml_tokenizer, attention):
    """transformers' block-diagonal mask (sdpa) and our per-conversation attention both keep conversations apart."""
    lora_model.get_base_model().set_attn_implementation("sdpa")
    if attention == training.PACKED_ATTENTION:
        training.use_packed_attention(lora_model)  # registers the kernel, as training does
    lora_model.eval()
    changed = [dict(rows[0], input_ids=[(t + 7) % 50000 for t in rows[0]["input_ids"]]), *rows[1:]]
    first, second = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])

    def packed_logits(batch_rows):
        batch = collate(batch_rows, chatml_tokenizer, padding_free=True)
        # transformers derives the block-diagonal mask from position_ids only without a KV cache (training has
        # none; TRL and trained_logits_loss pass use_cache=False): with a cache, packed rows would see each other.
        return lora_model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]

    with torch.no_grad():
        logits, logits_changed = packed_logits(rows), packed_logits(changed)
        second_alone = lora_model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0]
    assert not torch.allclose(logits[:first], logits_changed[:first])  # the first conversation did change
    torch.testing.assert_close(logits[first:], logits_changed[first:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[first : first + second], second_alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize(
    "chunk", [None, 7, "sharded"], ids=["one-chunk", "chunks-of-7", "in-forward-for-sharded-weights"]
)
def test_trained_logits_loss_has_the_full_projection_loss_and_gradients(
    lora_model, rows, chatml_tokenizer, padding_free, chunk, monkeypatch
):
    """In one chunk, in chunks of 7 positions (each recomputed in backward), or inside the forward as FSDP/ZeRO-3 need:
    the loss and gradients of the full logits."""
    from finetune import chunked_loss

    if chunk == "sharded":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    elif chunk:
        monkeypatch.setattr(chunked_loss, "loss_chunk_positions", lambda vocab: chunk)
    lora_model.train()  # dropout is 0, so train mode is deterministic
    batch = collate(rows, chatml_tokenizer, padding_free=padding_free)
    trainable = [p for p in lora_model.parameters() if p.requires_grad]

    output = lora_model(**batch, use_cache=False)  # transformers' own loss over the full logits
    full, logits = output.loss, output.logits[:, :-1][batch["labels"][:, 1:] != -100]
    full_grads = torch.autograd.grad(full, trainable)
    fast, hits, labelled = training.trained_logits_loss(lora_model, batch)
    fast_grads = torch.autograd.grad(fast, trainable)

    targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
    assert labelled == len(targets) > 7 * 3
    assert hits.item() == (logits.argmax(-1) == targets).sum().item()
    assert fast.item() == pytest.approx(full.item(), abs=1e-5)
    for a, b in zip(full_grads, fast_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in fast_grads)


def test_trainer_levers_leave_the_training_loss_unchanged(tiny_llama_dir, rows, chatml_tokenizer, tmp_path):
    """Two optimizer steps with gradient accumulation: TRL's own loss on padded batches vs both levers."""
    splits = DatasetDict({"train": Dataset.from_list(rows * 2)})
    losses = {}
    for levers in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model = adapters.attach_lora(model, LoraConfig(r=8, dropout=0.0), gradient_checkpointing=False)
        cfg = TrainingConfig(
            max_steps=2,
            batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            logging_steps=1,
            packing=levers,
            skip_untrained_logits=levers,
            warmup_ratio=0,
        )
        trainer = training.build_trainer(
            model, chatml_tokenizer, splits, cfg, tmp_path / str(levers), dtype=torch.float32
        )
        assert isinstance(trainer, _TrainedLogitsSFTTrainer) == levers
        trainer.train()
        losses[levers] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_adapters_of_a_quantized_model_train_in_float32(tiny_llama_dir, rows, tmp_path):
    """TRL casts a quantized model's adapters to bf16, where small AdamW updates round away; ours stay float32,
    at their initial values, and change in training."""
    from finetune.config import ModelConfig
    from finetune.models import load_model

    model = load_model(ModelConfig(source=str(tiny_llama_dir), quantization="4bit"))
    model = adapters.attach_lora(model, LoraConfig(r=4), gradient_checkpointing=False)
    initial = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    cfg = TrainingConfig(max_steps=2, batch_size=2, learning_rate=1e-3, logging_steps=1, warmup_ratio=0)
    trainer = training.build_trainer(
        model, None, DatasetDict({"train": Dataset.from_list(rows)}), cfg, tmp_path, dtype=torch.float32
    )
    trained = {name: param for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert trained.keys() == initial.keys() and all(p.dtype == torch.float32 for p in trained.values())
    assert all(torch.equal(trained[name], initial[name]) for name in initial)
    trainer.train()
    assert all(not torch.equal(trained[name], initial[name]) for name in initial)  # B first, then A
