"""The lower bound: the same stages with neither replay nor learning-rate decay (every
stage at stage 1's learning rate), so what it forgets is what the recipe protects."""

from __future__ import annotations

from kuavo_train.strategies.base import Strategy


class SequentialNaive(Strategy):
    name = "sequential_naive"
    description = "the same stages without replay and without lr decay (lower bound)"

    def weights(self, stage):
        return {stage.task_id: 1.0}

    def lr(self, stage):
        lr, source = super().lr(self.cfg.ordered_stages()[0])
        return lr, f"stage 1's ({source}), no decay"
