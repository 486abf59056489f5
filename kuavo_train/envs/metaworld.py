"""MetaWorld v3 as our benchmark trains on it, as a gymnasium environment.

The variant of `kuavo-train benchmark metaworld`, not LeRobot's own `metaworld` env:
camera, image size, state layout (full 39-dim or 4-dim agent state), horizon and
render settings come from the dataset's `meta/metaworld.json` (the same `SimSettings`
and `MetaWorldSim` that recorded the demonstrations), and the instruction is ours.
Observations: `pixels/<camera>` -> `observation.images.<camera>`, `agent_pos` ->
`observation.state`. Episode seed -> scene (`scenes`): "heldout" (default) the
dataset's held-out evaluation seeds (`eval_seeds`), index = seed mod their number;
"train" its training seeds; "seed" the episode seed is the MetaWorld scene seed.
Ends on `info["success"]` (terminated) or at the horizon (truncated); the reward is
MetaWorld's own dense reward.
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
from kuavo_train.envs.seeding import EPISODE_KEY, encode

SCENE_MODES = ("heldout", "train", "seed")
META_FILE = "metaworld.json"  # kuavo_train/data/metaworld/writer.py
DEFAULT_DATA_ROOT = Path("data/metaworld")  # where `kuavo-train benchmark metaworld` writes its datasets
FPS = 80


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
                 episode_length: int | None = None, render_mode: str = "rgb_array"):
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
        self.settings = resolve_settings(task, meta, camera=camera, image_size=image_size, state_mode=state_mode,
                                         horizon=episode_length)
        self.sim = MetaWorldSim(self.settings)
        self.task = task
        self.task_description = (meta or {}).get("instruction") or instruction_for(task)
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
        if self.scene_list is None:
            return int(seed) if seed is not None else int(self.np_random.integers(0, 2**31 - 1))
        i = int(seed) % len(self.scene_list) if seed is not None else int(self.np_random.integers(len(self.scene_list)))
        return self.scene_list[i]

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
