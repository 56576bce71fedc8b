"""Repetition guard: loops, reply quality and cost per step, with and without it, against transformers' own tools.

    .venv/bin/python benchmarks/repetition_guard.py          # SmolLM2-135M-Instruct, 96 chatterbot prompts, CPU

Every arm answers the same prompts greedily (first turns of distinct chatterbot-corpus English conversations, a
seeded sample) in left-padded batches, as evaluation does: no guard, the guard (`finetune.generation`, DRY) at
several settings, and transformers' `repetition_penalty` and `no_repeat_ngram_size`. Per arm: the repetition scores
of the replies, the share of replies that loop, reference scores against chatterbot's own replies, and a few probe
prompts whose right answer repeats itself (counting, a list, a class with two attributes). The guard's own cost is
timed on its own, per decoding step, for a batch of 16 rows over 64 new tokens and one row over 512.
Results: benchmarks/results/repetition_guard.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OFFLINE, machine, machine_markdown, write  # noqa: E402

os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
ROOT = Path(__file__).resolve().parents[1]

# label -> (guard settings (strength, base, allowed_length) or None, extra generate() kwargs)
ARMS: dict[str, tuple[tuple[float, float, int] | None, dict[str, Any]]] = {
    "no guard": (None, {}),
    "guard 0.8 / 1.75 / 2 (default)": ((0.8, 1.75, 2), {}),
    "guard 0.4 / 1.75 / 2": ((0.4, 1.75, 2), {}),
    "guard 1.6 / 1.75 / 2": ((1.6, 1.75, 2), {}),
    "guard 0.8 / 1.75 / 3": ((0.8, 1.75, 3), {}),
    "guard 0.8 / 1.75 / 4": ((0.8, 1.75, 4), {}),
    "repetition_penalty 1.1": (None, {"repetition_penalty": 1.1}),
    "repetition_penalty 1.2": (None, {"repetition_penalty": 1.2}),
    "no_repeat_ngram_size 4": (None, {"no_repeat_ngram_size": 4}),
}


def _counts_to_twenty(reply: str) -> bool:
    numbers = [int(n) for n in re.findall(r"\d+", reply)]  # "1, 2, 3" and "1. 1 2. 2" both count
    return set(numbers) == set(range(1, 21)) and numbers == sorted(numbers)


# Prompts whose right answer repeats itself, each with a check of that answer.
PROBES: dict[str, Any] = {
    "Count from 1 to 20, separated by commas.": _counts_to_twenty,
    "List the days of the week, one per line.": lambda reply: all(
        day in reply for day in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
    ),
    "Write a Python class Point with attributes x and y and a method that returns x + y.": lambda reply: (
        "self.x" in reply and "self.y" in reply and re.search(r"return (self\.)?x \+ (self\.)?y", reply) is not None
    ),
    "Make a markdown table of three fruits and their colours.": lambda reply: reply.count("\n|") >= 4,  # + separator
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Bundled alias, folder or Hub id.")
    parser.add_argument("--quantization", default="none", choices=["4bit", "8bit", "none"])
    parser.add_argument("--prompts", type=int, default=96, help="Chatterbot prompts to answer.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--probe-tokens", type=int, default=160, help="New tokens for the probe prompts.")
    parser.add_argument("--loop-threshold", type=float, default=0.2, help="A reply loops from this repeated share.")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), help="Arms to run (labels above).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="repetition_guard", help="Results file name under benchmarks/results/.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--report-only", action="store_true", help="Rebuild the Markdown from the JSON results.")
    return parser.parse_args()


def chatterbot_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """(first user turn, its reply) of distinct chatterbot-corpus English conversations, a seeded sample."""
    import yaml

    from finetune.config import DataSource
    from finetune.data.sources import chatterbot_files

    pairs: dict[str, str] = {}
    for file in chatterbot_files(DataSource(type="chatterbot", language="english")):
        for conversation in yaml.safe_load(file.read_text())["conversations"]:
            if len(conversation) >= 2 and isinstance(conversation[0], str) and isinstance(conversation[1], str):
                pairs.setdefault(conversation[0].strip(), conversation[1].strip())
    chosen = sorted(pairs.items())
    random.Random(seed).shuffle(chosen)
    return chosen[:count]


def answer(model, tokenizer, prompts: list[str], arm: str, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy replies in left-padded batches, decoded as evaluation does, with the arm's guard or transformers tool."""
    import torch
    from transformers import LogitsProcessorList

    from finetune.data import render_prompt
    from finetune.generation import DecodingSettings, RepetitionGuard, generate_kwargs

    guard, extra = ARMS[arm]
    settings = DecodingSettings(max_new_tokens=max_new_tokens, temperature=0, repetition_guard=False)
    texts = [render_prompt(tokenizer, [{"role": "user", "content": p}], "") for p in prompts]
    eos = model.generation_config.eos_token_id
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    replies = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            width = batch["input_ids"].shape[1]
            kwargs = {**generate_kwargs(settings, model.generation_config, prompt_length=width), **extra}
            if guard:
                kwargs["logits_processor"] = LogitsProcessorList([RepetitionGuard(width, *guard)])
            with torch.inference_mode():
                output = model.generate(**batch, **kwargs)
            for row in output[:, width:].tolist():
                replies.append(row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))])
    finally:
        tokenizer.padding_side = side
    return replies


