"""README.md's quickstart numbers are a real run's, and that run used the quickstart recipe as it is now."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quickstart  # noqa: E402

# Settings a run records as decided (gradient checkpointing: auto -> the planner's choice; the compute dtype: auto ->
# this machine's, finetune.precision), as given on the command line to replace an old run, or only observing it
# (trackers read the metrics, change none).
_DECIDED_OR_OVERRIDDEN = (
    "training.gradient_checkpointing",
    "model.compute_dtype",
    "output.overwrite",
    "training.report_to",
    "training.logging_dir",
)


def _flat(node, prefix=""):
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def test_readme_quickstart_block_is_rendered_from_the_recorded_run():
    record = json.loads(quickstart.RESULTS.read_text())
    readme = (ROOT / "README.md").read_text()
    assert quickstart.readme_block(record) in readme, (
        "README.md's quickstart block differs from benchmarks/results/quickstart.json: run "
        "`.venv/bin/python benchmarks/quickstart.py` (or edit nothing between the markers by hand)"
    )


def test_the_recorded_run_used_the_quickstart_recipe_as_it_is_now():
    from finetune.config import RecipeConfig

    record = json.loads(quickstart.RESULTS.read_text())
    recorded = _flat(
        RecipeConfig.from_dict(yaml.safe_load(record["recipe"]), source="recorded").model_dump(mode="json")
    )
    current = _flat(RecipeConfig.from_yaml(quickstart.RECIPE).model_dump(mode="json"))
    differences = {
        key: (recorded.get(key), current.get(key))
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key) and not key.startswith(_DECIDED_OR_OVERRIDDEN)
    }
    assert not differences, (
        f"recipes/quickstart.yaml (or a default) changed since README's numbers were recorded: {differences}. "
        "Rerun `.venv/bin/python benchmarks/quickstart.py`."
    )
