"""MetaWorld v3 as our benchmark trains on it, as a gymnasium environment.

The variant of `kuavo-train benchmark metaworld`, not LeRobot's own `metaworld` env:
camera, image size, state layout (full 39-dim or 4-dim agent state), horizon and
render settings come from the dataset's `meta/metaworld.json` (the same `SimSettings`
and `MetaWorldSim` that recorded the demonstrations), and the instruction is ours.
Observations: `pixels/<camera>` -> `observation.images.<camera>`, `agent_pos` ->
`observation.state`. Episode seed -> scene (`scenes`): "heldout" (default) the
dataset's held-out evaluation seeds (`eval_seeds`), index = (seed - 1000) mod their number;
"train" its training seeds; "seed" the episode seed is the MetaWorld scene seed.
Ends on `info["success"]` (terminated) or at the horizon (truncated); the reward is
MetaWorld's own dense reward.

A dataset recorded with the stock observation (`"observation": "stock"` in its
sidecar) is evaluated in LeRobot's own `metaworld` env instead (`make_stock_env`):
stock's observations, rewards, termination and 500-step horizon, the scene seeded
with the episode seed as stock does; we only add the episode seed entry that our
per-episode seeding reads (seeding.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from kuavo_train.data.metaworld.env import (
    DEFAULT_CAMERA,
    HORIZON,
    IMAGE_SIZE,
    MetaWorldError,
    SimSettings,
    image_key,
    instruction_for,
    state_names,
)
from kuavo_train.envs.seeding import EPISODE_KEY, encode, scene_for

SCENE_MODES = ("heldout", "train", "seed")
META_FILE = "metaworld.json"  # kuavo_train/data/metaworld/writer.py
DEFAULT_DATA_ROOT = Path("data/metaworld")  # where `kuavo-train benchmark metaworld` writes its datasets
FPS = 80


def is_stock(meta: dict | None) -> bool:
    return (meta or {}).get("observation") == "stock"


def stock_config(task: str):
    """LeRobot's own `--env.type=metaworld` config for a task."""
    from lerobot.envs.configs import MetaworldEnv

    return MetaworldEnv(task=task)


class StockEpisodeSeeds:
    """LeRobot's metaworld vector env, untouched, plus `EPISODE_KEY` in every observation
    (episode seed and step, removed by the env preprocessor before the policy sees the batch)
    and `scene_seed` in the reset info. Not a gymnasium VectorWrapper: stock's asynchronous
    env is not a VectorEnv, so everything else is forwarded as is."""

    def __init__(self, env):
        self.env = env
        self._seeds: list[int | None] = [None] * env.num_envs
        self._step = 0

    def _with_entry(self, obs: dict) -> dict:
        return {**obs, EPISODE_KEY: np.stack([encode(s, self._step) for s in self._seeds])}

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        n = self.env.num_envs
        if seed is None:
            self._seeds = [None] * n
        elif isinstance(seed, (int, np.integer)):
            self._seeds = [int(seed) + i for i in range(n)]  # gymnasium's rule for one seed
        else:
            self._seeds = [None if s is None else int(s) for s in seed]
        self._step = 0
        # Stock seeds MetaWorld's scene with the episode seed itself.
        scenes = np.array([-1 if s is None else s for s in self._seeds], dtype=np.int64)
        return self._with_entry(obs), {**info, "scene_seed": scenes}

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self._step += 1
        return self._with_entry(obs), reward, terminated, truncated, info

    def __getattr__(self, name):
        if name == "env":  # not set yet (e.g. during copying): no recursion
            raise AttributeError(name)
        return getattr(self.env, name)


def make_stock_env(task: str, n_envs: int, use_async_envs: bool) -> StockEpisodeSeeds:
    """Stock's vector env for one task, built by stock's own config (`create_envs`)."""
    envs = stock_config(task).create_envs(n_envs=n_envs, use_async_envs=use_async_envs)
    (vec,) = [v for group in envs.values() for v in group.values()]
    return StockEpisodeSeeds(vec)


def default_dataset_root(task: str) -> Path:
    return DEFAULT_DATA_ROOT / task


