"""finetune: turn a pretrained decoder-only checkpoint into a chat model with LoRA/QLoRA.

from finetune import ChatSFTRecipe
result = ChatSFTRecipe.from_yaml("recipes/quickstart.yaml").run()
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["ChatSFTRecipe", "FinetuneError", "PreferenceRecipe", "Recipe", "RecipeConfig", "RunResult"]


def __getattr__(name: str) -> Any:
    # Lazy, so `finetune --help` and config validation don't pay for importing torch and transformers.
    if name in ("ChatSFTRecipe", "PreferenceRecipe", "Recipe", "RunResult"):
        from finetune import recipes

        return getattr(recipes, name)
    if name == "RecipeConfig":
        from finetune.config import RecipeConfig

        return RecipeConfig
    if name == "FinetuneError":
        from finetune.errors import FinetuneError

        return FinetuneError
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
