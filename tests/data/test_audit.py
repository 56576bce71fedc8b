"""The pre-flight audit and `finetune data inspect`, on the quickstart recipe and on planted defects."""

import json
import shutil

import pytest
from tokenizers import processors
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import DataConfig, DataSource
from finetune.data import inspect_data, prepare_data
from finetune.errors import FinetuneError
from finetune.models import CHATML_TEMPLATE
from tests.conftest import FACTS, build_chatml_tokenizer

DOUBLE_BOS = "{{ bos_token }}{{ bos_token }}" + CHATML_TEMPLATE


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]}
        for i in range(4)
        for q, a in FACTS
    ]
    rows.append({"messages": [{"role": "user", "content": "a question nobody answered"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _cfg(path, **kwargs):
    return DataConfig(
        sources=[DataSource(path=str(path))], validation_split=0.1, test_split=0.1, max_length=128, **kwargs
    )


def _findings(prepared):
    return {f.check: f for f in prepared.report.findings}


def test_clean_data_passes_and_reports_each_check(facts_file, chatml_tokenizer):
    findings = _findings(prepare_data(_cfg(facts_file), chatml_tokenizer))
    assert {k: f.level for k, f in findings.items()} == {
        "loss share": "ok",
        "end of turn trained": "ok",
        "double BOS": "ok",
        "pad token": "ok",
        "truncation": "ok",
        "rows without an assistant turn": "warning",
        "chat template": "info",
    }
    assert "1 rows have no assistant reply" in findings["rows without an assistant turn"].message
    assert "trained <|im_end|>" in findings["end of turn trained"].message


def test_template_that_doubles_bos_stops_the_run(facts_file):
    tokenizer = build_chatml_tokenizer()
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.chat_template = DOUBLE_BOS
    with pytest.raises(
        FinetuneError, match=r"(?s)double BOS: \d+ rows start with two <\|endoftext\|> tokens.*data.audit: warn"
    ):
        prepare_data(_cfg(facts_file), tokenizer)
    allowed = prepare_data(_cfg(facts_file, audit="warn"), tokenizer)
    assert _findings(allowed)["double BOS"].level == "serious"


def test_bos_added_again_by_the_tokenizer_is_a_warning(facts_file):
    tokenizer = build_chatml_tokenizer()
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    prepared = prepare_data(_cfg(facts_file), tokenizer)
    assert all(row["input_ids"][:2] != [bos, bos] for row in prepared.splits["train"])  # our own tokenization is right
    finding = _findings(prepared)["double BOS"]
    assert finding.level == "warning" and "re-tokenizes rendered prompts" in finding.message


def test_pad_equal_to_eos_is_flagged(facts_file):
    tokenizer = build_chatml_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    finding = _findings(prepare_data(_cfg(facts_file), tokenizer))["pad token"]
    assert finding.level == "warning" and "is also the end-of-turn/EOS token" in finding.message


def test_template_that_never_closes_a_turn_with_a_special_token_stops_the_run(facts_file):
    tokenizer = build_chatml_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(
        FinetuneError, match="end of turn trained: the chat template closes an assistant turn with no special token"
    ):
        prepare_data(_cfg(facts_file), tokenizer)


def test_truncation_rate_is_flagged(tmp_path, chatml_tokenizer):
    path = tmp_path / "two_turns.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{q1} ({i})"},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": q2},
                {"role": "assistant", "content": a2},
            ]
        }
        for i in range(4)
        for (q1, a1), (q2, a2) in zip(FACTS, FACTS[1:])
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    prepared = prepare_data(_cfg(path).model_copy(update={"max_length": 40, "too_long": "truncate"}), chatml_tokenizer)
    assert prepared.report.truncated == len(rows)  # every conversation kept its first exchange only
    finding = _findings(prepared)["truncation"]
    assert finding.level == "warning" and "were longer than data.max_length" in finding.message


def test_inspect_writes_markdown_json_and_histogram(facts_file, chatml_tokenizer, tmp_path):
    inspection = inspect_data(_cfg(facts_file), chatml_tokenizer, tmp_path / "out", show_rows=2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["inspect.json", "inspect.md", "lengths.png"]
    summary = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert summary["formats"] == {"messages": 25} and summary["invalid"] == {
        "no assistant reply to train on (the last turn must be the assistant's)": 1
    }
    markdown = (tmp_path / "out" / "inspect.md").read_text()
    assert "⟪" in markdown and "<|im_end|>⟫" in markdown  # the trained reply ends with its end-of-turn token
    trained = "".join(piece for piece, carries_loss in inspection.rendered[0] if carries_loss)
    assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained


def test_cli_inspects_the_quickstart_recipe(tmp_path, smollm2_tokenizer):
    result = CliRunner().invoke(
        app, ["data", "inspect", "recipes/quickstart.yaml", "--rows", "1", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    for expected in (
        "rows read",
        "Token lengths",
        "Pre-flight audit",
        "end of turn trained",
        "Chat template inference will use",
    ):
        assert expected in result.output
    assert (tmp_path / "lengths.png").stat().st_size > 1000


def test_cli_flags_planted_defects_in_a_data_file(facts_file, tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "pad-is-eos"
    shutil.copytree(tiny_llama_dir, model_dir)
    tokenizer = build_chatml_tokenizer(eos_token="<|endoftext|>")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(model_dir)
    runner = CliRunner()
    result = runner.invoke(
        app, ["data", "inspect", str(facts_file), "--model", str(model_dir), "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 0, result.output
    assert "pad token" in result.output and "rows without an assistant turn" in result.output
    doubled = runner.invoke(
        app,
        [
            "data",
            "inspect",
            str(facts_file),
            "--model",
            str(tiny_llama_dir),
            "--out",
            str(tmp_path / "b"),
            "--set",
            f"model.chat_template={DOUBLE_BOS}",
        ],
    )
    assert doubled.exit_code == 1 and "serious" in doubled.output and "double BOS" in doubled.output
