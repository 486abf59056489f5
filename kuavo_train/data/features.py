"""One policy over tasks whose state/action vectors differ: the union feature space.

Task 4 (sorting) walks: its action has the 16 arm/gripper dims of tasks 1-3
plus 4 base-command dims. One SmolVLA has one action vector, so the model's
state and action are the UNION of every task's named dims, in a fixed order:
the first task's names in its own order, then each later task's new names in
that task's order (task-id order). A task fills only its own dims; the others
are set to the union mean (0 after mean/std normalization) and masked out of
the loss, of the statistics and of the action error, and the inference wrapper
returns each task's own dims under its own names.

Dims are matched by the `names` LeRobot stores in `meta/info.json` (a joint
named after its URDF link, `zarm_l1_link`, is the joint `zarm_l1`). Datasets
without names match by position, which is only safe when every task has the
same size (checked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from kuavo_train.data.frames import ChunkedFrameDataset, VectorLayout
from kuavo_train.data.task_data import ACTION_KEY, STATE_KEY, DataError, TaskData

log = logging.getLogger(__name__)


def feature_names(feature: dict, key: str) -> list[str] | None:
    """The per-dim names of a 1-D feature (LeRobot stores a list, or a dict holding one list)."""
    names = feature.get("names")
    if isinstance(names, dict):
        lists = [v for v in names.values() if isinstance(v, (list, tuple))]
        names = lists[0] if len(lists) == 1 else None
    if not isinstance(names, (list, tuple)) or len(names) != int(feature["shape"][0]):
        return None
    names = [str(n) for n in names]
    return names if len(set(names)) == len(names) else None


@dataclass(frozen=True)
class FeatureSpace:
    """The union state/action of a run and where each task's dims sit in it."""

    names: dict[str, tuple[str, ...]]  # key -> union names
    index: dict[int, dict[str, tuple[int, ...]]]  # task id -> key -> union position of each own dim
    task_names: dict[int, dict[str, tuple[str, ...]]]  # task id -> key -> own names

    def dim(self, key: str) -> int:
        return len(self.names[key])

    def is_uniform(self) -> bool:
        """True when every task has every dim in union order (no scatter, no mask)."""
        return all(idx[k] == tuple(range(self.dim(k))) for idx in self.index.values() for k in self.names)

    def mask(self, task_id: int, key: str) -> np.ndarray:
        m = np.zeros(self.dim(key), dtype=bool)
        m[list(self.index[task_id][key])] = True
        return m

    def to_json(self) -> dict:
        return {"names": {k: list(v) for k, v in self.names.items()},
                "tasks": {str(t): {k: list(v) for k, v in d.items()} for t, d in self.task_names.items()}}


