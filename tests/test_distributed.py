"""Two CPU processes (gloo, through Accelerate's launcher) must train like one process with the same global batch,
and write every output once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune import ChatSFTRecipe
from tests.conftest import tiny_recipe

REPO = Path(__file__).resolve().parent.parent


def _recipe(model_dir: Path, data: Path, run_dir: Path, batch_size: int) -> dict:
    config = tiny_recipe(
        model_dir,
        data,
        run_dir,
        training__batch_size=batch_size,
        # 8 training rows, 4 per step: 2 epochs are 4 steps only if the step count (which sets the warmup and the
        # validation interval) counts every process's batch.
        training__max_steps=None,
        training__epochs=2,
        # A random order is a seeded permutation of the rows whatever the world size, and accelerate hands process
        # i every i-th batch of it: 2 processes x batch 2 see exactly the rows of 1 process x batch 4, step by step.
        # (Length grouping sorts within mega-batches of 50 per-device batches, whose size changes with the split.)
        training__group_by_length=False,
        # Dropout masks come from each process's own random stream, so they could never match across world sizes.
        lora__dropout=0.0,
        evaluation__max_new_tokens=8,
    )
    return config


ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _run(*command: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *command], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, facts_jsonl, tmp_path_factory):
    """The same recipe trained by 2 processes with batch 2 (`finetune run --num-processes 2`), by 2 processes
    launched with the FSDP config (on CPU Accelerate falls back to DDP, but finetune takes its sharded-weights
    paths), and by 1 process with batch 4."""
    root = tmp_path_factory.mktemp("distributed")
    two_path, fsdp_path = root / "two.yaml", root / "fsdp.yaml"
    two_path.write_text(yaml.safe_dump(_recipe(tiny_llama_dir, facts_jsonl, root / "two", batch_size=2)))
    fsdp_path.write_text(yaml.safe_dump(_recipe(tiny_llama_dir, facts_jsonl, root / "fsdp", batch_size=2)))
    two = _run("-m", "finetune", "run", str(two_path), "--num-processes", "2")
    fsdp_config = str(REPO / "recipes" / "accelerate" / "fsdp_qlora.yaml")
    _run("-m", "accelerate.commands.launch", "--config_file", fsdp_config, "-m", "finetune", "run", str(fsdp_path))
    one = ChatSFTRecipe(**_recipe(tiny_llama_dir, facts_jsonl, root / "one", batch_size=4)).run()
    return two, root / "two", root / "fsdp", one


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_two_processes_follow_the_loss_trajectory_of_one_with_the_same_global_batch(runs):
    _, two_dir, fsdp_dir, one = runs
    single = _metrics(one.run_dir)["history"]
    for run_dir in (two_dir, fsdp_dir):
        two = _metrics(run_dir)["history"]
        for series in ("train_loss", "eval_loss"):
            assert [step for step, _ in two[series]] == [step for step, _ in single[series]] == [1, 2, 3, 4]
            # The same rows at every step; what remains is float summation order (measured: ~1e-7 relative).
            assert [loss for _, loss in two[series]] == pytest.approx([loss for _, loss in single[series]], rel=1e-5), (
                series
            )
    # And the loss did move: a trajectory that stayed flat would match trivially.
    assert single["train_loss"][0][1] != pytest.approx(single["train_loss"][-1][1], rel=1e-4)


def test_held_out_metrics_are_gathered_from_both_processes(runs):
    _, two_dir, fsdp_dir, one = runs
    for run_dir in (two_dir, fsdp_dir):  # rows split between the processes, and (sharded weights) scored by each
        metrics = _metrics(run_dir)
        # Before training both runs score the same base model: the rows split between two processes must add up
        # to exactly what one process scores alone.
        assert metrics["metrics_before"]["scored_tokens"] == one.metrics_before["scored_tokens"]
        assert metrics["metrics_before"]["perplexity"] == pytest.approx(one.metrics_before["perplexity"], rel=1e-5)
        assert len(metrics["samples"]["after"]) == len(_metrics(one.run_dir)["samples"]["after"]) == 2


def test_outputs_and_logs_are_written_once(runs):
    two, two_dir, fsdp_dir, _ = runs
    for run_dir in (two_dir, fsdp_dir):
        for name in (
            "adapter/adapter_model.safetensors",
            "merged/model.safetensors",
            "metrics.json",
            "report.md",
            "recipe.yaml",
            "run.json",
        ):
            assert (run_dir / name).is_file(), name
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert [entry["event"] for entry in log if "event" in entry] == ["start", "finished"]
        assert [entry["step"] for entry in log if "loss" in entry] == [1, 2, 3, 4]
        # The merge check compares the merged model with base + the saved adapter: a wrongly gathered adapter fails.
        assert _metrics(run_dir)["merge_max_logit_diff"] < 1e-3
    assert two.stdout.count("Loading tokenizer and data") == 1 and two.stdout.count("Done: ") == 1


ON_MAIN = """
from finetune import distributed
from finetune.errors import FinetuneError

