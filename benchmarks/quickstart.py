"""The quickstart's numbers in README.md, taken from a real `make quickstart` run, never typed by hand.

    .venv/bin/python benchmarks/quickstart.py                    # runs recipes/quickstart.yaml, then records it
    .venv/bin/python benchmarks/quickstart.py --run-dir runs/quickstart   # records a run already made

Writes benchmarks/results/quickstart.json (the run's metrics.json without samples and history, its recipe.yaml, the
machine, the wall time) and rewrites README.md between its `quickstart-results` markers from that file. The test
tests/test_readme.py renders the block again from the committed JSON and fails if README.md differs, or if the
recorded recipe is not recipes/quickstart.yaml as it is now (numbers from an older recipe would be stale).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OFFLINE, machine  # noqa: E402

os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quickstart.json"
RECIPE = ROOT / "recipes" / "quickstart.yaml"
BEGIN = "<!-- quickstart-results: written by benchmarks/quickstart.py from benchmarks/results/quickstart.json -->"
END = "<!-- /quickstart-results -->"


def readme_block(record: dict[str, Any]) -> str:
    """The README's quickstart paragraph and table, exactly as the run printed its numbers."""
    from finetune.metrics.intervals import comparison_markdown, recorded_changes

    metrics = record["metrics"]
    fidelity = metrics.get("merge_fidelity") or {}
    merged = fidelity.get("full_precision")
    cpu = record["machine"]["cpu"]
    dtype = yaml.safe_load(record["recipe"])["model"].get("compute_dtype", "auto")  # as decided on that machine
    prompts = (metrics.get("safety") or {}).get("prompts") or {}
    safety = f", {min(prompts.values())} prompts of each safety set answered" if prompts else ""
    lines = [
        BEGIN,
        f"Its last recorded run ({cpu}, {record['machine']['cores']} cores, computing in {dtype}) took "
        f"{record['wall_seconds']:.0f} s: "
        f"training {metrics['train_seconds']:.0f} s on {metrics['train_rows']} conversations, evaluation "
        f"{metrics['evaluation_seconds']:.0f} s ({metrics['evaluation_rows']} held-out conversations scored, "
        f"{metrics['evaluation_generations']} replies generated{safety}, before and after), merge "
        f"{metrics['merge_seconds']:.0f} s. "
        "It printed this table (95% paired bootstrap intervals over the held-out rows; better or worse only where "
        "the interval excludes no change):",
        "",
        *comparison_markdown(recorded_changes(metrics)),
        "",
    ]
    if merged is not None:
        lines.append(
            f"These are the adapter on its 4-bit training base; the merged full-precision model in `merged/` scores "
            f"a held-out perplexity of {merged:.2f}."
        )
    lines.append(END)
    return "\n".join(lines)


def rewrite_readme(readme: Path, block: str) -> str:
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no quickstart-results markers")
    head, rest = text.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="A finished quickstart run (default: run it now).")
    args = parser.parse_args()
    from finetune import ChatSFTRecipe
    from finetune.run_folder import RunFolder

    wall = None
    run_dir = args.run_dir
    if run_dir is None:
        started = time.perf_counter()
        result = ChatSFTRecipe.from_yaml(RECIPE, ["output.overwrite=true"]).run()
        wall, run_dir = time.perf_counter() - started, result.run_dir
    folder = RunFolder(Path(run_dir))
    metrics = folder.read_metrics()
    for key in ("samples", "history"):
        metrics.pop(key, None)
    if wall is None:  # a run made earlier: from its log's first and last events
        events = [json.loads(line) for line in folder.train_log.read_text().splitlines()]
        wall = events[-1]["time"] - events[0]["time"]
    record = {
        "machine": machine(),
        "wall_seconds": round(wall, 1),
        "recipe": folder.recipe.read_text(encoding="utf-8"),
        "metrics": metrics,
    }
    RESULTS.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    readme = ROOT / "README.md"
    readme.write_text(rewrite_readme(readme, readme_block(record)), encoding="utf-8")
    print(f"wrote {RESULTS} and the quickstart block of {readme}")


if __name__ == "__main__":
    main()