def read_metaworld_meta(dataset_root) -> dict | None:
    p = Path(dataset_root) / "meta" / META_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def resolve_settings(task: str, meta: dict | None, *, camera=None, image_size=None, state_mode=None,
                     horizon=None) -> SimSettings:
    """The dataset's settings, each overridable; MetaWorld defaults without a dataset."""
    m = meta or {}
    return SimSettings(task=task, camera=camera or m.get("camera", DEFAULT_CAMERA),
                       image_size=int(image_size or m.get("image_size", IMAGE_SIZE)),
                       state_mode=state_mode or m.get("state_mode", "full"),
                       horizon=int(horizon or m.get("horizon", HORIZON)))


class KuavoMetaWorldEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}

    def __init__(self, task: str = "push-v3", dataset_root: str | None = None, scenes: str = "heldout",
                 camera: str | None = None, image_size: int | None = None, state_mode: str | None = None,
                 episode_length: int | None = None, render_mode: str = "rgb_array", instruction: str | None = None):
        super().__init__()
        from kuavo_train.data.metaworld.env import MetaWorldSim, check_tasks, require_metaworld

        require_metaworld()
        check_tasks([task])
        if scenes not in SCENE_MODES:
            raise MetaWorldError(f"kuavo_metaworld: scenes must be one of {', '.join(SCENE_MODES)} (got {scenes!r})")
        root = Path(dataset_root) if dataset_root else default_dataset_root(task)
        meta = read_metaworld_meta(root)
        self.scene_list: list[int] | None = None
        if scenes != "seed":
            if meta is None:
                raise MetaWorldError(
                    f"kuavo_metaworld: no scenes for {task}: {root / 'meta' / META_FILE} not found (write the datasets with "
                    "`kuavo-train benchmark metaworld`, point --env.dataset_root at one, or use --env.scenes=seed)")
            if meta.get("task") != task:
                raise MetaWorldError(f"kuavo_metaworld: {root} holds task {meta.get('task')!r}, not {task!r}")
            self.scene_list = [int(s) for s in meta["eval_seeds" if scenes == "heldout" else "train_seeds"]]
        if is_stock(meta):
            raise MetaWorldError(f"kuavo_metaworld: {root} was recorded with LeRobot's stock observation: evaluate it "
                                 "in LeRobot's own env (KuavoMetaWorldEnvConfig builds that one for such a dataset)")
        self.settings = resolve_settings(task, meta, camera=camera, image_size=image_size, state_mode=state_mode,
                                         horizon=episode_length)
        self.sim = MetaWorldSim(self.settings)
        self.task = task
        self.task_description = instruction or (meta or {}).get("instruction") or instruction_for(task)
        self._max_episode_steps = self.settings.horizon
        self.render_mode = render_mode
        s = self.settings
        self.camera = s.camera
        self.observation_space = spaces.Dict({
            "pixels": spaces.Dict({s.camera: spaces.Box(0, 255, (s.image_size, s.image_size, 3), dtype=np.uint8)}),
            "agent_pos": spaces.Box(-np.inf, np.inf, (len(state_names(s.state_mode)),), dtype=np.float32),
            EPISODE_KEY: spaces.Box(-1.0, float(1 << 24), (3,), dtype=np.float32),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
        self.episode_seed: int | None = None
        self.scene_seed: int | None = None
        self.steps = 0
        self._image: np.ndarray | None = None

    def scene_for(self, seed: int | None) -> int:
        return scene_for(self.scene_list, seed, self.np_random)

    def _observation(self, sim_obs: dict) -> dict:
        self._image = sim_obs[image_key(self.camera)]
        return {
            "pixels": {self.camera: self._image},
            "agent_pos": np.asarray(sim_obs["observation.state"], dtype=np.float32),
            EPISODE_KEY: encode(self.episode_seed, self.steps),
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode_seed = None if seed is None else int(seed)
        self.scene_seed = self.scene_for(seed)
        self.steps = 0
        obs = self._observation(self.sim.reset(self.scene_seed))
        return obs, {"is_success": False, "scene_seed": self.scene_seed}

    def step(self, action):
        sim_obs, success = self.sim.step(action)
        self.steps += 1
        obs = self._observation(sim_obs)
        truncated = not success and self.steps >= self.settings.horizon
        return obs, self.sim.reward, bool(success), truncated, {"is_success": bool(success), "scene_seed": self.scene_seed}

    def render(self):
        """The camera image of the last observation (no extra MuJoCo render)."""
        if self._image is None:
            s = self.settings
            return np.zeros((s.image_size, s.image_size, 3), dtype=np.uint8)
        return self._image

    def close(self):
        self.sim.close()
