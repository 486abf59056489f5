"""Write the demo world as real LeRobot v3.0 datasets, and run policies in it closed loop.

One dataset per task (`<out>/<task_name>/`), written by LeRobot's own
`LeRobotDataset.create / add_frame / save_episode / finalize`. Images are
stored as images (not video: torchcodec cannot load on machines without FFmpeg
libraries). Episodes 0..N-1 are the training split and N..N+M-1 the held-out
split, recorded in `meta/info.json` `splits`; `meta/demo_world.json` keeps the
scene seed of every episode so evaluation can replay held-out scenes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from kuavo_train.data.demo_world.tasks import CAMERAS, DEMO_TASKS, JOINT_NAMES, TASKS_BY_NAME, DemoWorldError
from kuavo_train.data.demo_world.world import SUCCESS_EVENTS, KuavoDemoWorld
from kuavo_train.data.generated import changed_params, made_with
from kuavo_train.files import replace_dir, staging_dir

FPS = 10
GENERATOR_VERSION = 2
META_FILE = "demo_world.json"

log = logging.getLogger(__name__)


def features(image_size: int) -> dict:
    vec = {"dtype": "float32", "shape": (16,), "names": list(JOINT_NAMES)}
    feats = {"observation.state": dict(vec), "action": dict(vec)}
    for cam in CAMERAS:
        feats[f"observation.images.{cam}"] = {"dtype": "image", "shape": (image_size, image_size, 3),
                                              "names": ["height", "width", "channels"]}
    return feats


def scene_seeds(task: str, seed: int, count: int, split: str) -> list[int]:
    """Scene seeds of a split. Tasks of one scene family get the SAME seeds (tasks 1 and 2
    see identical scenes and differ only by instruction); train and val never overlap."""
    family = TASKS_BY_NAME[task].scene_family
    offset = {"train": 0, "val": 1_000_000}[split]
    rng = np.random.default_rng([seed, {"conveyor": 1, "bottles": 3, "rack": 4}[family]])
    base = int(rng.integers(0, 10_000_000))
    return [offset + base + i for i in range(count)]


def expert_episode(task: str, scene_seed: int, image_size: int) -> list[tuple[dict, np.ndarray]] | None:
    """(observation, action) pairs of one expert demonstration; None if the expert failed."""
    w = KuavoDemoWorld(task, image_size)
    obs = w.reset(scene_seed)
    frames = []
    while not w.done:
        action = w.expert_action()
        frames.append((obs, action.astype(np.float32)))
        obs = w.step(action)
    return frames if w.success else None


def _params(task, num_train, num_val, seed, image_size) -> dict:
    t = TASKS_BY_NAME[task]
    return {"task": task, "task_id": t.task_id, "instruction": t.instruction, "seed": seed, "image_size": image_size,
            "num_train_episodes": num_train, "num_val_episodes": num_val, "generator_version": GENERATOR_VERSION}


def _check_inputs(out_dir, tasks, num_train, num_val, image_size) -> None:
    unknown = [t for t in tasks if t not in TASKS_BY_NAME]
    if unknown:
        raise DemoWorldError(f"demo world error: unknown task {unknown[0]!r} (known: {', '.join(TASKS_BY_NAME)})")
    if not tasks:
        raise DemoWorldError("demo world error: no tasks given")
    for name, v in (("num_train_episodes", num_train), ("num_val_episodes", num_val)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise DemoWorldError(f"demo world error: {name} must be an integer >= 1 (got {v!r})")
    if not 16 <= int(image_size) <= 256:
        raise DemoWorldError(f"demo world error: image_size must be within [16, 256] (got {image_size!r})")
    out = Path(out_dir)
    probe_dir = next((p for p in [out, *out.parents] if p.exists()), None)
    if probe_dir is None or not probe_dir.is_dir():
        raise DemoWorldError(f"demo world error: cannot write to {out}: {probe_dir} is not a directory")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise DemoWorldError(f"demo world error: cannot write to {out}: {probe_dir} is not writable")


def write_task_dataset(out_dir, task: str, *, num_train_episodes: int, num_val_episodes: int, seed: int,
                       image_size: int, overwrite: bool = False) -> Path:
    """`out_dir/<task>/` as a LeRobot dataset (temp folder + rename: never half-written)."""
    import datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets.disable_progress_bars()  # one "Map" bar per episode is noise, not progress
    _check_inputs(out_dir, [task], num_train_episodes, num_val_episodes, image_size)
    out_dir = Path(out_dir)
    dest = out_dir / task
    params = _params(task, num_train_episodes, num_val_episodes, seed, image_size)
    if dest.exists() and not overwrite:
        if made_with(dest, META_FILE, params):
            return dest
        raise _made_otherwise(dest, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out_dir, task)
    try:
        root = tmp / task
        ds = LeRobotDataset.create(repo_id=f"kuavo_demo/{task}", fps=FPS, features=features(image_size), root=root,
                                   robot_type="kuavo", use_videos=False)
        instruction = TASKS_BY_NAME[task].instruction
        used: dict[str, list[int]] = {}
        for split, count in (("train", num_train_episodes), ("val", num_val_episodes)):
            candidates = iter(scene_seeds(task, seed, 10 * count + 10, split))
            used[split] = []
            while len(used[split]) < count:
                s = next(candidates)
                frames = expert_episode(task, s, image_size)
                if frames is None:  # keep only successful demonstrations
                    continue
                for obs, action in frames:
                    ds.add_frame({**obs, "action": action, "task": instruction})
                ds.save_episode()
                used[split].append(s)
        ds.finalize()
        info_path = root / "meta" / "info.json"
        info = json.loads(info_path.read_text())
        info["splits"] = {"train": f"0:{num_train_episodes}",
                          "val": f"{num_train_episodes}:{num_train_episodes + num_val_episodes}"}
        info_path.write_text(json.dumps(info, indent=4))
        meta = {**params, "scene_seeds": used, "success_events": SUCCESS_EVENTS[task],
                "success_criterion": "the task's key events happen in order (see kuavo_train/data/demo_world/world.py)"}
        (root / "meta" / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(root, dest)  # the old dataset goes only once the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _made_otherwise(dest: Path, params: dict) -> DemoWorldError:
    changed = ", ".join(changed_params(dest, META_FILE, params)[:3])
    return DemoWorldError(f"demo world error: {dest} exists, made with other settings ({changed}): "
                          f"`kuavo-train make-data --overwrite` regenerates it")


def write_demo_world(out_dir, *, tasks=None, num_train_episodes: int = 40, num_val_episodes: int = 8, seed: int = 0,
                     image_size: int = 64, overwrite: bool = False, workers: int = 1) -> list[Path]:
    """One dataset per task; every input is checked before anything is written.

    `workers` > 1 writes tasks in that many processes at once (each task's dataset is independent
    and written into its own temp folder, so a failure still leaves no half-written dataset)."""
    tasks = list(tasks) if tasks is not None else [t.name for t in DEMO_TASKS]
    _check_inputs(out_dir, tasks, num_train_episodes, num_val_episodes, image_size)
    for task in tasks:
        dest = Path(out_dir) / task
        params = _params(task, num_train_episodes, num_val_episodes, seed, image_size)
        if dest.exists() and not overwrite and not made_with(dest, META_FILE, params):
            raise _made_otherwise(dest, params)
    kw = dict(num_train_episodes=num_train_episodes, num_val_episodes=num_val_episodes, seed=seed,
              image_size=image_size, overwrite=overwrite)
    workers = max(1, min(int(workers), len(tasks)))
    t0 = time.perf_counter()

    def written(task: str, path: Path) -> Path:
        log.info("demo world: %s written, %d + %d episodes (%.0f s since the first task began)", task,
                 num_train_episodes, num_val_episodes, time.perf_counter() - t0)
        return path

    if workers == 1:
        return [written(t, write_task_dataset(out_dir, t, **kw)) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: the caller may hold torch's thread pools, which a forked child must not inherit
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(write_task_dataset, out_dir, t, **kw): t for t in tasks}
        paths = {futures[f]: written(futures[f], f.result()) for f in as_completed(futures)}
        return [paths[t] for t in tasks]


def _worker_init(parent_pid: int) -> None:
    from kuavo_train.logs import quiet_worker
    from kuavo_train.processes import die_with_parent

    die_with_parent(parent_pid)
    quiet_worker()


def load_scene_seeds(root, split: str = "val") -> list[int]:
    return list(json.loads((Path(root) / "meta" / META_FILE).read_text())["scene_seeds"][split])


class ExpertPolicy:
    """The scripted expert as a closed-loop policy (it reads the world it is attached to)."""

    def __init__(self):
        self.world: KuavoDemoWorld | None = None

    def reset(self):
        pass

    def __call__(self, obs: dict, instruction: str) -> np.ndarray:
        return self.world.expert_action()


def run_closed_loop(task: str, scene_seeds: list[int], policy_fn, *, image_size: int = 64, max_steps: int | None = None) -> dict:
    """Reset to each scene, act with `policy_fn(obs, instruction)` until success or the step limit.

    For scripted policies (the expert). Models are evaluated through kuavo_train/envs (the
    `kuavo_demo` env of lerobot-eval, with its per-episode seeding) by evaluation/closed_loop.py."""
    world = KuavoDemoWorld(task, image_size)
    if max_steps is not None:
        world.max_steps = int(max_steps)
    if isinstance(policy_fn, ExpertPolicy):
        policy_fn.world = world
    instruction = TASKS_BY_NAME[task].instruction
    successes, steps = [], []
    for s in scene_seeds:
        obs = world.reset(int(s))
        policy_fn.reset()
        while not world.done:
            obs = world.step(policy_fn(obs, instruction))
        successes.append(bool(world.success))
        steps.append(world.steps)
    return {"success_rate": float(np.mean(successes)) if successes else float("nan"), "successes": successes, "steps": steps}
