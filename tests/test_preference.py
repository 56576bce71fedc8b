"""Preference recipes (DPO, ORPO, SimPO, KTO) on a tiny model: the same stages and outputs as SFT, the reference
model right with LoRA, and held-out preference scores before and after."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune import ChatSFTRecipe, FinetuneError, PreferenceRecipe, Recipe, RecipeConfig
from finetune.cli import app
from finetune.evaluation import nll
from finetune.training import preference as preference_training
from tests.conftest import FACTS, tiny_recipe


@pytest.fixture(scope="module")
def pairs_jsonl(tmp_path_factory):
    """Each made-up question with its right answer chosen over each other question's answer."""
    rows = [
        {"prompt": question, "chosen": answer, "rejected": other}
        for question, answer in FACTS
        for _, other in FACTS
        if other != answer
    ]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def unpaired_jsonl(tmp_path_factory):
    rows = [{"prompt": q, "completion": a, "label": True} for q, a in FACTS] + [
        {"prompt": q, "completion": FACTS[(i + 1) % len(FACTS)][1], "label": False} for i, (q, _) in enumerate(FACTS)
    ]
    path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows * 2))
    return path


def _preference_recipe(model_dir, data, run_dir, method="dpo", **overrides):
    config = tiny_recipe(model_dir, data, run_dir, **overrides)
    config["method"] = method
    config["data"].update(validation_split=0.0, test_split=0.2)
    return config


@pytest.fixture(scope="module")
def dpo_run(tiny_llama_dir, pairs_jsonl, tmp_path_factory):
    """DPO through the command line, from a YAML recipe, as a user runs it."""
    config = _preference_recipe(
        tiny_llama_dir,
        pairs_jsonl,
        tmp_path_factory.mktemp("dpo") / "run",
        training__max_steps=16,
        training__learning_rate=5e-3,
        training__warmup_ratio=0.0,
    )
    config["evaluation"].update(max_rows=None, generation_rows=4, max_new_tokens=6)
    path = tmp_path_factory.mktemp("yaml") / "dpo.yaml"
    RecipeConfig.from_dict(config).to_yaml(path)
    result = CliRunner().invoke(app, ["run", str(path), "--report-to", "tensorboard"])
    assert result.exit_code == 0, result.output
    return RecipeConfig.from_dict(config).run_dir, result.output


