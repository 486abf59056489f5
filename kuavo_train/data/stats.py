"""One set of normalization statistics for every stage.

Re-fitting stats per stage shifts the meaning of every earlier task's inputs
and targets (a continual-VLA study measured success collapsing from 93.5% to
23.7%), so stats are computed once, from the per-episode stats LeRobot already
stored for each dataset's training episodes, aggregated with LeRobot's own
`aggregate_stats`, and saved into every checkpoint's processors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kuavo_train.data.task_data import ACTION_KEY, STATE_KEY, DataError, TaskData

# The run's one set of statistics, in the run directory.
STATS_FILE = "normalization_stats.json"

STAT_NAMES = ("min", "max", "mean", "std", "count")


def _episode_stats(task: TaskData, keys: tuple[str, ...]) -> list[dict]:
    import pandas as pd

    files = sorted((task.root / "meta" / "episodes").glob("**/*.parquet"))
    if not files:
        raise DataError(f"data error: stages.{task.name}.dataset.root: {task.root} has no meta/episodes/*.parquet")
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).set_index("episode_index")
    out = []
    for ep in task.train_episodes:
        row = df.loc[ep]
        ep_stats = {}
        for key in keys:
            cols = {s: f"stats/{key}/{s}" for s in STAT_NAMES}
            missing = [c for c in cols.values() if c not in df.columns]
            if missing:
                raise DataError(f"data error: stages.{task.name}.dataset.root: {task.root} lacks per-episode stats {missing[0]!r}")
            ep_stats[key] = {s: np.asarray(row[c], dtype=np.float64) for s, c in cols.items()}
        out.append(ep_stats)
    return out


def training_stats(tasks: list[TaskData], space=None, *, stats_from: str = "all_tasks") -> dict[str, dict[str, np.ndarray]]:
    """Aggregate state/action stats over the training episodes of the chosen tasks, in the union space.

    Each union dim is aggregated (with LeRobot's `aggregate_stats`) over the tasks that have
    it only: a task's absent dims are padding, not data. `first_task` takes each dim from the
    earliest task that has it.
    """
    from lerobot.datasets.compute_stats import aggregate_stats

    from kuavo_train.data.features import build_feature_space

    tasks = sorted(tasks, key=lambda t: t.task_id)
    if space is None:
        space = build_feature_space(tasks, max_state_dim=10**6, max_action_dim=10**6)
    per_task = {t.task_id: _episode_stats(t, (STATE_KEY, ACTION_KEY)) for t in tasks}
    out: dict[str, dict[str, np.ndarray]] = {}
    for key in (STATE_KEY, ACTION_KEY):
        dim = space.dim(key)
        result = {s: np.zeros(dim, dtype=np.float64) for s in STAT_NAMES if s != "count"}
        count = np.zeros(dim, dtype=np.float64)
        # group union dims by the tasks that own them, so each group aggregates over the same episodes
        owners: dict[tuple[int, ...], list[int]] = {}
        for u in range(dim):
            ids = tuple(t.task_id for t in tasks if u in space.index[t.task_id][key])
            owners.setdefault(ids, []).append(u)
        for ids, dims in owners.items():
            chosen = ids if stats_from == "all_tasks" else ids[:1]
            episodes = []
            for tid in chosen:
                pos = [space.index[tid][key].index(u) for u in dims]
                for ep in per_task[tid]:
                    episodes.append({key: {s: (v[pos] if s != "count" else v) for s, v in ep[key].items()}})
            agg = aggregate_stats(episodes)[key]
            for s in result:
                result[s][dims] = np.asarray(agg[s], dtype=np.float64).reshape(-1)
            count[dims] = float(np.asarray(agg["count"]).reshape(-1)[0])
        # LeRobot's stats carry one frame count per feature; a dim missing in some tasks has fewer.
        out[key] = {**{s: v.astype(np.float32) for s, v in result.items()}, "count": np.array([count.max()], dtype=np.float32)}
    return out


def stats_to_json(stats) -> dict:
    return {k: {s: v.tolist() for s, v in d.items()} for k, d in stats.items()}


def stats_from_json(data) -> dict:
    return {k: {s: np.asarray(v, dtype=np.float32) for s, v in d.items()} for k, d in data.items()}


def read_stats_file(path) -> dict:
    """A run's statistics file (`STATS_FILE`), as `stats_from_json` gives it; one-line DataError when
    it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data error: {path} is missing: a run's normalization statistics are written when its "
                        "training starts (train first, or restore the file)")
    try:
        stats = stats_from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, AttributeError) as exc:  # bad JSON, or not {key: {stat: numbers}}
        raise DataError(f"data error: {path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): "
                        "restore it; a new run_dir computes the statistics again") from None
    return stats
