"""Evaluation speed: batched generation for BLEU/ROUGE against one prompt at a time, in one session.

    .venv/bin/python benchmarks/eval_speed.py                       # SmolLM2-135M-Instruct, 32 held-out prompts, CPU

Both use `finetune.evaluation.generate` (greedy with the repetition guard, KV cache, left padding when batched) on
the same held-out prompts of the quickstart recipe's test split, then score the replies with the same metrics. A
warm-up call comes first so neither pays one-off start-up costs. Results: benchmarks/results/eval_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OFFLINE, machine, machine_markdown, write  # noqa: E402

os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
ROOT = Path(__file__).resolve().parents[1]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Bundled alias, folder or Hub id.")
    parser.add_argument("--quantization", default="none", choices=["4bit", "8bit", "none"])
    parser.add_argument("--rows", type=int, default=32, help="Held-out prompts to answer.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--name", default="eval_speed", help="Results file name under benchmarks/results/.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    from finetune import data, evaluation, models
    from finetune.config import RecipeConfig
    from finetune.generation import DecodingSettings
    from finetune.metrics import score_generations

    config = RecipeConfig.from_yaml(
        ROOT / "recipes" / "quickstart.yaml", [f"model.source={args.model}", f"model.quantization={args.quantization}"]
    )
    info = machine()
    tokenizer = models.load_tokenizer(config.model)
    heldout = data.prepare_data(config.data, tokenizer).splits["test"]
    rows = heldout.select(range(min(args.rows, len(heldout))))
    prompts = [messages[:-1] for messages in rows["messages"]]
    references = [messages[-1]["content"] for messages in rows["messages"]]
    model = models.load_model(config.model)
    models.configure_generation(model, tokenizer, data.end_of_turn_ids(tokenizer))
    evaluation.generate(model, tokenizer, prompts[:1], decoding=DecodingSettings(4, temperature=0), batch_size=1)

    runs: dict[str, dict[str, Any]] = {}
    for label, batch_size in (("one_at_a_time", 1), ("batched", args.batch_size)):
        start = time.perf_counter()
        replies = evaluation.generate(
            model,
            tokenizer,
            prompts,
            decoding=DecodingSettings(args.max_new_tokens, temperature=0),
            batch_size=batch_size,
        )
        seconds = time.perf_counter() - start
        predictions = [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in replies]
        runs[label] = {
            "batch_size": batch_size,
            "seconds": round(seconds, 2),
            "generated_tokens": sum(len(r) for r in replies),
            "tokens_per_s": sum(len(r) for r in replies) / seconds,
            "scores": score_generations(predictions, references),
            "predictions": predictions,
        }
        print(f"{label}: {seconds:.1f} s", flush=True)
    single, batched = runs["one_at_a_time"], runs["batched"]
    same = sum(a == b for a, b in zip(single["predictions"], batched["predictions"])) / len(prompts)
    payload = {
        "machine": info,
        "command": " ".join(["python benchmarks/eval_speed.py", *sys.argv[1:]]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "runs": runs,
        "speedup": single["seconds"] / batched["seconds"],
        "identical_replies": same,
        "target_met": single["seconds"] / batched["seconds"] >= 3,
    }
    json_path, md_path = write(args.name, payload, markdown(payload, len(prompts)), args.out)
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path}")


def markdown(payload: dict[str, Any], prompts: int) -> str:
    single, batched = payload["runs"]["one_at_a_time"], payload["runs"]["batched"]
    lines = [
        "# Evaluation speed: batched generation vs one prompt at a time",
        "",
        machine_markdown(payload["machine"]),
        "",
        f"{prompts} held-out prompts, greedy, at most {payload['settings']['max_new_tokens']} new tokens, "
        f"model `{payload['settings']['model']}` ({payload['settings']['quantization']}). Command: `{payload['command']}`.",
        "",
        f"| figure | one at a time | batched ({batched['batch_size']}) | ratio |",
        "|---|---|---|---|",
        f"| wall time (s) | {single['seconds']:.1f} | {batched['seconds']:.1f} | {payload['speedup']:.2f}x faster |",
        f"| generated tokens/s | {single['tokens_per_s']:.1f} | {batched['tokens_per_s']:.1f} | |",
        f"| generated tokens | {single['generated_tokens']} | {batched['generated_tokens']} | |",
    ]
    for metric in sorted(single["scores"]):
        lines.append(f"| {metric} | {single['scores'][metric]:.4f} | {batched['scores'][metric]:.4f} | |")
    lines += [
        "",
        f"Identical replies: {payload['identical_replies']:.0%} (left padding changes float rounding, which can flip a",
        "greedy choice between near-tied tokens). Target (batched at least 3x faster): "
        + ("met." if payload["target_met"] else "NOT met."),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
