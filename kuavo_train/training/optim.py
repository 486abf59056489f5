"""The stages' optimizer: LeRobot's AdamW preset of the policy config, optionally fused."""

from __future__ import annotations

import torch


def build_optimizer(policy_config, params, *, fused: bool) -> torch.optim.Optimizer:
    """LeRobot's AdamW preset (`policy_config.get_optimizer_preset()`: lr, betas, eps, weight
    decay; what lerobot-train builds), with torch's fused implementation when `fused`.

    The preset's own `build` takes no `fused`, so the fused optimizer is built here from the
    preset's fields; its state has the same layout (step, exp_avg, exp_avg_sq per parameter)."""
    preset = policy_config.get_optimizer_preset()  # SmolVLA's: AdamWConfig
    if not fused:
        return preset.build(params)
    return torch.optim.AdamW(params, lr=preset.lr, betas=tuple(preset.betas), eps=preset.eps,
                             weight_decay=preset.weight_decay, fused=True)
