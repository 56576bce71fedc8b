"""Base models: a pretrained model with no chat template and no turn tokens, fine-tuned with model.chat_template:
chatml. The markers become special tokens with new embedding rows trained beside LoRA, and the adapter, the merged
model, serving and the model card carry them. Tiny in-process models: Gemma-3 (tied embeddings) and Mistral (an
output layer of its own)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import ChatSFTRecipe
from finetune.config import DataConfig, DataSource, ModelConfig
from finetune.data import end_of_turn_ids, prepare_data
from finetune.errors import FinetuneError
from finetune.models import load_tokenizer
from finetune.run_folder import RunFolder
from finetune.serving import load_chat_model
from tests.families import FAMILIES, Family, build_model_dir


def _pretrained_like(build):
    """Embedding rows the size of a trained model's: at the 0.02 initialisation the frozen rows of a tiny model bound
    every logit near zero, and no reply could be learnt exactly."""

    def built(vocab: int, ids: dict[str, int]):
        model = build(vocab, ids)
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            layer.weight.data.normal_(0, 0.1)
        return model

    return built


BASES = {
    "gemma3": Family(
        "gemma3",
        None,
        {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
        (),
        "<|im_end|>",
        _pretrained_like(FAMILIES["gemma3"].build_model),
    ),
    "mistral": Family(
        "mistral",
        None,
        {"bos": "<s>", "eos": "</s>", "pad": "<unk>"},
        (),
        "<|im_end|>",
        _pretrained_like(FAMILIES["mistral"].build_model),
    ),
}
ROWS = [
    {"messages": [{"role": "user", "content": "Ping?"}, {"role": "assistant", "content": "Pong."}]},
    {"messages": [{"role": "user", "content": "Marco?"}, {"role": "assistant", "content": "Polo."}]},
    {"messages": [{"role": "user", "content": "Knock knock."}, {"role": "assistant", "content": "Who is there?"}]},
] * 4


@pytest.fixture(scope="module", params=list(BASES))
def base(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"base-{request.param}")
    data = root / "chats.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in ROWS))
    return build_model_dir(BASES[request.param], root / "base"), data


def test_a_base_model_needs_a_template_and_chatml_works(base):
    folder, data = base
    with pytest.raises(FinetuneError, match="no chat template. Set model.chat_template to 'chatml'"):
        load_tokenizer(ModelConfig(source=str(folder)))
    plain = AutoTokenizer.from_pretrained(folder)
    tokenizer = load_tokenizer(ModelConfig(source=str(folder), chat_template="chatml"))
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [len(plain), len(plain) + 1]
    assert end_of_turn_ids(tokenizer) == [len(plain) + 1]
    prepared = prepare_data(
        DataConfig(sources=[DataSource(type="file", path=str(data))], validation_split=0, test_split=0), tokenizer
    )
    assert not [f for f in prepared.report.findings if f.level == "serious"]  # the audit's advice works


@pytest.fixture(scope="module")
def run(base):
    folder, data = base
    recipe = ChatSFTRecipe(
        name="base",
        model={"source": str(folder), "quantization": "none", "chat_template": "chatml"},
        lora={"r": 8, "dropout": 0.0},
        data={
            "sources": [{"type": "file", "path": str(data)}],
            "max_length": 64,
            "validation_split": 0,
            "test_split": 0.25,
        },
        training={
            "max_steps": 40,
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-2,
            "warmup_ratio": 0,
        },
        evaluation={"max_rows": 3, "generation": False, "time_share": None, "safety": False},
        output={"dir": str(folder.parent / "run")},
    )
    result = recipe.run()
    return recipe, result


def test_the_added_tokens_are_trained_and_saved_in_the_adapter_without_the_whole_embedding(run, base):
    recipe, result = run
    vocab = len(AutoTokenizer.from_pretrained(base[0]))
    assert recipe.new_tokens == [vocab, vocab + 1]
    adapter = RunFolder(result.run_dir).adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert list(config["trainable_token_indices"].values())[0] == [vocab, vocab + 1]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        rows = {key: weights.get_tensor(key) for key in weights.keys() if "trainable_tokens" in key}
        assert not [key for key in weights.keys() if key.endswith(".weight") and "lora_" not in key]
    assert rows and all(t.shape[0] == 2 for t in rows.values())  # two rows, never the whole (vocab x hidden) matrix
    embeddings = AutoModelForCausalLM.from_pretrained(base[0]).get_input_embeddings().weight
    for trained in rows.values():  # moved away from where they started (the mean of the existing rows)
        assert (trained - embeddings.mean(0)).abs().max() > 1e-2
    card = (adapter / "README.md").read_text()
    assert "## Added tokens" in card and "`<|im_start|>`, `<|im_end|>`" in card
    assert "base.resize_token_embeddings(len(tokenizer))" in card
    assert result.metrics_after["perplexity"] < result.metrics_before["perplexity"]


def test_merged_model_has_the_new_vocabulary_and_stops_at_im_end(run):
    recipe, result = run
    tokenizer = AutoTokenizer.from_pretrained(result.merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer) == stop + 1
    assert stop in merged.generation_config.eos_token_id
    trained = [row["messages"] for row in recipe.data.splits["train"]]
    for question, answer in ((m[0]["content"], m[1]["content"]) for m in trained):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            output = merged.generate(**prompt, max_new_tokens=20, do_sample=False)
        reply = output[0, prompt["input_ids"].shape[1] :].tolist()
        assert reply[-1] == stop and stop not in reply[:-1], tokenizer.decode(reply)
        assert tokenizer.decode(reply, skip_special_tokens=True) == answer


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "base+adapter"])
def test_serving_answers_and_stops_with_the_added_tokens(run, merged):
    recipe, result = run
    folder = RunFolder(result.run_dir)
    chat = (
        load_chat_model(result.run_dir)
        if merged
        else load_chat_model(recipe.config.model.source, [str(folder.adapter)])
    )
    question, answer = recipe.data.splits["train"][0]["messages"]
    completion = chat.complete(chat.default, chat.prompt_ids([question]), _greedy())
    assert (completion.text, completion.finish_reason) == (answer["content"], "stop")


def test_batched_serving_keeps_the_trained_token_rows_per_adapter(run):
    """Rows of the adapter (its trained rows for the added tokens) and of the base share a batch: each gets exactly
    its one-at-a-time reply, and the adapter's still ends at the trained end-of-turn token."""
    from finetune.serving import Batcher

    recipe, result = run
    chat = load_chat_model(recipe.config.model.source, [str(RunFolder(result.run_dir).adapter)])
    questions = [rows["messages"][0] for rows in recipe.data.splits["train"]][:3]
    jobs = [(name, chat.prompt_ids([q])) for q in questions for name in chat.variants]
    alone = [chat.complete(name, prompt, _greedy()) for name, prompt in jobs]
    batcher = Batcher(chat, max_batch_size=len(jobs))
    try:
        together = [f.result(timeout=60) for f in [batcher.submit(name, prompt, _greedy()) for name, prompt in jobs]]
    finally:
        batcher.close()
    assert together == alone and alone[1].finish_reason == "stop"


