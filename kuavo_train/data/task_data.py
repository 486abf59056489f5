"""Each stage's dataset on disk: open it with LeRobot, resolve its train/val
episodes, and check that every task's data fits one policy.

Problems become one-line `DataError`s naming the task config and the field,
raised before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kuavo_train.data.v21 import default_cache_dir, v3_view
from kuavo_train.errors import DataError, first_line  # re-exported: the data layer's error type

STATE_KEY = "observation.state"
ACTION_KEY = "action"




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
    # policy camera key -> the dataset key it is read from (config `cameras`, default: every RGB camera)
    camera_map: dict[str, str] | None = None

    @property
    def policy_cameras(self) -> tuple[str, ...]:
        return tuple(self.camera_map) if self.camera_map else self.camera_keys

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
    # a LeRobot v2.1 dataset is read through a v3.0 copy cached in $KUAVO_V30_CACHE or <dataset parent>/.v30
    root = v3_view(root, default_cache_dir(root), label=f"{field}.root")
    try:
        meta = LeRobotDatasetMetadata(stage.dataset.repo_id, root=root)
    except Exception as exc:  # LeRobot raises many kinds on a broken dataset
        raise DataError(f"data error: {field}.root: cannot read the LeRobot dataset at {root}: {first_line(exc)}") from None
    version = str(meta.info.codebase_version if hasattr(meta.info, "codebase_version") else meta.info["codebase_version"])
    if not version.startswith("v3"):
        raise DataError(f"data error: {field}.root: {root} is a LeRobot {version} dataset; convert it to v3.0 first")
    features = dict(meta.features)
    for key in (STATE_KEY, ACTION_KEY):
        if key not in features:
            raise DataError(f"data error: {field}.root: dataset {root} has no {key!r} feature")
    check_finite(root, meta, field)
    camera_map = resolve_cameras(stage, tuple(meta.camera_keys), root, where)
    cameras = tuple(camera_map.values())
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
    if stage.dataset.train_episodes is None:
        # the dataset's own train split (LeRobot writes train = every episode) minus the held-out ones
        train = tuple(e for e in train if e not in set(val))
        if not train:
            raise DataError(f"data error: {field}.train_episodes: no training episode left in {root} after the val episodes")
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
        camera_map=camera_map,
    )


def check_finite(root: Path, meta, field: str) -> None:
    """NaN or inf in a state or action value, or in their stats, would train a NaN model that reports
    success: refuse the dataset, naming the episode, frame and dim (numeric columns only: fast)."""
    import numpy as np
    import pyarrow.parquet as pq

    for key in (STATE_KEY, ACTION_KEY):
        for stat, value in (meta.stats or {}).get(key, {}).items():
            if not np.isfinite(np.asarray(value, dtype=np.float64)).all():
                raise DataError(f"data error: {field}.root: meta/stats.json of {root} has a non-finite {key} {stat}")
    for f in sorted((root / "data").glob("**/*.parquet")):
        try:
            t = pq.read_table(f, columns=[STATE_KEY, ACTION_KEY, "episode_index", "frame_index"])
        except Exception as exc:  # truncated or not parquet at all
            raise DataError(f"data error: {field}.root: cannot read {f}: {first_line(exc)} "
                            "(the file is damaged: copy or convert the dataset again)") from None
        for key in (STATE_KEY, ACTION_KEY):
            values = np.stack(t.column(key).to_numpy(zero_copy_only=False)).astype(np.float64)
            bad = ~np.isfinite(values)
            if bad.any():
                row, dim = (int(x[0]) for x in np.nonzero(bad))
                names = meta.features[key].get("names")
                flat = names if isinstance(names, list) else None
                dim_name = f" ({flat[dim]!r})" if flat and dim < len(flat) else ""
                raise DataError(
                    f"data error: {field}.root: {key} is {values[row, dim]} at episode "
                    f"{int(t.column('episode_index')[row].as_py())} frame {int(t.column('frame_index')[row].as_py())}, "
                    f"dim {dim}{dim_name}, in {f}: fix or drop that episode"
                )


def is_depth(key: str) -> bool:
    return "depth" in key.rsplit(".", 1)[-1] or key.startswith("observation.depth")


def resolve_cameras(stage, available: tuple[str, ...], root: Path, where: str) -> dict[str, str]:
    """Policy camera key -> dataset key, ordered by policy key. Default: every RGB camera under its
    own name (depth is opt-in).

    SmolVLA tells its cameras apart only by their place among the image inputs, so every stage
    (and so the final model) must feed them in one order, whatever order a dataset lists them
    in or a task config names them in: sorted by name."""
    field = f"stages.{stage.name}.cameras"
    chosen = getattr(stage, "cameras", None)
    if chosen is None:
        rgb = {k: k for k in sorted(available) if not is_depth(k)}
        if not rgb:
            raise DataError(f"data error: stages.{stage.name}.dataset.root: dataset {root} has no RGB camera "
                            f"(it has {list(available) or 'none'}; choose cameras in {where})")
        return rgb
    out = {}
    short = {k.rsplit(".", 1)[-1]: k for k in available}
    for policy_name, data_name in chosen.items():
        data_key = data_name if data_name in available else short.get(data_name)
        if data_key is None:
            raise DataError(f"data error: {field}.{policy_name}: task {stage.name} has no camera {data_name!r} "
                            f"(its dataset {root} has {[k.rsplit('.', 1)[-1] for k in available]})")
        key = policy_name if policy_name.startswith("observation.") else f"observation.images.{policy_name}"
        out[key] = data_key
    if not out:
        raise DataError(f"data error: {field}: no camera chosen for task {stage.name}")
    return dict(sorted(out.items()))


def _episode_lengths(meta, n: int) -> tuple[int, ...]:
    """Frames per episode, by episode index (from meta/episodes)."""
    eps = meta.episodes
    lengths = dict(zip((int(i) for i in eps["episode_index"]), (int(x) for x in eps["length"])))
    return tuple(lengths.get(i, 0) for i in range(n))


def check_compatible(tasks: list[TaskData]) -> None:
    """All stages train ONE policy: the same policy cameras and fps everywhere.

    State/action dims may differ: they are matched by name into one union space
    (kuavo_train/data/features.py), which also checks them against max_*_dim.
    Camera image sizes may differ too: SmolVLA resizes every image with padding.
    """
    ref = tasks[0]
    for t in tasks:
        field = f"stages.{t.name}.cameras"
        if set(t.policy_cameras) != set(ref.policy_cameras):
            raise DataError(
                f"data error: {field}: task {t.name} feeds the policy cameras {sorted(t.policy_cameras)}, task {ref.name} "
                f"{sorted(ref.policy_cameras)}: one policy needs the same cameras in every task (choose or rename them in "
                f"the task configs)"
            )
        if t.fps != ref.fps:
            raise DataError(f"data error: stages.{t.name}.dataset.root: fps {t.fps} differs from {ref.fps} of stage {ref.name}")
