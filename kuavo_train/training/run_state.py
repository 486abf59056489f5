"""`run.json`: which stages of a run are done and where their final checkpoints are."""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_FILE = "run.json"


class RunNotFoundError(ValueError):
    """A folder that is not a kuavo_train run directory; `str()` is one line."""


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class RunState:
    def __init__(self, run_dir: Path, data: dict):
        self.run_dir = Path(run_dir)
        self.data = data

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        path = Path(run_dir) / RUN_FILE
        data = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
        return cls(run_dir, data)

    @classmethod
    def load_existing(cls, run_dir: Path) -> "RunState":
        if not (Path(run_dir) / RUN_FILE).is_file():
            raise RunNotFoundError(f"{run_dir} is not a kuavo_train run directory (no {RUN_FILE}; train first)")
        return cls.load(run_dir)

    def save(self) -> None:
        write_json_atomic(self.run_dir / RUN_FILE, self.data)

    def stage(self, name: str) -> dict:
        return self.data["stages"].get(name, {})

    def is_complete(self, name: str) -> bool:
        return self.stage(name).get("status") == "complete"

    def final_checkpoint(self, name: str) -> Path | None:
        s = self.stage(name)
        return self.run_dir / s["final_checkpoint"] if s.get("status") == "complete" else None

    def update_stage(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def global_step_offset(self, task_id: int) -> int:
        """Optimizer steps of the stages before `task_id` (x axis shared by all stages)."""
        return sum(s.get("total_steps", 0) for s in self.data["stages"].values() if s.get("task_id", 0) < task_id)
