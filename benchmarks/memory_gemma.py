"""Peak training memory on Gemma 3 270M (262k-token vocabulary) with the chunked loss against the whole logits.

    .venv/bin/python benchmarks/memory_gemma.py          # two runs of one step each (a few minutes on 2 cores)

The bundled Gemma 3 270M base with model.chat_template: chatml trains on conversations of the full data.max_length,
once with the loss in chunks (finetune.chunked_loss, the default) and once with every labelled position's logits at
once (the baseline, as before chunking), each in its own process, in the same session. Reported: peak resident
memory of the training phase (memory_plan.py's measurement) and the planner's estimate for each.
Results: benchmarks/results/memory_gemma.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, machine_markdown, write  # noqa: E402
from memory_plan import ROOT, child  # noqa: E402

OVERRIDES = [
    "model.source=gemma3-270m",
    "model.chat_template=chatml",
    "model.quantization=none",
    "lora.dropout=0",
    "training.batch_size=4",
    "data.max_length=256",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--child", choices=["chunked", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "whole":  # one chunk however many positions: the logits of every labelled position at once
            from finetune import planning

            planning.LOGITS_PER_CHUNK = 1 << 62
        args.result.write_text(json.dumps(child(OVERRIDES, args.steps)))
        return
    rows = {}
    for variant in ("whole", "chunked"):
        with tempfile.TemporaryDirectory() as folder:
            result = Path(folder) / "result.json"
            print(f"\n=== {variant} ===", flush=True)
            subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--result", str(result), "--child", variant],
                check=True,
                cwd=ROOT,
            )
            rows[variant] = json.loads(result.read_text())
        print(
            f"{variant}: measured {rows[variant]['measured_gib']:.2f} GiB, estimate {rows[variant]['estimate_gib']:.2f} GiB"
        )
    payload = {
        "machine": machine(),
        "overrides": OVERRIDES,
        "steps": args.steps,
        "rows": rows,
        "ratio": rows["chunked"]["measured_gib"] / rows["whole"]["measured_gib"],
    }
    write("memory_gemma", payload, markdown(payload))
    print(markdown(payload))


def markdown(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    lines = [
        "# Gemma 3 270M: peak training memory, chunked loss vs whole logits",
        "",
        machine_markdown(payload["machine"]),
        "",
        f"`gemma3-270m` base, `{' '.join(payload['overrides'][1:])}`, {payload['steps']} training step(s) on conversations of",
        "the full max_length (262,146-token vocabulary after the two ChatML tokens). Measured: peak resident memory of the",
        "training phase. Command: `python benchmarks/memory_gemma.py`.",
        "",
        "| loss | tokens per batch | logits at once (GiB, planner) | added tokens' rows (GiB, planner) | estimate (GiB) | measured (GiB) | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, label in (("whole", "whole logits (before)"), ("chunked", "chunked (default)")):
        row = rows[variant]
        parts = row["estimate"]
        lines.append(
            f"| {label} | {row['tokens']} | {parts['logits'] / 1024**3:.2f} | {parts.get('added tokens', 0) / 1024**3:.2f} "
            f"| {row['estimate_gib']:.2f} | {row['measured_gib']:.2f} | {row['estimate_gib'] / row['measured_gib'] - 1:+.0%} |"
        )
    lines += ["", f"Chunked / whole measured peak: {payload['ratio']:.2f}x."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
