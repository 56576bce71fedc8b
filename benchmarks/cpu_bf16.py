"""bf16 vs float32 training on this CPU: the quickstart recipe in each compute dtype, same data, same steps.

    .venv/bin/python benchmarks/cpu_bf16.py                        # 4-bit and unquantized, 24 steps each (~15 min)
    .venv/bin/python benchmarks/cpu_bf16.py --quantization 4bit --steps 48

Each arm is `recipes/quickstart.yaml` (SmolLM2-135M-Instruct, chatterbot, batch 8 x up to 256 tokens) with
`model.compute_dtype` set to float32 or bfloat16, run in a child process of its own, the arms of one quantization
back to back. Measured: training wall and process CPU seconds (evaluation excluded), seconds per step, and the
held-out perplexity of the test split after training (the recipe's own before/after scoring, every test
conversation). The probe `model.compute_dtype: auto` decides with (finetune.precision) is measured in the same run.
Results: benchmarks/results/NAME.{json,md} (NAME: cpu_bf16, or --name).
"""

from __future__ import annotations

import argparse
import json
import os
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
DTYPES = ("float32", "bfloat16")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quantization", nargs="+", default=["4bit", "none"], choices=["4bit", "none"])
    parser.add_argument("--steps", type=int, default=24, help="Optimizer steps per arm (the quickstart's 24).")
    parser.add_argument("--name", default="cpu_bf16", help="Results file name under benchmarks/results/.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def child(unit: Path) -> None:
    """One arm: the quickstart recipe in one dtype; writes its measurements into `unit`."""
    from finetune import ChatSFTRecipe, RecipeConfig

    arm = json.loads(unit.read_text())
    config = RecipeConfig.from_yaml(ROOT / "recipes" / "quickstart.yaml").with_overrides(
        {
            "model.quantization": arm["quantization"],
            "model.compute_dtype": arm["dtype"],
            "training.max_steps": arm["steps"],
            "training.eval_steps": arm["steps"],
            "evaluation.generation": False,
            "evaluation.safety": False,
            "output.dir": arm["run_dir"],
            "output.overwrite": True,
            "output.merge": False,
        },
        source="benchmarks/cpu_bf16.py",
    )
    recipe = ChatSFTRecipe(config)
    recipe.setup()
    cpu, wall = time.process_time(), time.perf_counter()
    outcome = recipe.train()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    comparison = recipe.evaluate_before_and_after()
    changes = {change.metric: change for change in comparison.changes}
    arm.update(
        train_wall_s=round(wall, 1),
        train_cpu_s=round(cpu, 1),
        wall_s_per_step=round(wall / arm["steps"], 3),
        final_train_loss=outcome.loss,
        perplexity_before=changes["perplexity"].before,
        perplexity_after=changes["perplexity"].after,
        test_rows=changes["perplexity"].rows,
    )
    unit.write_text(json.dumps(arm))


def main() -> None:
    args = arguments()
    if args.child:
        child(args.child)
        return
    from finetune import precision

    info = machine()
    probe = precision.measure_matmuls()
    arms: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cpu-bf16-") as work:
        for quantization in args.quantization:
            for dtype in DTYPES:
                unit = Path(work) / f"{quantization}-{dtype}.json"
                unit.write_text(
                    json.dumps(
                        {
                            "quantization": quantization,
                            "dtype": dtype,
                            "steps": args.steps,
                            "run_dir": str(Path(work) / f"run-{quantization}-{dtype}"),
                        }
                    )
                )
                print(f"=== {quantization}, {dtype}: {args.steps} steps", flush=True)
                subprocess.run([sys.executable, __file__, "--child", str(unit)], check=True)
                arms.append(json.loads(unit.read_text()))
    payload = {
        "machine": info,
        "probe": {**probe.__dict__, "speedup": round(probe.speedup, 2)},
        "auto_picks": precision.choose_compute_dtype("auto", cuda=False, probe=probe).name,
        "command": "python benchmarks/cpu_bf16.py " + " ".join(sys.argv[1:]),
        "arms": arms,
    }
    json_path, md_path = write(args.name, payload, markdown(payload), args.out)
    print(md_path.read_text())


def markdown(payload: dict[str, Any]) -> str:
    probe = payload["probe"]
    lines = [
        "# bf16 vs float32 training on CPU",
        "",
        machine_markdown(payload["machine"]),
        "",
        f"Matmul probe (finetune.precision, {probe['threads']} threads): float32 {probe['float32_gflops']} GFLOP/s, "
        f"bf16 {probe['bfloat16_gflops']} GFLOP/s ({probe['speedup']}x); native bf16 flags: "
        f"{', '.join(probe['native_bf16']) or 'none'}; `model.compute_dtype: auto` picks {payload['auto_picks']}.",
        "",
        f"`recipes/quickstart.yaml` in each compute dtype, same data, seed and steps. Command: `{payload['command']}`.",
        "",
        "| quantization | compute dtype | steps | training wall (s) | s/step | speed vs float32 | held-out perplexity "
        "before -> after | after vs float32 |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    reference = {arm["quantization"]: arm for arm in payload["arms"] if arm["dtype"] == "float32"}
    for arm in payload["arms"]:
        base = reference[arm["quantization"]]
        lines.append(
            f"| {arm['quantization']} | {arm['dtype']} | {arm['steps']} | {arm['train_wall_s']} | "
            f"{arm['wall_s_per_step']} | {base['train_wall_s'] / arm['train_wall_s']:.2f}x | "
            f"{arm['perplexity_before']:.3f} -> {arm['perplexity_after']:.3f} | "
            f"{arm['perplexity_after'] / base['perplexity_after']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
