"""Checkpoints: telling complete ones from those cut short by a crash (`find_checkpoints`).

transformers writes the checkpoints themselves (adapter, optimizer, scheduler, RNG states, trainer state, whose step
count makes a resumed run skip the batches already consumed); this module only reads their folders.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# transformers writes trainer_state.json after the weights, optimizer, scheduler and RNG states, so a checkpoint
# whose trainer_state.json parses and names the folder's step was written to the end.
_CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoints of a run folder: the newest one a run can resume from, and those cut short by a crash."""

    latest: Path | None
    step: int  # of `latest`; 0 when there is none
    incomplete: list[Path] = field(default_factory=list)


def checkpoint_is_complete(folder: Path) -> bool:
    """Whether a checkpoint folder was written to the end: adapter weights, optimizer, scheduler, trainer state and RNG
    state are all there, and the trainer state's step matches the folder's name.

    Args:
        folder: A `checkpoint-N` folder.

    Returns:
        True when a run can resume from it.
    """
    match = _CHECKPOINT.match(folder.name)
    if not match or not all((folder / name).is_file() for name in _CHECKPOINT_FILES):
        return False
    if not any(folder.glob("rng_state*.pth")):
        return False
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == int(match.group(1))


def find_checkpoints(output_dir: Path) -> Checkpoints:
    """The checkpoints in a run's checkpoints/ folder: the newest complete one, and those that are not complete.

    Args:
        output_dir: The trainer's output folder (a run's checkpoints/); it may not exist.

    Returns:
        Checkpoints: `latest` (None when no complete one exists), its step, and the incomplete folders, oldest first.
    """
    folders = (
        [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if output_dir.is_dir() else []
    )
    folders.sort(key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))
    complete = [p for p in folders if checkpoint_is_complete(p)]
    latest = complete[-1] if complete else None
    return Checkpoints(
        latest=latest,
        step=int(_CHECKPOINT.match(latest.name).group(1)) if latest else 0,
        incomplete=[p for p in folders if p not in complete],
    )
