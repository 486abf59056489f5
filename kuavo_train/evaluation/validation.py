"""Deterministic multi-task validation on held-out episodes (spec section 4).

The spec's snippet drew fresh flow-matching noise and time on every call, so
the same weights scored differently each time. Here every validation sample
gets its own noise and time from a generator seeded by (seed, task, sample),
independent of batch size, order and process: the same weights always give
the same loss.
"""

from __future__ import annotations

import numpy as np
import torch

BETA_ALPHA = 1.5  # SmolVLA's training time distribution: Beta(1.5, 1) * 0.999 + 0.001


def validation_frames(dataset, episodes: list[int], frames_per_episode: int) -> list[int]:
    """Evenly spaced frame indices (into `dataset`) of each chosen episode."""
    ep_index = dataset.episode_index_array()
    out = []
    for ep in episodes:
        idx = np.flatnonzero(ep_index == ep)
        if len(idx) == 0:
            continue
        take = np.unique(np.linspace(0, len(idx) - 1, num=min(frames_per_episode, len(idx))).round().astype(int))
        out.extend(idx[take].tolist())
    return out


def seeded_noise_and_time(seed: int, task_id: int, sample_ids: list[int], chunk: int, dim: int):
    """Per-sample noise (B, chunk, dim) and time (B,) from per-sample generators."""
    noises, times = [], []
    for sid in sample_ids:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, task_id, sid]).generate_state(1)[0]))
        noises.append(torch.randn(chunk, dim, generator=g))
        u = torch.rand((), generator=g)
        # Inverse CDF of Beta(1.5, 1): F(x) = x^1.5, so x = u^(1/1.5).
        times.append(u ** (1.0 / BETA_ALPHA) * 0.999 + 0.001)
    return torch.stack(noises), torch.stack(times)


@torch.no_grad()
def validation_loss(policy, preprocessor, dataset, indices: list[int], *, task_id: int, seed: int, batch_size: int, device,
                    feature_cache=None, split: bool = False) -> float:
    """Mean per-sample flow-matching loss over `indices` with fixed noise and time. `split`: the
    processes of `accelerate launch` share the batches (each computes its part; every process
    gets the same mean, equal to what one process computes)."""
    from kuavo_train.policy.feature_cache import serving
    from kuavo_train.processes import split_map

    was_training = policy.training
    policy.eval()
    cfg = policy.config

    def batch_losses(ids: list[int]) -> list[float]:
        batch = dataset.batch(ids)
        noise, time = seeded_noise_and_time(seed, task_id, ids, cfg.chunk_size, cfg.max_action_dim)
        model_batch = preprocessor(dict(batch))
        with serving(feature_cache, batch, model_batch):
            per_sample, _ = policy.forward(model_batch, noise=noise.to(device), time=time.to(device), reduction="none")
        return per_sample.detach().float().cpu().tolist()

    batches = [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    losses = [x for part in (split_map(batch_losses, batches) if split else map(batch_losses, batches)) for x in part]
    if was_training:
        policy.train()
    return float(torch.tensor(losses, dtype=torch.float32).mean()) if losses else float("nan")
