"""GGUF export: file size and held-out perplexity per quantization type, measured in llama.cpp itself.

    .venv/bin/python benchmarks/export_quality.py                          # makes a short quickstart run first
    .venv/bin/python benchmarks/export_quality.py --run-dir runs/quickstart

Each type is exported with `ChatSFTRecipe.export` (so every file passed the export's own checks), then llama.cpp
(llama-cpp-python) scores the run's held-out conversations with it: perplexity over the assistant tokens, the ones
training scores. The baseline is the run's merged/ model in transformers (float32) on the same tokens. Results:
benchmarks/results/export_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import math
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
    from finetune.config import ExportQuant, choices

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run-dir", type=Path, help="A finished run with merged/ (default: a 4-step quickstart run, made first)."
    )
    parser.add_argument("--quants", nargs="+", default=list(choices(ExportQuant)), choices=choices(ExportQuant))
    parser.add_argument("--rows", type=int, default=60, help="Held-out conversations scored.")
    parser.add_argument("--name", default="export_quality", help="Results file name under benchmarks/results/.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args()


def _nll(logits: Any, labels: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled next tokens (-100 = not scored) and how many there were."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)[:-1]
    targets = np.asarray(labels[1:])
    keep = targets != -100
    rows, targets = logits[keep], targets[keep]
    peak = rows.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    return float((log_norm - rows[np.arange(len(targets)), targets]).sum()), int(keep.sum())


def llama_cpp_perplexity(path: Path, rows: list[dict[str, Any]]) -> float:
    """In llama.cpp, run in a child process like every use of llama.cpp here (finetune.llama_cpp_runner)."""
    from finetune.llama_cpp_runner import score_gguf

    total, count = score_gguf(path, [(row["input_ids"], row["labels"]) for row in rows])
    return math.exp(total / count)


def transformers_perplexity(folder: Path, rows: list[dict[str, Any]]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            nll, n = _nll(logits.numpy(), row["labels"])
            total, count = total + nll, count + n
    return math.exp(total / count)


def main() -> None:
    args = arguments()
    from finetune import ChatSFTRecipe, FinetuneError
    from finetune.export import MARGIN

    info = machine()
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = ROOT / "runs" / "export-quality"
        started = time.perf_counter()
        ChatSFTRecipe.from_yaml(
            ROOT / "recipes" / "quickstart.yaml",
            [
                "training.max_steps=4",
                f"output.dir={run_dir}",
                "output.overwrite=true",
                "evaluation.before_and_after=false",
                "evaluation.generation=false",
            ],
        ).run()
        print(f"run made in {time.perf_counter() - started:.0f} s")
    recipe = ChatSFTRecipe.from_run_dir(run_dir)
    heldout = recipe.data.splits[recipe.heldout_split]
    rows = [
        {"input_ids": r["input_ids"], "labels": r["labels"]}
        for r in heldout.select(range(min(args.rows, len(heldout))))
    ]
    tokens = sum(sum(label != -100 for label in row["labels"][1:]) for row in rows)
    baseline = transformers_perplexity(recipe.folder.merged, rows)
    merged_bytes = sum(f.stat().st_size for f in recipe.folder.merged.glob("*.safetensors"))
    results = []
    for quant in args.quants:
        try:
            exported = recipe.export(quant=quant)
        except FinetuneError as exc:  # a type whose file fails the export's checks is a result too, not the end
            results.append({"quant": quant, "failed": str(exc)})
            print(f"{quant}: export failed its checks: {exc}")
            continue
        started = time.perf_counter()
        ppl = llama_cpp_perplexity(exported.path, rows)
        results.append(
            {
                "quant": quant,
                "size_bytes": exported.size_bytes,
                "perplexity": ppl,
                "perplexity_vs_merged": ppl / baseline,
                "export_seconds": exported.seconds,
                "scoring_seconds": round(time.perf_counter() - started, 1),
                "checks": exported.checks,
            }
        )
        print(f"{quant}: {exported.size_bytes / 2**20:.1f} MiB, perplexity {ppl:.4f} ({ppl / baseline:.4f} x merged)")
    payload = {
        "machine": info,
        "run_dir": str(run_dir),
        "base_model": recipe.config.model.source,
        "rows": len(rows),
        "scored_tokens": tokens,
        "merged": {"size_bytes": merged_bytes, "perplexity": baseline},
        "results": results,
    }
    table = [
        "| type | size (MiB) | vs merged/ size | held-out perplexity (llama.cpp) | vs merged/ | reload logit diff, x std (x twin) | llama.cpp vs transformers, x std (x twin) | export (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| merged/ (safetensors, float32, transformers) | {merged_bytes / 2**20:.1f} | 1.00 | {baseline:.4f} | 1.0000 | | | |",
    ]
    for r in results:
        if "failed" in r:
            table.append(f"| {r['quant']} | export refused: {r['failed']} | | | | | | |")
            continue
        checks = r["checks"]
        reload, runtime = checks["transformers_reload"], checks["llama_cpp_logits"]
        table.append(
            f"| {r['quant']} | {r['size_bytes'] / 2**20:.1f} | {r['size_bytes'] / merged_bytes:.2f} | {r['perplexity']:.4f} | "
            f"{r['perplexity_vs_merged']:.4f} | {reload['relative']:.4f} ({reload['relative'] / reload['rounding_twin']:.2f}) | "
            f"{runtime['relative']:.4f} ({runtime['relative'] / runtime['rounding_twin']:.2f}) | {r['export_seconds']:.0f} |"
        )
    markdown = (
        f"# GGUF export: size and held-out perplexity per type\n\n{machine_markdown(info)}\n\n"
        f"Run: {recipe.config.model.source} after a 4-step quickstart QLoRA run, merged in full precision; {len(rows)} held-out "
        f"conversations, {tokens} scored assistant tokens. Perplexity of each GGUF file measured in llama.cpp "
        f"(llama-cpp-python); merged/ in transformers on the same tokens. Logit differences are the export's own checks, "
        f"in units of the reference logits' standard deviation, and in brackets as a multiple of the rounding twin's "
        f"(the check fails past {MARGIN:g}).\n\n" + "\n".join(table) + "\n"
    )
    for path in write(args.name, payload, markdown, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