def build_feature_space(tasks: list[TaskData], *, max_state_dim: int, max_action_dim: int) -> FeatureSpace:
    """The union of the tasks' state and action names; one-line DataError when it cannot be formed."""
    tasks = sorted(tasks, key=lambda t: t.task_id)
    union: dict[str, list[str]] = {}
    index: dict[int, dict[str, tuple[int, ...]]] = {}
    own: dict[int, dict[str, tuple[str, ...]]] = {t.task_id: {} for t in tasks}
    for key, limit, limit_field in ((STATE_KEY, max_state_dim, "policy.max_state_dim"),
                                    (ACTION_KEY, max_action_dim, "policy.max_action_dim")):
        named = {t.task_id: feature_names(t.features[key], key) for t in tasks}
        sizes = {t.task_id: int(t.features[key]["shape"][0]) for t in tasks}
        if any(n is None for n in named.values()):
            # Without names only identical sizes can be matched (by position).
            ref = tasks[0]
            for t in tasks:
                if sizes[t.task_id] != sizes[ref.task_id]:
                    bad = t if named[t.task_id] is None else ref
                    raise DataError(
                        f"data error: stages.{bad.name}.dataset.root: {key} of {bad.root} has no per-dim names in "
                        f"meta/info.json, and its size {sizes[bad.task_id]} differs between tasks ({ref.name}: "
                        f"{sizes[ref.task_id]}, {t.name}: {sizes[t.task_id]}): name the dims to match them"
                    )
            names = [f"{key}_{i}" for i in range(sizes[ref.task_id])]
            named = {t.task_id: list(named[t.task_id] or names) for t in tasks}
            if any(named[t.task_id] != named[ref.task_id] for t in tasks):
                named = {t.task_id: names for t in tasks}
        same = {tid: [same_dim(n) for n in ns] for tid, ns in named.items()}
        if any(len(set(v)) < len(v) for v in same.values()):
            same = {tid: list(ns) for tid, ns in named.items()}
        _warn_unshared(tasks, same, key)
        order: list[str] = []  # the first spelling of each dim
        seen: list[str] = []
        for t in tasks:
            for n, m in zip(named[t.task_id], same[t.task_id]):
                if m not in seen:
                    seen.append(m)
                    order.append(n)
            own[t.task_id][key] = tuple(named[t.task_id])
        if len(order) > limit:
            raise DataError(
                f"data error: {limit_field}: the tasks need a {len(order)}-dim {key.rsplit('.', 1)[-1]} in all "
                f"({', '.join(f'{t.name}: {sizes[t.task_id]}' for t in tasks)}), more than {limit_field.split('.')[1]}={limit} "
                "(it would be cut silently)"
            )
        union[key] = order
        positions = {m: i for i, m in enumerate(seen)}
        for t in tasks:
            index.setdefault(t.task_id, {})[key] = tuple(positions[m] for m in same[t.task_id])
    return FeatureSpace(names={k: tuple(v) for k, v in union.items()}, index=index, task_names=own)


def same_dim(name: str) -> str:
    """The name dims are matched by. Leju's own converter names the arm dims after the arm's URDF
    links (zarm_l1_link), the robot's messages and ours after its joints (zarm_l1): one joint."""
    return name.removesuffix("_link")


def _warn_unshared(tasks: list[TaskData], same: dict[int, list[str]], key: str) -> None:
    """Tasks of one size that share under half of their dims by name are most likely the same
    joints named two ways (datasets from different converters); said, since it may be meant
    (one task on the left arm, one on the right)."""
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            x, y = same[a.task_id], same[b.task_id]
            if len(x) == len(y) and len(set(x) & set(y)) < len(x) / 2:
                log.warning("%s of tasks %s and %s: %d dims each, only %d with the same name (%s... against %s...): "
                            "dims are matched by name (meta/info.json); if they are the same joints, name them alike",
                            key, a.name, b.name, len(x), len(set(x) & set(y)), ", ".join(x[:2]), ", ".join(y[:2]))


def union_features(space: FeatureSpace, task: TaskData, camera_map: dict[str, str]) -> dict:
    """LeRobot-style feature dict of the policy: union state/action + cameras under their policy names."""
    feats = {}
    for key in (STATE_KEY, ACTION_KEY):
        feats[key] = {"dtype": "float32", "shape": (space.dim(key),), "names": list(space.names[key])}
    for policy_key, data_key in camera_map.items():
        feats[policy_key] = dict(task.features[data_key])
    return feats


def make_task_dataset(task: TaskData, episodes, chunk_size: int, space: FeatureSpace | None = None,
                      stats=None, cached_frames=None) -> ChunkedFrameDataset:
    """A task's samples in the run's union state/action space (padded with the union mean, masked)."""
    layouts = {}
    if space is not None and not space.is_uniform():
        for key in (STATE_KEY, ACTION_KEY):
            layouts[key] = VectorLayout(space.index[task.task_id][key], np.asarray(stats[key]["mean"], dtype=np.float32))
    return ChunkedFrameDataset(
        task.repo_id,
        task.root,
        episodes=list(episodes),
        chunk_size=chunk_size,
        camera_keys=list(task.camera_keys),
        camera_map=task.camera_map,
        state_key=STATE_KEY,
        action_key=ACTION_KEY,
        task=task.instruction,
        task_id=task.task_id,
        state_layout=layouts.get(STATE_KEY),
        action_layout=layouts.get(ACTION_KEY),
        cached_frames=cached_frames,
    )