def guard_cost(vocabulary: int, rows: int, new_tokens: int, prompt: int = 48, repeats: int = 3) -> dict[str, float]:
    """Seconds the guard adds per decoding step, averaged over a whole reply, on this machine's CPU."""
    import torch

    from finetune.generation import RepetitionGuard

    guard = RepetitionGuard(prompt)
    generator = torch.Generator().manual_seed(0)
    # A looping reply, so that every shift has matches to count (the work is the same either way: it is dense).
    ids = torch.randint(0, vocabulary, (rows, prompt + new_tokens), generator=generator)
    ids[:, prompt:] = ids[:, prompt : prompt + 7].repeat(1, new_tokens // 7 + 1)[:, :new_tokens]
    scores = torch.randn(rows, vocabulary, generator=generator)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for step in range(1, new_tokens + 1):
            guard(ids[:, : prompt + step], scores)
        best = min(best, (time.perf_counter() - start) / new_tokens)
    return {"rows": rows, "new_tokens": new_tokens, "vocabulary": vocabulary, "seconds_per_step": best}


def main() -> None:
    args = arguments()
    if args.report_only:
        payload = json.loads((args.out / f"{args.name}.json").read_text())
        print(write(args.name, payload, markdown(payload), args.out)[1].read_text())
        return
    from finetune import data, models
    from finetune.config import ModelConfig
    from finetune.metrics import score_generations
    from finetune.metrics.repetition import repeated_ngram_share

    info = machine()
    config = ModelConfig(source=args.model, quantization=args.quantization)
    tokenizer = models.load_tokenizer(config)
    model = models.load_model(config)
    models.configure_generation(model, tokenizer, data.end_of_turn_ids(tokenizer))
    model.eval()
    pairs = chatterbot_pairs(args.prompts, args.seed)
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    answer(model, tokenizer, prompts[:1], "no guard", 4, 1)  # warm-up

    runs: dict[str, dict[str, Any]] = {}
    for arm in args.arms:
        start = time.perf_counter()
        replies = answer(model, tokenizer, prompts, arm, args.max_new_tokens, args.batch_size)
        seconds = time.perf_counter() - start
        predictions = [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in replies]
        scores = score_generations(predictions, references)
        probe_replies = answer(model, tokenizer, list(PROBES), arm, args.probe_tokens, len(PROBES))
        probe_texts = [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in probe_replies]
        token_shares = [repeated_ngram_share(reply, 4) for reply in replies]
        runs[arm] = {
            "seconds": round(seconds, 2),
            "generated_tokens": sum(len(r) for r in replies),
            "scores": scores,
            "looping_replies": sum(share >= args.loop_threshold for share in _word_shares(predictions)),
            "token_repeated_4gram_share": sum(token_shares) / len(token_shares),
            "probes": dict(zip(PROBES, probe_texts)),
            "predictions": predictions,
        }
        print(
            f"{arm}: {seconds:.1f} s, repeated_4gram_share {scores['repeated_4gram_share']:.3f}, "
            f"looping {runs[arm]['looping_replies']}, probes {_passed(runs[arm])}/{len(PROBES)}",
            flush=True,
        )

    vocabulary = model.get_output_embeddings().weight.shape[0]
    cost = [guard_cost(vocabulary, args.batch_size, args.max_new_tokens), guard_cost(vocabulary, 1, 512)]
    plain = runs.get("no guard")
    step_seconds = (
        plain["seconds"] / (len(prompts) / args.batch_size) / args.max_new_tokens if plain else None
    )  # upper bound on a step's time: rows that stopped early still take their batch's steps
    payload = {
        "machine": info,
        "command": " ".join(["python benchmarks/repetition_guard.py", *sys.argv[1:]]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "prompts": prompts,
        "references": references,
        "runs": runs,
        "guard_cost": cost,
        "decoding_step_seconds": step_seconds,
    }
    json_path, md_path = write(args.name, payload, markdown(payload), args.out)
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path}")


def _passed(run: dict[str, Any]) -> int:
    """Probes whose reply passes its check (scored from the stored replies, so --report-only rescores them)."""
    return sum(check(run["probes"][probe]) for probe, check in PROBES.items())


def _word_shares(predictions: list[str]) -> list[float]:
    from finetune.metrics import repetition

    return repetition.per_reply(predictions)["repeated_4gram_share"]


def markdown(payload: dict[str, Any]) -> str:
    settings, runs = payload["settings"], payload["runs"]
    prompts = len(payload["prompts"])
    lines = [
        "# Repetition guard: loops, quality and cost",
        "",
        machine_markdown(payload["machine"]),
        "",
        f"{prompts} chatterbot-corpus prompts (first turns of distinct English conversations, seed {settings['seed']}), "
        f"greedy, at most {settings['max_new_tokens']} new tokens, batches of {settings['batch_size']}, model "
        f"`{settings['model']}` ({settings['quantization']}). A reply *loops* when at least "
        f"{float(settings['loop_threshold']):.0%} of its word 4-grams repeat earlier ones. Guard arms: strength / base / "
        f"allowed length. Probes: {len(PROBES)} prompts whose right answer repeats itself, at most "
        f"{settings['probe_tokens']} new tokens. Seconds are wall time on a machine shared with other work, so they "
        f"vary with its load; the guard's own cost is measured on its own below. Command: `{payload['command']}`.",
        "",
        "| arm | looping replies | repeated_4gram_share | distinct_2 | repeated token 4-grams | bleu | rougeL | "
        "token_f1 | probes passed | tokens | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, run in runs.items():
        s = run["scores"]
        lines.append(
            f"| {arm} | {run['looping_replies']} / {prompts} | {s['repeated_4gram_share']:.3f} | {s['distinct_2']:.3f} | "
            f"{run['token_repeated_4gram_share']:.3f} | {s['bleu']:.2f} | {s['rougeL']:.3f} | {s['token_f1']:.3f} | "
            f"{_passed(run)} / {len(PROBES)} | {run['generated_tokens']} | {run['seconds']:.1f} |"
        )
    lines += ["", "## Cost of the guard per decoding step (the guard alone, this machine's CPU)", ""]
    lines += ["| rows | new tokens | vocabulary | ms per step |", "|---:|---:|---:|---:|"]
    for cost in payload["guard_cost"]:
        lines.append(
            f"| {cost['rows']} | {cost['new_tokens']} | {cost['vocabulary']} | {cost['seconds_per_step'] * 1000:.3f} |"
        )
    if payload["decoding_step_seconds"]:
        lines += [
            "",
            f"A decoding step of the model itself (no guard, batch {settings['batch_size']}) took at most "
            f"{payload['decoding_step_seconds'] * 1000:.0f} ms here.",
        ]
    plain, default = runs.get("no guard"), runs.get("guard 0.8 / 1.75 / 2 (default)")
    if plain and default:
        lines += ["", "## Replies that changed most (no guard vs the default guard)", ""]
        lines += ["| prompt | no guard | guard |", "|---|---|---|"]
        shares = _word_shares(plain["predictions"])
        worst = sorted(range(prompts), key=lambda i: -shares[i])[:8]
        for i in worst:
            lines.append(
                f"| {_cell(payload['prompts'][i])} | {_cell(plain['predictions'][i])} | "
                f"{_cell(default['predictions'][i])} |"
            )
        lines += ["", "## Probes (no guard vs the default guard)", ""]
        lines += ["| prompt | no guard | guard |", "|---|---|---|"]
        for probe in PROBES:
            lines.append(f"| {_cell(probe)} | {_cell(plain['probes'][probe])} | {_cell(default['probes'][probe])} |")
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 300) -> str:
    return " ".join(text.split()).replace("|", "\\|")[:limit]


if __name__ == "__main__":
    main()
