"""Atomic file writes: the one helper every layer uses, so that a crash or a full disk leaves
the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; when the block ends without error it is renamed to
    `path`, otherwise removed. For writers that want a file name (savefig, safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def hash_file(h, path: str | Path, chunk: int = 1 << 20) -> None:
    """Feed a file's bytes into the hash `h` a chunk at a time: the digest of reading it whole,
    without holding a base model's weights (about 1 GB for smolvla_base) in memory."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


def hash_folder(h, folder: str | Path) -> None:
    """Feed every file under `folder` (relative path, then bytes; sorted) into the hash `h`."""
    folder = Path(folder)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        hash_file(h, f)
