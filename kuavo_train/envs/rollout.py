"""Our closed-loop episodes, run the way stock `lerobot-eval` runs them with `--eval.batch_size=1`.

Per episode seed s (lerobot-eval's are `--seed`, `--seed`+1, ...):
1. `policy_fn.reset()`, then the vector env (one env, built by the EnvConfig's own
   `create_envs`) is reset with `seed=[s]` and LeRobot's new-rollout option;
2. every step: LeRobot's `preprocess_observation`, the instruction from
   `env.call("task_description")`, the EnvConfig's env preprocessor (which seeds every RNG
   with s at step 0, see seeding.py), the policy, the env postprocessor, `env.step`;
3. until terminated or truncated, or `_max_episode_steps`; success = `is_success` at any
   step (from `final_info` when the vector env auto-reset), rewards summed as lerobot-eval
   sums them.
So one model and one list of seeds give the same per-episode successes and rewards here
and in `lerobot-eval` (tests/test_lerobot_env.py runs both).

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


def run_episode(vec_env, env_preprocessor, env_postprocessor, policy_fn, seed: int | None) -> dict:
    from lerobot.envs import preprocess_observation
    from lerobot.envs.utils import NEW_ROLLOUT_OPTION

    policy_fn.reset()
    obs, info = vec_env.reset(seed=[seed] if seed is not None else None, options={NEW_ROLLOUT_OPTION: True})
    scene = info.get("scene_seed") if isinstance(info, dict) else None
    max_steps = int(vec_env.call("_max_episode_steps")[0])
    rewards, successes = [], []
    done, step = False, 0
    while not done and step < max_steps:
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
        rewards.append(torch.from_numpy(np.asarray(reward)))
        successes.append(_successes(info, 1)[0])
        done = bool(terminated[0] or truncated[0])
        step += 1
    r = torch.stack(rewards, dim=1)  # (1, steps), summed like lerobot-eval's eval_policy
    return {"seed": seed, "scene_seed": None if scene is None else int(np.asarray(scene).reshape(-1)[0]),
            "success": bool(any(successes)), "sum_reward": float(r.sum(dim=1)[0]), "max_reward": float(r.max(dim=1).values[0]),
            "steps": step}


def run_episodes(env_cfg, policy_fn, seeds) -> list[dict]:
    """Each seed as its own batch-of-one rollout in an env built from `env_cfg` (an EnvConfig)."""
    vec = env_cfg.create_envs(n_envs=1, use_async_envs=False)[env_cfg.type][0]
    pre, post = env_cfg.get_env_processors()
    try:
        return [run_episode(vec, pre, post, policy_fn, s) for s in seeds]
    finally:
        vec.close()
