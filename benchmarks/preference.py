"""Held-out preferences at equal training time: each preference method's recipe (DPO, ORPO, SimPO, KTO) against a
plain TRL DPO + peft script.

    .venv/bin/python benchmarks/preference.py                    # greedy pairs, 4-bit, five arms (~1 h on 2 cores)
    .venv/bin/python benchmarks/preference.py --quantization none --budget 150 --arms plain dpo

Pairs come from data nobody here wrote: chatterbot-corpus conversations (exact duplicates removed), each one's real
last reply chosen over
  greedy     the base model's own greedy reply to the same prompt (plain transformers generate, float32 base, at
             most 64 new tokens; generated once and cached in --work, with the time it took)
  shuffled   the real last reply of another conversation, as the library pairs a source with `rejected: shuffled`
             (finetune.data.preference.load_preferences, run on each split's conversations on its own)
KTO trains on the same pairs unpaired: the chosen reply labelled true, the rejected one false.
Split by prompt after a seeded shuffle: every pair of a held-out prompt is held out, so no held-out pair, nor any
other reply to its prompt, is ever trained on. Only pairs whose both conversations fit 256 tokens are kept (no arm
drops or cuts any), and none whose replies are the same text.

(a) plain: TRL's DPOTrainer as TRL's documentation writes it: a conversational prompt/chosen/rejected dataset that
    TRL tokenizes itself, the model and tokenizer passed in, peft LoRA r=16, alpha 32, dropout 0.05 on all linear
    layers through `peft_config=`, and DPOConfig's defaults (beta 0.1, sigmoid loss, linear decay, no warmup,
    gradient checkpointing, a reference pass per step with the adapter switched off) except what CPU needs: use_cpu,
    bf16 off (as in the harness's plain SFT script), batch 4, and the learning rate of TRL's DPO script for LoRA
    (5e-6; trl/scripts/dpo.py).
(b) recipes: `finetune.PreferenceRecipe` with the library's defaults for each method; only the data (a JSONL file of
    the training pairs, no validation or test split: the benchmark holds its own out), data.max_length and
    model.quantization are set.

Equal time: each arm trains in a child process with one thread (OMP_NUM_THREADS=1) for the same budget of its own
process CPU time, counted from just before its trainer is built (so TRL's tokenization in (a) and the reference
log-probs the recipe computes for DPO and KTO count), model loading excluded. Each arm runs its own schedule over
the budget's seconds and saves its adapter at 1/4, 2/4, 3/4 and all of the budget (benchmarks/quality.py's callback).

Scoring is plain transformers + peft, no code of the library, the same for every arm: the base as trained on (NF4
for 4-bit, float32 for 32-bit) plus each saved adapter; for each held-out pair the mean per-token log-probability of
the chosen and of the rejected reply (its tokens after the prompt, end of turn included; quality_tasks.reply_nll).
Accuracy: share of pairs whose chosen reply scores higher; margin: mean of chosen minus rejected; perplexity: of the
chosen replies, token-weighted. Results: benchmarks/results/NAME.{json,md,png} (NAME: preference, or --name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# This checkout's finetune (not whichever one is installed), and the benchmarks beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_tasks
from _harness import OFFLINE, machine, machine_markdown, write
from quality import POINTS, budget_callback

os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
ROOT = Path(__file__).resolve().parents[1]
Chat = quality_tasks.Chat
Pair = dict[str, Any]  # {"prompt": messages, "chosen": text, "rejected": text}

MAX_LENGTH = 256  # 99%+ of chatterbot's conversations fit (benchmarks/quality.py)
MAX_NEW_TOKENS = 64  # the library's evaluation.max_new_tokens: replies as long as its evaluation generates
METHODS = ("dpo", "orpo", "simpo", "kto")
# The plain script; changing the recipe's defaults never changes it.
PLAIN = {
    "batch_size": 4,
    "learning_rate": 5e-6,
    "lr_scheduler": "linear",
    "warmup_ratio": 0.0,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "beta": 0.1,
    "loss": "sigmoid",
    "reference": "a pass per step, adapter off",
    "gradient_checkpointing": True,
    "seed": 42,
}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["greedy"], choices=["greedy", "shuffled"])
    parser.add_argument("--quantization", nargs="+", default=["4bit"], choices=["4bit", "none"])
    parser.add_argument(
        "--budget", type=float, default=240, help="Training budget per arm, seconds of its own CPU time."
    )
    parser.add_argument("--arms", nargs="+", default=["plain", *METHODS], choices=["plain", *METHODS])
    parser.add_argument(
        "--jobs", type=int, default=1, help="Arms trained at once, one thread each (the budget is CPU time)."
    )
    parser.add_argument(
        "--learning-rate", type=float, help="training.learning_rate of the recipe arms (default: the library's)."
    )
    parser.add_argument("--test-prompts", type=int, default=96, help="Prompts whose pairs are held out.")
    parser.add_argument("--name", default="preference", help="Results file name under benchmarks/results/.")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/finetune-preference"), help="Replies cache, adapters, per-run results."
    )
    parser.add_argument(
        "--report-only", action="store_true", help="Only rebuild the tables and plot from the runs in --work."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", choices=["train", "score"], help=argparse.SUPPRESS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--unit", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- pairs


def prompt_key(prompt: Chat) -> str:
    return json.dumps(prompt, sort_keys=True)


def distinct(chats: list[Chat]) -> list[Chat]:
    """The chats without exact duplicates (chatterbot's tech_support file repeats many), first occurrence kept."""
    seen: set[str] = set()
    out = []
    for chat in chats:
        key = json.dumps(chat, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(chat)
    return out


def fits(tokenizer: Any, prompt: Chat, reply: str, max_length: int = MAX_LENGTH) -> bool:
    chat = [*prompt, {"role": "assistant", "content": reply}]
    return len(quality_tasks.reply_tokens(tokenizer, chat)[0]) <= max_length


def split_by_prompt(chats: list[Chat], test_prompts: int, seed: int) -> tuple[list[Chat], list[Chat]]:
    """(train, test): the chats of `test_prompts` prompts drawn after a seeded shuffle are the test split; a prompt's
    chats are all in one split."""
    keys = sorted({prompt_key(chat[:-1]) for chat in chats})
    random.Random(seed).shuffle(keys)
    held = set(keys[:test_prompts])
    return [c for c in chats if prompt_key(c[:-1]) not in held], [c for c in chats if prompt_key(c[:-1]) in held]


def greedy_replies(
    model: Any, tokenizer: Any, prompts: list[Chat], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """The model's greedy reply to each prompt: plain transformers generate, left-padded batches, stopping at the
    model's end of turn; the reply text without special tokens, stripped."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = [
            tokenizer(
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True), add_special_tokens=False
            )["input_ids"]
            for p in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
            )
        replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return replies


def greedy_pairs(chats: list[Chat], replies: dict[str, str]) -> list[Pair]:
    """Each chat's real last reply chosen over the greedy reply to its prompt; none where the two are the same text
    or either is empty (the library drops those too, so every arm gets the same pairs)."""
    pairs = []
    for chat in chats:
        chosen, rejected = chat[-1]["content"].strip(), replies[prompt_key(chat[:-1])].strip()
        if chosen and rejected and chosen != rejected:
            pairs.append({"prompt": chat[:-1], "chosen": chosen, "rejected": rejected})
    return pairs


def shuffled_pairs(chats: list[Chat], folder: Path, seed: int) -> list[Pair]:
    """The pairs the library builds from these conversations for a source with `rejected: shuffled`."""
    from finetune.config import DataConfig, DataSource
    from finetune.data.preference import load_preferences
    from finetune.data.report import DataReport

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "conversations.jsonl"
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    source = DataSource(type="file", path=str(path), rejected="shuffled")
    rows = load_preferences(DataConfig(sources=[source], seed=seed), DataReport(), paired=True)
    return [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]} for row in rows]


def cached_greedy_replies(prompts: list[Chat], cache: Path) -> dict[str, Any]:
    """Greedy replies of the float32 base to every prompt, generated once (one thread) and kept in `cache`, with the
    CPU and wall time they took."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import model_source, models
    from finetune.config import ModelConfig

    path = models.weights_path(model_source.resolve(ModelConfig()))
    keys = sorted({prompt_key(p) for p in prompts})
    digest = hashlib.sha256(json.dumps([str(path), MAX_NEW_TOKENS, keys]).encode()).hexdigest()[:12]
    file = cache / f"greedy-replies-{digest}.json"
    if file.is_file():
        return json.loads(file.read_text())
    print(f"=== generating the base model's greedy replies to {len(keys)} prompts (once; cached in {file})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu, wall = time.process_time(), time.perf_counter()
    texts = greedy_replies(model, tokenizer, [json.loads(k) for k in keys], MAX_NEW_TOKENS)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    torch.set_num_threads(threads)
    capped = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) >= MAX_NEW_TOKENS - 1 for t in texts)
    record = {
        "model": str(path),
        "max_new_tokens": MAX_NEW_TOKENS,
        "prompts": len(keys),
        "cpu_seconds": round(cpu, 1),
        "wall_seconds": round(wall, 1),
        "threads": 1,
        "at_the_token_limit": capped,
        "replies": dict(zip(keys, texts)),
    }
    cache.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(record, indent=1))
    return record


def build_pairs(kind: str, tokenizer: Any, work: Path, test_prompts: int, seed: int = 0) -> dict[str, Any]:
    """Training and held-out pairs of one kind, and how they were made."""
    chats = distinct(quality_tasks.chatterbot_task(work / "cache"))
    read = len(chats)
    chats = [c for c in chats if fits(tokenizer, c[:-1], c[-1]["content"])]
    train_chats, test_chats = split_by_prompt(chats, test_prompts, seed)
    info: dict[str, Any] = {"conversations": read, "fitting": len(chats)}
    if kind == "greedy":
        generated = cached_greedy_replies([c[:-1] for c in chats], work / "cache")
        info["generation"] = {k: v for k, v in generated.items() if k != "replies"}
        train, test = greedy_pairs(train_chats, generated["replies"]), greedy_pairs(test_chats, generated["replies"])
    else:
        train = shuffled_pairs(train_chats, work / "cache" / "shuffled-train", seed)
        test = shuffled_pairs(test_chats, work / "cache" / "shuffled-test", seed)
    train = [p for p in train if fits(tokenizer, p["prompt"], p["rejected"])]
    test = [p for p in test if fits(tokenizer, p["prompt"], p["rejected"])]
    return {"train": train, "test": test, "info": info}


def conversational(pair: Pair) -> dict[str, Any]:
    """A pair in TRL's conversational preference format, which both the library and TRL read."""
    return {
        "prompt": pair["prompt"],
        "chosen": [{"role": "assistant", "content": pair["chosen"]}],
        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
    }


def unpaired(pairs: list[Pair]) -> list[dict[str, Any]]:
    """KTO's view of the pairs: each chosen reply labelled true, each rejected one false."""
    return [
        {"prompt": p["prompt"], "completion": [{"role": "assistant", "content": p[side]}], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]


# ---------------------------------------------------------------- scoring


def pair_rows(model: Any, tokenizer: Any, pairs: list[Pair], batch_size: int = 8) -> dict[str, list[float]]:
    """Per held-out pair: mean per-token log-prob of the chosen and of the rejected reply, and the chosen reply's
    summed NLL and token count (for perplexity); plain forward passes (quality_tasks.reply_nll)."""
    sides = {}
    for side in ("chosen", "rejected"):
        chats = [[*p["prompt"], {"role": "assistant", "content": p[side]}] for p in pairs]
        sides[side] = quality_tasks.reply_nll(model, tokenizer, chats, batch_size)
    return {
        "chosen_logp": [-total / count for total, count in sides["chosen"]],
        "rejected_logp": [-total / count for total, count in sides["rejected"]],
        "chosen_nll": [total for total, _ in sides["chosen"]],
        "chosen_tokens": [count for _, count in sides["chosen"]],
    }


def summary(rows: dict[str, list[float]]) -> dict[str, float]:
    """Accuracy (chosen above rejected), mean margin and mean log-probs of each side, perplexity of the chosen."""
    chosen, rejected = rows["chosen_logp"], rows["rejected_logp"]
    n = len(chosen)
    return {
        "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
        "chosen_logp": sum(chosen) / n,
        "rejected_logp": sum(rejected) / n,
        "perplexity": math.exp(sum(rows["chosen_nll"]) / sum(rows["chosen_tokens"])),
    }


def paired_interval(
    a: dict[str, list[float]], b: dict[str, list[float]], metric: str, draws: int = 2000
) -> list[float]:
    """95% paired bootstrap interval (over held-out pairs, seeded) of b's accuracy or margin minus a's."""
    import numpy as np

    def per_pair(rows: dict[str, list[float]]) -> Any:
        difference = np.array(rows["chosen_logp"]) - np.array(rows["rejected_logp"])
        return (difference > 0).astype(float) if metric == "accuracy" else difference

    delta = per_pair(b) - per_pair(a)
    picks = np.random.default_rng(0).integers(0, len(delta), size=(draws, len(delta)))
    means = delta[picks].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


# ---------------------------------------------------------------- child: train one arm


def _adapter_dtypes(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for param in model.parameters():
        if param.requires_grad:
            counts[str(param.dtype).replace("torch.", "")] = counts.get(str(param.dtype).replace("torch.", ""), 0) + 1
    return counts


def _dtype_probe() -> Any:
    """Records the dtypes of the trained weights when training starts (after the trainer has set them up)."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        dtypes: dict[str, int] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            self.dtypes = _adapter_dtypes(model)

    return Probe()


def _base_init(quantization: str) -> dict[str, Any]:
    import torch
    from transformers import BitsAndBytesConfig

    init: dict[str, Any] = {"dtype": torch.float32}
    if quantization == "4bit":
        init["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return init


def train_plain(unit: dict[str, Any], folder: Path, out: Path) -> tuple[Any, dict[str, Any], int]:
    """TRL's DPOTrainer as its documentation writes it (see the module docstring)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from finetune import model_source, models
    from finetune.config import ModelConfig

    path = models.weights_path(model_source.resolve(ModelConfig()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **_base_init(unit["quantization"]))
    rows = [json.loads(line) for line in (folder / "train_pairs.jsonl").read_text().splitlines()]
    probe = _dtype_probe()
    budget = budget_callback(
        unit["budget"],
        PLAIN["learning_rate"],
        PLAIN["warmup_ratio"],
        out,
        PLAIN["batch_size"],
        scheduler=PLAIN["lr_scheduler"],
        started=time.process_time(),
    )
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=str(out / "trainer"),
            per_device_train_batch_size=PLAIN["batch_size"],
            learning_rate=PLAIN["learning_rate"],
            max_steps=10**6,  # the budget callback stops training
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            report_to="none",
            seed=PLAIN["seed"],
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=PLAIN["lora_r"],
            lora_alpha=PLAIN["lora_alpha"],
            lora_dropout=PLAIN["lora_dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        callbacks=[budget, probe],
    )
    trainer.train()
    return budget, {**PLAIN, "adapter_dtypes": probe.dtypes}, len(trainer.train_dataset)


def train_recipe(unit: dict[str, Any], folder: Path, out: Path, method: str) -> tuple[Any, dict[str, Any], int]:
    """`PreferenceRecipe` with the library's defaults: only data, data.max_length and model.quantization set."""
    from finetune.config import RecipeConfig
    from finetune.recipes import PreferenceRecipe
    from finetune.training.preference import reference_mode

    data = folder / ("train_kto.jsonl" if method == "kto" else "train_pairs.jsonl")
    config = RecipeConfig.from_dict(
        {
            "name": f"preference-{method}",
            "method": method,
            "model": {"quantization": unit["quantization"]},
            "data": {
                "sources": [{"type": "file", "path": str(data)}],
                "max_length": unit["max_length"],
                "validation_split": 0.0,
                "test_split": 0.0,
            },
            # The budget callback stops training; the schedule's step count is never reached.
            "training": {"max_steps": 10**6}
            | ({"learning_rate": unit["learning_rate"]} if unit["learning_rate"] else {}),
            "output": {"dir": str(out / "run"), "overwrite": True},
        },
        source="benchmarks/preference.py",
    )
    recipe = PreferenceRecipe(config)
    recipe.setup()
    training = recipe.config.training
    probe = _dtype_probe()
    budget = budget_callback(
        unit["budget"],
        training.learning_rate,
        training.warmup_ratio,
        out,
        training.batch_size * training.gradient_accumulation_steps,
        scheduler=training.lr_scheduler,
        started=time.process_time(),
    )
    recipe.train(callbacks=[budget, probe])
    settings = {
        "batch_size": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler": training.lr_scheduler,
        "warmup_ratio": training.warmup_ratio,
        "lora_r": recipe.config.lora.r,
        "lora_alpha": recipe.config.lora.lora_alpha,
        "lora_dropout": recipe.config.lora.dropout,
        "beta": recipe.config.preference.beta_for(method),
        "loss": recipe.config.preference.loss if method == "dpo" else method,
        "reference": {
            "cached": "each row scored when first read, reused after",
            "precompute": "precomputed before training",
            "each_step": "a pass per step",
            None: "none",
        }[reference_mode(recipe.config)],
        "gradient_checkpointing": recipe.config.training.gradient_checkpointing,
        "adapter_dtypes": probe.dtypes,
    }
    return budget, settings, len(recipe.data.splits["train"])


def train_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    unit = json.loads((args.unit / "unit.json").read_text())
    out = args.unit / args.arm
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.arm == "plain":
        budget, settings, rows = train_plain(unit, args.unit, out)
    else:
        budget, settings, rows = train_recipe(unit, args.unit, out, args.arm)
    if len(budget.saved) < len(POINTS):
        raise SystemExit(f"{args.arm}: training ended after {budget.spent():.0f} s, before the budget")
    return {
        "arm": args.arm,
        "settings": settings,
        "train_rows": rows,
        "build_cpu_seconds": round(budget.build_seconds, 1),
        "points": budget.saved,
        "threads": torch.get_num_threads(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------- child: score every saved adapter


def score_child(args: argparse.Namespace) -> dict[str, Any]:
    """Plain transformers + peft: the base as trained on, then each adapter on it in turn."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import model_source, models
    from finetune.config import ModelConfig

    unit = json.loads((args.unit / "unit.json").read_text())
    test = [json.loads(line) for line in (args.unit / "test_pairs.jsonl").read_text().splitlines()]
    path = models.weights_path(model_source.resolve(ModelConfig()))
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, **_base_init(unit["quantization"]))
    started = time.process_time()
    scores = {"base": pair_rows(base, tokenizer, test)}
    print(f"  base: {summary(scores['base'])} ({time.process_time() - started:.0f} CPU s)", flush=True)
    for arm in unit["arms"]:
        run = json.loads((args.unit / arm / "result.json").read_text())
        for point in run["points"]:
            model = PeftModel.from_pretrained(base, point["adapter"])
            scores[point["adapter"]] = pair_rows(model, tokenizer, test)
            base = model.unload()  # the LoRA layers out again, the base weights untouched
            print(f"  {arm} @ {point['cpu_seconds']:.0f} s: {summary(scores[point['adapter']])}", flush=True)
    return scores


# ---------------------------------------------------------------- parent


def child(kind: str, unit: Path, arm: str | None = None) -> None:
    command = [sys.executable, __file__, "--child", kind, "--unit", str(unit), *(["--arm", arm] if arm else [])]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(unit / f"{kind}-{arm or 'all'}.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"{kind} {arm or ''} failed; see {unit}/{kind}-{arm or 'all'}.log")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_unit(args: argparse.Namespace, kind: str, quantization: str, pairs: dict[str, Any]) -> Path:
    unit = args.work / args.name / f"{kind}-{quantization}"
    unit.mkdir(parents=True, exist_ok=True)
    write_jsonl(unit / "train_pairs.jsonl", [conversational(p) for p in pairs["train"]])
    write_jsonl(unit / "train_kto.jsonl", unpaired(pairs["train"]))
    write_jsonl(unit / "test_pairs.jsonl", pairs["test"])
    (unit / "unit.json").write_text(
        json.dumps(
            {
                "pairs": kind,
                "quantization": quantization,
                "budget": args.budget,
                "max_length": MAX_LENGTH,
                "train_pairs": len(pairs["train"]),
                "test_pairs": len(pairs["test"]),
                "test_prompts": len({prompt_key(p["prompt"]) for p in pairs["test"]}),
                "made": pairs["info"],
                "arms": args.arms,
                "learning_rate": args.learning_rate,
                "jobs": args.jobs,
                "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                "command": command_line(),
            },
            indent=1,
        )
    )

    def train(arm: str) -> None:
        print(f"=== {kind} pairs, {quantization}: training {arm} for {args.budget:.0f} CPU seconds", flush=True)
        child("train", unit, arm)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(train, args.arms))
    print(f"=== {kind} pairs, {quantization}: scoring", flush=True)
    child("score", unit)
    (unit / "load_average_at_end.json").write_text(json.dumps([round(x, 2) for x in os.getloadavg()]))
    return unit


def collect(folder: Path) -> dict[str, Any]:
    """Every finished unit under the work folder: pairs -> quantization -> entry with each arm's curve."""
    results: dict[str, Any] = {}
    for unit_file in sorted(folder.glob("*/unit.json")):
        unit = json.loads(unit_file.read_text())
        scores_file = unit_file.parent / "scores.json"
        if not scores_file.is_file():
            continue
        scores = json.loads(scores_file.read_text())
        end_load = unit_file.parent / "load_average_at_end.json"
        entry = {key: unit[key] for key in ("train_pairs", "test_pairs", "test_prompts", "max_length", "made")} | {
            "budget_cpu_seconds": unit["budget"],
            "jobs": unit.get("jobs", 1),
            "load_average": {
                "start": unit.get("load_average_at_start"),
                "end": json.loads(end_load.read_text()) if end_load.is_file() else None,
            },
            "base": _rounded(summary(scores["base"])),
            "arms": {},
        }
        plain_rows = None
        if "plain" in unit["arms"]:
            plain_run = json.loads((unit_file.parent / "plain" / "result.json").read_text())
            plain_rows = [scores[p["adapter"]] for p in plain_run["points"]]
        for arm in unit["arms"]:
            run = json.loads((unit_file.parent / arm / "result.json").read_text())
            curve = [{"cpu_seconds": 0.0, "steps": 0, "rows_seen": 0} | _rounded(summary(scores["base"]))]
            for index, point in enumerate(run["points"]):
                rows = scores[point["adapter"]]
                entry_point = {
                    "cpu_seconds": point["cpu_seconds"],
                    "steps": point["steps"],
                    "rows_seen": point["conversations"],
                } | _rounded(summary(rows))
                if plain_rows is not None and arm != "plain":
                    entry_point["vs_plain"] = {
                        m: [round(x, 4) for x in paired_interval(plain_rows[index], rows, m)]
                        for m in ("accuracy", "margin")
                    }
                curve.append(entry_point)
            entry["arms"][arm] = {
                "settings": run["settings"],
                "train_rows": run["train_rows"],
                "build_cpu_seconds": run["build_cpu_seconds"],
                "wall_seconds": run["wall_seconds"],
                "curve": curve,
            }
        results.setdefault(unit["pairs"], {})[unit["quantization"]] = entry
    return results


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in values.items()}


def _label(arm: str) -> str:
    return "(a) plain TRL DPO" if arm == "plain" else f"(b) recipe {arm}"


def ahead(arm: dict[str, Any], plain: dict[str, Any], metric: str) -> bool:
    """Whether the arm is better than the plain script at a point: higher accuracy or margin, lower perplexity."""
    return arm[metric] < plain[metric] if metric == "perplexity" else arm[metric] > plain[metric]


def markdown(payload: dict[str, Any]) -> str:
    plain = payload["plain_settings"]
    lines = [
        "# Held-out preferences at equal training time: plain TRL DPO script (a) vs each preference recipe (b)",
        "",
        machine_markdown(payload["machine"])
        + " (Described when this table was built; the load while the arms ran, recorded per unit below, does not",
        "change their CPU-time budgets.)",
        "",
        "Equal time = the same budget of each arm's own **process CPU time, one thread each** (OMP_NUM_THREADS=1), "
        "counted from just before its trainer is built (TRL's tokenization in (a), every reference pass of "
        "every arm), model loading excluded. Pairs: chatterbot-corpus conversations, the "
        "real last reply chosen over the base model's own greedy reply (greedy) or another conversation's reply "
        "(shuffled, as the library builds them); KTO gets the same pairs unpaired (chosen: true, rejected: false). "
        "Held-out pairs are split by prompt and never trained on. Scored by plain transformers + peft on the base "
        "each adapter trained on (NF4 for 4-bit, float32 for 32-bit): a pair counts as right when the chosen reply's "
        "mean per-token log-probability is above the rejected one's; margin = mean of chosen minus rejected (nats per "
        "token); perplexity of the held-out chosen replies. Model: SmolLM2-135M-Instruct (bundled).",
        f"(a) plain TRL DPO: {_settings(plain)}, reference: {plain['reference']}, gradient checkpointing on, TRL's "
        "defaults otherwise (it tokenizes the conversational pairs itself). (b) recipes: the library's defaults per "
        "method; only data, data.max_length and model.quantization set. Commands: "
        + "; ".join(f"`{c}`" for c in payload["commands"])
        + ".",
    ]
    for kind, by_quantization in payload["results"].items():
        for quantization, entry in by_quantization.items():
            lines += _unit_markdown(kind, quantization, entry)
    lines += [
        "",
        f"Curves: [{payload['name']}.png]({payload['name']}.png). Seconds are each arm's process CPU time at the save "
        "(at or just past the quarter mark; the table rows are the quarter marks). Rows seen: pairs for (a), dpo, orpo "
        "and simpo; labelled replies for kto (two per pair).",
    ]
    return "\n".join(lines) + "\n"


def _unit_markdown(kind: str, quantization: str, entry: dict[str, Any]) -> list[str]:
    arms = entry["arms"]
    names = list(arms)
    made = entry["made"]
    base = entry["base"]
    load = entry["load_average"]
    lines = [
        "",
        f"## {kind} pairs, quantization {quantization}",
        "",
        f"{entry['train_pairs']} training / {entry['test_pairs']} held-out pairs ({entry['test_prompts']} held-out "
        f"prompts) from {made['conversations']} distinct chatterbot conversations ({made['fitting']} fit "
        f"{entry['max_length']} tokens). Budget {entry['budget_cpu_seconds']:.0f} CPU seconds per arm, "
        f"{entry['jobs']} arm(s) training at a time on one thread each. Load average "
        f"(1, 5, 15 min) {load['start']} at the start of this unit, {load['end']} at its end.",
    ]
    generation = made.get("generation")
    if generation:
        lines.append(
            f"Rejected replies: the float32 base's greedy replies to {generation['prompts']} prompts, at most "
            f"{generation['max_new_tokens']} new tokens ({generation['at_the_token_limit']} reached it), generated once "
            f"in {generation['cpu_seconds']:.0f} CPU seconds on one thread ({generation['wall_seconds']:.0f} s wall)."
        )
    lines += [
        "",
        f"Base model before training: accuracy {100 * base['accuracy']:.1f}%, margin {base['margin']:+.3f}, perplexity "
        f"{base['perplexity']:.2f}.",
        "",
        "| arm | settings | rows trained on | trainer build (CPU s) | adapter weights |",
        "|---|---|---|---|---|",
    ]
    for arm in names:
        settings = arms[arm]["settings"]
        dtypes = ", ".join(f"{n} {d}" for d, n in settings.get("adapter_dtypes", {}).items())
        lines.append(
            f"| {_label(arm)} | {_settings(settings)}, reference: {settings['reference']} | {arms[arm]['train_rows']} | "
            f"{arms[arm]['build_cpu_seconds']:.0f} | {dtypes} |"
        )
    for metric, title, show in (
        ("accuracy", "held-out preference accuracy, % (rows seen)", lambda v: f"{100 * v:.1f}"),
        ("margin", "mean margin, chosen minus rejected log-prob per token", lambda v: f"{v:+.3f}"),
        ("perplexity", "perplexity of the held-out chosen replies (lower is better)", lambda v: f"{v:.2f}"),
    ):
        lines += [
            "",
            f"**{title}**",
            "",
            "| CPU seconds | " + " | ".join(_label(a) for a in names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for index in range(len(POINTS) + 1):
            share = POINTS[index - 1] if index else 0.0
            cells = []
            for arm in names:
                point = arms[arm]["curve"][index]
                cell = show(point[metric]) + (f" ({point['rows_seen']})" if metric == "accuracy" and index else "")
                if index and arm != "plain" and "plain" in arms:
                    cell = cell if ahead(point, arms["plain"]["curve"][index], metric) else f"**{cell}**"
                cells.append(cell)
            row = f"{share * entry['budget_cpu_seconds']:.0f}" if index else "0 (base)"
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if "plain" in arms and len(names) > 1:
        lines += [
            "",
            "Bold: the recipe is not ahead of (a) at that point. Recipe minus (a), with the 95% paired bootstrap "
            "interval over held-out pairs:",
            "",
            "| method | "
            + " | ".join(f"{POINTS[i] * entry['budget_cpu_seconds']:.0f} s" for i in range(len(POINTS)))
            + " | ahead at every point (accuracy / margin / perplexity)? |",
            "|---|" + "---|" * len(POINTS) + "---|",
        ]
        for arm in names:
            if arm == "plain":
                continue
            cells, every = [], {m: True for m in ("accuracy", "margin", "perplexity")}
            for index in range(1, len(POINTS) + 1):
                point, reference = arms[arm]["curve"][index], arms["plain"]["curve"][index]
                for metric in every:
                    every[metric] &= ahead(point, reference, metric)
                low, high = point["vs_plain"]["accuracy"]
                m_low, m_high = point["vs_plain"]["margin"]
                cells.append(
                    f"accuracy {100 * (point['accuracy'] - reference['accuracy']):+.1f} pts [{100 * low:+.1f}, "
                    f"{100 * high:+.1f}]; margin {point['margin'] - reference['margin']:+.3f} [{m_low:+.3f}, "
                    f"{m_high:+.3f}]"
                )
            verdict = " / ".join("yes" if every[m] else "**no**" for m in every)
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def _settings(values: dict[str, Any]) -> str:
    return (
        f"LoRA r={values['lora_r']}, alpha {values['lora_alpha']:g}, dropout {values['lora_dropout']}, batch "
        f"{values['batch_size']}, lr {values['learning_rate']:g} {values['lr_scheduler']}, warmup "
        f"{values['warmup_ratio']}, beta {values['beta']:g}"
    )


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = [(kind, q, entry) for kind, by_q in payload["results"].items() for q, entry in by_q.items()]
    metrics = (("accuracy", "held-out accuracy"), ("margin", "mean margin (nats/token)"), ("perplexity", "chosen ppl"))
    figure, axes = plt.subplots(len(units), 3, figsize=(13, 3.4 * len(units)), squeeze=False)
    for row, (kind, quantization, entry) in enumerate(units):
        for column, (metric, label) in enumerate(metrics):
            axis = axes[row][column]
            for arm, run in entry["arms"].items():
                axis.plot(
                    [p["cpu_seconds"] for p in run["curve"]],
                    [p[metric] for p in run["curve"]],
                    marker="o",
                    linestyle="--" if arm == "plain" else "-",
                    label=_label(arm),
                )
            axis.set_title(f"{kind} pairs, {quantization}: {label}")
            axis.set_xlabel("training CPU seconds (1 thread)")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def command_line() -> str:
    return " ".join(["python benchmarks/preference.py", *sys.argv[1:]])


def report(args: argparse.Namespace) -> None:
    payload = {
        "name": args.name,
        "machine": machine(),
        "plain_settings": PLAIN,
        "results": collect(args.work / args.name),
    }
    units = sorted((args.work / args.name).glob("*/unit.json"))
    payload["commands"] = list(
        dict.fromkeys(json.loads(u.read_text()).get("command", command_line()) for u in units)
    ) or [command_line()]
    _, md_path = write(args.name, payload, markdown(payload), args.out)
    if payload["results"]:
        plot(payload, args.out / f"{args.name}.png")
    print(md_path.read_text())


def main() -> None:
    args = arguments()
    if args.child:
        result = train_child(args) if args.child == "train" else score_child(args)
        target = args.unit / args.arm / "result.json" if args.child == "train" else args.unit / "scores.json"
        target.write_text(json.dumps(result, indent=1))
        return
    if not args.report_only:
        from transformers import AutoTokenizer

        from finetune import model_source, models
        from finetune.config import ModelConfig

        tokenizer = AutoTokenizer.from_pretrained(models.weights_path(model_source.resolve(ModelConfig())))
        for kind in args.pairs:
            pairs = build_pairs(kind, tokenizer, args.work, args.test_prompts)
            for quantization in args.quantization:
                run_unit(args, kind, quantization, pairs)
                report(args)  # tables as each unit finishes
    report(args)


if __name__ == "__main__":
    main()
