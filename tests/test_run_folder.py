import pytest

from finetune.config import RecipeConfig
from finetune.errors import FinetuneError
from finetune.run_folder import RunFolder, is_adapter


def test_a_run_folder_names_every_part_of_the_layout(tmp_path):
    run = RunFolder.of(RecipeConfig.from_dict({"name": "demo", "output": {"dir": str(tmp_path / "{name}")}}))
    assert run.path == tmp_path / "demo"
    assert (run.recipe.name, run.metrics.name, run.manifest.name, run.train_log.name) == (
        "recipe.yaml",
        "metrics.json",
        "run.json",
        "train_log.jsonl",
    )
    assert run.weight_folders == (run.path / "adapter", run.path / "merged")
    assert not (run.has_recipe() or run.has_adapter() or run.has_merged() or run.is_finished())


def test_reading_an_unfinished_run_says_what_is_missing(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(FinetuneError, match="no recipe.yaml, so this is not a run folder"):
        run.read_config()
    with pytest.raises(FinetuneError, match="no metrics.json; the run did not finish"):
        run.read_metrics()
    with pytest.raises(FinetuneError, match="not a finished run folder"):
        run.require_adapter()
    RecipeConfig().to_yaml(run.recipe)
    (run.adapter).mkdir()
    (run.adapter / "adapter_config.json").write_text("{}")
    run.require_adapter()
    assert is_adapter(run.adapter) and run.read_config({"name": "again"}).name == "again"
