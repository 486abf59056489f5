"""The stages' optimizer: LeRobot's AdamW preset of the policy config, optionally fused."""

from __future__ import annotations

import contextlib

import torch


def build_optimizer(policy_config, params, *, fused: bool) -> torch.optim.Optimizer:
    """LeRobot's AdamW preset (`policy_config.get_optimizer_preset()`: lr, betas, eps, weight
    decay; what lerobot-train builds), with torch's fused implementation when `fused`.

    The preset's own `build` takes no `fused`, so the fused optimizer is built here from the
    preset's fields; its state has the same layout (step, exp_avg, exp_avg_sq per parameter).
    Write and read its state inside `stock_param_groups`."""
    preset = policy_config.get_optimizer_preset()  # SmolVLA's: AdamWConfig
    if not fused:
        return preset.build(params)
    return torch.optim.AdamW(params, lr=preset.lr, betas=tuple(preset.betas), eps=preset.eps,
                             weight_decay=preset.weight_decay, fused=True)


@contextlib.contextmanager
def stock_param_groups(optimizer):
    """The optimizer's param groups as lerobot-train's AdamW has them (`fused` unset) while its
    training state is saved or loaded, then as they were.

    LeRobot's loader checks every saved param-group field against the live optimizer's type,
    so a `fused: true` on disk stops `lerobot-train --resume` (whose AdamW has `fused: null`),
    and a `null` on disk would stop a fused resume of ours."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    fused = [group.get("fused") for group in opt.param_groups]
    for group in opt.param_groups:
        group["fused"] = None
    try:
        yield
    finally:
        # loading replaces the group dicts (with the file's `null`): restore on the current ones
        for group, value in zip(opt.param_groups, fused):
            group["fused"] = value