def claim():
    raise FinetuneError("run folder taken")

rank = distributed.init().process_index
print(f"rank {rank} gathered {distributed.gather([rank * 10, rank * 10 + 1])}", flush=True)
print(f"rank {rank} got {distributed.on_main(lambda: 'written by ' + str(rank))}", flush=True)
try:
    distributed.on_main(claim)
except FinetuneError as exc:
    print(f"rank {rank} raised: {exc}", flush=True)
"""


def test_main_process_results_and_errors_reach_every_process(tmp_path):
    script = tmp_path / "on_main.py"
    script.write_text(ON_MAIN)
    out = _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)).stdout
    for rank in (0, 1):
        assert f"rank {rank} gathered [0, 1, 10, 11]" in out and f"rank {rank} got written by 0" in out
    # The main process raises its own error; the other one is told why it stops instead of waiting for ever.
    assert "rank 0 raised: run folder taken" in out
    assert "rank 1 raised: stopped because the main process failed: run folder taken" in out


def test_a_failed_process_fails_the_launch_with_its_exit_codes(tmp_path, monkeypatch):
    from finetune import distributed
    from finetune.errors import FinetuneError

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Each process stops with "recipe file not found"; the launcher ends the other one if it is still running.
    with pytest.raises(
        FinetuneError, match=r"the 2-process run failed: .*rank [01] \(exit code 2\).*errors are printed above"
    ):
        distributed.launch(["validate", str(tmp_path / "missing.yaml")], 2)


ACCELERATE_CONFIGS = {
    "one_gpu.yaml": "NO",
    "multi_gpu_ddp.yaml": "MULTI_GPU",
    "fsdp_qlora.yaml": "FSDP",
    "deepspeed_zero3.yaml": "DEEPSPEED",
}


@pytest.mark.parametrize(("name", "distributed_type"), ACCELERATE_CONFIGS.items())
def test_accelerate_configs_are_accepted_by_accelerate(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = REPO / "recipes" / "accelerate" / name
    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert config.distributed_type.value == distributed_type
    # Nested keys that are not `accelerate launch` options would be dropped without a word.
    options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.fsdp_config) | set(config.deepspeed_config) <= options
    # What `accelerate launch --config_file` does with the file (the private step that merges it into the
    # arguments), then the plugin each process builds from the environment it is given.
    args, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    )
    if distributed_type == "FSDP":
        env = prepare_multi_gpu_env(args)
        with patch_environment(**{k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}):
            plugin = FullyShardedDataParallelPlugin()
        assert (
            plugin.fsdp_version == 2 and plugin.reshard_after_forward is True and env["ACCELERATE_USE_FSDP"] == "true"
        )
    if distributed_type == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
            plugin = DeepSpeedPlugin()
        zero = plugin.deepspeed_config["zero_optimization"]
        assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
        # Left to the Trainer, which fills them from the recipe.
        assert (
            plugin.deepspeed_config["gradient_accumulation_steps"]
            == plugin.deepspeed_config["train_micro_batch_size_per_gpu"]
            == "auto"
        )


def test_4bit_weights_are_stored_in_the_compute_dtype_under_fsdp(tiny_llama_dir, monkeypatch):
    import torch

    from finetune.config import ModelConfig
    from finetune.models import compute_dtype, load_model

    config = ModelConfig(source=str(tiny_llama_dir), quantization="4bit")
    plain = load_model(config)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    sharded = load_model(config)
    assert plain.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8
    assert sharded.model.layers[0].mlp.up_proj.weight.dtype == compute_dtype(config)  # bf16 or float32 on CPU
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, sharded(ids).logits)  # same 4-bit values, packed differently
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert (
        load_model(config.model_copy(update={"quant_storage": "bfloat16"})).model.layers[0].mlp.up_proj.weight.dtype
        == torch.bfloat16
    )
