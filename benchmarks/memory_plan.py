"""The memory planner's estimates against measured peak memory, on several configurations.

    .venv/bin/python benchmarks/memory_plan.py           # SmolLM2-135M-Instruct configs on CPU (a few minutes)

Each configuration trains a few steps in its own process on conversations that all have (almost exactly)
`data.max_length` tokens, the worst case the planner assumes, and reports the peak resident memory of the
training phase (CUDA: peak allocated memory plus the planner's context allowance is not comparable, so this
runs on CPU). Results: benchmarks/results/memory_plan.{json,md}; the table is copied into docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OFFLINE, PeakMemory, machine, machine_markdown, write  # noqa: E402

os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
ROOT = Path(__file__).resolve().parents[1]

# (label, overrides): SmolLM2-135M-Instruct at 32 and 4 bits, with and without checkpointing, LoRA dropout and the
# levers, 1024 to 4096 tokens per batch.
CONFIGS = [
    ("fp32, batch 8 x 256", ["model.quantization=none"]),
    ("4-bit, batch 8 x 256", ["model.quantization=4bit"]),
    ("4-bit, batch 8 x 256, no LoRA dropout", ["model.quantization=4bit", "lora.dropout=0"]),
    ("4-bit, batch 4 x 512", ["model.quantization=4bit", "training.batch_size=4", "data.max_length=512"]),
    (
        "fp32, batch 4 x 512, checkpointing",
        [
            "model.quantization=none",
            "training.batch_size=4",
            "data.max_length=512",
            "training.gradient_checkpointing=true",
        ],
    ),
    (
        "4-bit, batch 16 x 128, no LoRA dropout",
        ["model.quantization=4bit", "training.batch_size=16", "data.max_length=128", "lora.dropout=0"],
    ),
    (
        "fp32, batch 8 x 256, TRL's loss (levers off)",
        ["model.quantization=none", "training.skip_untrained_logits=false", "training.packing=false"],
    ),
    ("4-bit, batch 4 x 256", ["model.quantization=4bit", "training.batch_size=4"]),
    ("fp32, batch 8 x 512", ["model.quantization=none", "data.max_length=512"]),
]
WORDS = (
    "river stone light garden winter music paper window bridge forest morning silver market harbour "
    "letter candle mountain village orchard lantern meadow thunder pebble willow compass"
).split()


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", type=int, nargs="*", help="Indices of CONFIGS to run (default: all).")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="Override for every configuration."
    )
    parser.add_argument("--name", default="memory_plan")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def full_length_conversations(tokenizer: Any, length: int, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` distinct conversations of `length` tokens or a few fewer: a short question and a long reply."""
    from finetune.data import tokenize_conversation

    rng = random.Random(seed)
    rows = []
    for index in range(count):
        question = f"Tell me about item {index}."
        words = [rng.choice(WORDS) for _ in range(length)]
        low, high = 1, length
        while low < high:  # the longest reply that keeps the conversation within `length` tokens
            middle = (low + high + 1) // 2
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": " ".join(words[:middle])},
            ]
            if len(tokenize_conversation(tokenizer, messages)[-1]["input_ids"]) <= length:
                low = middle
            else:
                high = middle - 1
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": " ".join(words[:low])},
                ]
            }
        )
    return rows


def child(overrides: list[str], steps: int) -> dict[str, Any]:
    """Set up and train `steps` steps with the recipe's own stages; peak RSS of the training phase, and the plan."""
    from datasets import DatasetDict

    from finetune import models, planning, training
    from finetune.config import RecipeConfig
    from finetune.recipes import ChatSFTRecipe

    folder = Path(tempfile.mkdtemp(prefix="memory-plan-"))
    config = RecipeConfig.from_yaml(ROOT / "recipes" / "quickstart.yaml", overrides)
    tokenizer = models.load_tokenizer(config.model)
    rows = full_length_conversations(tokenizer, config.data.max_length, count=config.training.batch_size * (steps + 2))
    data_file = folder / "data.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = RecipeConfig.from_yaml(
        ROOT / "recipes" / "quickstart.yaml",
        [
            *overrides,
            f"data.sources=[{{type: file, path: {data_file}}}]",
            "data.validation_split=0",
            "data.test_split=0.05",
            f"training.max_steps={steps}",
            f"training.save_steps={steps}",
            "training.keep_best=false",
            f"output.dir={folder / 'run'}",
            "output.overwrite=true",
        ],
    )
    recipe = ChatSFTRecipe(config)
    recipe.setup()  # resolves gradient_checkpointing: auto with the planner, as a run does
    train = recipe.data.splits["train"]
    shape = dataclasses.replace(planning.model_shape(config), added_tokens=len(recipe.new_tokens))
    estimate = planning.plan(config, "cpu", batch=planning.Batch.from_data(train, config), shape=shape)
    trainer = training.build_trainer(
        recipe.model,
        recipe.tokenizer,
        DatasetDict(train=train),
        config.training,
        folder / "checkpoints",
        dtype=models.compute_dtype(config.model),
    )
    memory = PeakMemory()
    trainer.train()
    memory.pause()
    return {
        "estimate": estimate.parts,
        "estimate_gib": estimate.total / 1024**3,
        "measured_gib": memory.peak_rss / 1024**3,
        "tokens": estimate.settings["tokens"],
        "checkpointing": estimate.settings["checkpointing"],
    }


def main() -> None:
    args = arguments()
    if args.child is not None:
        args.result.write_text(json.dumps(child(args.child, args.steps)))
        return
    rows = []
    chosen = [CONFIGS[i] for i in args.only] if args.only else CONFIGS
    for label, overrides in chosen:
        overrides = [f"model.source={args.model}", *overrides, *args.overrides]
        with tempfile.TemporaryDirectory() as folder:
            result = Path(folder) / "result.json"
            print(f"\n=== {label} ===", flush=True)
            command = [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--result",
                str(result),
                "--child",
                *overrides,
            ]
            subprocess.run(command, check=True, cwd=ROOT)
            measured = json.loads(result.read_text())
        measured["label"] = label
        measured["error"] = measured["estimate_gib"] / measured["measured_gib"] - 1
        rows.append(measured)
        print(
            f"{label}: estimate {measured['estimate_gib']:.2f} GiB, measured {measured['measured_gib']:.2f} GiB ({measured['error']:+.0%})"
        )
    payload = {"machine": machine(), "model": args.model, "steps": args.steps, "rows": rows}
    write(args.name, payload, markdown(payload), args.out)
    print(markdown(payload))


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Memory planner: estimate vs measured peak",
        "",
        machine_markdown(payload["machine"]),
        "",
        f"Model `{payload['model']}`, {payload['steps']} training steps per configuration on conversations of the full",
        "`data.max_length`. Measured: peak resident memory of the training phase (the process's high-water mark, reset",
        "after loading). Command: `python benchmarks/memory_plan.py`.",
        "",
        "| configuration | tokens per batch | estimate (GiB) | measured (GiB) | error | activations | logits | allocator |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        parts = row["estimate"]
        lines.append(
            f"| {row['label']} | {row['tokens']} | {row['estimate_gib']:.2f} | {row['measured_gib']:.2f} | {row['error']:+.0%} "
            f"| {parts['activations'] / 1024**3:.2f} | {parts['logits'] / 1024**3:.2f} | {parts['allocator'] / 1024**3:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