def _greedy():
    from finetune.serving import DecodingSettings

    return DecodingSettings(max_new_tokens=20, temperature=0)


def test_a_4bit_base_gets_rows_for_the_added_tokens_and_trains_them(base):
    from finetune import adapters, models
    from finetune.config import LoraConfig

    folder, _ = base
    cfg = ModelConfig(source=str(folder), chat_template="chatml", quantization="4bit")
    tokenizer = load_tokenizer(cfg)
    model = models.load_model(cfg)
    new = models.fit_vocabulary(model, tokenizer)
    assert new == [len(tokenizer) - 2, len(tokenizer) - 1] and model.get_input_embeddings().weight.shape[0] == len(
        tokenizer
    )
    model = adapters.attach_lora(model, LoraConfig(r=4), gradient_checkpointing=False, new_tokens=new)
    ids = tokenizer.apply_chat_template(ROWS[0]["messages"], tokenize=True, return_dict=True, return_tensors="pt")[
        "input_ids"
    ]
    model(input_ids=ids, labels=ids).loss.backward()
    rows = [p for name, p in model.named_parameters() if "trainable_tokens_delta" in name]
    assert rows and all(p.grad is not None and p.grad.abs().sum() > 0 for p in rows)


def test_checkpoints_hold_the_trained_rows_not_the_whole_embedding(base, tmp_path):
    folder, data = base
    recipe = ChatSFTRecipe(
        name="checkpoints",
        model={"source": str(folder), "quantization": "none", "chat_template": "chatml"},
        data={
            "sources": [{"type": "file", "path": str(data)}],
            "max_length": 64,
            "validation_split": 0,
            "test_split": 0,
        },
        training={"max_steps": 1, "batch_size": 4, "save_steps": 1},
        output={"dir": str(tmp_path / "run")},
    )
    recipe.setup()
    recipe.train()
    [checkpoint] = recipe.folder.checkpoints.glob("checkpoint-*")
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert any("trainable_tokens" in key for key in keys)
    assert not [key for key in keys if key.endswith(".weight") and "lora_" not in key], (
        keys
    )  # no whole embedding matrix
