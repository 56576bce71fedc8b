"""The run manifest: `write_manifest(run_dir)` records in run.json what a reader needs to trust and reproduce the run."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from finetune import atomic
from finetune.hub.card import REPRODUCE
from finetune.hub.provenance import base_model, data_sources, library_versions, mtime, now, sha256
from finetune.run_folder import MANIFEST, MODEL_CARD, RECIPE, RunFolder

# Written into the weight folders by the card and the manifest; the manifest hashes everything else.
_DESCRIPTIVE_FILES = (MODEL_CARD, MANIFEST, RECIPE)


def write_manifest(run_dir: str | Path) -> Path:
    """Write `run.json` at the run root and a copy (with `recipe.yaml`) into `adapter/` and `merged/`.

    Records what a reader needs to trust and reproduce the run: library versions, sha256 of the data files and of
    every weight and config file, the recipe, the metrics, timestamps, Python and platform.

    Args:
        run_dir: A finished run folder (recipe.yaml and metrics.json).

    Returns:
        The path of the root run.json.

    Raises:
        FinetuneError: The folder has no recipe.yaml, or no metrics.json (the run did not finish).
    """
    run = RunFolder(Path(run_dir))
    config, metrics = run.read_config(), run.read_metrics()
    weights = run.adapter / "adapter_model.safetensors"
    manifest = {
        "manifest_version": 1,
        "name": config.name,
        "written_at": now(),
        "finished_at": mtime(run.metrics),
        "adapter_saved_at": mtime(weights) if weights.is_file() else None,
        "train_seconds": metrics.get("train_seconds"),
        "trackers": metrics.get("trackers") or {},
        "reproduce": REPRODUCE,
        "base_model": base_model(config),
        "data": data_sources(config),
        "files": _file_hashes(run),
        "metrics": {
            key: metrics.get(key)
            for key in (
                "train_loss",
                "merge_strategy",
                "merge_max_logit_diff",
                "merge_fidelity",
                "metrics_before",
                "metrics_after",
            )
        },
        "recipe": config.model_dump(mode="json"),
        "libraries": library_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    atomic.write_text(run.manifest, text)
    for folder in run.weight_folders:
        if folder.is_dir():
            atomic.write_text(folder / MANIFEST, text)
            atomic.copy_file(run.recipe, folder / RECIPE)
    return run.manifest


def _file_hashes(run: RunFolder) -> dict[str, dict[str, Any]]:
    files = [run.recipe, run.metrics]
    for folder in run.weight_folders:
        files += [
            p
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not (p.parent == folder and p.name in _DESCRIPTIVE_FILES)
        ]
    return {
        p.relative_to(run.path).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in files
        if p.is_file()
    }
