import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune import ChatSFTRecipe, FinetuneError
from finetune.cli import app
from tests.conftest import tiny_recipe


@pytest.fixture(scope="module")
def qlora_run(tiny_llama_dir, facts_jsonl, tmp_path_factory):
    config = tiny_recipe(
        tiny_llama_dir,
        facts_jsonl,
        tmp_path_factory.mktemp("merge") / "q",
        model__quantization="4bit",
        training__max_steps=4,
    )
    config["evaluation"].update(before_and_after=False, generation=False)
    recipe = ChatSFTRecipe(**config)
    return recipe, recipe.run()


def test_qlora_merge_keeps_the_candidate_with_the_better_held_out_perplexity(qlora_run):
    recipe, result = qlora_run
    report = recipe.merge_report
    fidelity = report.fidelity
    reference = fidelity["adapter_on_training_base"]
    assert reference == recipe.metrics_after["perplexity"]  # the run's own after-score, not scored again
    if report.strategy == "full_precision":
        assert fidelity["full_precision"] <= reference and "nf4_roundtrip" not in fidelity  # never built
    else:
        assert fidelity["full_precision"] > reference == fidelity["nf4_roundtrip"]
    assert result.merge_max_logit_diff < 1e-3
    card = (result.adapter_dir / "README.md").read_text()
    assert (
        "Merge candidates" in card and f"{fidelity['full_precision']:.4f}" in card and f"Kept {report.reason}" in card
    )


@pytest.mark.parametrize("select", ["perplexity", "fidelity"])
def test_the_nf4_round_trip_reproduces_the_adapter_on_its_4bit_base(qlora_run, tmp_path, select):
    """Forced to nf4_roundtrip (fidelity), the merged model scores what the adapter on its 4-bit base scored: that is
    why its perplexity is taken from the run instead of measured again."""
    from finetune.evaluation import perplexity

    recipe, result = qlora_run
    again = ChatSFTRecipe.from_run_dir(result.run_dir)
    again.config.output.merge_select = select
    report = again.merge(out_dir=tmp_path / select)
    assert report.strategy == ("nf4_roundtrip" if select == "fidelity" else recipe.merge_report.strategy)
    if report.strategy == "nf4_roundtrip":
        heldout = again.data.splits["test"].select(range(again.evaluated_rows))
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / select)
        measured = perplexity(merged, heldout, pad_token_id=again.tokenizer.pad_token_id)["perplexity"]
        assert measured == pytest.approx(report.fidelity["adapter_on_training_base"], rel=1e-3)


def test_forced_strategy_and_dtype_through_the_cli(qlora_run, tmp_path):
    from typer.testing import CliRunner

    _, result = qlora_run
    out = tmp_path / "fp16"
    run = CliRunner().invoke(
        app, ["merge", str(result.run_dir), "--strategy", "full_precision", "--dtype", "float16", "--out", str(out)]
    )
    assert run.exit_code == 0, run.output
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float16
    assert "merged (full_precision, float16)" in run.output


def test_merging_a_finished_run_again_from_python_refreshes_what_describes_it(tmp_path, tiny_llama_dir, facts_jsonl):
    import hashlib
    import json

    config = tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "again", training__max_steps=1)
    config["evaluation"].update(before_and_after=False, generation=False)
    run_dir = ChatSFTRecipe(**config).run().run_dir
    report = ChatSFTRecipe.from_run_dir(run_dir).merge(dtype="float16")
    manifest = json.loads((run_dir / "run.json").read_text())
    weights = (run_dir / "merged" / "model.safetensors").read_bytes()
    assert manifest["files"]["merged/model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert json.loads((run_dir / "merged" / "run.json").read_text()) == manifest
    assert json.loads((run_dir / "metrics.json").read_text())["merge_max_logit_diff"] == report.max_logit_diff
    assert f"largest logit difference {report.max_logit_diff:.2e}" in (run_dir / "adapter" / "README.md").read_text()


def test_merge_refuses_impossible_requests(qlora_run, tmp_path, tiny_llama_dir, facts_jsonl):
    recipe, result = qlora_run
    with pytest.raises(FinetuneError, match="`strategy='fancy'`: unknown merge strategy"):
        ChatSFTRecipe.from_run_dir(result.run_dir).merge(strategy="fancy")
    with pytest.raises(FinetuneError, match="not a finished run folder"):
        ChatSFTRecipe.from_run_dir(tmp_path)
    full = ChatSFTRecipe(**tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "fp", training__max_steps=1))
    with pytest.raises(FinetuneError, match="only applies to adapters trained on a 4-bit base"):
        full.config.output.merge_strategy = "nf4_roundtrip"
        full.run()
