"""Our closed-loop episodes, run the way stock `lerobot-eval` runs them.

Episodes go in batches of `batch_size` environments (lerobot-eval's `--eval.batch_size`):
batch k holds episode seeds s0 + k*B .. s0 + k*B + B - 1, as lerobot-eval numbers them
from its `--seed` s0, and a last partial batch is run whole and cut, as lerobot-eval does.
Per batch:
1. `policy_fn.reset()`, then the vector env (B envs, built by the EnvConfig's own
   `create_envs`) is reset with the batch's seeds and LeRobot's new-rollout option;
2. every step: LeRobot's `preprocess_observation`, the instructions from
   `env.call("task_description")`, the EnvConfig's env preprocessor (which seeds every RNG
   with the batch's first seed at step 0, see seeding.py), the policy on the whole batch,
   the env postprocessor, `env.step`;
3. until every env is done or `_max_episode_steps`; then, per env, lerobot-eval's
   episode mask (steps up to one past the first done): success = `is_success` at any of
   them (read from `final_info` when the vector env auto-reset), rewards summed and maxed
   over them.
So one model, one list of seeds and one batch size give the same per-episode successes and
rewards here and in `lerobot-eval` (tests/test_lerobot_env.py runs both). The policy's
sampling noise is drawn for the whole batch, so another batch size gives other noise.

`policy_fn` has `reset()` and `__call__(batch) -> (B, action_dim)` tensor, where `batch`
is what lerobot-eval hands the policy's preprocessor (see evaluation/closed_loop.py).
"""

from __future__ import annotations

import numpy as np
import torch

ACTION = "action"


def _successes(info: dict, n: int) -> list[bool]:
    """Per env: is_success of this step, read from final_info when an env just finished."""
    src = info.get("final_info", info) if isinstance(info, dict) else {}
    value = src.get("is_success") if isinstance(src, dict) else None
    if value is None:
        return [False] * n
    arr = np.asarray(value).reshape(-1)
    return [bool(v) for v in arr] if arr.size == n else [bool(arr.any())] * n


def run_batch(vec_env, env_preprocessor, env_postprocessor, policy_fn, seeds: list[int]) -> list[dict]:
    """One rollout of the vector env's B episodes (seeds: one per env)."""
    from lerobot.envs import preprocess_observation
    from lerobot.envs.utils import NEW_ROLLOUT_OPTION

    n = vec_env.num_envs
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} environments")
    policy_fn.reset()
    obs, info = vec_env.reset(seed=list(seeds), options={NEW_ROLLOUT_OPTION: True})
    scenes = np.asarray(info.get("scene_seed") if isinstance(info, dict) and "scene_seed" in info else [None] * n,
                        dtype=object).reshape(-1)
    max_steps = int(vec_env.call("_max_episode_steps")[0])
    rewards, successes, dones = [], [], []
    done = np.zeros(n, dtype=bool)
    step = 0
    while not done.all() and step < max_steps:
        batch = preprocess_observation(obs)
        batch["task"] = list(vec_env.call("task_description"))
        batch = env_preprocessor(batch)
        with torch.no_grad():
            action = policy_fn(batch)
        action = env_postprocessor({ACTION: action})[ACTION]
        action_np = action.to("cpu").numpy()
        if action_np.ndim != 2:
            raise ValueError(f"the policy returned an action of shape {action_np.shape}; expected (batch, action_dim)")
        obs, reward, terminated, truncated, info = vec_env.step(action_np)
        done = np.asarray(terminated) | np.asarray(truncated) | done
        if step + 1 == max_steps:
            done[:] = True
        rewards.append(np.asarray(reward, dtype=np.float64).reshape(n))
        successes.append(_successes(info, n))
        dones.append(done.copy())
        step += 1
    r, s, d = np.stack(rewards, axis=1), np.asarray(successes).T, np.stack(dones, axis=1)
    done_at = d.argmax(axis=1)
    # lerobot-eval's mask: the steps up to and including the one after the first done
    mask = np.arange(r.shape[1])[None, :] <= (done_at + 1)[:, None]
    rm = torch.from_numpy(r * mask)  # as lerobot-eval computes them (float64 rewards of the vector env)
    return [{"seed": seeds[i], "scene_seed": None if scenes[i] is None else int(scenes[i]),
             "success": bool((s[i] & mask[i]).any()), "sum_reward": float(rm[i].sum()),
             "max_reward": float(rm[i].max()), "steps": int(done_at[i]) + 1} for i in range(n)]


def run_episodes(env_cfg, policy_fn, seeds, batch_size: int = 1) -> list[dict]:
    """Consecutive episode seeds in batches of `batch_size` envs built from `env_cfg` (an EnvConfig)."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        return []
    if any(b - a != 1 for a, b in zip(seeds, seeds[1:])):
        raise ValueError("episode seeds must be consecutive (lerobot-eval numbers its episodes so)")
    bs = max(1, int(batch_size))
    vec = env_cfg.create_envs(n_envs=bs, use_async_envs=False)[env_cfg.type][0]
    pre, post = env_cfg.get_env_processors()
    out: list[dict] = []
    try:
        for first in range(seeds[0], seeds[-1] + 1, bs):
            out += run_batch(vec, pre, post, policy_fn, list(range(first, first + bs)))
    finally:
        vec.close()
    return out[: len(seeds)]
