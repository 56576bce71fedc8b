"""Fine-tune the bundled SmolLM2-135M-Instruct on a laptop CPU through the Python API (about 8 minutes).

    python examples/cpu_quickstart.py

Same pipeline as `finetune run recipes/quickstart.yaml`, written out as Python.
"""

from finetune import ChatSFTRecipe

CONFIG = {
    "name": "cpu-quickstart",
    "model": {"source": "smollm2-135m-instruct", "quantization": "4bit"},
    "lora": {"r": 16},
    "data": {"sources": [{"type": "chatterbot", "language": "english"}], "max_length": 256, "validation_split": 0.04},
    "training": {
        "learning_rate": 3e-4,
        "max_steps": 24,
        "batch_size": 8,
        "gradient_accumulation_steps": 1,
        "eval_steps": 12,
    },
    "evaluation": {"max_rows": 200, "batch_size": 16, "generation_rows": 32, "max_new_tokens": 40},
    "output": {"overwrite": True},
}

if __name__ == "__main__":
    result = ChatSFTRecipe(**CONFIG).run()
    print(f"perplexity {result.metrics_before['perplexity']:.2f} -> {result.metrics_after['perplexity']:.2f}")
    print(f"adapter: {result.adapter_dir}\nmerged model: {result.merged_dir}")
