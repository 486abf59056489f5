"""Datasets this project generates (demo world, MetaWorld experts) record how they were made."""

from __future__ import annotations

import json
from pathlib import Path


def made_with(root: Path, sidecar: str, params: dict) -> bool:
    """True when `root/meta/<sidecar>` records exactly these generation parameters (so it can be reused)."""
    meta = Path(root) / "meta" / sidecar
    if not meta.is_file():
        return False
    old = json.loads(meta.read_text())
    return all(old.get(k) == v for k, v in params.items())
