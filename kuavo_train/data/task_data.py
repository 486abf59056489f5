"""Each stage's dataset on disk: open it with LeRobot, resolve its train/val
episodes, and check that every task's data fits one policy.

Problems become one-line `DataError`s naming the task config and the field,
raised before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE_KEY = "observation.state"
ACTION_KEY = "action"


class DataError(ValueError):
    """Bad or missing data; `str()` is the one line shown to the user."""


@dataclass(frozen=True)
class TaskData:
    task_id: int
    name: str
    instruction: str
    repo_id: str
    root: Path
    fps: int
    features: dict
    camera_keys: tuple[str, ...]
    train_episodes: tuple[int, ...]
    val_episodes: tuple[int, ...]
    dataset_tasks: tuple[str, ...]
    episode_lengths: tuple[int, ...] = ()

    @property
    def num_train_frames(self) -> int:
        return sum(self.episode_lengths[e] for e in self.train_episodes)

    @property
    def state_dim(self) -> int:
        return int(self.features[STATE_KEY]["shape"][0])

    @property
    def action_dim(self) -> int:
        return int(self.features[ACTION_KEY]["shape"][0])


def _split_range(spec: str) -> range:
    lo, hi = spec.split(":")
    return range(int(lo), int(hi))


def open_task_data(stage, *, config_file: str | None = None) -> TaskData:
    """Open `stage.dataset` with LeRobot's metadata reader and resolve its episode split."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    where = config_file or f"configs/policy/tasks/{stage.name}.yaml"
    field = f"stages.{stage.name}.dataset"
    root = Path(stage.dataset.root)
    if not (root / "meta" / "info.json").is_file():
        raise DataError(
            f"data error: {field}.root: no LeRobot dataset at {root} (missing meta/info.json; set the root in {where} "
            "or data_root; `make demo` generates the demo datasets)"
        )
    try:
        meta = LeRobotDatasetMetadata(stage.dataset.repo_id, root=root)
    except Exception as exc:  # LeRobot raises many kinds on a broken dataset
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data error: {field}.root: cannot read the LeRobot dataset at {root}: {first}") from None
    version = str(meta.info.codebase_version if hasattr(meta.info, "codebase_version") else meta.info["codebase_version"])
    if not version.startswith("v3"):
        raise DataError(f"data error: {field}.root: {root} is a LeRobot {version} dataset; convert it to v3.0 first")
    features = dict(meta.features)
    for key in (STATE_KEY, ACTION_KEY):
        if key not in features:
            raise DataError(f"data error: {field}.root: dataset {root} has no {key!r} feature")
    cameras = tuple(meta.camera_keys)
    if not cameras:
        raise DataError(f"data error: {field}.root: dataset {root} has no camera feature")
    n = meta.total_episodes
    splits = dict(getattr(meta.info, "splits", None) or {})

    def resolve(name: str, explicit, default: range | None) -> tuple[int, ...]:
        if explicit is not None:
            eps = range(explicit[0], explicit[1])
        elif name in splits:
            eps = _split_range(splits[name])
        elif default is not None:
            eps = default
        else:
            raise DataError(
                f"data error: {field}.{name}_episodes: dataset {root} has no {name!r} split; give [first, last) in {where}"
            )
        if eps.stop > n:
            raise DataError(f"data error: {field}.{name}_episodes: {list((eps.start, eps.stop))} exceeds the {n} episodes of {root}")
        if len(eps) == 0:
            raise DataError(f"data error: {field}.{name}_episodes: no episodes selected in {root}")
        return tuple(eps)

    val = resolve("val", stage.dataset.val_episodes, None)
    train_default = range(0, n) if "train" not in splits else None
    train = resolve("train", stage.dataset.train_episodes, train_default)
    if "train" not in splits and stage.dataset.train_episodes is None:
        train = tuple(e for e in train if e not in set(val))
    overlap = set(train) & set(val)
    if overlap:
        raise DataError(
            f"data error: {field}.val_episodes: episodes {sorted(overlap)[:5]} are in both train and val of {root}: validation must be held out"
        )
    tasks = tuple(str(t) for t in meta.tasks.index) if meta.tasks is not None else ()
    return TaskData(
        task_id=stage.task_id,
        name=stage.name,
        instruction=stage.instruction,
        repo_id=stage.dataset.repo_id,
        root=root,
        fps=int(meta.fps),
        features=features,
        camera_keys=cameras,
        train_episodes=train,
        val_episodes=val,
        dataset_tasks=tasks,
        episode_lengths=_episode_lengths(meta, n),
    )


def _episode_lengths(meta, n: int) -> tuple[int, ...]:
    """Frames per episode, by episode index (from meta/episodes)."""
    eps = meta.episodes
    lengths = dict(zip((int(i) for i in eps["episode_index"]), (int(x) for x in eps["length"])))
    return tuple(lengths.get(i, 0) for i in range(n))


def check_compatible(tasks: list[TaskData], *, max_state_dim: int, max_action_dim: int) -> None:
    """All stages train ONE policy: same cameras, dims and fps everywhere, dims within the max."""
    ref = tasks[0]
    for t in tasks:
        field = f"stages.{t.name}.dataset.root"
        if t.state_dim > max_state_dim:
            raise DataError(
                f"data error: policy.max_state_dim: {t.root} has a {t.state_dim}-dim state, more than max_state_dim={max_state_dim} (it would be cut silently)"
            )
        if t.action_dim > max_action_dim:
            raise DataError(
                f"data error: policy.max_action_dim: {t.root} has a {t.action_dim}-dim action, more than max_action_dim={max_action_dim}"
            )
        for key in (STATE_KEY, ACTION_KEY):
            if tuple(t.features[key]["shape"]) != tuple(ref.features[key]["shape"]):
                raise DataError(
                    f"data error: {field}: {key} shape {tuple(t.features[key]['shape'])} differs from "
                    f"{tuple(ref.features[key]['shape'])} in {ref.root} (stage {ref.name})"
                )
        if t.camera_keys != ref.camera_keys:
            raise DataError(
                f"data error: {field}: cameras {list(t.camera_keys)} differ from {list(ref.camera_keys)} of stage {ref.name}"
            )
        for cam in t.camera_keys:
            if tuple(t.features[cam]["shape"]) != tuple(ref.features[cam]["shape"]):
                raise DataError(
                    f"data error: {field}: camera {cam} shape {tuple(t.features[cam]['shape'])} differs from "
                    f"{tuple(ref.features[cam]['shape'])} of stage {ref.name}"
                )
        if t.fps != ref.fps:
            raise DataError(f"data error: {field}: fps {t.fps} differs from {ref.fps} of stage {ref.name}")
