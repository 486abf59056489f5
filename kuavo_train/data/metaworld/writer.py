"""Scripted-expert demonstrations of MetaWorld v3 tasks as LeRobot v3.0 datasets.

One dataset per task (`<out>/<task>/`), written with LeRobot's own
`LeRobotDataset.create / add_frame / save_episode / finalize`, camera images
stored as images. Only successful expert episodes are kept. Episodes 0..N-1
are the training split (scenes from training seeds), N.. the held-out split
(the expert's successful episodes on the held-out evaluation seeds), recorded
in `meta/info.json` `splits`. `meta/metaworld.json` tells the evaluation which
simulator settings and held-out seeds to use, and the expert's own success
rate on them (the ceiling).

All tasks draw scenes from the SAME seeds, so tasks of one MetaWorld scene
(push / pick-place) see identical object and goal placements.

With the stock observation (`SimSettings.observation == "stock"`) the held-out
seeds are the episode seeds our evaluation and `lerobot-eval` use by default
(1000, 1001, ...): LeRobot's env takes the episode seed as the scene seed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from kuavo_train.data.generated import EVAL_START_SEED, changed_params, made_with
from kuavo_train.data.metaworld.env import (
    ACTION_KEY,
    OBSERVATIONS,
    STATE_KEY,
    STATE_MODES,
    STOCK_CAMERA_POS,
    STOCK_RENDER_SIZE,
    MetaWorldError,
    MetaWorldSim,
    SimSettings,
    check_tasks,
    fork_map,
    run_episode,
    state_names,
)
from kuavo_train.files import replace_dir, staging_dir

META_FILE = "metaworld.json"
GENERATOR_VERSION = 1
EVAL_SEED_OFFSET = 1_000_000  # held-out seeds never overlap training seeds


def stock_eval_start() -> int:
    return EVAL_START_SEED


def scene_seeds(seed: int, count: int, split: str, observation: str = "ours") -> list[int]:
    if observation == "stock" and split == "eval":
        return [stock_eval_start() + i for i in range(count)]
    base = int(np.random.default_rng([int(seed), 7]).integers(0, 10_000_000))
    return [{"train": 0, "eval": EVAL_SEED_OFFSET}[split] + base + i for i in range(count)]


def features(settings: SimSettings) -> dict:
    names = state_names(settings.state_mode)
    return {
        STATE_KEY: {"dtype": "float32", "shape": (len(names),), "names": names},
        ACTION_KEY: {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "grip"]},
        settings.image_key: {"dtype": "image", "shape": (settings.image_size, settings.image_size, 3),
                             "names": ["height", "width", "channels"]},
    }


def _expert_chunk(job) -> list[dict]:
    settings, seeds = job[0], job[1]
    sim = MetaWorldSim(settings)
    try:
        return [run_episode(sim, s, None, record=True) for s in seeds]
    finally:
        sim.close()


def expert_episodes(settings: SimSettings, seeds: list[int], workers: int) -> list[dict]:
    """The expert on each seed (in seed order), episodes spread over `workers` processes."""
    per_seed = fork_map(lambda chunk: _expert_chunk((settings, chunk)), list(seeds), workers)
    return per_seed


def _params(settings: SimSettings, num_train: int, num_eval: int, seed: int) -> dict:
    params = {**dataclasses.asdict(settings), "instruction": settings.instruction, "seed": seed,
              "num_train_episodes": num_train, "num_eval_seeds": num_eval, "generator_version": GENERATOR_VERSION}
    if settings.observation == "ours":
        del params["observation"]  # datasets written before the option still match
    return params


def _check(num_train: int, num_eval: int, settings: SimSettings) -> None:
    for name, v in (("train episodes", num_train), ("evaluation seeds", num_eval)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise MetaWorldError(f"metaworld error: {name} must be an integer >= 1 (got {v!r})")
    if settings.observation not in OBSERVATIONS:
        raise MetaWorldError(f"metaworld error: observation {settings.observation!r} (choose {', '.join(OBSERVATIONS)})")
    if settings.observation == "stock" and settings != SimSettings.stock(settings.task, settings.image_size):
        raise MetaWorldError("metaworld error: the stock observation fixes camera, state and horizon "
                             f"(got {settings}; build it with SimSettings.stock)")
    if settings.state_mode not in STATE_MODES:
        raise MetaWorldError(f"metaworld error: state mode {settings.state_mode!r} (choose {', '.join(STATE_MODES)})")
    if not 16 <= settings.image_size <= 512:
        raise MetaWorldError(f"metaworld error: image size must be within [16, 512] (got {settings.image_size})")
    if settings.horizon < 1:
        raise MetaWorldError(f"metaworld error: horizon must be >= 1 (got {settings.horizon})")


def write_task_dataset(out_dir, settings: SimSettings, *, num_train_episodes: int, num_eval_seeds: int, seed: int = 0,
                       workers: int = 1, overwrite: bool = False, log=None) -> Path:
    """`out_dir/<task>/`: reused when it exists with the same parameters; written to a temp folder + renamed."""
    import datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    check_tasks([settings.task])
    _check(num_train_episodes, num_eval_seeds, settings)
    datasets.disable_progress_bars()
    out_dir = Path(out_dir)
    dest = out_dir / settings.task
    params = _params(settings, num_train_episodes, num_eval_seeds, seed)
    if dest.exists() and not overwrite:
        if made_with(dest, META_FILE, params):
            return dest
        changed = ", ".join(changed_params(dest, META_FILE, params)[:3])
        raise MetaWorldError(f"metaworld error: {dest} exists, made with other settings ({changed}): pass "
                             f"--overwrite-data to regenerate it, or --data for another folder")
    t0 = time.time()
    # Training demos: try candidate seeds in order until enough expert successes.
    eval_seeds = scene_seeds(seed, num_eval_seeds, "eval", settings.observation)
    candidates = [s for s in scene_seeds(seed, 5 * num_train_episodes + 20, "train") if s not in eval_seeds]
    train, attempted, succeeded, pos = [], 0, 0, 0
    while len(train) < num_train_episodes:
        need = num_train_episodes - len(train)
        batch = candidates[pos : pos + need + (need + 9) // 10]  # ~10% spare for the expert's rare failures
        if not batch:
            raise MetaWorldError(f"metaworld error: the {settings.task} expert succeeded in only {len(train)} of "
                                 f"{attempted} scenes (need {num_train_episodes})")
        pos += len(batch)
        for ep in expert_episodes(settings, batch, workers):
            attempted += 1
            succeeded += bool(ep["success"])
            if ep["success"] and len(train) < num_train_episodes:
                train.append(ep)
    # Held-out scenes: every evaluation seed is tried; the expert's successes become the val split.
    held = expert_episodes(settings, eval_seeds, workers)
    val = [ep for ep in held if ep["success"]]
    if not val:
        raise MetaWorldError(f"metaworld error: the {settings.task} expert failed on all {num_eval_seeds} held-out scenes")
    gen_seconds = time.time() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out_dir, settings.task)
    try:
        root = tmp / settings.task
        fps = int(round(1.0 / 0.0125))  # MetaWorld steps at 80 Hz (frame_skip 5 x 2.5 ms)
        ds = LeRobotDataset.create(repo_id=f"metaworld/{settings.task}", fps=fps, features=features(settings), root=root,
                                   robot_type="sawyer", use_videos=False)
        instruction = settings.instruction
        for ep in train + val:
            for obs, action in ep["frames"]:
                ds.add_frame({**obs, ACTION_KEY: action, "task": instruction})
            ds.save_episode()
        ds.finalize()
        info_path = root / "meta" / "info.json"
        info = json.loads(info_path.read_text())
        n, m = len(train), len(val)
        info["splits"] = {"train": f"0:{n}", "val": f"{n}:{n + m}"}
        info_path.write_text(json.dumps(info, indent=4))
        from importlib.metadata import version

        meta = {
            **params,
            "simulator": "metaworld",
            "metaworld_version": version("metaworld"),
            "mujoco_version": version("mujoco"),
            "fps": fps,
            "render": _render_meta(settings),
            "train_seeds": [ep["seed"] for ep in train],
            "train_attempts": attempted,
            "train_expert_successes": succeeded,
            "expert_train_success_rate": succeeded / attempted,
            "eval_seeds": eval_seeds,
            "expert_eval_successes": [bool(ep["success"]) for ep in held],
            "expert_eval_success_rate": float(np.mean([ep["success"] for ep in held])),
            "val_seeds": [ep["seed"] for ep in val],
            "episode_steps": {"train": [ep["steps"] for ep in train], "val": [ep["steps"] for ep in val]},
            "generation_seconds": round(gen_seconds, 1),
            "success_criterion": "MetaWorld's info['success'] within the horizon",
        }
        (root / "meta" / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(root, dest)  # the old dataset goes only once the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        log.info("dataset %s: %d train + %d held-out episodes (expert: %d/%d training scenes, %d/%d held-out), %.0f s",
                 dest, len(train), len(val), succeeded, attempted, len(val), len(held), time.time() - t0)
    return dest


def _render_meta(settings: SimSettings) -> dict:
    if settings.observation == "stock":
        from importlib.metadata import version

        return {"env": "lerobot.envs.metaworld.MetaworldEnv", "lerobot_version": version("lerobot"),
                "camera": settings.camera, "camera_pos": list(STOCK_CAMERA_POS), "render_size": STOCK_RENDER_SIZE,
                "quality": "MetaWorld's defaults", "flipped_axes": [0, 1], "resized_to": settings.image_size,
                "resize": "SmolVLA's resize_with_pad (bilinear), as the policy resizes the 480 px frame"}
    return {"shadows": False, "reflections": False, "offsamples": 0, "image_flipped_upright": True}


def read_meta(root) -> dict:
    return json.loads((Path(root) / "meta" / META_FILE).read_text())


def has_metaworld(root) -> bool:
    return (Path(root) / "meta" / META_FILE).is_file()