def test_dpo_runs_end_to_end_with_the_sft_recipes_outputs(dpo_run):
    run_dir, output = dpo_run
    for name in ("adapter/adapter_model.safetensors", "merged/model.safetensors", "metrics.json", "report.md"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "adapter" / "ref").exists()  # only the trained adapter is saved, not the reference copy
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "dpo"
    changes = {c["metric"]: c for c in metrics["changes"]}
    for name in ("preference_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "perplexity"):
        assert name in changes and changes[name]["rows"] == metrics["evaluation_rows"]
    # Trained to prefer the right answers: on held-out pairs the chosen reply gains on the rejected one.
    assert changes["reward_margin"]["after"] > changes["reward_margin"]["before"]
    assert changes["preference_accuracy"]["after"] >= changes["preference_accuracy"]["before"]
    said = " ".join(output.split())  # rich wraps long lines
    assert "each row scored the first time it is read and reused after (auto on CPU)" in said
    assert "reference passes scored" in said
    assert "| preference_accuracy |" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    ("method", "choice", "expected"),
    [
        ("dpo", "auto", "cached"),  # on CPU: never scores a row twice, nor one training does not read
        ("kto", "auto", "cached"),
        ("dpo", "precompute", "precompute"),
        ("kto", "each_step", "each_step"),
        ("orpo", "precompute", None),  # no reference at all
        ("simpo", "auto", None),
    ],
)
def test_the_reference_mode_auto_caches_scores_on_cpu(method, choice, expected):
    config = RecipeConfig.from_dict({"method": method, "preference": {"reference_log_probs": choice}})
    assert preference_training.reference_mode(config) == expected


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_cached_reference_scores_each_row_once_and_trains_as_a_pass_per_step_does(
    method, tiny_llama_dir, pairs_jsonl, unpaired_jsonl, tmp_path
):
    """Two epochs: the first scores every training row once, the second reuses every score, and the losses are those
    of a reference pass at every step; the scores are the base's (a fresh adapter's reference)."""
    data = unpaired_jsonl if method == "kto" else pairs_jsonl
    losses, recipes = {}, {}
    for mode in ("auto", "each_step"):
        config = _preference_recipe(
            tiny_llama_dir, data, tmp_path / mode, method, training__max_steps=None, training__epochs=2.0
        )
        config["preference"] = {"reference_log_probs": mode}
        recipe = recipes[mode] = PreferenceRecipe(**config)
        recipe.setup()
        losses[mode] = [loss for _, loss in recipe.train().history["train_loss"]]
    cached = recipes["auto"]
    cache = cached.state.reference_cache
    rows = len(cached.data.splits["train"])
    assert cached.state.decisions["preference.reference_log_probs"] == "cached"
    assert recipes["each_step"].state.reference_cache is None
    assert (cache.rows_scored, cache.rows_reused) == (rows, rows)
    assert len(losses["auto"]) == 2 * -(-rows // 4)  # two epochs of batches of 4
    assert losses["auto"] == pytest.approx(losses["each_step"], rel=1e-4)
    assert any(event["event"] == "reference" for event in cached.state.log.events())
    if method == "dpo":
        from transformers import AutoModelForCausalLM

        train = cached.data.splits["train"]
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        with torch.no_grad():
            base_logps = -nll(base, train.select_columns(["input_ids", "labels"]), pad_token_id=0).rows[:, 0]

        def key(prompt, reply):
            return torch.tensor(prompt + reply).numpy().tobytes()

        scores = [
            cache.scores[key(r["prompt_ids"], r["chosen_ids"]) + b"|" + key(r["prompt_ids"], r["rejected_ids"])]
            for r in train
        ]
        assert torch.allclose(torch.tensor([s[0] for s in scores]), torch.tensor(base_logps).float(), atol=1e-3)
    for recipe in recipes.values():
        recipe.cleanup()


def test_dpo_defaults_to_a_lower_learning_rate_than_sft_unless_set():
    """DPO at the SFT rate (5e-4) doubled held-out chosen-reply perplexity (benchmarks/results/preference.md)."""
    assert RecipeConfig.from_dict({"method": "dpo"}).training.learning_rate == 1.5e-4
    assert RecipeConfig.from_dict({"method": "dpo", "training": {"learning_rate": 1e-3}}).training.learning_rate == 1e-3
    for method in ("sft", "orpo", "simpo", "kto"):
        assert RecipeConfig.from_dict({"method": method}).training.learning_rate == 5e-4


def test_a_method_is_trained_by_its_recipe_class(tiny_llama_dir, pairs_jsonl, tmp_path):
    config = RecipeConfig.from_dict(_preference_recipe(tiny_llama_dir, pairs_jsonl, tmp_path / "x"))
    assert isinstance(Recipe.for_config(config), PreferenceRecipe)
    with pytest.raises(FinetuneError, match="method `dpo` is trained by PreferenceRecipe, not ChatSFTRecipe"):
        ChatSFTRecipe(config)


def test_continuing_an_sft_adapter_keeps_it_as_the_reference_never_the_bare_base(
    tiny_llama_dir, facts_jsonl, pairs_jsonl, tmp_path
):
    """LLaMA-Factory #8459: after SFT, DPO must compare with the SFT model. The reference TRL uses is a frozen copy
    of the SFT adapter, and the log-probs precomputed before training are that model's, not the base's."""
    sft = ChatSFTRecipe(**tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "sft", training__learning_rate=5e-3))
    sft_dir = sft.run().run_dir
    config = _preference_recipe(tiny_llama_dir, pairs_jsonl, tmp_path / "dpo", training__max_steps=1)
    config["model"]["adapter"] = str(sft_dir)
    config["preference"] = {"reference_log_probs": "precompute"}  # one step reads fewer rows than auto precomputes
    recipe = PreferenceRecipe(**config)
    recipe.setup()
    recipe.train()
    saved = load_file(sft_dir / "adapter" / "adapter_model.safetensors")
    reference = {
        name.replace(".ref.", "."): p for name, p in recipe.trainer.model.named_parameters() if ".ref." in name
    }
    assert saved and set(saved) <= set(reference)
    assert all(torch.equal(reference[key].detach(), value) for key, value in saved.items())
    train = recipe.trainer.train_dataset
    rows = recipe.data.splits["train"]
    chosen = rows.select_columns(["input_ids", "labels"])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        base_logps = -nll(base, chosen, pad_token_id=recipe.tokenizer.pad_token_id).rows[:, 0]
        sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), sft_dir / "adapter")
        sft_logps = -nll(sft_model, chosen, pad_token_id=recipe.tokenizer.pad_token_id).rows[:, 0]
    precomputed = torch.tensor(train["ref_chosen_logps"], dtype=torch.float64)
    assert torch.allclose(precomputed, torch.tensor(sft_logps), atol=1e-3)
    assert not torch.allclose(precomputed, torch.tensor(base_logps), atol=1e-1)
    recipe.cleanup()


def test_dpo_reports_to_tensorboard_like_sft(dpo_run):
    """--report-to reaches the preference trainers too: DPO's own metrics, the recipe, the before/after scores."""
    from tests.test_trackers import read_events

    run_dir, _ = dpo_run
    scalars, texts = read_events(run_dir / "logs" / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]][-1] == 16
    assert "train/rewards/margins" in scalars  # a metric only TRL's DPO trainer logs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert scalars["after/preference_accuracy"][0][1] == pytest.approx(metrics["metrics_after"]["preference_accuracy"])
    assert "method: dpo" in texts["recipe"][0]


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_orpo_simpo_and_kto_train_on_finetunes_tokens(method, tiny_llama_dir, pairs_jsonl, unpaired_jsonl, tmp_path):
    data = unpaired_jsonl if method == "kto" else pairs_jsonl
    config = _preference_recipe(tiny_llama_dir, data, tmp_path / method, method, training__max_steps=2)
    config["evaluation"].update(generation=False)
    config["output"]["merge"] = False
    result = PreferenceRecipe(**config).run()
    assert result.train_loss is not None and torch.isfinite(torch.tensor(result.train_loss))
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    scores = {"kto": "desirable_logp"}.get(method, "preference_accuracy")
    assert scores in result.metrics_after


