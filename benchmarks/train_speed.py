"""Training speed and memory: a plain TRL + peft script against this library's recipe, in one session.

    .venv/bin/python benchmarks/train_speed.py                      # SmolLM2-135M-Instruct, 4-bit and 32-bit, CPU
    .venv/bin/python benchmarks/train_speed.py --data sessions --quantization 4bit   # long multi-turn chats
    .venv/bin/python benchmarks/train_speed.py --steps 200 --model PATH_OR_HUB_ID --batch-size 16   # on a GPU

Data (--data): `chatterbot`, the recipe's own short chatterbot-corpus conversations (max 256 tokens), or `sessions`,
2,000 multi-turn FOLDOC sessions of 1-8 turns whose replies are whole dictionary entries (max 1,024 tokens; median
~600 tokens; benchmarks/quality_tasks.py). Speed ratios depend on the data (padding, share of reply tokens), so
every claim names its data set.

(a) baseline: SFTTrainer on a `messages` dataset, written the way TRL's documentation shows (TRL's defaults:
    gradient checkpointing on, padding per batch, no packing, loss on every token since SmolLM2's template has no
    `{% generation %}` markers for `assistant_only_loss`), with the same model, LoRA rank and alpha, data,
    learning rate and schedule, batch size, maximum length, precision and seed as (b).
(b) library: `ChatSFTRecipe` set up from recipes/quickstart.yaml with the same numbers, trained by its trainer,
    once per compute dtype in --compute-dtypes (float32, and bf16 mixed precision where the CPU has it). The
    baseline computes in float32 on CPU, as TRL does there.

Utilisation is measured against the fastest matmul dtype of the device, measured in the same run (on CPU the faster
of float32 and bf16), so a recipe that leaves bf16 unused on a CPU that has it shows it.

Each run is a child process, so its peak memory is its own. Both are scored on the same held-out conversations
by the same function (`finetune.evaluation.perplexity`) every --eval-every steps, with the clock and the
memory watermark paused while scoring. Results: benchmarks/results/train_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OFFLINE, PeakMemory, machine, machine_markdown, matmul_tflops, plain_trl_trainer, write  # noqa: E402

os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("baseline", "library")
DATA = ("chatterbot", "sessions")


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Bundled alias, folder or Hub id.")
    parser.add_argument("--quantization", nargs="+", default=["4bit", "none"], choices=["4bit", "8bit", "none"])
    parser.add_argument("--steps", type=int, default=24, help="Optimizer steps per run.")
    parser.add_argument("--data", default="chatterbot", choices=DATA, help="Conversations to train on (see above).")
    parser.add_argument("--batch-size", type=int, help="Conversations per step (default 8; 4 for sessions).")
    parser.add_argument("--max-length", type=int, help="Tokens per conversation (default 256; 1,024 for sessions).")
    parser.add_argument(
        "--compute-dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="The library's runs: one per compute dtype (bfloat16 is left out where the CPU has no native bf16).",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("/tmp/finetune-quality/cache"), help="Downloaded Debian data (sessions)."
    )
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=4, help="Score the validation split every N steps.")
    parser.add_argument(
        "--validation-rows",
        type=int,
        help="Score only the first N validation conversations (default: all; 24 for sessions, whose long rows take "
        "~1.5 s each to score on 2 cores).",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="Extra recipe override, e.g. training.packing=false (the baseline reads the same numbers).",
    )
    parser.add_argument(
        "--levers",
        action="store_true",
        help="Instead of (a) vs (b): the recipe with all levers on vs each switched off in turn (results: levers.md).",
    )
    parser.add_argument("--name", help="Results file name under benchmarks/results/ (default: train_speed, or levers).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    long_chats = args.data == "sessions"
    args.batch_size = args.batch_size or (4 if long_chats else 8)
    args.max_length = args.max_length or (1024 if long_chats else 256)
    args.validation_rows = args.validation_rows or (24 if long_chats else None)
    return args


def recipe_overrides(args: argparse.Namespace, quantization: str, run_dir: Path) -> list[str]:
    data = [f"data.sources=[{{type: file, path: '{args.data_file}'}}]"] if args.data_file else []
    return [
        f"model.source={args.model}",
        f"model.quantization={quantization}",
        f"model.compute_dtype={args.dtype}",
        *data,
        f"lora.r={args.lora_r}",
        f"data.max_length={args.max_length}",
        f"training.max_steps={args.steps}",
        f"training.batch_size={args.batch_size}",
        "training.gradient_accumulation_steps=1",
        f"training.learning_rate={args.learning_rate}",
        f"training.logging_steps={args.steps}",
        # Validation runs in the harness (same function for both); one checkpoint, at the end.
        "training.keep_best=false",
        f"training.eval_steps={args.steps}",
        f"training.save_steps={args.steps}",
        f"output.dir={run_dir}",
        "output.overwrite=true",
        *args.overrides,
    ]


# ---------------------------------------------------------------- child: one run


class CountingCollator:
    """Wraps a collator to count, over every batch: positions computed, real tokens, loss-carrying tokens, and
    assistant-reply tokens (looked up by token ids in the library's own masks, which the baseline lacks)."""

    def __init__(self, collator: Any, split: Any) -> None:
        self.collator = collator
        self.replies = {
            tuple(ids): sum(label != -100 for label in labels)
            for ids, labels in zip(split["input_ids"], split["labels"])
        }
        self.positions = self.tokens = self.trained = self.assistant = self.unmatched = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(rows)
        self.positions += batch["input_ids"].numel()
        self.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        self.trained += int((batch["labels"][:, 1:] != -100).sum())
        for row in rows:
            count = self.replies.get(tuple(row["input_ids"]))
            self.unmatched += count is None
            self.assistant += count or 0
        return batch


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import DatasetDict
    from transformers import TrainerCallback

    from finetune import data, evaluation, model_source, models, planning, training
    from finetune.config import RecipeConfig
    from finetune.recipes import ChatSFTRecipe

    quantization = args.quantization[0]
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-"))
    config = RecipeConfig.from_yaml(ROOT / "recipes" / "quickstart.yaml", recipe_overrides(args, quantization, run_dir))
    on_cuda = torch.cuda.is_available()
    if args.child == "library":
        # The recipe's own setup (tokenizer, data splits and masks, model, LoRA, the memory planner's choice of
        # checkpointing) and trainer; validation is left to the harness.
        recipe = ChatSFTRecipe(config)
        recipe.setup()
        config = recipe.config  # as resolved by setup (the planner's checkpointing and batch decisions)
        tokenizer, splits, model = recipe.tokenizer, recipe.data.splits, recipe.model
        trainer = training.build_trainer(
            model,
            tokenizer,
            DatasetDict(train=splits["train"]),
            config.training,
            run_dir / "checkpoints",
            dtype=models.compute_dtype(config.model),
        )
        checkpointing = bool(config.training.gradient_checkpointing)
    else:
        # The same conversations and held-out split; the baseline loads its model itself, as TRL's documentation does.
        tokenizer = models.load_tokenizer(config.model)
        splits = data.prepare_data(config.data, tokenizer).splits
        train_cfg = config.training
        trainer = plain_trl_trainer(
            model_source.resolve(config.model),
            splits["train"]["messages"],
            run_dir / "baseline",
            quantization=config.model.quantization,
            max_steps=train_cfg.max_steps,
            batch_size=train_cfg.batch_size,
            learning_rate=train_cfg.learning_rate,
            lr_scheduler=train_cfg.lr_scheduler,  # same schedule as (b), so only the levers differ
            warmup_steps=math.ceil(train_cfg.warmup_ratio * train_cfg.max_steps),
            max_length=config.data.max_length,
            lora_r=config.lora.r,
            lora_alpha=config.lora.lora_alpha,
            lora_dropout=config.lora.dropout,
            seed=train_cfg.seed,
        )
        model = trainer.model
        # The harness scores (a) before training, in eval mode; without this, bitsandbytes would repack its 4-bit
        # weights for an inference kernel with no backward (see finetune.models.disable_4bit_cpu_repacking) and the
        # baseline would train broken. A script that never evaluates before training does not need it.
        models.disable_4bit_cpu_repacking(model)
        checkpointing = bool(trainer.args.gradient_checkpointing)
    validation = splits["validation"]
    if args.validation_rows:
        validation = validation.select(range(min(args.validation_rows, len(validation))))
    counter = CountingCollator(trainer.data_collator, splits["train"])
    trainer.data_collator = counter

    curve: list[dict[str, float]] = []
    memory: PeakMemory | None = None
    clock = {"train": 0.0, "since": 0.0}

    def score(step: int) -> None:
        losses = evaluation.perplexity(model, validation, pad_token_id=tokenizer.pad_token_id, batch_size=8)
        curve.append(
            {
                "step": step,
                "train_seconds": round(clock["train"], 2),
                "val_loss": round(math.log(losses["perplexity"]), 4),
                "val_loss_all_tokens": round(math.log(losses["perplexity_all_tokens"]), 4),
            }
        )

    class Curve(TrainerCallback):
        def on_train_begin(self, *a, **k):
            score(0)
            clock["since"] = time.perf_counter()
            memory.resume()

        def on_step_end(self, run_args, state, control, **k):
            if state.global_step % args.eval_every == 0 or state.global_step == state.max_steps:
                if on_cuda:
                    torch.cuda.synchronize()
                clock["train"] += time.perf_counter() - clock["since"]
                memory.pause()
                score(state.global_step)
                memory.resume()
                clock["since"] = time.perf_counter()

    trainer.add_callback(Curve())
    memory = PeakMemory()
    trainer.train()
    memory.pause()

    shape = planning.model_shape(config)
    return {
        "variant": args.child,
        # the baseline computes as TRL does: bf16 on a GPU, float32 on CPU
        "compute_dtype": (
            str(models.compute_dtype(config.model)).removeprefix("torch.")
            if args.child == "library"
            else ("bfloat16" if on_cuda else "float32")
        ),
        "quantization": quantization,
        "gradient_checkpointing": checkpointing,
        "steps": trainer.state.global_step,
        "train_seconds": round(clock["train"], 2),
        "positions": counter.positions,
        "tokens": counter.tokens,
        "trained_tokens": counter.trained,
        # None when the baseline's own tokenization of a conversation differs from the library's
        "assistant_tokens": counter.assistant if not counter.unmatched else None,
        "peak_rss_gib": round(memory.peak_rss / 1024**3, 3),
        "peak_cuda_gib": round(memory.peak_cuda / 1024**3, 3) if on_cuda else None,
        "val_loss": curve[-1]["val_loss"],
        "val_loss_all_tokens": curve[-1]["val_loss_all_tokens"],
        "validation_rows": len(validation),
        "curve": curve,
        "matmul_params": shape.matmul_params,
    }


# ---------------------------------------------------------------- parent: runs, ratios, tables


# Each lever switched off in turn (--levers), to measure what it is worth on its own against the recipe with all on.
LEVERS = [
    ("packing off (padded batches)", ["training.packing=false"]),
    ("output layer at every position", ["training.skip_untrained_logits=false"]),
    ("torch's dropout masks", ["lora.fast_dropout=false"]),
    ("gradient checkpointing on", ["training.gradient_checkpointing=true"]),
]


def run_child(
    args: argparse.Namespace,
    variant: str,
    quantization: str,
    argv: list[str],
    overrides: tuple[str, ...] = (),
    dtype: str = "float32",
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        sets = [item for override in overrides for item in ("--set", override)]
        data = ["--data-file", str(args.data_file)] if args.data_file else []
        command = [
            sys.executable,
            __file__,
            *argv,
            *sets,
            *data,
            "--quantization",
            quantization,
            "--child",
            variant,
            "--dtype",
            dtype,
            "--result",
            str(result),
        ]
        print(f"\n=== {variant} {dtype} {' '.join(overrides)}, quantization {quantization} ===", flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
        return json.loads(result.read_text())


def summarize(run: dict[str, Any], tflops: float) -> dict[str, Any]:
    seconds = run["train_seconds"]
    flops_per_token = (6 if run["gradient_checkpointing"] else 4) * run["matmul_params"]
    return {
        **run,
        "tokens_per_s": run["tokens"] / seconds,
        "trained_tokens_per_s": run["trained_tokens"] / seconds,
        "assistant_tokens_per_s": run["assistant_tokens"] / seconds if run["assistant_tokens"] is not None else None,
        "padding_share": 1 - run["tokens"] / run["positions"],
        "utilisation": run["tokens"] * flops_per_token / seconds / (tflops * 1e12),
    }


def time_to_reach(curve: list[dict[str, float]], target: float) -> float | None:
    """Training seconds at the first validation at or below `target` (no interpolation: conservative)."""
    return next((point["train_seconds"] for point in curve if point["step"] > 0 and point["val_loss"] <= target), None)


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    reached = time_to_reach(b["curve"], a["val_loss"])
    memory_key = "peak_cuda_gib" if a.get("peak_cuda_gib") else "peak_rss_gib"
    ratios = {
        "wall_time": b["train_seconds"] / a["train_seconds"],
        "tokens_per_s": b["tokens_per_s"] / a["tokens_per_s"],
        "trained_tokens_per_s": b["trained_tokens_per_s"] / a["trained_tokens_per_s"],
        "assistant_tokens_per_s": (
            b["assistant_tokens_per_s"] / a["assistant_tokens_per_s"]
            if a["assistant_tokens_per_s"] and b["assistant_tokens_per_s"]
            else None
        ),
        "peak_memory": b[memory_key] / a[memory_key],
        "time_to_baseline_val_loss": reached / a["train_seconds"] if reached is not None else None,
    }
    targets = {
        "time_to_baseline_val_loss <= 1/1.5": ratios["time_to_baseline_val_loss"] is not None
        and ratios["time_to_baseline_val_loss"] <= 1 / 1.5,
        # (a) carries loss on prompts too, so its loss-carrying rate counts tokens (b) deliberately leaves out;
        # both are reported, and the rate of assistant-reply tokens compares the same tokens in both.
        "loss-carrying tokens/s >= 1.5x": ratios["trained_tokens_per_s"] >= 1.5,
        "assistant-reply tokens/s >= 1.5x": (ratios["assistant_tokens_per_s"] or 0) >= 1.5,
        "peak_memory <= baseline": ratios["peak_memory"] <= 1.0,
        "utilisation >= 70%": b["utilisation"] >= 0.7,
    }
    return {"ratios": ratios, "targets": targets}


ROWS = [
    ("train_seconds", "wall time, training (s)", "{:.1f}"),
    ("tokens_per_s", "processed tokens/s", "{:.1f}"),
    ("trained_tokens_per_s", "trained (loss-carrying) tokens/s", "{:.1f}"),
    ("assistant_tokens_per_s", "assistant-reply tokens/s", "{:.1f}"),
    ("peak_rss_gib", "peak RSS (GiB)", "{:.2f}"),
    ("peak_cuda_gib", "peak GPU memory (GiB)", "{:.2f}"),
    ("val_loss", "validation loss, assistant tokens (end)", "{:.4f}"),
    ("val_loss_all_tokens", "validation loss, all tokens (end)", "{:.4f}"),
    ("utilisation", "utilisation of the matmul limit", "{:.1%}"),
    ("padding_share", "share of computed positions that are padding", "{:.1%}"),
]
RATIO_OF = {
    "train_seconds": "wall_time",
    "tokens_per_s": "tokens_per_s",
    "trained_tokens_per_s": "trained_tokens_per_s",
    "assistant_tokens_per_s": "assistant_tokens_per_s",
    "peak_rss_gib": "peak_memory",
    "peak_cuda_gib": "peak_memory",
}


def header(payload: dict[str, Any], title: str) -> list[str]:
    rates = ", ".join(f"{dtype} {tflops * 1000:.0f}" for dtype, tflops in payload["matmul_rates"].items())
    return [
        f"# {title}",
        "",
        machine_markdown(payload["machine"]),
        f"Measured matmul rates (1024x1024, GFLOP/s): {rates}; the limit utilisation is measured against is the "
        f"fastest, {payload['matmul_dtype']} ({payload['matmul_tflops'] * 1000:.0f} GFLOP/s).",
        "",
    ]


def row(label: str, cells: list[str]) -> str:
    return "| " + " | ".join([label, *cells]) + " |"


DATA_TEXT = {
    "chatterbot": "chatterbot-corpus conversations",
    "sessions": "multi-turn FOLDOC sessions (1-8 turns, whole dictionary entries as replies)",
}


def markdown(payload: dict[str, Any]) -> str:
    settings = payload["settings"]
    lines = [
        *header(payload, "Training speed: plain TRL script (a) vs finetune recipe, per compute dtype"),
        f"Data: **{settings['data']}**, {DATA_TEXT[settings['data']]}. Model `{settings['model']}`, LoRA "
        f"r={settings['lora_r']} on all linear layers, {settings['steps']} steps of {settings['batch_size']} "
        f"conversations (max {settings['max_length']} tokens), lr {settings['learning_rate']}. "
        f"Command: `{payload['command']}`.",
    ]
    for quantization, entry in payload["results"].items():
        runs = {label: run for label, run in entry.items() if label != "comparison"}
        labels = list(runs)
        libraries = [label for label in labels if label != "baseline"] if "baseline" in runs else []
        names = [
            f"({chr(97 + i)}) "
            + ("TRL baseline" if label == "baseline" else f"finetune, {runs[label]['compute_dtype']}")
            for i, label in enumerate(labels)
        ]
        ratio_names = [f"{chr(98 + i)}/a" for i in range(len(libraries))]
        lines += [
            "",
            f"## quantization: {quantization}",
            "",
            f"Validation: {runs[labels[0]].get('validation_rows', 'all')} held-out conversations, the same for every run."
            + (f" The baseline computes in {runs['baseline']['compute_dtype']}." if "baseline" in runs else ""),
            "",
            row("figure", names + ratio_names),
            "|---" * (1 + len(names) + len(ratio_names)) + "|",
        ]
        comparisons = entry.get("comparison", {})
        for key, label, fmt in ROWS:
            values = [runs[name].get(key) for name in labels]
            if all(v is None for v in values):
                continue
            cells = [fmt.format(v) if v is not None else "-" for v in values]
            ratios = [comparisons.get(name, {}).get("ratios", {}).get(RATIO_OF.get(key, "")) for name in libraries]
            cells += [f"{ratio:.2f}" if ratio is not None else "" for ratio in ratios]
            lines.append(row(label, cells))
        checkpointing = ["on" if runs[name]["gradient_checkpointing"] else "off" for name in labels]
        lines.append(row("gradient checkpointing", checkpointing + [""] * len(libraries)))
        if comparisons:
            reached = [comparisons[name]["ratios"]["time_to_baseline_val_loss"] for name in libraries]
            lines.append(
                row(
                    "time to the baseline's final validation loss",
                    [f"{runs['baseline']['train_seconds']:.1f} s", *[""] * len(libraries)]
                    + [f"{r:.2f}" if r is not None else "not reached" for r in reached],
                )
            )
            lines.append("")
            for name in libraries:
                targets = comparisons[name]["targets"]
                lines.append(
                    f"Targets, {name}: "
                    + ", ".join(f"{target}: {'met' if ok else 'NOT met'}" for target, ok in targets.items())
                    + "."
                )
        for name in labels:
            curve = ", ".join(
                f"{p['step']}: {p['val_loss']:.3f} @ {p['train_seconds']:.0f}s" for p in runs[name]["curve"]
            )
            lines.append(f"\nValidation curve ({name}; step: loss @ training seconds): {curve}")
    lines += [
        "",
        "Utilisation = processed tokens x FLOPs per token / time / the fastest measured matmul rate, with 4 FLOPs per",
        "matmul parameter and token (forward, and backward to the inputs; LoRA's own gradients are negligible), 6 with",
        "gradient checkpointing. Validation loss is the mean next-token loss on held-out assistant replies (what the",
        "recipe trains on); the all-token figure is what (a) trains on. Time to the baseline's loss counts training",
        "seconds up to the first validation of a recipe run at or below (a)'s final assistant-token loss.",
    ]
    return "\n".join(lines) + "\n"


def levers_markdown(payload: dict[str, Any]) -> str:
    settings = payload["settings"]
    lines = [
        *header(payload, "Training speed: each lever switched off in turn"),
        f"Data: **{settings['data']}**. The recipe (b) with every lever on, then with one switched off. Model `{settings['model']}`, LoRA r={settings['lora_r']}, "
        f"{settings['steps']} steps of {settings['batch_size']} conversations (max {settings['max_length']} tokens). "
        f"Command: `{payload['command']}`. The last column is what the lever is worth: time with it off / time with all on.",
    ]
    for quantization, entry in payload["results"].items():
        on = entry["all levers on"]
        lines += [
            "",
            f"## quantization: {quantization}",
            "",
            "| run | training (s) | processed tokens/s | peak RSS (GiB) | validation loss (end) | padding | time vs all on |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, run in entry.items():
            lines.append(
                f"| {label} | {run['train_seconds']:.1f} | {run['tokens_per_s']:.1f} | {run['peak_rss_gib']:.2f} | "
                f"{run['val_loss']:.4f} | {run['padding_share']:.0%} | {run['train_seconds'] / on['train_seconds']:.2f}x |"
            )
    lines += [
        "",
        "Validation loss: the same held-out replies for every run; dropout masks differ between runs, so it may move a little.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = arguments()
    if args.child:
        result = child(args)
        args.result.write_text(json.dumps(result))
        return
    import torch

    from finetune import precision

    on_cuda = torch.cuda.is_available()
    device = "cuda" if on_cuda else "cpu"
    info = machine()
    # The dtypes this device computes in natively: bf16 on a GPU (where float32 is no one's choice); on CPU float32,
    # and bf16 where the CPU has it. The limit is the fastest of their matmuls, measured now.
    native = ["bfloat16"] if on_cuda else ["float32", *(["bfloat16"] if precision.cpu_description()[1] else [])]
    rates = {name: matmul_tflops(getattr(torch, name), device) for name in native}
    limit_dtype = max(rates, key=rates.get)
    tflops = rates[limit_dtype]
    print(f"matmul rates (TFLOP/s): {rates}; limit {limit_dtype}", flush=True)
    dtypes = [dtype for dtype in args.compute_dtypes if dtype in native] or native
    if dtypes != args.compute_dtypes:
        print(f"compute dtypes run here: {dtypes} (no native bf16 on this CPU, or a GPU)", flush=True)
    if args.data == "sessions":
        args.data_file = sessions_file(args.cache)
    argv = _without(_without(sys.argv[1:], "--quantization"), "--compute-dtypes")
    results: dict[str, Any] = {}
    for quantization in args.quantization:
        entry: dict[str, Any] = {}
        if args.levers:
            dtype = dtypes[-1]
            entry["all levers on"] = summarize(run_child(args, "library", quantization, argv, dtype=dtype), tflops)
            for label, overrides in LEVERS:
                run = run_child(args, "library", quantization, argv, tuple(overrides), dtype=dtype)
                entry[label] = summarize(run, tflops)
            results[quantization] = entry
            continue
        if "baseline" in args.variants:
            entry["baseline"] = summarize(run_child(args, "baseline", quantization, argv), tflops)
        if "library" in args.variants:
            for dtype in dtypes:
                entry[f"library {dtype}"] = summarize(
                    run_child(args, "library", quantization, argv, dtype=dtype), tflops
                )
        if "baseline" in entry:
            entry["comparison"] = {
                label: compare(entry["baseline"], run) for label, run in entry.items() if label.startswith("library")
            }
        results[quantization] = entry
    payload = {
        "machine": info,
        "matmul_rates": rates,
        "matmul_tflops": tflops,
        "matmul_dtype": limit_dtype,
        "matmul_tflops_after": matmul_tflops(getattr(torch, limit_dtype), device),
        "command": " ".join(["python benchmarks/train_speed.py", *sys.argv[1:]]),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("child", "result", "out", "cache", "data_file", "dtype")
        },
        "results": results,
    }
    name = args.name or ("levers" if args.levers else "train_speed")
    json_path, md_path = write(name, payload, levers_markdown(payload) if args.levers else markdown(payload), args.out)
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path}")


def sessions_file(cache: Path) -> Path:
    """The multi-turn sessions as a messages JSONL file under `cache` (built once from the Debian FOLDOC package)."""
    from quality_tasks import sessions_task

    from finetune import atomic

    path = cache / "foldoc_sessions.jsonl"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        chats = sessions_task(cache)
        atomic.write_text(path, "".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    return path


def _without(argv: list[str], option: str) -> list[str]:
    """argv minus `option` and the values after it (the parent passes one quantization to each child)."""
    out, skipping = [], False
    for item in argv:
        if item == option:
            skipping = True
            continue
        if skipping and not item.startswith("--"):
            continue
        skipping = False
        out.append(item)
    return out


if __name__ == "__main__":
    main()
