"""One set of normalization statistics for every stage.

Re-fitting stats per stage shifts the meaning of every earlier task's inputs
and targets (a continual-VLA study measured success collapsing from 93.5% to
23.7%), so stats are computed once, from the per-episode stats LeRobot already
stored for each dataset's training episodes, aggregated with LeRobot's own
`aggregate_stats`, and saved into every checkpoint's processors.
"""

from __future__ import annotations

import numpy as np

from kuavo_train.data.task_data import ACTION_KEY, STATE_KEY, DataError, TaskData

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


def training_stats(tasks: list[TaskData], *, stats_from: str = "all_tasks") -> dict[str, dict[str, np.ndarray]]:
    """Aggregate state/action stats over the training episodes of the chosen tasks."""
    from lerobot.datasets.compute_stats import aggregate_stats

    chosen = tasks if stats_from == "all_tasks" else [min(tasks, key=lambda t: t.task_id)]
    per_episode = [s for t in chosen for s in _episode_stats(t, (STATE_KEY, ACTION_KEY))]
    stats = aggregate_stats(per_episode)
    return {k: {s: np.asarray(v, dtype=np.float32) for s, v in d.items()} for k, d in stats.items()}
