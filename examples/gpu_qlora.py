"""QLoRA on a consumer GPU (8-24 GB) through the Python API: a 1.5B instruct model on your own chat data.

    python examples/gpu_qlora.py data/my_chats.jsonl [--model Qwen/Qwen2.5-1.5B-Instruct] [--vram 8]

The data file holds one conversation per line: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
(ShareGPT, Alpaca and prompt/completion rows work too). Needs network access to the Hub for the model, or a
local folder / GGUF file as --model.
"""

import argparse

from finetune import ChatSFTRecipe

# Per-device batch and checkpointing that fit a 1-3B model in 4-bit with 1024-token rows.
BY_VRAM = {
    8: {"batch_size": 2, "gradient_accumulation_steps": 8, "gradient_checkpointing": True},
    12: {"batch_size": 4, "gradient_accumulation_steps": 4, "gradient_checkpointing": True},
    24: {"batch_size": 8, "gradient_accumulation_steps": 2, "gradient_checkpointing": False},
}


def build_config(data_path: str, model: str, vram: int) -> dict:
    return {
        "name": "gpu-qlora",
        "model": {"source": model, "quantization": "4bit", "compute_dtype": "bfloat16"},
        "lora": {"r": 16, "dropout": 0.05},
        "data": {"sources": [{"type": "file", "path": data_path}], "max_length": 1024},
        "training": {"learning_rate": 2e-4, "epochs": 2, "optimizer": "paged_adamw_8bit", **BY_VRAM[vram]},
        "output": {"merge_dtype": "bfloat16"},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--model", default="Qwen/Qwen2.5-1.5B-Instruct")
    parser.add_argument("--vram", type=int, choices=sorted(BY_VRAM), default=8)
    args = parser.parse_args()
    result = ChatSFTRecipe(**build_config(args.data, args.model, args.vram)).run()
    print(result.metrics_before, result.metrics_after, result.merged_dir, sep="\n")
