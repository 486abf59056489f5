"""The Kuavo demo world as a gymnasium environment, in the observation format of its datasets.

Observations follow LeRobot's env convention, so that stock `preprocess_observation`
turns them into exactly the keys the policies were trained on:
`pixels/<camera>` (HWC uint8) -> `observation.images.<camera>` for head_cam_h,
wrist_cam_l, wrist_cam_r; `agent_pos` (16 float32) -> `observation.state`. Actions are
the 16 absolute joint targets of the datasets. The instruction is `task_description`.

Episode seed -> scene (`scenes`):
- "heldout" (default): the dataset's held-out scenes (`meta/demo_world.json`,
  `scene_seeds.val`), scene index = (seed - 1000) mod their number: lerobot-eval's default
  seeds 1000, 1001, ... visit them in order from the first;
- "train": the same over the training scenes;
- "seed": the episode seed is the scene seed itself (any integer is a new scene; no
  dataset needed).
An episode ends with success (terminated) or after the world's step limit (truncated);
`info["is_success"]` says which. The reward is the world's `progress()` after the step (in
[0, 1], 1 exactly on success), so lerobot-eval's `avg_max_reward` is how far episodes got.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from kuavo_train.data.demo_world.tasks import CAMERAS, TASKS_BY_NAME, DemoWorldError
from kuavo_train.data.demo_world.world import KuavoDemoWorld
from kuavo_train.envs.seeding import EPISODE_KEY, encode, scene_for

SCENE_MODES = ("heldout", "train", "seed")
DEMO_META = "demo_world.json"
DEFAULT_DATA_ROOT = Path("outputs/demo/datasets")  # where `make demo` / `kuavo-train make-data` write
DEFAULT_IMAGE_SIZE = 64
FPS = 10


def default_dataset_root(task: str) -> Path:
    return DEFAULT_DATA_ROOT / task


def read_demo_meta(dataset_root) -> dict | None:
    p = Path(dataset_root) / "meta" / DEMO_META
    return json.loads(p.read_text()) if p.is_file() else None


class KuavoDemoEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}

    def __init__(self, task: str = "task1_moving_grasp", dataset_root: str | None = None, scenes: str = "heldout",
                 image_size: int | None = None, episode_length: int | None = None, render_mode: str = "rgb_array",
                 instruction: str | None = None):
        super().__init__()
        if task not in TASKS_BY_NAME:
            raise DemoWorldError(f"kuavo_demo: unknown task {task!r} (known: {', '.join(TASKS_BY_NAME)})")
        if scenes not in SCENE_MODES:
            raise DemoWorldError(f"kuavo_demo: scenes must be one of {', '.join(SCENE_MODES)} (got {scenes!r})")
        root = Path(dataset_root) if dataset_root else default_dataset_root(task)
        meta = read_demo_meta(root)
        self.scene_list: list[int] | None = None
        if scenes != "seed":
            if meta is None:
                raise DemoWorldError(
                    f"kuavo_demo: no scenes for {task}: {root / 'meta' / DEMO_META} not found (build the demo data with "
                    "`make demo` or `kuavo-train make-data`, point --env.dataset_root at a demo-world dataset, or use "
                    "--env.scenes=seed)")
            if meta.get("task") != task:
                raise DemoWorldError(f"kuavo_demo: {root} holds task {meta.get('task')!r}, not {task!r}")
            self.scene_list = [int(s) for s in meta["scene_seeds"]["val" if scenes == "heldout" else "train"]]
            if not self.scene_list:
                raise DemoWorldError(f"kuavo_demo: {root} records no {scenes} scenes")
        size = int(image_size or (meta or {}).get("image_size") or DEFAULT_IMAGE_SIZE)
        self.world = KuavoDemoWorld(task, size)
        if episode_length:
            self.world.max_steps = int(episode_length)
        self.task = task
        # the instruction a run trained the task with, when its task config changed the world's own
        self.task_description = instruction or TASKS_BY_NAME[task].instruction
        self._max_episode_steps = self.world.max_steps
        self.render_mode = render_mode
        self.image_size = size
        img = spaces.Box(0, 255, (size, size, 3), dtype=np.uint8)
        self.observation_space = spaces.Dict({
            "pixels": spaces.Dict({cam: img for cam in CAMERAS}),
            "agent_pos": spaces.Box(-np.inf, np.inf, (16,), dtype=np.float32),
            EPISODE_KEY: spaces.Box(-1.0, float(1 << 24), (3,), dtype=np.float32),
        })
        self.action_space = spaces.Box(-np.inf, np.inf, (16,), dtype=np.float32)
        self.episode_seed: int | None = None
        self.scene_seed: int | None = None
        self._obs: dict | None = None

    def scene_for(self, seed: int | None) -> int:
        return scene_for(self.scene_list, seed, self.np_random)

    def _observation(self, world_obs: dict) -> dict:
        self._obs = world_obs
        return {
            "pixels": {cam: world_obs[f"observation.images.{cam}"] for cam in CAMERAS},
            "agent_pos": np.asarray(world_obs["observation.state"], dtype=np.float32),
            EPISODE_KEY: encode(self.episode_seed, self.world.steps),
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode_seed = None if seed is None else int(seed)
        self.scene_seed = self.scene_for(seed)
        obs = self._observation(self.world.reset(self.scene_seed))
        return obs, {"is_success": False, "scene_seed": self.scene_seed}

    def step(self, action):
        obs = self._observation(self.world.step(np.asarray(action, dtype=np.float64).reshape(-1)))
        success = bool(self.world.success)
        terminated = success
        truncated = not success and self.world.steps >= self.world.max_steps
        info = {"is_success": success, "scene_seed": self.scene_seed, "events": len(self.world.events)}
        return obs, float(self.world.progress()), terminated, truncated, info

    def render(self):
        """The three cameras side by side (what lerobot-eval writes into its videos)."""
        if self._obs is None:
            return np.zeros((self.image_size, 3 * self.image_size, 3), dtype=np.uint8)
        return np.concatenate([self._obs[f"observation.images.{cam}"] for cam in CAMERAS], axis=1)

    def close(self):
        pass
