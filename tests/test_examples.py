"""The example scripts build valid recipes (they are run for real by `make quickstart` and on GPUs)."""

import importlib.util
from pathlib import Path

from finetune import RecipeConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_quickstart_builds_the_quickstart_pipeline():
    example = RecipeConfig.from_dict(load("cpu_quickstart").CONFIG)
    recipe = RecipeConfig.from_yaml(EXAMPLES.parent / "recipes" / "quickstart.yaml")
    assert example.model == recipe.model and example.data == recipe.data and example.lora == recipe.lora


def test_gpu_example_configs_validate_for_every_card_size():
    module = load("gpu_qlora")
    for vram in module.BY_VRAM:
        config = RecipeConfig.from_dict(module.build_config("chats.jsonl", "Qwen/Qwen2.5-1.5B-Instruct", vram))
        assert config.model.quantization == "4bit" and config.training.optimizer == "paged_adamw_8bit"
