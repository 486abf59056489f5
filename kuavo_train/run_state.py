"""`run.json`: which stages of a run are done and where their final checkpoints are."""

from __future__ import annotations

import json
from pathlib import Path

from kuavo_train.errors import KuavoError
from kuavo_train.files import write_json_atomic

RUN_FILE = "run.json"


class RunNotFoundError(KuavoError):
    """A folder that is not a kuavo_train run directory; `str()` is one line."""


class RunStateError(KuavoError):
    """A run.json that cannot be read."""


class ResumeSourceError(KuavoError):
    """A stage would start from an earlier stage's model that this run does not have."""


def check_resume_sources(cfg, stages_to_run: list, run_dir: Path) -> None:
    """Every stage that resumes from another stage's model (resume_from: task) needs that
    stage complete in `run.json` or trained earlier by this invocation; checked before
    anything is written."""
    state = RunState.load(run_dir)
    planned = [s.name for s in stages_to_run]
    for i, stage in enumerate(stages_to_run):
        if stage.resume_from != "task" or state.is_complete(stage.name):
            continue
        source = cfg.stage_by_id(stage.resume_task_id)
        if state.is_complete(source.name) or source.name in planned[:i]:
            continue
        where = f"{Path(run_dir) / RUN_FILE}" if (Path(run_dir) / RUN_FILE).is_file() else f"{run_dir} (no {RUN_FILE} yet)"
        raise ResumeSourceError(
            f"stages.{stage.name}.resume_task_id: stage {stage.name} starts from task {stage.resume_task_id} "
            f"({source.name})'s final model, which is not complete in {where} and not trained first by task={cfg.task}: "
            f"train it first (task=tasks/{source.name} or task=all) (in configs/policy/tasks/{stage.name}.yaml)"
        )


class RunState:
    def __init__(self, run_dir: Path, data: dict):
        self.run_dir = Path(run_dir)
        self.data = data

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            return cls(run_dir, {"stages": {}})
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:  # our writes are atomic: a hand edit, or another tool's copy
            raise RunStateError(f"{path} is damaged ({str(exc).splitlines()[0][:120]}): restore it, or choose "
                                "another run_dir") from None
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise RunStateError(f"{path} is not a kuavo_train run state (no \"stages\" object): restore it, or "
                                "choose another run_dir")
        return cls(run_dir, data)

    @classmethod
    def load_existing(cls, run_dir: Path) -> "RunState":
        if not (Path(run_dir) / RUN_FILE).is_file():
            raise RunNotFoundError(f"{run_dir} is not a kuavo_train run directory (no {RUN_FILE}; train first)")
        return cls.load(run_dir)

    def reload(self) -> None:
        """Re-read run.json (another process, the main one, may have written it)."""
        self.data = RunState.load(self.run_dir).data

    def save(self) -> None:
        write_json_atomic(self.run_dir / RUN_FILE, self.data)

    def stage(self, name: str) -> dict:
        return self.data["stages"].get(name, {})

    def is_complete(self, name: str) -> bool:
        return self.stage(name).get("status") == "complete"

    def final_checkpoint(self, name: str) -> Path | None:
        s = self.stage(name)
        return self.run_dir / s["final_checkpoint"] if s.get("status") == "complete" else None

    def recorded_path(self, path: str | Path) -> Path:
        """A path this run recorded, as seen from here. Relative paths are relative to the folder the
        run was started from: when one does not exist here, it is taken under that folder, which is
        this run folder's absolute path less the recorded `run_dir` (so `--run /abs/outputs/demo/run`
        finds `outputs/demo/datasets/...` from any directory)."""
        p = Path(path)
        if p.is_absolute() or p.exists():
            return p
        recorded = Path(self.data.get("config", {}).get("run_dir") or ".")
        here = self.run_dir.resolve().parts
        if recorded.parts and not recorded.is_absolute() and ".." not in recorded.parts \
                and here[-len(recorded.parts):] == recorded.parts:
            return Path(*here[:-len(recorded.parts)]) / p
        return p

    def recorded_config(self) -> dict:
        """The config this run recorded, its paths (datasets, base model, caches) as seen from here
        (`recorded_path`; kept as recorded where neither exists, e.g. a hub id) and run_dir this folder."""
        data = json.loads(json.dumps(self.data.get("config") or {}))

        def here(section: dict, key: str) -> None:
            if isinstance(section, dict) and isinstance(section.get(key), str):
                p = self.recorded_path(section[key])
                section[key] = str(p) if p.exists() else section[key]

        here(data, "data_root")
        for stage in (data.get("stages") or {}).values():
            here(stage.get("dataset"), "root")
        here(data.get("policy"), "pretrained_path")
        here(data.get("evaluation"), "base_row_dir")
        here(data.get("feature_cache"), "dir")
        data["run_dir"] = str(self.run_dir)
        return data

    def update_stage(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def global_step_offset(self, task_id: int) -> int:
        """Optimizer steps of the stages before `task_id` (x axis shared by all stages)."""
        return sum(s.get("total_steps", 0) for s in self.data["stages"].values() if s.get("task_id", 0) < task_id)

    def stage_starts(self) -> dict[str, int]:
        """Global step at which each stage that has begun starts, in training order, by stage name
        (a stage not begun yet has no start; the joint baseline's one stage starts at 0)."""
        stages = sorted(self.data["stages"].items(), key=lambda kv: kv[1].get("task_id", 0))
        return {name: self.global_step_offset(s.get("task_id", 0)) for name, s in stages if "task_id" in s}
