"""QLoRA on a consumer GPU (8-24 GB) through the Python API: a 1.5B instruct model on your own chat data.

    python examples/gpu_qlora.py data/my_chats.jsonl [--model Qwen/Qwen2.5-1.5B-Instruct]

The data file holds one conversation per line: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
(ShareGPT, Alpaca and prompt/completion rows work too). Needs network access to the Hub for the model, or a
local folder / GGUF file as --model.

The batch fits itself: `batch_size: auto` asks the memory planner for the largest batch whose estimated peak stays
within 70% of the GPU's free memory, and the accumulation steps make up the 16 conversations per optimizer step, so
an 8 GB and a 24 GB card train the same thing (the run prints the choice; recipe.yaml records it). See what it
would pick on a card you do not have with `finetune plan` and `--device 8GB`.
"""

import argparse

from finetune import ChatSFTRecipe

# Conversations per optimizer step on every card.
EFFECTIVE_BATCH = 16


def build_config(data_path: str, model: str) -> dict:
    return {
        "name": "gpu-qlora",
        "model": {"source": model, "quantization": "4bit", "compute_dtype": "bfloat16"},
        "lora": {"r": 16, "dropout": 0.05},
        "data": {"sources": [{"type": "file", "path": data_path}], "max_length": 1024},
        "training": {
            "learning_rate": 2e-4,
            "epochs": 2,
            "optimizer": "paged_adamw_8bit",
            "batch_size": "auto",
            "effective_batch_size": EFFECTIVE_BATCH,
        },
        "output": {"merge_dtype": "bfloat16"},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--model", default="Qwen/Qwen2.5-1.5B-Instruct")
    args = parser.parse_args()
    result = ChatSFTRecipe(**build_config(args.data, args.model)).run()
    print(result.decisions, result.metrics_before, result.metrics_after, result.merged_dir, sep="\n")
