"""Where a training step spends its time in float32 and in bf16, and what candidate bf16 levers are worth.

    .venv/bin/python benchmarks/step_profile.py                    # 4-bit quickstart recipe, ~20 min on 2 cores
    .venv/bin/python benchmarks/step_profile.py --quantization none --rounds 4

1. Profile: the quickstart recipe (SmolLM2-135M-Instruct, chatterbot, batch 8 x up to 256 tokens) in each compute
   dtype, one child process each; torch.profiler records --profile-steps steps after --warmup steps and the table
   groups self CPU time by operator family (matrix products, attention, dtype casts, dropout masks, ...).
2. Levers, A/B in one process: the recipe in bf16 builds its trainer once, and every batch of a fixed set is run
   (forward and backward) under each lever in turn, the order reversed every round, so drift and other load on the
   machine fall on every variant alike. Reported: each lever's median per-batch time ratio to the recipe as it is,
   with the interquartile range. The levers are candidates, patched in here; a lever that pays goes into the library.
     float32 attention   sdpa runs in float32 under bf16 autocast (torch's bf16 flash-attention backward on CPU is
                         ~3x slower than float32's at 40-100 tokens per conversation)
     math attention      conversations under 256 tokens run sdpa's math backend (matrix products and a softmax),
                         which in bf16 took 0.71x the flash kernel's forward + backward at 8 x ~40 tokens and 0.73x
                         at 8 x ~100, standalone
     one input cast      each adapted layer casts its input to bf16 once, for the quantized layer and its adapter
                         (bitsandbytes casts the input to bf16 and its output back to float32, then autocast casts
                         the input again for LoRA)
     compiled layers     torch.compile of the decoder layer's forward (one compiled function for every layer, dynamic
                         shapes), fusing the elementwise work between matrix products; compiled in the warm-up
Results: benchmarks/results/step_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OFFLINE, machine, machine_markdown, write

os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
ROOT = Path(__file__).resolve().parents[1]
LEVERS = ("float32 attention", "math attention", "one input cast", "compiled layers")
# Operator families of the profile, matched on the operator's name in order (first match wins).
FAMILIES = (
    ("matrix products", ("aten::mm", "aten::bmm", "aten::addmm", "gemm_4bit")),
    ("attention (sdpa)", ("scaled_dot_product",)),
    ("dtype casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("dropout masks", ("aten::random_", "aten::ge", "aten::bitwise_and", "aten::bernoulli")),
    ("4-bit dequantization", ("dequantize",)),
    (
        "elementwise (mul, add, silu, norms, ...)",
        (
            "aten::mul",
            "aten::add",
            "aten::silu",
            "aten::pow",
            "aten::rsqrt",
            "aten::mean",
            "aten::div",
            "aten::neg",
            "aten::cat",
        ),
    ),
    ("loss (log-softmax)", ("log_softmax", "nll_loss")),
    ("optimizer", ("Optimizer.", "_foreach", "aten::sqrt", "aten::lerp")),
    ("allocation", ("aten::empty", "aten::fill_", "aten::zero")),
)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quantization", default="4bit", choices=["4bit", "8bit", "none"])
    parser.add_argument("--warmup", type=int, default=3, help="Steps before the profiler starts (kernels get built).")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--batches", type=int, default=6, help="Batches of the levers' A/B.")
    parser.add_argument("--rounds", type=int, default=8, help="Rounds of the levers' A/B (every batch, every lever).")
    parser.add_argument("--name", default="step_profile", help="Results file name under benchmarks/results/.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", choices=["profile", "levers"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def recipe(args: argparse.Namespace, steps: int, run_dir: str) -> Any:
    from finetune import ChatSFTRecipe, RecipeConfig

    config = RecipeConfig.from_yaml(ROOT / "recipes" / "quickstart.yaml").with_overrides(
        {
            "model.quantization": args.quantization,
            "model.compute_dtype": args.dtype,
            "training.max_steps": steps,
            "training.eval_steps": 10_000,
            "training.save_steps": 10_000,
            "evaluation.generation": False,
            "evaluation.safety": False,
            "output.dir": run_dir,
            "output.overwrite": True,
            "output.merge": False,
        },
        source="benchmarks/step_profile.py",
    )
    built = ChatSFTRecipe(config)
    built.setup()
    return built


def family(name: str) -> str:
    return next((label for label, keys in FAMILIES if any(key in name for key in keys)), "other")


def profile_child(args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """Profile --profile-steps training steps after --warmup, grouped by operator family and by operator."""
    import torch
    from transformers import TrainerCallback

    built = recipe(args, args.warmup + args.profile_steps, run_dir)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    walls: list[float] = []

    class Window(TrainerCallback):
        started = 0.0

        def on_step_begin(self, run_args, state, control, **kwargs):
            if state.global_step == args.warmup:
                profiler.start()
            self.started = time.perf_counter()

        def on_step_end(self, run_args, state, control, **kwargs):
            if state.global_step > args.warmup:
                walls.append(time.perf_counter() - self.started)
            if state.global_step == args.warmup + args.profile_steps:
                profiler.stop()

    built.train(callbacks=[Window()])
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    families: dict[str, float] = {}
    for event in events:
        name = family(event.key)
        families[name] = families.get(name, 0.0) + event.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "dtype": args.dtype,
        "steps": args.profile_steps,
        "wall_s_per_step_profiled": round(sum(walls) / len(walls), 3),
        "self_cpu_s": round(total / 1e6, 3),
        "families": {k: round(v / total, 4) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
        "top_operators": [
            {"name": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in top
        ],
    }


def levers_child(args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """Every batch under the recipe as it is and under each candidate lever, interleaved (see the docstring)."""
    import torch
    from datasets import DatasetDict
    from peft.tuners.lora import LoraLayer
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import finetune.training.speed as speed
    from finetune import models, training

    built = recipe(args, 1, run_dir)
    active = {lever: False for lever in LEVERS}
    plain_sdpa = speed.sdpa_attention_forward

    def sdpa(module, query, key, value, attention_mask, **kwargs):
        if active["float32 attention"] and torch.is_autocast_enabled(query.device.type):
            with torch.autocast(query.device.type, enabled=False):
                out, weights = plain_sdpa(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
            return out.to(torch.get_autocast_dtype(query.device.type)), weights
        if active["math attention"] and query.shape[2] < 256:
            with sdpa_kernel(SDPBackend.MATH):
                return plain_sdpa(module, query, key, value, attention_mask, **kwargs)
        return plain_sdpa(module, query, key, value, attention_mask, **kwargs)

    def cast_once(module, inputs):
        if active["one input cast"] and torch.is_autocast_enabled(inputs[0].device.type):
            return (inputs[0].to(torch.get_autocast_dtype(inputs[0].device.type)), *inputs[1:])
        return None

    speed.sdpa_attention_forward = sdpa  # the packed attention calls it per conversation
    layers = built.model.get_base_model().model.layers
    plain_forwards = [layer.forward for layer in layers]
    compiled_forward = torch.compile(type(layers[0]).forward, dynamic=True)  # compiles at its first call
    compiled_forwards = [compiled_forward.__get__(layer) for layer in layers]

    def use(variant: str) -> None:
        active.update({lever: lever == variant for lever in LEVERS})
        for layer, plain, compiled in zip(layers, plain_forwards, compiled_forwards):
            layer.forward = compiled if variant == "compiled layers" else plain

    for module in built.model.modules():
        if isinstance(module, LoraLayer):
            module.register_forward_pre_hook(cast_once)
    config = built.config
    trainer = training.build_trainer(
        built.model,
        built.tokenizer,
        DatasetDict(train=built.data.splits["train"]),
        config.training,
        Path(run_dir) / "checkpoints",
        dtype=models.compute_dtype(config.model),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, which this bypasses
    batches = [batch for _, batch in zip(range(args.batches), trainer.get_train_dataloader())]
    trainer.model.train()

    def step(batch: dict[str, Any]) -> float:
        started = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        trainer.model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    variants = ["as it is", *LEVERS]
    for batch in batches:  # warm-up: oneDNN builds its bf16 kernels on first use
        for variant in variants:
            use(variant)
            step(batch)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_ in range(args.rounds):
        for batch in batches:
            for variant in variants if round_ % 2 == 0 else variants[::-1]:
                use(variant)
                times[variant].append(step(batch))
    result = {"dtype": args.dtype, "pairs": len(times["as it is"]), "variants": {}}
    for variant, values in times.items():
        ratios = sorted(value / base for value, base in zip(values, times["as it is"]))
        quartile = len(ratios) // 4
        result["variants"][variant] = {
            "mean_s_per_batch": round(statistics.mean(values), 3),
            "median_ratio": round(statistics.median(ratios), 3),
            "iqr": [round(ratios[quartile], 3), round(ratios[-1 - quartile], 3)],
        }
    return result


def run_child(kind: str, dtype: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, __file__, *sys.argv[1:], "--child", kind, "--dtype", dtype, "--result", str(result)]
        print(f"\n=== {kind}, {dtype} ===", flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
        return json.loads(result.read_text())


def markdown(payload: dict[str, Any]) -> str:
    profiles, levers = payload["profiles"], payload["levers"]
    dtypes = list(profiles)
    lines = [
        "# Where a training step spends its time, float32 vs bf16; candidate bf16 levers",
        "",
        machine_markdown(payload["machine"]),
        "",
        f"`recipes/quickstart.yaml` with `model.quantization: {payload['quantization']}`. Command: `{payload['command']}`.",
        "",
        f"## Profile ({payload['profile_steps']} steps after {payload['warmup']}, torch.profiler, self CPU time)",
        "",
        "| operator family | " + " | ".join(dtypes) + " |",
        "|---" * (1 + len(dtypes)) + "|",
    ]
    families = list(dict.fromkeys(name for p in profiles.values() for name in p["families"]))
    for name in families:
        lines.append(f"| {name} | " + " | ".join(f"{profiles[d]['families'].get(name, 0):.1%}" for d in dtypes) + " |")
    lines.append(
        "| self CPU seconds, all steps | " + " | ".join(f"{profiles[d]['self_cpu_s']:.2f}" for d in dtypes) + " |"
    )
    lines.append(
        "| wall seconds per step (profiled) | "
        + " | ".join(f"{profiles[d]['wall_s_per_step_profiled']:.2f}" for d in dtypes)
        + " |"
    )
    for dtype in dtypes:
        top = ", ".join(f"{o['name']} {o['share']:.1%} ({o['calls']} calls)" for o in profiles[dtype]["top_operators"])
        lines += ["", f"Top operators, {dtype}: {top}."]
    lines += [
        "",
        f"## Candidate levers, {levers['dtype']} (A/B in one process, {levers['pairs']} batch pairs per lever)",
        "",
        "| variant | mean s per batch (forward + backward) | median per-batch time vs as it is | interquartile range |",
        "|---|---:|---:|---|",
    ]
    for variant, row in levers["variants"].items():
        lines.append(
            f"| {variant} | {row['mean_s_per_batch']:.3f} | {row['median_ratio']:.3f} | "
            f"{row['iqr'][0]:.3f}-{row['iqr'][1]:.3f} |"
        )
    lines += [
        "",
        "A lever is worth shipping when its median ratio is clearly below 1 (its interquartile range too).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = arguments()
    if args.child:
        with tempfile.TemporaryDirectory() as run_dir:
            result = (profile_child if args.child == "profile" else levers_child)(args, run_dir)
        args.result.write_text(json.dumps(result))
        return
    info = machine()
    profiles = {dtype: run_child("profile", dtype) for dtype in ("float32", "bfloat16")}
    levers = run_child("levers", "bfloat16")
    payload = {
        "machine": info,
        "quantization": args.quantization,
        "warmup": args.warmup,
        "profile_steps": args.profile_steps,
        "command": " ".join(["python benchmarks/step_profile.py", *sys.argv[1:]]),
        "profiles": profiles,
        "levers": levers,
    }
    json_path, md_path = write(args.name, payload, markdown(payload), args.out)
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path}")


if __name__ == "__main__":
    main()
