"""The spec's recipe: each task in its own stage, earlier tasks replayed by the configured
shares, the vision encoder (and, with train_expert_only, the VLM) frozen, the learning
rate decayed from stage to stage. Freezing is the policy settings' (`policy.*`), which
every strategy shares; this strategy adds replay and the per-stage learning rates.

`sequential_spec`, its name before strategies were plug-ins, is an alias."""

from __future__ import annotations

import logging
import math

from kuavo_train.strategies.base import Strategy, normalized

log = logging.getLogger(__name__)


class ReplayFreezeDecay(Strategy):
    name = "replay_freeze_decay"
    aliases = ("sequential_spec",)
    description = "replay of earlier tasks + frozen vision/VLM + per-stage lr decay (the spec's recipe)"

    def plan(self, task_sizes, num_processes=1):
        """Shares that do not sum to 1 are used renormalised: said once, in one line, for every such stage."""
        if self.cfg.replay.use_replay_buffer:
            off = [(s, sum(s.replay_weights.values())) for s in self.cfg.ordered_stages()]
            off = [(s, total) for s, total in off if not math.isclose(total, 1.0, abs_tol=1e-4)]
            if off:
                log.warning("config warning: replay shares renormalised to sum to 1: %s", "; ".join(
                    f"stages.{s.name}.replay_weights sum to {total:g} (configs/policy/tasks/{s.name}.yaml), used as "
                    "{" + ", ".join(f"{t}: {w:.3g}" for t, w in normalized(s.replay_weights).items()) + "}"
                    for s, total in off))
        return super().plan(task_sizes, num_processes)

    def weights(self, stage):
        if not self.cfg.replay.use_replay_buffer:
            return {stage.task_id: 1.0}
        return normalized(stage.replay_weights)
