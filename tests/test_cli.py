import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from finetune.cli import app
from finetune.config import RecipeConfig
from tests.conftest import tiny_recipe

REPO = Path(__file__).resolve().parent.parent


def finetune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    result = finetune("--help")
    assert result.returncode == 0 and "run" in result.stdout and "validate" in result.stdout


def test_bad_input_gets_one_clear_error_and_no_traceback(tmp_path):
    missing = finetune("run", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "recipe file not found" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rat: 0.1\n")
    typo = finetune("validate", str(bad))
    assert typo.returncode == 2 and f"{bad}:2: unknown key `training.learning_rat`. Did you mean `learning_rate`?" in typo.stderr
    assert "Traceback" not in typo.stderr


def test_validate_the_quickstart_recipe():
    result = finetune("validate", "recipes/quickstart.yaml", "--set", "training.max_steps=2")
    assert result.returncode == 0 and "valid" in result.stdout


def test_run_through_the_cli_with_overrides(tiny_llama_dir, facts_jsonl, tmp_path):
    path = tmp_path / "tiny.yaml"
    RecipeConfig.from_dict(tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "cli-run")).to_yaml(path)
    result = CliRunner().invoke(app, ["run", str(path), "--set", "training.max_steps=2", "--set", "output.merge=false"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and (tmp_path / "cli-run" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "cli-run" / "merged").exists()
    again = CliRunner().invoke(app, ["run", str(path), "--set", "training.max_steps=1", "--overwrite"])
    assert again.exit_code == 0, again.output
    scored = CliRunner().invoke(app, ["eval", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "cli-run" / "adapter"),
                                      "--data", str(facts_jsonl), "--generation-rows", "3", "--max-new-tokens", "4",
                                      "--out", str(tmp_path / "scores.json")])
    assert scored.exit_code == 0, scored.output
    assert {"perplexity", "bleu", "rougeL"} <= set(json.loads((tmp_path / "scores.json").read_text())["metrics"])


def test_eval_names_a_missing_adapter(tiny_llama_dir, facts_jsonl, tmp_path):
    result = finetune("eval", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path), "--data", str(facts_jsonl))
    assert result.returncode == 2 and "no adapter_config.json there" in result.stderr
