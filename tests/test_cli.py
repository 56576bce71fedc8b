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
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_help_lists_the_commands():
    result = finetune("--help")
    assert result.returncode == 0 and "run" in result.stdout and "validate" in result.stdout


def test_bad_input_gets_one_clear_error_and_no_traceback(tmp_path):
    missing = finetune("run", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "recipe file not found" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rat: 0.1\n")
    typo = finetune("validate", str(bad))
    assert (
        typo.returncode == 2
        and f"{bad}:2: unknown key `training.learning_rat`. Did you mean `learning_rate`?" in typo.stderr
    )
    assert "Traceback" not in typo.stderr


def test_debug_prints_the_traceback_with_the_cause(tmp_path):
    """The error a user sees stays one line; --debug (or FINETUNE_DEBUG=1) adds the traceback and its cause."""
    bad = tmp_path / "broken.yaml"
    bad.write_text("training: [unclosed\n")
    plain = finetune("validate", str(bad))
    debug = finetune("--debug", "validate", str(bad))
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "not valid YAML" in plain.stderr
    assert "Traceback" in debug.stderr and "The above exception was the direct cause" in debug.stderr
    assert "yaml" in debug.stderr.lower() and debug.stderr.rstrip().endswith(plain.stderr.rstrip().splitlines()[-1])


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
    scored = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_llama_dir),
            "--adapter",
            str(tmp_path / "cli-run" / "adapter"),
            "--data",
            str(facts_jsonl),
            "--generation-rows",
            "3",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "scores.json"),
        ],
    )
    assert scored.exit_code == 0, scored.output
    assert {"perplexity", "bleu", "rougeL"} <= set(json.loads((tmp_path / "scores.json").read_text())["metrics"])


def test_eval_names_a_missing_adapter(tiny_llama_dir, facts_jsonl, tmp_path):
    result = finetune("eval", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path), "--data", str(facts_jsonl))
    assert result.returncode == 2 and "no adapter_config.json there" in result.stderr


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_finishes_the_run(tiny_llama_dir, facts_jsonl, tmp_path):
    import signal
    import time

    run_dir = tmp_path / "interrupted"
    path = tmp_path / "tiny.yaml"
    config = tiny_recipe(
        tiny_llama_dir, facts_jsonl, run_dir, training__max_steps=12, training__save_steps=6, data__validation_split=0.0
    )
    config["output"]["merge"] = False
    config["evaluation"].update(before_and_after=False, generation=False)
    RecipeConfig.from_dict(config).to_yaml(path)
    child = subprocess.Popen(
        [sys.executable, "-m", "finetune", "run", str(path)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = run_dir / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while (
        child.poll() is None
        and time.monotonic() < deadline
        and '"loss"' not in (log.read_text() if log.is_file() else "")
    ):
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)  # what Ctrl-C sends, at the first logged training step
    stderr = child.communicate(timeout=300)[1]
    assert child.returncode == 130, stderr[-3000:]
    assert "interrupted: SIGINT received: training stopped after step" in stderr and "Traceback" not in stderr
    assert "kernels-community" not in stderr and "is deprecated" not in stderr  # no noise a user cannot act on
    assert f"{run_dir / 'recipe.yaml'}, and --resume." in stderr  # the CLI names its flag, Python its argument

    resumed = finetune("run", str(run_dir / "recipe.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "checkpoints").exists()
    history = json.loads((run_dir / "metrics.json").read_text())["history"]["train_loss"]
    assert [step for step, _ in history] == list(range(1, 13))  # every step once: none repeated, none skipped
    events = [json.loads(line).get("event") for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [e for e in events if e] == ["start", "interrupted", "resume", "finished"]


def test_resume_needs_a_run_and_excludes_overwrite(tiny_llama_dir, facts_jsonl, tmp_path):
    path = tmp_path / "tiny.yaml"
    RecipeConfig.from_dict(tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "never-run")).to_yaml(path)
    both = CliRunner().invoke(app, ["run", str(path), "--resume", "--overwrite"])
    assert "pass one of them" in str(both.exception)
    missing = CliRunner().invoke(app, ["run", str(path), "--resume"])
    assert "holds no run to resume" in str(missing.exception) and not (tmp_path / "never-run").exists()


def test_validate_with_preflight_reports_each_check(tiny_llama_dir, facts_jsonl, tmp_path):
    path = tmp_path / "tiny.yaml"
    RecipeConfig.from_dict(tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run")).to_yaml(path)
    result = CliRunner().invoke(app, ["validate", str(path), "--preflight"])
    assert result.exit_code == 0, result.output
    assert all(word in result.output for word in ("disk:", "quantization:", "context:", "file(s) found", "valid"))
    too_long = CliRunner().invoke(app, ["validate", str(path), "--preflight", "--set", "data.max_length=4096"])
    assert "data.max_length (4096) is longer than the context" in str(too_long.exception)
