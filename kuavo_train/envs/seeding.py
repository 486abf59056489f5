"""One episode seed decides an episode: its scene AND the policy's sampling noise.

SmolVLA draws its flow-matching noise from torch's global RNG. Stock `lerobot-eval`
seeds that RNG once (`set_seed(--seed)`) before it builds the policy, so on its own the
noise of episode k depends on how much of the stream model construction and episodes
0..k-1 consumed: a different loader, episode order or worker split gives other noise and
another success rate for the same model and scenes.

Our environments therefore publish their episode seed and step in every observation
(`EPISODE_KEY`, three float32 numbers: seed // 2**16, seed % 2**16, step; float32 holds
them exactly). `EpisodeSeedStep`, the environment preprocessor that `lerobot-eval`
applies to every observation (`EnvConfig.get_env_processors`), removes that key and,
when a rollout starts (every batch row at step 0), calls LeRobot's own
`set_seed(seed of the first row)`. It runs in the process that holds the policy, so it
works with synchronous and asynchronous vector envs alike. With one environment per
batch (`--eval.batch_size=1`) every episode's noise then depends on its own seed only,
and our closed-loop evaluation, which applies the same step, reproduces each episode.
"""

from __future__ import annotations

import numpy as np
import torch
from lerobot.processor import ObservationProcessorStep

EPISODE_KEY = "kuavo_episode"
POLICY_EPISODE_KEY = f"observation.{EPISODE_KEY}"  # the key after lerobot's preprocess_observation
_LOW = 1 << 16
MAX_SEED = 1 << 40  # seed // 2**16 must stay below 2**24 to be exact in float32


def scene_for(scene_list: list[int] | None, seed: int | None, rng: np.random.Generator) -> int:
    """The scene of an episode seed. With a dataset's held-out scenes, seeds EVAL_START_SEED,
    EVAL_START_SEED + 1, ... (lerobot-eval's default --seed, and ours) visit them in their stored
    order from the first, whatever their number, so that n episodes are the first n scenes, those
    the dataset's expert success was measured on."""
    from kuavo_train.data.generated import EVAL_START_SEED

    if scene_list is None:
        return int(seed) if seed is not None else int(rng.integers(0, 2**31 - 1))
    i = (int(seed) - EVAL_START_SEED) % len(scene_list) if seed is not None else int(rng.integers(len(scene_list)))
    return scene_list[i]


def encode(seed: int | None, step: int) -> np.ndarray:
    """The observation entry; seed -1 means "not seeded" (no reseeding)."""
    if seed is None or not 0 <= int(seed) < MAX_SEED:
        return np.array([-1.0, -1.0, float(step)], dtype=np.float32)
    s = int(seed)
    return np.array([s // _LOW, s % _LOW, float(step)], dtype=np.float32)


def decode(values) -> list[tuple[int | None, int]]:
    """(seed or None, step) per batch row."""
    arr = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).reshape(-1, 3)
    out = []
    for hi, lo, step in arr:
        out.append((None if hi < 0 else int(hi) * _LOW + int(lo), int(step)))
    return out


class EpisodeSeedStep(ObservationProcessorStep):
    """Drop the episode entry from the observation; at a rollout's first step, seed every RNG
    (LeRobot's `set_seed`: python, numpy, torch, CUDA) with the first row's episode seed."""

    def observation(self, observation):
        entry = observation.pop(POLICY_EPISODE_KEY, None)
        if entry is None:
            return observation
        rows = decode(entry)
        if rows and all(step == 0 for _, step in rows) and rows[0][0] is not None:
            from lerobot.utils.random_utils import set_seed

            set_seed(rows[0][0])
        return observation

    def transform_features(self, features):
        return features


def env_processors():
    """(preprocessor, postprocessor) for `EnvConfig.get_env_processors`."""
    from lerobot.processor import PolicyProcessorPipeline

    return PolicyProcessorPipeline(steps=[EpisodeSeedStep()]), PolicyProcessorPipeline(steps=[])
