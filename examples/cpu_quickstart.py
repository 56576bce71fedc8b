"""Fine-tune the bundled SmolLM2-135M-Instruct on a laptop CPU through the Python API (about 4 minutes).

    python examples/cpu_quickstart.py

Same pipeline as `finetune run recipes/quickstart.yaml`, written out as Python.
"""

from finetune import ChatSFTRecipe

CONFIG = {
    "name": "cpu-quickstart",
    "model": {"source": "smollm2-135m-instruct", "quantization": "4bit"},
    "lora": {"r": 16},
    "data": {
        "sources": [{"type": "chatterbot", "language": "english"}],
        "max_length": 256,
        "validation_split": 0.04,
        "test_split": 0.15,
    },
    "training": {
        "learning_rate": 3e-4,
        "max_steps": 24,
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "eval_steps": 12,
    },
    # A fixed sample (no time budget): every held-out conversation scored, 64 of them answered, before and after.
    "evaluation": {"time_share": None, "max_rows": None, "batch_size": 16, "generation_rows": 64, "max_new_tokens": 32},
    "output": {"overwrite": True},
}

if __name__ == "__main__":
    recipe = ChatSFTRecipe(**CONFIG)
    result = recipe.run()
    for change in recipe.state.comparison.changes:  # each with its 95% paired bootstrap interval
        print(f"{change.metric}: {change.before:.4g} -> {change.after:.4g}, {change.text()}")
    print(f"adapter: {result.adapter_dir}\nmerged model: {result.merged_dir}")
