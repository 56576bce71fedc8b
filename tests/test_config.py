import pytest

from finetune.config import RecipeConfig, apply_overrides
from finetune.errors import FinetuneError


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_validate_and_round_trip(tmp_path):
    config = RecipeConfig()
    assert config.model.quantization == "4bit" and config.lora.lora_alpha == 32
    config.to_yaml(tmp_path / "out.yaml")
    assert RecipeConfig.from_yaml(tmp_path / "out.yaml") == config


def test_unknown_key_names_file_line_and_allowed_keys(tmp_path):
    path = write(tmp_path, "name: x\ntraining:\n  max_steps: 5\n  lr: 0.1\n")
    with pytest.raises(FinetuneError) as err:
        RecipeConfig.from_yaml(path)
    message = str(err.value)
    assert f"{path}:4: unknown key `training.lr`" in message
    assert "learning_rate" in message and "Allowed keys here:" in message


def test_wrong_type_and_bad_choice_name_the_key_and_the_allowed_values(tmp_path):
    path = write(tmp_path, "model:\n  quantization: 3bit\ntraining:\n  max_steps: many\n")
    with pytest.raises(FinetuneError) as err:
        RecipeConfig.from_yaml(path)
    message = str(err.value)
    assert f"{path}:2: `model.quantization`: Input should be 'none', '8bit' or '4bit' (got '3bit')" in message
    assert f"{path}:4: `training.max_steps`" in message and "'many'" in message


def test_impossible_settings_are_refused(tmp_path):
    with pytest.raises(FinetuneError, match="validation_split \\+ test_split"):
        RecipeConfig.from_dict({"data": {"validation_split": 0.5, "test_split": 0.45}})
    with pytest.raises(FinetuneError, match="needs `path`"):
        RecipeConfig.from_dict({"data": {"sources": [{"type": "file"}]}})


def test_overrides_parse_values_as_yaml(tmp_path):
    path = write(tmp_path, "training:\n  max_steps: 5\n")
    config = RecipeConfig.from_yaml(path, ["training.max_steps=20", "lora.use_dora=true", "model.source=some/model"])
    assert config.training.max_steps == 20 and config.lora.use_dora is True and config.model.source == "some/model"
    with pytest.raises(FinetuneError, match="expected KEY=VALUE"):
        apply_overrides({}, ["training.max_steps"])
    with pytest.raises(FinetuneError, match="unknown key `training.nope`"):
        RecipeConfig.from_yaml(path, ["training.nope=1"])


def test_one_way_to_change_a_config_takes_strings_or_typed_values():
    base = RecipeConfig()
    changed = base.with_overrides(["training.max_steps=20"]).with_overrides({"lora.r": 8, "model.quantization": "none"})
    assert (changed.training.max_steps, changed.lora.r, changed.model.quantization) == (20, 8, "none")
    assert base.training.max_steps is None and base.lora.r == 16  # the original is left as it was
    with pytest.raises(FinetuneError, match="unknown key `lora.rank`"):
        base.with_overrides({"lora.rank": 8})
    with pytest.raises(FinetuneError, match="`model.quantization`"):
        base.with_overrides({"model.quantization": "2bit"})


def test_allowed_values_come_from_the_config_types():
    from finetune.config import MergeStrategy, Quantization, choices
    from finetune.merging import STRATEGIES

    assert choices(Quantization) == ("none", "8bit", "4bit")
    assert STRATEGIES == choices(MergeStrategy) == ("auto", "full_precision", "nf4_roundtrip")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FinetuneError, match="recipe file not found"):
        RecipeConfig.from_yaml(tmp_path / "absent.yaml")
    path = write(tmp_path, "model:\n  source: [unclosed\n")
    with pytest.raises(FinetuneError, match=rf"{path}:\d+: not valid YAML"):
        RecipeConfig.from_yaml(path)
    with pytest.raises(FinetuneError, match="must be a YAML mapping"):
        RecipeConfig.from_yaml(write(tmp_path, "- a\n- b\n"))


def test_every_shipped_recipe_validates():
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        RecipeConfig.from_yaml(path)


def test_configuration_reference_is_in_sync_with_the_fields():
    from pathlib import Path

    from finetune.config import reference_markdown

    docs = Path(__file__).parent.parent.joinpath("docs", "configuration.md").read_text()
    assert reference_markdown() in docs, (
        "regenerate the Keys section of docs/configuration.md from reference_markdown()"
    )


def test_effective_batch_size_sets_the_accumulation_and_refuses_a_contradiction():
    def training(**keys):
        return RecipeConfig.from_dict({"training": keys}).training

    assert training(batch_size=4, effective_batch_size=16).gradient_accumulation_steps == 4
    derived = RecipeConfig.from_dict({"training": {"batch_size": 4, "effective_batch_size": 16}})
    # Changing the batch derives the accumulation again (the planner's suggestions and decisions rely on it).
    assert derived.with_overrides(["training.batch_size=8"]).training.gradient_accumulation_steps == 2
    assert training(batch_size="auto", effective_batch_size=16).gradient_accumulation_steps == 1
    with pytest.raises(FinetuneError, match=r"effective_batch_size \(10\) must be a multiple of batch_size \(4\)"):
        training(batch_size=4, effective_batch_size=10)
    with pytest.raises(FinetuneError, match="remove gradient_accumulation_steps"):
        training(batch_size=4, effective_batch_size=16, gradient_accumulation_steps=3)
    with pytest.raises(FinetuneError, match="remove gradient_accumulation_steps"):
        training(batch_size="auto", effective_batch_size=16, gradient_accumulation_steps=3)
    with pytest.raises(FinetuneError, match=r"`training.batch_size`: .* or auto \(got 'big'\)"):
        training(batch_size="big")


def test_an_out_of_range_effective_batch_size_is_named_by_its_key():
    """Found by tests/test_config_properties.py: -1 reached the accumulation rule before the field's own check."""
    with pytest.raises(FinetuneError, match=r"training\.effective_batch_size"):
        RecipeConfig.from_dict({"training": {"effective_batch_size": -1}})
