"""Datasets this project generates (demo world, MetaWorld experts) record how they were made."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The first episode seed of an evaluation (lerobot-eval's default --seed): the held-out scenes
# of generated datasets are numbered so that stock lerobot-eval's episodes land on them.
EVAL_START_SEED = 1000


def generator_processes() -> int:
    """Processes that generate data at once: one per core this process may use, at most two
    (rendering, simulation and LeRobot's writer are single-threaded Python)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(2, cores))


def made_with(root: Path, sidecar: str, params: dict) -> bool:
    """True when `root/meta/<sidecar>` records exactly these generation parameters (so it can be reused)."""
    return (Path(root) / "meta" / sidecar).is_file() and not changed_params(root, sidecar, params)


def changed_params(root: Path, sidecar: str, params: dict) -> list[str]:
    """`name old -> new` for each generation parameter `root/meta/<sidecar>` records otherwise."""
    meta = Path(root) / "meta" / sidecar
    old = json.loads(meta.read_text()) if meta.is_file() else {}
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in params.items() if old.get(k) != v]
