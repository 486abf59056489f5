"""The upper bound: one model trained on all tasks at once.

To be a fair comparison it gets the number of optimizer steps the default recipe
(replay_freeze_decay) would spend on the same data: the steps of every stage of that
recipe (replay included), spread over as many epochs as its stages have in total (rounded
up to whole epochs of equal length: at most one step more per epoch), each epoch mixing
all tasks by their share of training frames.
"""

from __future__ import annotations

import dataclasses
import math

from kuavo_train.strategies.base import StagePlan, Strategy, normalized
from kuavo_train.strategies.replay_freeze_decay import ReplayFreezeDecay

STAGE_NAME = "joint"


class Joint(Strategy):
    name = "joint"
    description = "one model on all tasks at once, as many steps as the recipe (upper bound)"

    def plan(self, task_sizes, num_processes=1):
        cfg = self.cfg
        stages = cfg.ordered_stages()
        first, last = stages[0], stages[-1]
        total = sequential_steps(cfg, task_sizes, num_processes)
        epochs = sum(s.max_epoch for s in stages)
        lr, source = self.lr(first)
        stage = dataclasses.replace(
            first,
            name=STAGE_NAME,
            task_id=last.task_id,  # validates and records every task, and fills the last matrix row
            instruction="",
            max_epoch=epochs,
            resume_from="pretrained",
            resume_task_id=None,
            # Stage 1's cosine would end after stage 1's length and leave the rest at decay_lr:
            # decay over the whole joint run instead (LeRobot's scheduler shrinks it if shorter).
            scheduler_decay_steps=max(first.scheduler_decay_steps, total),
            replay_weights={t: float(n) for t, n in task_sizes.items()},
        )
        samples = math.ceil(total / epochs) * cfg.dataloader.batch_size * num_processes
        return [StagePlan(stage=stage, weights=normalized(stage.replay_weights), lr=lr, lr_source=f"stage 1's ({source})",
                          epoch_samples=samples, dir_name="joint_all_tasks", label="joint stage",
                          learns=tuple(s.task_id for s in stages),
                          stock_unsupported="the joint baseline trains on every task's dataset at once; stock "
                                            "lerobot-train reads one dataset")]

    def lr(self, stage):
        """Its one stage runs at stage 1's rate, whichever stage is asked about."""
        return super().lr(self.cfg.ordered_stages()[0])


def sequential_steps(cfg, task_sizes: dict[int, int], num_processes: int = 1) -> int:
    """Optimizer steps of the whole default-recipe run on these datasets."""
    return sum(p.total_steps(cfg, num_processes) for p in ReplayFreezeDecay(cfg).plan(task_sizes, num_processes))
