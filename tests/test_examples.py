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


def test_gpu_example_fits_its_batch_to_each_card_and_keeps_16_per_step():
    """The example leaves the batch to the memory planner; on each consumer card the plan keeps 16 per step."""
    from transformers import Qwen2Config

    from finetune import planning

    module = load("gpu_qlora")
    config = RecipeConfig.from_dict(module.build_config("chats.jsonl", "Qwen/Qwen2.5-1.5B-Instruct"))
    assert config.model.quantization == "4bit" and config.training.optimizer == "paged_adamw_8bit"
    assert config.training.batch_size == "auto" and config.training.effective_batch_size == module.EFFECTIVE_BATCH
    # Qwen2.5-1.5B-Instruct's published config.json (no download: the numbers are what planning needs).
    shape = planning.ModelShape.from_config(
        Qwen2Config(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    chosen = {card: planning.choose_batch_size(config, card, shape=shape) for card in ("8GB", "12GB", "24GB")}
    for choice in chosen.values():
        assert choice.fits and choice.batch_size * choice.gradient_accumulation_steps == module.EFFECTIVE_BATCH
    # Recomputing activations costs about a third more compute per token at any batch, so a card that fits a batch
    # without it trains without it; the 8 GB card needs it.
    assert chosen["8GB"].gradient_checkpointing and not chosen["24GB"].gradient_checkpointing
