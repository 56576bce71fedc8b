import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from finetune.config import ModelConfig
from finetune.data import tokenize_conversation
from finetune.evaluation import generate, nll, perplexity, write_report
from finetune.generation import DecodingSettings
from finetune.models import configure_generation, load_tokenizer

CHATS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}],
    [
        {"role": "user", "content": "Name a fruit"},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "A pear, perhaps, or a plum."},
    ],
    [
        {"role": "system", "content": "Terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
]


def test_batched_perplexity_equals_row_by_row_loss(tiny_llama_dir):
    tokenizer = load_tokenizer(ModelConfig(source=str(tiny_llama_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rows = [tokenize_conversation(tokenizer, chat)[-1] for chat in CHATS]
    result = perplexity(model, Dataset.from_list(rows), pad_token_id=tokenizer.pad_token_id, batch_size=2)
    # Independent computation: the model's own loss per row (mean over its trained tokens), re-weighted.
    total, count = 0.0, 0
    for row in rows:
        labels = torch.tensor([row["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * n
        count += n
    assert result["scored_tokens"] == count
    assert math.isclose(result["perplexity"], math.exp(total / count), rel_tol=1e-4)
    assert result["perplexity_all_tokens"] > 1
    # Per conversation, in the dataset's order (the batches run length-sorted): what intervals resample.
    per_row = nll(model, Dataset.from_list(rows), pad_token_id=tokenizer.pad_token_id, batch_size=2).rows
    for row, (row_nll, row_tokens, _, _) in zip(rows, per_row):
        labels = torch.tensor([row["labels"]])
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item()
        assert row_tokens == int((labels[:, 1:] != -100).sum()) and math.isclose(
            row_nll / row_tokens, alone, rel_tol=1e-4
        )


def test_generation_is_batched_left_padded_and_stops_at_end_of_turn(tiny_llama_dir):
    tokenizer = load_tokenizer(ModelConfig(source=str(tiny_llama_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    configure_generation(model, tokenizer, [tokenizer.convert_tokens_to_ids("<|im_end|>")])
    prompts = [chat[:-1] for chat in CHATS]
    short = DecodingSettings(6, temperature=0)
    batched = generate(model, tokenizer, prompts, decoding=short, batch_size=3)
    one_by_one = [generate(model, tokenizer, [p], decoding=short)[0] for p in prompts]
    assert batched == one_by_one and all(0 < len(r) <= 6 for r in batched)
    assert tokenizer.padding_side == "right"


def test_report_table_plot_and_card_carry_each_change_with_its_interval(tmp_path):
    import numpy as np

    from finetune.metrics.intervals import RowScores, compare

    generator = np.random.default_rng(0)
    quality = generator.uniform(0.2, 0.6, size=24)
    before = {
        "perplexity": RowScores("perplexity", np.stack([np.full(24, 30.0), np.full(24, 10.0)], axis=1)),
        "rougeL": RowScores("mean", quality),
    }
    after = {
        "perplexity": RowScores("perplexity", np.stack([np.full(24, 20.0), np.full(24, 10.0)], axis=1)),
        "rougeL": RowScores("mean", quality + generator.normal(0, 0.1, size=24)),
    }
    changes = compare(before, after)
    write_report(
        tmp_path,
        summary={"name": "t", "changes": [c.as_dict() for c in changes]},
        history={"train_loss": [(1, 3.0), (2, 2.5)], "eval_loss": [(2, 2.7)]},
    )
    report = (tmp_path / "report.md").read_text()
    assert "| perplexity | 20.09 | 7.389 | -63.2% (better; 95% CI -63.2% to -63.2%) |" in report
    assert "| rougeL |" in report and "no clear change (n=24; 95% CI" in report
    assert "paired bootstrap" in report
    for name in ("metrics.json", "report.md", "loss_curves.png", "metrics.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_score_adds_generation_metrics_consistent_with_its_samples(tiny_llama_dir):
    from finetune.config import EvaluationConfig
    from finetune.evaluation import score
    from finetune.metrics import score_generations

    tokenizer = load_tokenizer(ModelConfig(source=str(tiny_llama_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    configure_generation(model, tokenizer, [tokenizer.convert_tokens_to_ids("<|im_end|>")])
    rows = [{"messages": chat, "tools": "", **tokenize_conversation(tokenizer, chat)[-1]} for chat in CHATS]
    result = score(model, tokenizer, Dataset.from_list(rows), EvaluationConfig(max_new_tokens=5, generation_rows=2))
    assert set(result.metrics) >= {"perplexity", "bleu", "rouge1", "rouge2", "rougeL", "token_f1", "exact_match"}
    assert [s["reference"] for s in result.samples] == ["Hello there, friend.", "A pear, perhaps, or a plum."]
    recomputed = score_generations([s["prediction"] for s in result.samples], [s["reference"] for s in result.samples])
    assert all(result.metrics[k] == v for k, v in recomputed.items())


def test_rows_within_keeps_the_prefix_that_fits_and_never_less_than_the_timed_batch():
    from finetune.evaluation import rows_within

    lengths = [10, 10, 20, 40, 10]
    # The first two rows (20 tokens) took 2 s: 0.1 s per token.
    assert rows_within(4.0, 2.0, lengths, first_rows=2) == 3  # 10 + 10 + 20 tokens = 4 s
    assert rows_within(100.0, 2.0, lengths, first_rows=2) == 5
    assert rows_within(0.5, 2.0, lengths, first_rows=2) == 2  # the timed batch is always kept


def test_before_is_the_base_model_scored_on_the_same_rows(tiny_llama_dir, facts_jsonl, tmp_path):
    """The before-scores come from the trained model with its adapters switched off: they must equal a fresh base."""
    from finetune import ChatSFTRecipe
    from tests.conftest import tiny_recipe

    recipe = ChatSFTRecipe(**tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run"))
    result = recipe.run()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rows = recipe.data.splits["test"].select(range(recipe.evaluated_rows))
    fresh = perplexity(base, rows, pad_token_id=recipe.tokenizer.pad_token_id)
    assert result.metrics_before["scored_tokens"] == fresh["scored_tokens"]
    assert math.isclose(result.metrics_before["perplexity"], fresh["perplexity"], rel_tol=1e-5)
    assert result.metrics_after["perplexity"] != result.metrics_before["perplexity"]  # the adapters were really on


def test_a_time_budget_cuts_held_out_rows_to_what_fits_and_reports_its_share(tiny_llama_dir, tmp_path):
    import json

    from finetune import ChatSFTRecipe
    from tests.conftest import tiny_recipe

    sums = tmp_path / "sums.jsonl"  # 40 distinct conversations: more held out than the budget keeps
    sums.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {n} plus {n}?"},
                        {"role": "assistant", "content": f"{2 * n}."},
                    ]
                }
            )
            + "\n"
            for n in range(40)
        )
    )
    config = tiny_recipe(
        tiny_llama_dir, sums, tmp_path / "run", evaluation__time_share=1e-6, evaluation__generation_rows=12
    )
    config["evaluation"].update(batch_size=2, max_new_tokens=4)
    config["data"]["test_split"] = 0.5
    recipe = ChatSFTRecipe(**config)
    recipe.run()
    metrics = json.loads((recipe.run_dir / "metrics.json").read_text())
    # A budget far below one batch keeps exactly the timed first batch of each kind, for both models.
    assert metrics["evaluation_rows"] == 2 and metrics["evaluation_generations"] == 2
    assert len(metrics["samples"]["before"]) == len(metrics["samples"]["after"]) == 2
    assert len(recipe.data.splits["test"]) > 8
    assert metrics["evaluation_share_of_training"] > 0 and "evaluation_seconds" in metrics
    assert {c["metric"] for c in metrics["changes"]} >= {"perplexity", "bleu", "rougeL", "token_f1"}
    assert all(c["rows"] == 2 for c in metrics["changes"] if c["metric"] != "perplexity_all_tokens")


class _SimulatedClock:
    """Time that passes only inside the model: `per_token` seconds for each input token of each forward pass (counted
    where tokens enter, the embedding), so a budget test is exact and does not depend on how busy the machine is."""

    def __init__(self, model, per_token: float) -> None:
        self.now, self.per_token = 0.0, per_token
        model.get_input_embeddings().register_forward_pre_hook(self._advance)

    def _advance(self, module, args):
        self.now += self.per_token * args[0].numel()

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("share", [0.05, 0.3, 1.0])
def test_the_budget_holds_or_is_exceeded_only_by_its_smallest_sample(tiny_llama_dir, tmp_path, share):
    """On a simulated clock: evaluation stays within its share of training, or, when even one batch of each kind
    before and after does not fit, takes just that and says so; and when the budget cut the sample, the line about
    telling changes names evaluation.time_share."""
    from finetune import ChatSFTRecipe, evaluation
    from tests.conftest import tiny_recipe

    data = tmp_path / "sums.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"{n} + {n}?"},
                        {"role": "assistant", "content": f"{2 * n}."},
                    ]
                }
            )
            + "\n"
            for n in range(60)
        )
    )
    config = tiny_recipe(tiny_llama_dir, data, tmp_path / "run", evaluation__time_share=share)
    config["evaluation"].update(batch_size=4, max_rows=40, generation_rows=24, max_new_tokens=6)
    config["data"]["test_split"] = 0.7
    recipe = ChatSFTRecipe(**config)
    recipe.setup()
    clock = _SimulatedClock(recipe.model, per_token=0.001)
    comparison = evaluation.before_and_after(
        recipe.model,
        recipe.tokenizer,
        recipe.data.splits["test"],
        recipe.config.evaluation,
        train_seconds=10.0,
        clock=clock,
    )
    cost = comparison.cost
    assert cost.budget == pytest.approx(10.0 * share)
    assert cost.seconds <= max(cost.budget, cost.minimum_seconds) * 1.10 + 1e-9  # 10%: batches of unequal length
    lines = comparison.lines(10.0, share)
    if cost.minimum_seconds > cost.budget:
        assert any("over its" in line and "evaluation.time_share" in line for line in lines)
        assert len(comparison.rows) == 4 and comparison.generated == 4  # one batch of each kind
    if share == 1.0:
        assert len(comparison.rows) == 40 and comparison.generated == 24  # everything asked for fits
    if len(comparison.rows) < 40 and any(c.verdict == "no clear change" for c in comparison.changes):
        assert any("raise evaluation.time_share" in line for line in lines)
