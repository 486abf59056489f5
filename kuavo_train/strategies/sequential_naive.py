"""The lower bound: the same stages with neither replay nor learning-rate decay (every
stage at stage 1's learning rate, or at its own `optimizer_lr` where a task config sets one), so
what it forgets is what the recipe protects."""

from __future__ import annotations

from kuavo_train.strategies.base import Strategy


class SequentialNaive(Strategy):
    name = "sequential_naive"
    description = "the same stages without replay and without lr decay (lower bound)"

    def weights(self, stage):
        return {stage.task_id: 1.0}

    def lr(self, stage):
        return self.undecayed_lr(stage)
