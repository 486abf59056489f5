"""What a stage was trained with, kept in run.json, so that a finished stage is never reused
and an interrupted one never resumed under other settings."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from kuavo_train.config.schema import source_of
from kuavo_train.errors import KuavoError
from kuavo_train.files import hash_folder
from kuavo_train.run_state import RunState
from kuavo_train.strategies import strategy_class
from kuavo_train.strategies.base import strategy_source


class SettingsChangedError(KuavoError):
    """A stage of the run was trained (or begun) with other settings than the config's."""


# Keys that do not decide a stage's weights: paths, devices, speed, logging, checkpoints,
# validation and evaluation. Every other key of the config does, and so does the stage's
# own config, its learning rate and its sampling shares as the strategy plans them.
_NOT_TRAINING = ("run_dir", "data_root", "task", "stages", "validation", "checkpoint", "logging", "evaluation",
                 "feature_cache", "demo", "policy.device", "optimizer.fused", "dataloader.num_workers",
                 "dataloader.prefetch_factor", "dataloader.persistent_workers")


# Keys that do not decide a stage's weights but decide which of its checkpoints is `best`: the
# held-out set its own task's loss is measured on. An interrupted stage keeps them (its `best` so far
# was chosen on that set); a finished one may be validated otherwise afterwards.
_RESUME_ONLY = ("validation.validation_episodes", "validation.seed")


def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict) and data:
        out = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _ignored(key: str, ignored) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignored)


@functools.lru_cache(maxsize=8)
def _model_id(path: str) -> str:
    """A local model folder by its content (a digest of its files), a hub id as it is."""
    if not Path(path).is_dir():
        return path
    h = hashlib.sha256()
    hash_folder(h, path)
    return f"content sha256 {h.hexdigest()[:24]}"


def stage_settings(cfg, plan) -> dict:
    """{dotted key: value} of everything that decides what stage `plan` (a strategy's StagePlan)
    trains, as stored in run.json when the stage starts."""
    flat = {k: v for k, v in _flat(cfg.to_dict()).items() if not _ignored(k, _NOT_TRAINING) or k in _RESUME_ONLY}
    flat["strategy.name"] = strategy_class(cfg.strategy.name).name  # an alias trains the same
    flat["policy.pretrained_path"] = _model_id(str(cfg.policy.pretrained_path))  # moved or copied: the same
    stage = {k: v for k, v in _flat(dataclasses.asdict(plan.stage)).items() if k != "dataset.root"}
    flat.update({f"stages.{plan.stage.name}.{k}": v for k, v in stage.items()})
    flat[f"stages.{plan.stage.name}.planned_lr"] = plan.lr
    flat[f"stages.{plan.stage.name}.planned_shares"] = {str(t): w for t, w in plan.weights.items()}
    return json.loads(json.dumps(flat, default=str))  # as run.json gives it back


def check_settings(cfg, plans: list, run_dir: Path, processes: int = 1) -> None:
    """A stage that run.json has complete or begun keeps the settings it started with: a finished
    stage is reused, an interrupted one resumed, so other settings now would be silently mixed
    with the old ones. An interrupted one also keeps its number of processes: its steps per epoch,
    and so the epoch it resumes at, depend on it. Checked before anything is written."""
    from kuavo_train.training.checkpoint import is_complete

    state = RunState.load(run_dir)
    for plan in plans:
        if not state.is_complete(plan.stage.name) and not is_complete(Path(run_dir) / plan.dir_name / "checkpoints" / "last"):
            continue  # begun, but stopped before its first checkpoint: it starts again, with any settings
        begun_with = state.stage(plan.stage.name).get("processes")
        if not state.is_complete(plan.stage.name) and begun_with is not None and begun_with != processes:
            raise SettingsChangedError(
                f"stage {plan.stage.name} of {run_dir} was begun with {begun_with} process(es) and this launch has "
                f"{processes}: its steps per epoch, and so where it resumes, depend on the count; resume it with "
                f"{begun_with} (`accelerate launch --num_processes {begun_with}`, or no launcher for 1), then go on "
                "with any number")
        old = state.stage(plan.stage.name).get("settings")
        if old is None:  # not begun, or begun before run.json recorded settings
            continue
        new = stage_settings(cfg, plan)
        # Keys both sides have: a key added since keeps, by its default, what runs did before it.
        # The keys a user sets first, those derived from them (planned_*) last.
        compared = old.keys() & new.keys()
        if state.is_complete(plan.stage.name):
            compared -= set(_RESUME_ONLY)
        changed = sorted((k for k in compared if old[k] != new[k]), key=lambda k: (".planned_" in k, k))
        if not changed:
            continue
        key = changed[0]
        source = strategy_source(cfg.strategy.name) if key.startswith("strategy.") else source_of(key)
        done = "trained" if state.is_complete(plan.stage.name) else "begun"
        more = f" (and {len(changed) - 1} more setting(s))" if len(changed) > 1 else ""
        # an interrupted stage can begin again alone: the stages before it stay
        way_out = "delete this one" if done == "trained" else \
            f"delete {Path(run_dir) / plan.dir_name} to begin the stage again"
        raise SettingsChangedError(
            f"config error: {key}: stage {plan.stage.name} of {run_dir} was {done} with {old[key]!r}, this "
            f"config says {new[key]!r}{more}; a stage is never reused or resumed with other settings: choose "
            f"another run_dir, or {way_out} (in {source} or its overrides)")
