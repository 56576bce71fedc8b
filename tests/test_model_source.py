import subprocess
import sys

import pytest

from finetune.config import ModelConfig, RecipeConfig
from finetune.errors import FinetuneError
from finetune.model_source import resolve


def test_folder_and_hub_sources_resolve(tiny_llama_dir):
    assert resolve(ModelConfig(source=str(tiny_llama_dir))).kind == "folder"
    assert resolve(ModelConfig(source="HuggingFaceTB/SmolLM2-135M-Instruct")).kind == "hub"


@pytest.mark.parametrize(
    ("source", "problem"),
    [("./missing/model", "does not exist"), ("missing.gguf", "GGUF file `missing.gguf` not found")],
)
def test_bad_sources_say_what_is_wrong(source, problem):
    with pytest.raises(FinetuneError, match=problem):
        resolve(ModelConfig(source=source))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FinetuneError, match="has no config.json"):
        resolve(ModelConfig(source=str(tmp_path)))


def test_resolving_and_reading_a_run_import_no_torch():
    code = (
        "import sys\n"
        "from finetune import config, model_source, run_folder\n"
        "model_source.resolve(config.ModelConfig(source='smollm2-135m-instruct'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_planning_a_gguf_source_converts_nothing(tmp_path, monkeypatch):
    from finetune import planning

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    source = resolve(ModelConfig(source="smollm2-135m-instruct"))
    assert source.config_folder is None  # nothing converted in this fresh cache
    shape = planning.model_shape(RecipeConfig())
    assert (shape.hidden, shape.layers) == (576, 30)  # read from the GGUF metadata
    assert not (tmp_path / "cache").exists()
