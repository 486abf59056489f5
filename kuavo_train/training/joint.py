"""The `joint` baseline: one model trained on all tasks at once (the usual upper bound).

To be a fair comparison it gets the SAME number of optimizer steps as the
`sequential_spec` recipe would spend on the same data: we count the steps of
every sequential stage (replay included) and spread them over as many epochs
as the sequential stages have in total, each epoch mixing all tasks by their
share of training frames.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from kuavo_train.config.schema import RunConfig, StageConfig
from kuavo_train.data.replay import epoch_quotas

JOINT_STAGE = "joint"


@dataclass(frozen=True)
class JointPlan:
    stage: StageConfig
    samples_per_epoch: int
    sequential_steps: int


def steps_per_epoch(samples: int, batch_size: int, drop_last: bool, num_processes: int = 1) -> int:
    steps = samples // batch_size if drop_last else math.ceil(samples / batch_size)
    return max(1, steps // num_processes)


def sequential_total_steps(cfg: RunConfig, task_sizes: dict[int, int], num_processes: int = 1) -> int:
    """Optimizer steps of the whole `sequential_spec` run on these datasets."""
    spec = dataclasses.replace(cfg, strategy="sequential_spec")
    total = 0
    for stage in spec.ordered_stages():
        weights = spec.replay_weights_for(stage)
        samples = sum(epoch_quotas({t: task_sizes[t] for t in weights}, weights, stage.task_id).values())
        total += steps_per_epoch(samples, cfg.dataloader.batch_size, cfg.dataloader.drop_last, num_processes) * stage.max_epoch
    return total


def joint_plan(cfg: RunConfig, task_sizes: dict[int, int], num_processes: int = 1) -> JointPlan:
    stages = cfg.ordered_stages()
    first, last = stages[0], stages[-1]
    total = sequential_total_steps(cfg, task_sizes, num_processes)
    epochs = sum(s.max_epoch for s in stages)
    per_epoch_steps = math.ceil(total / epochs)
    stage = dataclasses.replace(
        first,
        name=JOINT_STAGE,
        task_id=last.task_id,  # validates and records every task, like the last sequential stage
        instruction="",
        max_epoch=epochs,
        resume_from="pretrained",
        resume_task_id=None,
        optimizer_lr=cfg.lr_for(first),
        # Stage 1's cosine would end after stage 1's length and leave the rest at decay_lr:
        # decay over the whole joint run instead (LeRobot's scheduler shrinks it if shorter).
        scheduler_decay_steps=max(first.scheduler_decay_steps, total),
        replay_weights={t: float(n) for t, n in task_sizes.items()},
    )
    samples = per_epoch_steps * cfg.dataloader.batch_size * num_processes
    return JointPlan(stage=stage, samples_per_epoch=samples, sequential_steps=total)
