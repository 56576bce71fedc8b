"""Checkpoints, resume, signals, the NaN guard and determinism, on tiny in-process models (CPU)."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from finetune import ChatSFTRecipe, training
from finetune.errors import Interrupted
from finetune.training.trainer import _EpochSeededLengthSampler
from tests.conftest import tiny_recipe

REPO = Path(__file__).resolve().parent.parent

# Run in a child process: the recipe in argv[1], `resume` in argv[2]; every training batch is recorded (see
# record_batches) so the test can prove that no batch is repeated or skipped across the kill.
CHILD = """
import json, sys
from tests.test_training import record_batches
record_batches()
from finetune import ChatSFTRecipe
ChatSFTRecipe(**json.loads(sys.argv[1])).run(resume=sys.argv[2] == "resume")
"""


def record_batches() -> None:
    """Append each batch the trainer trains on (its rows' hashes) to $BATCH_LOG, pausing $STEP_DELAY s per batch.

    Recorded where a batch is consumed (`training_step`), not where it is collated: the data loader collates one
    batch ahead."""
    build = training.build_trainer

    def build_and_record(*args, **kwargs):
        trainer = build(*args, **kwargs)
        step = trainer.training_step

        def recording(model, inputs, *rest, **options):
            with open(os.environ["BATCH_LOG"], "a") as log:
                log.write(
                    json.dumps(
                        [hashlib.sha1(str(row.tolist()).encode()).hexdigest()[:10] for row in inputs["input_ids"]]
                    )
                    + "\n"
                )
            time.sleep(float(os.environ.get("STEP_DELAY", "0")))
            return step(model, inputs, *rest, **options)

        trainer.training_step = recording
        return trainer

    training.build_trainer = build_and_record


def batches(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def config(model_dir, data_path, run_dir, **overrides) -> dict:
    """Tiny recipe without validation, scoring or merge: only what training needs."""
    recipe = tiny_recipe(model_dir, data_path, run_dir, data__validation_split=0.0, **overrides)
    recipe["evaluation"].update(before_and_after=False, generation=False)
    recipe["output"]["merge"] = False
    return recipe


def train(recipe_dict: dict) -> ChatSFTRecipe:
    recipe = ChatSFTRecipe(**recipe_dict)
    recipe.setup()
    recipe.train()
    return recipe


def six_steps(tiny_llama_dir, facts_jsonl, run_dir, seed: int = 3, steps: int = 6) -> dict:
    return config(
        tiny_llama_dir,
        facts_jsonl,
        run_dir,
        training__max_steps=steps,
        training__save_steps=2,
        training__save_total_limit=2,
        training__seed=seed,
    )


@pytest.fixture(scope="module")
def six_step_run(tiny_llama_dir, facts_jsonl, tmp_path_factory):
    return train(six_steps(tiny_llama_dir, facts_jsonl, tmp_path_factory.mktemp("six") / "run"))


def test_same_seed_same_config_gives_an_identical_loss_curve(six_step_run, tiny_llama_dir, facts_jsonl, tmp_path):
    again = train(six_steps(tiny_llama_dir, facts_jsonl, tmp_path / "again"))
    other_seed = train(six_steps(tiny_llama_dir, facts_jsonl, tmp_path / "other", seed=4, steps=2))
    curves = [
        [loss for _, loss in run.state.training.history["train_loss"]] for run in (six_step_run, again, other_seed)
    ]
    assert len(curves[0]) == 6 and curves[0] == curves[1]  # exact: no tolerance
    assert curves[2] != curves[0][:2]  # the seed does reach LoRA initialisation, dropout and data order


def test_checkpoints_every_n_steps_keep_the_last_k_and_incomplete_ones_are_never_resumed_from(six_step_run, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(six_step_run.run_dir / "checkpoints", folder)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["checkpoint-4", "checkpoint-6"]
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "adapter_model.safetensors"} <= {
        p.name for p in (folder / "checkpoint-6").iterdir()
    }
    found = training.find_checkpoints(folder)
    assert found.latest == folder / "checkpoint-6" and found.step == 6 and not found.incomplete

    # What a crash mid-save leaves: a newer folder whose trainer_state.json (written last) is missing or cut short.
    for step, damage in ((8, "missing"), (10, "truncated")):
        broken = folder / f"checkpoint-{step}"
        shutil.copytree(folder / "checkpoint-6", broken)
        state = broken / "trainer_state.json"
        state.unlink() if damage == "missing" else state.write_text(state.read_text()[:40])
    found = training.find_checkpoints(folder)
    assert found.latest == folder / "checkpoint-6" and [p.name for p in found.incomplete] == [
        "checkpoint-8",
        "checkpoint-10",
    ]


class _Poison(TrainerCallback):
    """From optimizer step `at` on, make the model's output NaN (as an overflow or a bad row would)."""

    def __init__(self, model, at: int) -> None:
        self.at, self.armed = at, False
        model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output * float("nan") if self.armed else output
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step + 1 >= self.at


def test_nan_loss_stops_the_run_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tiny_llama_dir, facts_jsonl, tmp_path, monkeypatch
):
    recipe = ChatSFTRecipe(
        **config(tiny_llama_dir, facts_jsonl, tmp_path / "nan", training__max_steps=6, training__save_steps=1)
    )
    recipe.setup()
    build = training.build_trainer
    monkeypatch.setattr(
        training,
        "build_trainer",
        lambda *a, **k: build(*a, **{**k, "callbacks": [*k["callbacks"], _Poison(recipe.model, at=3)]}),
    )
    with pytest.raises(training.NonFiniteLoss) as err:
        recipe.train()
    message = str(err.value)
    assert "stopped at step 3" in message and "training.learning_rate" in message and "bfloat16" in message
    assert f"{recipe.run_dir / 'checkpoints' / 'checkpoint-2'}" in message
    found = training.find_checkpoints(recipe.run_dir / "checkpoints")
    assert found.latest.name == "checkpoint-2" and not found.incomplete  # nothing saved from the NaN step
    weights = load_file(found.latest / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(
        torch.isfinite(p).all() for p in recipe.model.parameters() if p.requires_grad
    )  # the bad update never landed
    assert json.loads((recipe.run_dir / "train_log.jsonl").read_text().splitlines()[-1])["event"] == "stopped"


class _Signal(TrainerCallback):
    def __init__(self, signum: int, at: int) -> None:
        self.signum, self.at = signum, at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at:
            os.kill(os.getpid(), self.signum)  # delivered to this (main) thread mid-step, as from `kill` or Ctrl-C


def test_sigterm_saves_a_checkpoint_says_how_to_resume_and_the_resume_matches_an_uninterrupted_run(
    tiny_llama_dir, facts_jsonl, tmp_path, monkeypatch
):
    # group_by_length: the sampler whose order a resumed run could not reproduce in later epochs before (9 rows in
    # batches of 4 make 3 steps per epoch, so the stop at step 4 falls in the second epoch).
    def recipe(name: str) -> dict:
        return config(
            tiny_llama_dir,
            facts_jsonl,
            tmp_path / name,
            training__max_steps=7,
            training__save_steps=3,
            training__group_by_length=True,
        )

    monkeypatch.setattr(training, "build_trainer", training.build_trainer)  # put back after the test
    monkeypatch.setenv("BATCH_LOG", str(tmp_path / "reference.jsonl"))
    record_batches()
    reference = train(recipe("reference"))

    assert threading.current_thread() is threading.main_thread()
    monkeypatch.setenv("BATCH_LOG", str(tmp_path / "interrupted.jsonl"))
    interrupted = ChatSFTRecipe(**recipe("interrupted"))
    interrupted.setup()
    build = training.build_trainer
    monkeypatch.setattr(
        training,
        "build_trainer",
        lambda *a, **k: build(*a, **{**k, "callbacks": [*k["callbacks"], _Signal(signal.SIGTERM, at=4)]}),
    )
    handler_before = signal.getsignal(
        signal.SIGTERM
    )  # not always SIG_DFL: torch's elastic launcher installs one in-process
    with pytest.raises(Interrupted) as err:
        interrupted.train()
    assert err.value.exit_code == 143 and "after step 4 of 7" in str(err.value)
    assert f"{interrupted.run_dir / 'recipe.yaml'}, and `resume=True`." in str(err.value)
    assert (
        training.find_checkpoints(interrupted.run_dir / "checkpoints").latest.name == "checkpoint-4"
    )  # off the save_steps cadence
    assert signal.getsignal(signal.SIGTERM) is handler_before  # handlers put back

    monkeypatch.setattr(training, "build_trainer", build)
    monkeypatch.setenv("BATCH_LOG", str(tmp_path / "resumed.jsonl"))
    resumed = ChatSFTRecipe(**recipe("interrupted"))
    resumed.setup(resume=True)
    resumed.train()
    assert batches(tmp_path / "interrupted.jsonl") + batches(tmp_path / "resumed.jsonl") == batches(
        tmp_path / "reference.jsonl"
    )
    ours = [p for p in resumed.model.parameters() if p.requires_grad]
    theirs = [p for p in reference.model.parameters() if p.requires_grad]
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert [e["event"] for e in training.RunLog(resumed.run_dir / "train_log.jsonl").events()] == [
        "start",
        "interrupted",
        "resume",
    ]


def test_length_grouped_order_depends_on_seed_and_epoch_only():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = _EpochSeededLengthSampler(4, lengths=list(range(40)), seed=seed)
        torch.rand(100)  # whatever the global RNG went through before (dropout masks, other epochs)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 2) == order(1, 2) and sorted(order(1, 2)) == list(range(40))
    assert order(1, 2) != order(1, 3) and order(1, 2) != order(2, 2)


# bfloat16: the guarantee holds for CPU bf16 training too (autocast, float32 adapters and optimizer state), on the
# same machine in the same dtype (docs/troubleshooting.md).
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_a_run_killed_at_a_random_step_resumes_to_the_same_weights_without_repeating_or_skipping_a_batch(
    compute_dtype, tiny_llama_dir, facts_jsonl, tmp_path, monkeypatch
):
    # 9 training rows in batches of 4: 3 steps per epoch, so 8 steps cross two epoch boundaries.
    steps = 8
    dtype = {"model__compute_dtype": compute_dtype}
    reference_log, killed_log, resumed_log = (
        tmp_path / "reference.jsonl",
        tmp_path / "killed.jsonl",
        tmp_path / "resumed.jsonl",
    )
    monkeypatch.setenv("BATCH_LOG", str(reference_log))
    monkeypatch.setattr(training, "build_trainer", training.build_trainer)  # put back after the test
    record_batches()  # the uninterrupted reference runs in this process
    reference = train(
        config(
            tiny_llama_dir,
            facts_jsonl,
            tmp_path / "reference",
            training__max_steps=steps,
            training__save_steps=1,
            **dtype,
        )
    )
    reference.save()
    assert reference.model.get_base_model().dtype == getattr(torch, compute_dtype)

    recipe = config(
        tiny_llama_dir,
        facts_jsonl,
        tmp_path / "interrupted",
        training__max_steps=steps,
        training__save_steps=1,
        **dtype,
    )
    kill_at = random.Random().randint(2, steps - 2)  # a different step each time the suite runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BATCH_LOG": str(killed_log), "STEP_DELAY": "0.2"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(recipe), "start"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    target = tmp_path / "interrupted" / "checkpoints" / f"checkpoint-{kill_at}"
    deadline = time.monotonic() + 240
    while not target.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.kill()  # SIGKILL: no handler runs, the checkpoint being written (if any) is left as it is
    child.wait()
    assert target.exists(), child.stderr.read()[-3000:]

    resumed = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(recipe), "resume"],
        cwd=REPO,
        env={**env, "BATCH_LOG": str(resumed_log), "STEP_DELAY": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = training.RunLog(tmp_path / "interrupted" / "train_log.jsonl").events()
    assert [e["event"] for e in events] == ["start", "resume", "finished"]  # one log, appended to by the resumed run
    resumed_from = int(events[1]["checkpoint"].rsplit("-", 1)[1])
    assert kill_at - 1 <= resumed_from <= kill_at  # the newest complete checkpoint: kill_at itself unless cut short

    # Data order: the batches before the checkpoint plus the resumed ones are exactly the uninterrupted sequence.
    expected = batches(reference_log)
    assert len(expected) == steps
    assert batches(killed_log)[:resumed_from] + batches(resumed_log) == expected
    # Weights: bit-identical to the uninterrupted run.
    ours = load_file(tmp_path / "interrupted" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference.folder.adapter / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    history = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())["history"]["train_loss"]
    # the same loss at every step
    assert [tuple(point) for point in history] == reference.state.training.history["train_loss"]
