"""The training display: one line with step, loss, tokens/s and time left; no log dicts, no nested bars."""

import io

from rich.console import Console

from finetune import ChatSFTRecipe, training
from tests.conftest import tiny_recipe


def test_training_shows_one_progress_line_and_each_validation(
    tiny_llama_dir, facts_jsonl, tmp_path, monkeypatch, capsys
):
    screen = io.StringIO()
    monkeypatch.setattr(
        training.trainer, "TrainingProgress", lambda: training.TrainingProgress(Console(file=screen, width=200))
    )
    config = tiny_recipe(tiny_llama_dir, facts_jsonl, tmp_path / "run", training__max_steps=4, training__eval_steps=2)
    recipe = ChatSFTRecipe(**config)
    recipe.setup()
    capsys.readouterr()  # data preparation's own bars are not the trainer's
    recipe.train()
    shown = screen.getvalue()
    assert "Training" in shown and "4/4" in shown and "loss " in shown and "tokens/s" in shown and "left" in shown
    assert shown.count("validation loss") == 2  # steps 2 and 4
    printed = capsys.readouterr()
    assert "{'loss'" not in printed.out + printed.err and "'eval_loss'" not in printed.out + printed.err
    assert "%|" not in printed.err  # no tqdm bar from the trainer