def test_orpo_and_simpo_see_no_eos_after_the_end_of_turn(tiny_llama_dir, pairs_jsonl, tmp_path):
    """TRL's ORPO/CPO tokenizer appends EOS to every reply; finetune's tokens reach their collator instead."""
    config = _preference_recipe(tiny_llama_dir, pairs_jsonl, tmp_path / "orpo", "orpo", training__max_steps=1)
    recipe = PreferenceRecipe(**config)
    recipe.setup()
    recipe.train()
    end_of_turn = recipe.tokenizer.convert_tokens_to_ids("<|im_end|>")
    row = recipe.trainer.train_dataset[0]
    trained = [t for t, label in zip(row["chosen_input_ids"], row["chosen_labels"]) if label != -100]
    assert trained[-1] == end_of_turn and trained.count(end_of_turn) == 1
    assert recipe.tokenizer.eos_token_id not in trained[-2:] or recipe.tokenizer.eos_token_id == end_of_turn
    recipe.cleanup()


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_4bit_models_adapters_train_in_float32(method, tiny_llama_dir, pairs_jsonl, unpaired_jsonl, tmp_path):
    """TRL's DPO and KTO trainers cast a quantized model's adapters to bf16, as its SFT trainer does (small AdamW
    steps then round away; see training.trainer.Float32Adapters): the recipe trains them in float32, from the values
    LoRA was attached with, beside a float32 reference copy."""
    data = unpaired_jsonl if method == "kto" else pairs_jsonl
    config = _preference_recipe(
        tiny_llama_dir,
        data,
        tmp_path / method,
        method,
        training__max_steps=1,
        training__warmup_ratio=0.0,
        model__quantization="4bit",
    )
    recipe = PreferenceRecipe(**config)
    recipe.setup()
    attached = {name: p.detach().clone() for name, p in recipe.state.model.named_parameters() if p.requires_grad}
    recipe.train()
    trained = {name: p for name, p in recipe.trainer.model.named_parameters() if p.requires_grad}
    assert trained.keys() == attached.keys() and all(p.dtype == torch.float32 for p in trained.values())
    assert all(not torch.equal(trained[name], attached[name]) for name in attached if "lora_B" in name)
    reference = [p for name, p in recipe.trainer.model.named_parameters() if ".ref." in name]
    assert reference and all(p.dtype == torch.float32 for p in reference)
    recipe.cleanup()


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_the_safety_mix_prefers_refusals_over_the_models_own_replies(
    method, tiny_llama_dir, pairs_jsonl, unpaired_jsonl, tmp_path
):
    """data.safety_mix in a preference recipe: HarmBench requests, a refusal chosen over what the model itself
    replies before training (DPO: as rejected; KTO: labelled false), tokenized and shuffled into the training split."""
    from finetune import safety
    from finetune.evaluation import reply_texts

    data = unpaired_jsonl if method == "kto" else pairs_jsonl
    config = _preference_recipe(tiny_llama_dir, data, tmp_path / method, method, training__max_steps=2)
    config["data"]["safety_mix"] = 0.25
    config["evaluation"].update(max_new_tokens=8)
    recipe = PreferenceRecipe(**config)
    recipe.setup()
    train = recipe.data.splits["train"]
    mixed = [row for row in train if row["origin"].startswith("safety mix pair: harmbench#")]
    own_rows = len(train) - len(mixed)
    requests = round(0.25 / 0.75 * own_rows)
    assert recipe.data.report.safety_mix == len(mixed) > 0
    assert [row["source"] for row in train][-len(mixed) :] != [-2] * len(mixed)  # shuffled in, not appended
    prompts = [row["prompt"][-1]["content"] for row in mixed]
    assert set(prompts) <= set(safety.harmbench())
    own = dict(
        zip(
            prompts, reply_texts(recipe.model, recipe.tokenizer, [r["prompt"] for r in mixed], recipe.config.evaluation)
        )
    )
    if method == "dpo":
        assert len(mixed) == requests  # the tiny model refuses nothing
        assert all(row["chosen"] in safety.REFUSALS and row["rejected"] == own[p] for row, p in zip(mixed, prompts))
        assert all(row["chosen_ids"] and row["rejected_ids"] for row in mixed)
    else:
        assert {row["label"] for row in mixed} == {True, False}
        for row, prompt in zip(mixed, prompts):
            assert row["completion"] in safety.REFUSALS if row["label"] else row["completion"] == own[prompt]
    recipe.train()
    recipe.cleanup()
