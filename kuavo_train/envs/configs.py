"""LeRobot `EnvConfig` types for our simulators: `--env.type=kuavo_demo` and `--env.type=kuavo_metaworld`.

Importing this module registers both with LeRobot's config registry; stock
`lerobot-eval` / `lerobot-train` import it through the `lerobot_env_kuavo` plugin
distribution (plugins/lerobot_env_kuavo). The features declare exactly the keys
our datasets (and so our checkpoints) use, so no `--rename_map` is needed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig

import kuavo_train.envs.seeding as seeding

ACTION = "action"
STATE = "observation.state"


def _vector_env(make_one, n_envs: int, use_async_envs: bool):
    """LeRobot's default layout: Sync (or Async when asked and n_envs > 1), same-step autoreset;
    each env frozen once its episode ends (LeRobot's wrapper: a batch's finished episodes stop
    simulating and rendering until the slowest one ends, and add no reward of a next episode)."""
    from lerobot.envs.utils import freeze_after_episode_end

    kwargs = {}
    if use_async_envs and n_envs > 1:
        cls, kwargs["context"] = gym.vector.AsyncVectorEnv, "forkserver"
    else:
        cls = gym.vector.SyncVectorEnv
    return cls([freeze_after_episode_end(make_one) for _ in range(n_envs)],
               autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, **kwargs)


def _features(cameras: list[str], image_size: int, state_dim: int, action_dim: int):
    """(features, features_map): raw env keys -> policy keys (`pixels/<cam>` arrive as `observation.images.<cam>`)."""
    features = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,)),
                "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(state_dim,))}
    features_map = {ACTION: ACTION, "agent_pos": STATE}
    for cam in cameras:
        key = f"observation.images.{cam}"
        features[key] = PolicyFeature(type=FeatureType.VISUAL, shape=(image_size, image_size, 3))
        features_map[key] = key
    return features, features_map


@EnvConfig.register_subclass("kuavo_demo")
@dataclass
class KuavoDemoEnvConfig(EnvConfig):
    """The Kuavo demo world (kuavo_train/envs/demo.py). `task`: task1_moving_grasp, task2_weighing,
    task3_placement or task4_sorting. `dataset_root`: the task's demo-world dataset, whose
    `meta/demo_world.json` gives the scenes and the image size (default
    outputs/demo/datasets/<task>, relative to the working directory). `scenes`: heldout (the
    dataset's held-out scenes, number (episode seed - 1000) mod their number), train, or seed (the episode seed
    is the scene seed). `image_size` / `episode_length`: default the dataset's / the world's.
    `instruction`: the task string the env sends (default the world's own; a run whose task config
    changed it is evaluated with its own)."""

    task: str = "task1_moving_grasp"
    fps: int = 10
    dataset_root: str | None = None
    scenes: str = "heldout"
    image_size: int | None = None
    episode_length: int | None = None
    instruction: str | None = None

    def __post_init__(self):
        from kuavo_train.data.demo_world.tasks import CAMERAS
        from kuavo_train.envs.demo import DEFAULT_IMAGE_SIZE, read_demo_meta

        meta = read_demo_meta(self.root) if self.task else None
        size = int(self.image_size or (meta or {}).get("image_size") or DEFAULT_IMAGE_SIZE)
        self.features, self.features_map = _features(list(CAMERAS), size, 16, 16)

    @property
    def root(self) -> Path:
        from kuavo_train.envs.demo import default_dataset_root

        return Path(self.dataset_root) if self.dataset_root else default_dataset_root(str(self.task))

    @property
    def gym_kwargs(self) -> dict:
        return {"task": self.task, "dataset_root": str(self.root), "scenes": self.scenes,
                "image_size": self.image_size, "episode_length": self.episode_length, "instruction": self.instruction}

    def create_envs(self, n_envs: int, use_async_envs: bool = False):
        from kuavo_train.envs.demo import KuavoDemoEnv

        KuavoDemoEnv(**self.gym_kwargs).close()  # bad options fail here, in the caller's process, with one line
        return {self.type: {0: _vector_env(functools.partial(KuavoDemoEnv, **self.gym_kwargs), n_envs, use_async_envs)}}

    def get_env_processors(self):
        return seeding.env_processors()


@EnvConfig.register_subclass("kuavo_metaworld")
@dataclass
class KuavoMetaWorldEnvConfig(EnvConfig):
    """MetaWorld v3 as `kuavo-train benchmark metaworld` trains on it (kuavo_train/envs/metaworld.py).
    `task`: a MetaWorld v3 task with a scripted expert (push-v3, ...). `dataset_root`: the task's
    benchmark dataset, whose `meta/metaworld.json` gives camera, image size, state layout,
    horizon, instruction and held-out seeds (default data/metaworld/<task>). `scenes`: heldout
    (its `eval_seeds`, number (episode seed - 1000) mod their number), train, or seed. `camera`, `image_size`,
    `state_mode` (full | agent), `episode_length`: default the dataset's. A dataset recorded with
    the stock observation is evaluated in LeRobot's own `metaworld` env (its scene = the episode
    seed, its fixed camera and horizon, so none of these options applies), with our per-episode seeding.
    `instruction`: the task string the env sends (default the dataset's)."""

    task: str = "push-v3"
    fps: int = 80
    dataset_root: str | None = None
    scenes: str = "heldout"
    camera: str | None = None
    image_size: int | None = None
    state_mode: str | None = None
    episode_length: int | None = None
    instruction: str | None = None

    def __post_init__(self):
        from kuavo_train.data.metaworld.env import state_names
        from kuavo_train.envs.metaworld import is_stock, read_metaworld_meta, resolve_settings, stock_config

        meta = read_metaworld_meta(self.root) if self.task else None
        if is_stock(meta):
            stock = stock_config(str(self.task))
            self.features, self.features_map = dict(stock.features), dict(stock.features_map)
            return
        s = resolve_settings(str(self.task), meta, camera=self.camera, image_size=self.image_size,
                             state_mode=self.state_mode, horizon=self.episode_length)
        self.features, self.features_map = _features([s.camera], s.image_size, len(state_names(s.state_mode)), 4)

    @property
    def root(self) -> Path:
        from kuavo_train.envs.metaworld import default_dataset_root

        return Path(self.dataset_root) if self.dataset_root else default_dataset_root(str(self.task))

    @property
    def gym_kwargs(self) -> dict:
        return {"task": self.task, "dataset_root": str(self.root), "scenes": self.scenes, "camera": self.camera,
                "image_size": self.image_size, "state_mode": self.state_mode, "episode_length": self.episode_length,
                "instruction": self.instruction}

    def create_envs(self, n_envs: int, use_async_envs: bool = False):
        from kuavo_train.data.metaworld.env import MetaWorldError
        from kuavo_train.envs.metaworld import KuavoMetaWorldEnv, is_stock, make_stock_env, read_metaworld_meta

        if is_stock(read_metaworld_meta(self.root)):
            fixed = {k: v for k, v in (("camera", self.camera), ("image_size", self.image_size),
                                        ("state_mode", self.state_mode), ("episode_length", self.episode_length),
                                        ("instruction", self.instruction)) if v}
            if fixed or self.scenes == "train":
                what = f"--env.{next(iter(fixed))}" if fixed else "--env.scenes=train"
                raise MetaWorldError(f"kuavo_metaworld: {self.root} holds the stock observation: LeRobot's env fixes "
                                     f"camera, image, state, horizon, instruction and scenes (drop {what})")
            return {self.type: {0: make_stock_env(str(self.task), n_envs, use_async_envs)}}
        return {self.type: {0: _vector_env(functools.partial(KuavoMetaWorldEnv, **self.gym_kwargs), n_envs,
                                           use_async_envs)}}

    def get_env_processors(self):
        return seeding.env_processors()
