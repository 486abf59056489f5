"""A policy closed loop in MetaWorld on a dataset's held-out seeds (the success matrix's cells).

Settings (camera, image size, state layout, horizon, render options) come from the
dataset's `meta/metaworld.json`, so evaluation sees exactly what the data showed.
"""

from __future__ import annotations

import numpy as np

from kuavo_train.data.metaworld.env import MetaWorldSim, SimSettings, default_workers, fork_map, run_episode
from kuavo_train.data.metaworld.writer import read_meta


def run_closed_loop(root, policy_fn, episodes: int, *, workers: int | None = None) -> dict:
    """`policy_fn(obs, instruction)` on the first `episodes` held-out seeds, spread over worker processes."""
    meta = read_meta(root)
    settings = SimSettings.from_meta(meta)
    seeds = list(meta["eval_seeds"])[: int(episodes)]
    instruction = meta["instruction"]

    def chunk(part):
        import torch

        sim = MetaWorldSim(settings)
        try:
            out = []
            for s in part:
                policy_fn.reset()
                torch.manual_seed(int(s))  # per-episode noise: results do not depend on the worker split
                ep = run_episode(sim, s, lambda obs: policy_fn(obs, instruction))
                out.append({"seed": ep["seed"], "success": ep["success"], "steps": ep["steps"]})
            return out
        finally:
            sim.close()

    results = fork_map(chunk, seeds, workers or default_workers())
    return {
        "success_rate": float(np.mean([r["success"] for r in results])) if results else float("nan"),
        "successes": [r["success"] for r in results],
        "steps": [r["steps"] for r in results],
        "seeds": seeds,
        "expert_success_rate": float(np.mean(meta["expert_eval_successes"][: len(seeds)])) if seeds else float("nan"),
    }


def success_rate(root, policy_fn, episodes: int) -> float:
    return float(run_closed_loop(root, policy_fn, episodes)["success_rate"])
