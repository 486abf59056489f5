"""Experience replay (ER): each stage samples every task seen so far in an equal share, and
an epoch is as long as the current task's frames alone, so a stage costs what a stage
without replay costs (sequential_naive's, lora_per_task's and ewc's budget; fewer steps
than the recipe and joint). Every stage runs at stage 1's learning rate: the replayed
share, not a smaller step, is what keeps the earlier tasks.

Why it is here: balanced rehearsal is continual learning's standard replay baseline (ER),
and it asks whether the recipe's small shares (an earlier task gets 10-20% of a later
stage; here 1/k), rather than replay itself, are what cost the recipe its earlier tasks.
It needs the earlier tasks' data, like the recipe; lora_per_task does not."""

from __future__ import annotations

import dataclasses

from kuavo_train.strategies.sequential_naive import SequentialNaive


class ExperienceReplay(SequentialNaive):
    """sequential_naive's stages, step count and learning rate, with the seen tasks replayed."""

    name = "experience_replay"
    description = "every task seen so far replayed in an equal share, at a no-replay stage's cost, no lr decay"

    def weights(self, stage):
        order = [s.task_id for s in self.cfg.ordered_stages()]
        seen = order[: order.index(stage.task_id) + 1]
        return {t: 1.0 / len(seen) for t in sorted(seen)}

    def stage_plan(self, stage, task_sizes):
        plan = super().stage_plan(stage, task_sizes)
        return dataclasses.replace(plan, epoch_samples=task_sizes[stage.task_id])
