"""Replay: mix the current task with earlier ones by configured shares (spec 3.1).

`ProportionalReplaySampler` is a seeded torch Sampler over a ConcatDataset of
per-task datasets. It is keyed by task id (not by list position, a defect of
the spec's snippet) and every index it yields is a real index (the snippet
ignored the index and drew at random, which breaks shuffling, resuming and
distributed sharding).

What an epoch is: every training frame of the CURRENT task exactly once, plus
replayed frames of earlier tasks so that the shares match the weights, i.e.
`round(n_current / w_current)` samples. Per-task quotas are exact (largest
remainder), the frames within a task are drawn without replacement (cycling
through fresh permutations when a quota exceeds the task's size) and the
order is shuffled, all from `(seed, stage, epoch)`: the same epoch always
yields the same order, which is what makes resume-after-crash exact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Sampler


def epoch_quotas(task_sizes: dict[int, int], weights: dict[int, float], current_task: int, total: int | None = None) -> dict[int, int]:
    """Samples per task in one epoch (largest-remainder rounding of the shares)."""
    w = {t: weights[t] for t in sorted(weights) if weights[t] > 0}
    s = sum(w.values())
    w = {t: v / s for t, v in w.items()}
    if total is None:
        total = int(round(task_sizes[current_task] / w[current_task]))
    raw = {t: total * v for t, v in w.items()}
    quotas = {t: int(np.floor(r)) for t, r in raw.items()}
    left = total - sum(quotas.values())
    for t in sorted(raw, key=lambda t: (-(raw[t] - quotas[t]), t))[:left]:
        quotas[t] += 1
    return quotas


def steps_per_epoch(samples: int, batch_size: int, drop_last: bool, num_processes: int = 1) -> int:
    """Optimizer steps of an epoch of `samples` split over `num_processes` (at least one)."""
    steps = samples // batch_size if drop_last else -(-samples // batch_size)
    return max(1, steps // num_processes)


class ProportionalReplaySampler(Sampler[int]):
    def __init__(
        self,
        task_ids: list[int],
        task_sizes: list[int],
        weights: dict[int, float],
        *,
        current_task: int,
        seed: int,
        stage: int,
        samples_per_epoch: int | None = None,
    ):
        if len(task_ids) != len(task_sizes):
            raise ValueError("task_ids and task_sizes differ in length")
        unknown = [t for t in weights if weights[t] > 0 and t not in task_ids]
        if unknown:
            raise ValueError(f"replay weights name tasks without data: {unknown}")
        self.task_ids = list(task_ids)
        self.offsets = dict(zip(task_ids, np.cumsum([0, *task_sizes[:-1]]).tolist()))
        self.sizes = dict(zip(task_ids, task_sizes))
        self.quotas = epoch_quotas(self.sizes, weights, current_task, samples_per_epoch)
        self.seed, self.stage, self.epoch = seed, stage, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.quotas.values())

    def plan(self, epoch: int) -> np.ndarray:
        """The global indices of epoch `epoch`, in order."""
        rng = np.random.default_rng([self.seed, self.stage, epoch])
        chunks = []
        for t in sorted(self.quotas):
            q, n = self.quotas[t], self.sizes[t]
            reps = -(-q // n)
            local = np.concatenate([rng.permutation(n) for _ in range(reps)])[:q]
            chunks.append(local + self.offsets[t])
        order = np.concatenate(chunks)
        return order[rng.permutation(len(order))]

    def __iter__(self):
        return iter(self.plan(self.epoch).tolist())

    def task_of(self, global_index: int) -> int:
        for t in reversed(self.task_ids):
            if global_index >= self.offsets[t]:
                return t
        raise IndexError(global_index)


def mixed_dataset(datasets: list[torch.utils.data.Dataset]) -> ConcatDataset:
    return ConcatDataset(datasets)
