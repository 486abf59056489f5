"""Elastic weight consolidation (EWC) on the trained parameters (the action expert, with the
spec's freezing): each stage trains on its own task only, like `sequential_naive`, with the
configured per-stage learning rates, plus a penalty that holds the parameters that mattered for
earlier tasks near their values at the end of those tasks' stages:

    loss + lambda / 2 * sum_i F_i * (theta_i - theta*_i)^2

F is the diagonal empirical Fisher information (mean squared gradient of the training loss),
measured on each finished stage's own training frames and summed over stages; theta* is the
model at the end of the last stage. Why this one: it is the standard regularisation baseline
of lifelong robot-learning benchmarks (LIBERO reports it beside experience replay and
parameter isolation), it needs no data of earlier tasks (replay does), and here it costs one
pass over the stage's frames per stage and an elementwise term per step.
"""

from __future__ import annotations

import logging

import torch

from kuavo_train.config.schema import Count, NonNegativeFloat, settings
from kuavo_train.processes import my_part, sum_over_processes
from kuavo_train.strategies.base import Strategy

log = logging.getLogger(__name__)


@settings
class EWCOptions:
    # Strength of the penalty. F comes from batch-mean losses, so it is small (mean about 1e-5 on the
    # demo after stage 1): lambda is large.
    ewc_lambda: NonNegativeFloat = 1.0e5
    # Batches of the finished stage's training frames over which F is averaged (0: all of them).
    fisher_batches: Count = 0


class EWC(Strategy):
    name = "ewc"
    description = "no replay; penalty lambda/2 * F * (theta - theta*)^2 keeps what earlier tasks needed (EWC)"
    Options = EWCOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.terms: list[tuple] | None = None  # built at the stage's first step from the loaded state

    def weights(self, stage):
        return {stage.task_id: 1.0}

    def extra_loss(self, policy, batch):
        if self.terms is None:  # (parameter, F, theta*) on the parameter's device: once, not at every step
            self.terms = [(p, self.fisher[n].to(p.device), self.anchor[n].to(p.device))
                          for n, p in policy.named_parameters() if n in self.fisher and p.requires_grad]
        if not self.terms:
            return None
        total = sum((f * (p - anchor) ** 2).sum() for p, f, anchor in self.terms)
        return 0.5 * self.options.ewc_lambda * total

    def after_stage(self, policy, plan, batches):
        params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        count = len(batches) if not self.options.fisher_batches else min(len(batches), self.options.fisher_batches)
        # the flow-matching loss draws noise and time: each batch gets its seed, so F is the same on a
        # rerun and whichever process of `accelerate launch` takes the batch
        generator = torch.Generator().manual_seed(self.cfg.seed)
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) for _ in range(count)]
        was_training = policy.training
        policy.train()
        for i in my_part(range(count)):
            torch.manual_seed(seeds[i])
            policy.zero_grad(set_to_none=True)
            loss, _ = policy(batches[i])
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
        fisher = sum_over_processes(fisher)
        policy.zero_grad(set_to_none=True)
        policy.train(was_training)
        self.terms = None  # F and theta* change below
        for n in fisher:
            fisher[n] /= max(count, 1)
            self.fisher[n] = self.fisher.get(n, torch.zeros_like(fisher[n])) + fisher[n].cpu()
            self.anchor[n] = params[n].detach().float().cpu().clone()
        log.info("ewc: Fisher information of stage %d over %d batches (%d tensors, mean %.3g); penalty lambda %g",
                 plan.stage.task_id, count, len(fisher),
                 float(torch.cat([f.flatten() for f in self.fisher.values()]).mean()) if self.fisher else 0.0,
                 self.options.ewc_lambda)

    def state_dict(self):
        return {**{f"fisher.{n}": t for n, t in self.fisher.items()}, **{f"anchor.{n}": t for n, t in self.anchor.items()}}

    def load_state_dict(self, state):
        self.terms = None
        self.fisher = {k[len("fisher."):]: v for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor."):]: v for k, v in state.items() if k.startswith("anchor.")}
