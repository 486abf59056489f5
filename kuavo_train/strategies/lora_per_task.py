"""One LoRA adapter per task over a frozen shared base (parameter isolation).

Stage k starts from stage k-1's checkpoint (the unchanged base and adapters 1..k-1), adds a
fresh adapter for task k (PEFT LoRA on the layers `strategy.targets` names, see
kuavo_train/policy/adapters.py TARGETS) and trains only it, on task k's own
frames (no replay: no old data is needed). Nothing an earlier task uses changes, so its
results after any later stage are those at the end of its own stage: zero backward transfer
by construction. The checkpoint is the base plus every adapter (kuavo_train/policy/adapters.py);
evaluation and the inference wrapper run each task with its own adapter, chosen by the
instruction, so one checkpoint still switches tasks by language. `kuavo-train export-merged`
writes one stock checkpoint per task (base and that task's adapter merged).
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import torch
from pydantic import Field

from kuavo_train.config.schema import PositiveFloat, PositiveInt, settings
from kuavo_train.policy import adapters
from kuavo_train.strategies.base import Strategy

log = logging.getLogger(__name__)


@settings
class LoRAOptions:
    rank: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    # below 1: at 1 PEFT's dropout zeroes every input of the adapter, which then never trains
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    targets: Literal[adapters.TARGETS] = "smolvla_default"
    # Learning rate of every adapter (no decay across stages: each adapter starts fresh).
    # None: lr_scale x stage 1's rate by the run's rule (or x the stage's own optimizer_lr), since
    # a low-rank update wants a larger step than full fine-tuning (measured on MetaWorld push, 4
    # epochs: validation loss 1.08 at 1x the recipe's rate, 0.43 at 5x, 0.25 at 12.5x, 0.21 at 25x).
    lr: PositiveFloat | None = None
    lr_scale: PositiveFloat = 10.0


class LoRAPerTask(Strategy):
    name = "lora_per_task"
    description = "a LoRA adapter per task on a frozen base, chosen by the instruction (zero forgetting)"
    Options = LoRAOptions

    def weights(self, stage):
        return {stage.task_id: 1.0}

    def lr(self, stage):
        if self.options.lr is not None:
            return self.options.lr, "strategy.lr of lora_per_task"
        lr, source = self.undecayed_lr(stage)
        return self.options.lr_scale * lr, f"strategy.lr_scale {self.options.lr_scale:g} x {source}"

    def stage_plan(self, stage, task_sizes):
        import dataclasses

        # each stage starts from the previous one, whatever the stage's config says: that checkpoint
        # holds the (unchanged) base and every earlier task's adapter
        order = [s.task_id for s in self.cfg.ordered_stages()]
        i = order.index(stage.task_id)
        stage = dataclasses.replace(stage, resume_from="pretrained" if i == 0 else "task",
                                    resume_task_id=None if i == 0 else order[i - 1])
        plan = super().stage_plan(stage, task_sizes)
        return dataclasses.replace(plan, stock_unsupported="the stage trains a LoRA adapter beside earlier tasks' "
                                                           "adapters; stock lerobot-train --resume would train the base")

    def before_stage(self, policy, plan):
        name = adapters.adapter_name(plan.stage.task_id)
        if name not in adapters.names(policy):  # a resumed stage loaded its adapter with the checkpoint
            o = self.options
            # LoRA's A starts random: from (seed, task), not from whatever the global RNG went through
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed * 1000 + plan.stage.task_id)
                adapters.add_adapter(policy, name, adapters.lora_config(policy, rank=o.rank, alpha=o.alpha,
                                                                        dropout=o.dropout, targets=o.targets))
        adapters.activate(policy, name)
        adapters.train_only(policy, name)
        size = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        log.info("lora_per_task: adapter %s (rank %d on %s) has %s parameters (%.1f KiB in float32); earlier adapters: %s",
                 name, self.options.rank, self.options.targets, f"{size:,}", size * 4 / 1024,
                 ", ".join(n for n in adapters.names(policy) if n != name) or "none")
