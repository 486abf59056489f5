"""MetaWorld v3 as a simulator: seeded scenes, fast headless rendering, scripted experts,
and episodes spread over worker processes.

The same `MetaWorldSim` produces the demonstrations and runs the closed-loop
evaluation, so camera, image size, render settings, state layout and horizon are
identical in both. Scenes are fully observable (the 39-dim observation carries the
goal, which the scripted experts need) and drawn from `env.seed(s)`: the raw env
ignores `reset(seed=...)`.

`observation="stock"` records what LeRobot's own `metaworld` env
(lerobot/envs/metaworld.py) shows a policy instead: its moved corner2 camera, its
full-quality render at MetaWorld's default 480 px flipped on both axes, its 4-dim
`agent_pos`, its instruction and its 500-step horizon, under its keys
(`observation.image`, `observation.state`). The image is stored resized to the
policy's input size with SmolVLA's own resize, which the policy applies to the
480 px frame anyway; closed-loop evaluation of such data runs LeRobot's env itself
(kuavo_train/envs/metaworld.py).

Rendering happens only in forked worker processes: a process that created an EGL
context must not fork another renderer, and the parent (which trains) never needs one.
"""

from __future__ import annotations

import os

# Headless rendering; must be set before mujoco is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")

import difflib  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import warnings  # noqa: E402

import numpy as np  # noqa: E402
from kuavo_train.data.generated import generator_processes  # noqa: E402
from kuavo_train.errors import KuavoError  # noqa: E402

# The scripted experts' gains exceed the action range by design (the env clips); not our concern.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")

DEFAULT_TASKS = ("push-v3", "pick-place-v3", "drawer-open-v3", "door-open-v3")
DEFAULT_CAMERA = "corner2"
IMAGE_SIZE = 64
HORIZON = 200
STATE_MODES = ("full", "agent")
STATE_KEY = "observation.state"
ACTION_KEY = "action"
OBSERVATIONS = ("ours", "stock")

# LeRobot's `metaworld` env, as read in lerobot 0.6.1 (the test compares our frames with its own).
STOCK_CAMERA = "corner2"
STOCK_CAMERA_POS = (0.75, 0.075, 0.7)  # it moves corner2 closer to the table
STOCK_RENDER_SIZE = 480  # it keeps MetaWorld's default render size
STOCK_IMAGE_KEY = "observation.image"  # its `pixels` is a bare array, so LeRobot names it this

# Our instruction per task (MetaWorld ships none). Tasks that share a scene differ only here.
INSTRUCTIONS = {
    "assembly-v3": "Pick up the nut and fit it over the peg.",
    "basketball-v3": "Pick up the ball and drop it through the hoop.",
    "bin-picking-v3": "Pick the cube out of the left bin and place it in the right bin.",
    "box-close-v3": "Pick up the lid and put it on the box.",
    "button-press-topdown-v3": "Press the button down from the top.",
    "button-press-topdown-wall-v3": "Reach over the wall and press the button down from the top.",
    "button-press-v3": "Press the button from the front.",
    "button-press-wall-v3": "Reach behind the wall and press the button from the front.",
    "coffee-button-v3": "Press the button on the coffee machine.",
    "coffee-pull-v3": "Pull the coffee mug out of the machine to the target.",
    "coffee-push-v3": "Push the coffee mug under the machine.",
    "dial-turn-v3": "Turn the dial.",
    "disassemble-v3": "Lift the nut off the peg.",
    "door-close-v3": "Close the door.",
    "door-lock-v3": "Turn the door lock down to lock it.",
    "door-open-v3": "Open the door by pulling its handle.",
    "door-unlock-v3": "Turn the door lock up to unlock it.",
    "hand-insert-v3": "Move the hand into the hole in the table.",
    "drawer-close-v3": "Push the drawer closed.",
    "drawer-open-v3": "Pull the drawer open by its handle.",
    "faucet-open-v3": "Turn the faucet handle to open it.",
    "faucet-close-v3": "Turn the faucet handle to close it.",
    "hammer-v3": "Pick up the hammer and hammer the nail in.",
    "handle-press-side-v3": "Press the handle down from the side.",
    "handle-press-v3": "Press the handle down.",
    "handle-pull-side-v3": "Pull the handle up from the side.",
    "handle-pull-v3": "Pull the handle up.",
    "lever-pull-v3": "Pull the lever up.",
    "peg-insert-side-v3": "Pick up the peg and insert it into the hole from the side.",
    "pick-place-wall-v3": "Pick up the puck, lift it over the wall and place it at the goal.",
    "pick-out-of-hole-v3": "Pick the puck out of the hole and lift it to the goal.",
    "reach-v3": "Move the gripper to the goal position.",
    "push-back-v3": "Push the puck backward to the goal.",
    "push-v3": "Push the puck across the table to the goal.",
    "pick-place-v3": "Pick up the puck and place it at the goal in the air.",
    "plate-slide-v3": "Slide the plate into the goal.",
    "plate-slide-side-v3": "Slide the plate sideways into the goal.",
    "plate-slide-back-v3": "Slide the plate backward out of the goal.",
    "plate-slide-back-side-v3": "Slide the plate backward and sideways out of the goal.",
    "peg-unplug-side-v3": "Pull the peg out of the hole sideways.",
    "soccer-v3": "Push the ball into the goal.",
    "stick-push-v3": "Pick up the stick and push the box with it.",
    "stick-pull-v3": "Pick up the stick and pull the box with it.",
    "push-wall-v3": "Push the puck around the wall to the goal.",
    "reach-wall-v3": "Reach over the wall to the goal position.",
    "shelf-place-v3": "Pick up the block and place it on the shelf.",
    "sweep-into-v3": "Sweep the puck into the hole.",
    "sweep-v3": "Sweep the puck off the table edge.",
    "window-open-v3": "Slide the window open.",
    "window-close-v3": "Slide the window closed.",
}


class MetaWorldError(KuavoError):
    """A bad benchmark input; `str()` is the one line shown to the user."""


def require_metaworld() -> None:
    try:
        import metaworld  # noqa: F401
    except ImportError as exc:
        raise MetaWorldError(
            f"metaworld error: metaworld is not installed ({exc.name or exc}): "
            "pip install -e '.[metaworld]' or run `make benchmark-metaworld`"
        ) from None


def known_tasks() -> list[str]:
    """MetaWorld v3 tasks that have a scripted expert (the ones we can make data for)."""
    require_metaworld()
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.policies import ENV_POLICY_MAP

    return sorted(set(ALL_V3_ENVIRONMENTS) & set(ENV_POLICY_MAP))


def check_tasks(tasks) -> list[str]:
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise MetaWorldError("metaworld error: --tasks is empty (give MetaWorld v3 names, e.g. push-v3,drawer-open-v3)")
    known = known_tasks()
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, known, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise MetaWorldError(f"metaworld error: unknown task {t!r}: {hint}({len(known)} v3 tasks with an expert, "
                                 f"e.g. {', '.join(known[:4])}, ...)")
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise MetaWorldError(f"metaworld error: task {dup[0]!r} appears twice in --tasks (a sequence trains each task once)")
    return tasks


@functools.lru_cache(maxsize=None)
def stock_env_facts(task: str) -> dict:
    """What LeRobot's own `metaworld` env uses for a task, read from an instance of it
    (cheap: it builds MetaWorld only at its first reset)."""
    require_metaworld()
    try:
        from lerobot.envs.metaworld import MetaworldEnv
    except ImportError as exc:
        raise MetaWorldError(f"metaworld error: LeRobot's metaworld env cannot be imported ({exc})") from None
    try:
        env = MetaworldEnv(task=task, obs_type="pixels_agent_pos")
    except KeyError:
        raise MetaWorldError(f"metaworld error: LeRobot's metaworld env has no task {task!r} "
                             "(--observation stock needs one of its tasks)") from None
    return {"instruction": env.task_description, "horizon": int(env._max_episode_steps), "camera": env.camera_name}


def instruction_for(task: str, observation: str = "ours") -> str:
    if observation == "stock":
        return stock_env_facts(task)["instruction"]
    return INSTRUCTIONS.get(task) or f"{task.removesuffix('-v3').replace('-', ' ').capitalize()}."


def state_names(mode: str) -> list[str]:
    """Names of the state dims: MetaWorld's observation layout (current frame, previous frame, goal)."""
    frame = ["hand_x", "hand_y", "hand_z", "gripper"] + [f"obj{k}_{c}" for k in (0, 1) for c in ("x", "y", "z", "qw", "qx", "qy", "qz")]
    if mode == "agent":
        return frame[:4]
    return frame + [f"prev_{n}" for n in frame] + ["goal_x", "goal_y", "goal_z"]


def image_key(camera: str) -> str:
    return f"observation.images.{camera}"


@dataclass(frozen=True)
class SimSettings:
    """Everything that must match between the data and the evaluation (stored in the sidecar).
    `observation`: "ours" or "stock" (LeRobot's metaworld env; see `stock`)."""

    task: str
    image_size: int = IMAGE_SIZE
    camera: str = DEFAULT_CAMERA
    horizon: int = HORIZON
    state_mode: str = "full"
    observation: str = "ours"

    @classmethod
    def from_meta(cls, meta: dict) -> "SimSettings":
        return cls(task=meta["task"], image_size=int(meta["image_size"]), camera=meta["camera"],
                   horizon=int(meta["horizon"]), state_mode=meta["state_mode"],
                   observation=meta.get("observation", "ours"))  # datasets from before the option are ours

    @classmethod
    def stock(cls, task: str, image_size: int = IMAGE_SIZE) -> "SimSettings":
        """LeRobot's metaworld observation of `task`; `image_size`: the stored (policy input) size."""
        facts = stock_env_facts(task)
        return cls(task=task, image_size=image_size, camera=facts["camera"], horizon=facts["horizon"],
                   state_mode="agent", observation="stock")

    @property
    def image_key(self) -> str:
        return STOCK_IMAGE_KEY if self.observation == "stock" else image_key(self.camera)

    @property
    def instruction(self) -> str:
        return instruction_for(self.task, self.observation)


def resize_like_smolvla(frame: np.ndarray, size: int) -> np.ndarray:
    """An HWC uint8 frame resized to size x size exactly as SmolVLA resizes its input images
    (LeRobot's `resize_with_pad` on [0, 1] floats), rounded back to uint8."""
    if frame.shape[0] == size and frame.shape[1] == size:
        return frame
    import torch
    from lerobot.policies.common.vla_utils import resize_with_pad

    img = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255.0
    out = resize_with_pad(img, size, size, pad_value=0)
    return (out[0].permute(1, 2, 0).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


class MetaWorldSim:
    """One task's env with fixed render settings; `reset(seed)` gives the seed's scene."""

    def __init__(self, settings: SimSettings):
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP

        s = self.settings = settings
        self.stock = s.observation == "stock"
        if self.stock:
            # Stock renders at MetaWorld's default size with its default quality; only the camera moves.
            env = ALL_V3_ENVIRONMENTS[s.task](render_mode="rgb_array", camera_name=STOCK_CAMERA)
            env.model.cam_pos[env.model.camera(STOCK_CAMERA).id] = STOCK_CAMERA_POS
        else:
            env = ALL_V3_ENVIRONMENTS[s.task](render_mode="rgb_array", camera_name=s.camera, width=s.image_size,
                                              height=s.image_size)
        env._partially_observable = False  # the goal is in the observation (the experts read it)
        del env.sawyer_observation_space  # cached for the hidden-goal layout; recomputed on access
        env._freeze_rand_vec = False  # a new scene at every reset ...
        env.seeded_rand_vec = True  # ... drawn from env.seed(s)
        env._set_task_called = True  # we set the scene by seed instead of a benchmark Task
        env.max_path_length = s.horizon + 1  # our own cap ends the episode first
        if not self.stock:
            m = env.model
            # Fast, deterministic llvmpipe rendering (~10x faster): no shadows, reflections or MSAA.
            m.light_castshadow[:] = 0
            m.mat_reflectance[:] = 0
            m.vis.quality.offsamples = 0
        self.env = env
        self.expert = ENV_POLICY_MAP[s.task]()
        self.fps = int(round(1.0 / env.dt))
        self.raw = None
        self.reward = 0.0

    def observation(self) -> dict:
        s = self.settings
        state = self.raw if s.state_mode == "full" else self.raw[:4]
        if self.stock:
            # Stock flips both axes (a mirror image, upright); the policy then resizes the frame.
            image = resize_like_smolvla(self.env.render()[::-1, ::-1], s.image_size)
        else:
            image = self.env.render()[::-1]  # MuJoCo's offscreen image is upside down for these cameras
        return {STATE_KEY: np.asarray(state, dtype=np.float32), s.image_key: image.copy()}

    def reset(self, seed: int) -> dict:
        self.env.seed(int(seed))
        self.raw, _ = self.env.reset()
        self.reward = 0.0
        return self.observation()

    def step(self, action) -> tuple[dict, bool]:
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(-1)[:4], -1.0, 1.0)
        self.raw, reward, _, _, info = self.env.step(a)
        self.reward = float(reward)  # MetaWorld's own dense reward (the lerobot-eval env reports it)
        return self.observation(), bool(info.get("success", False))

    def expert_action(self) -> np.ndarray:
        return np.clip(np.asarray(self.expert.get_action(self.raw), dtype=np.float32), -1.0, 1.0)

    def close(self) -> None:
        self.env.close()


def run_episode(sim: MetaWorldSim, seed: int, act, *, record: bool = False) -> dict:
    """Act until success or the horizon. `act(obs)` -> action; `None` uses the expert."""
    obs = sim.reset(seed)
    frames, success, steps = [], False, 0
    while steps < sim.settings.horizon and not success:
        action = sim.expert_action() if act is None else np.asarray(act(obs), dtype=np.float32).reshape(-1)
        if record:
            frames.append((obs, action.astype(np.float32)))
        obs, success = sim.step(action)
        steps += 1
    return {"seed": int(seed), "success": success, "steps": steps, "frames": frames if record else None}


# ---- worker processes -------------------------------------------------------------------

_JOB: tuple | None = None  # (function, chunks): inherited by forked workers, never pickled


def _init_worker(parent_pid: int) -> None:
    import signal

    from kuavo_train.processes import die_with_parent

    die_with_parent(parent_pid)
    # The parent stops the workers itself on Ctrl-C or SIGTERM; the handler they inherit from the
    # command line would print a traceback in each of them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Two 1-thread workers beat one 2-thread process on 2 cores (FINDINGS).
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _run_chunk(i: int, conn, parent_pid: int) -> None:
    _init_worker(parent_pid)
    fn, chunks = _JOB
    try:
        result = ("ok", fn(chunks[i]))
    except BaseException as e:  # noqa: BLE001 - raised again in the parent
        result = ("error", e)
    try:
        conn.send(result)
    except Exception:  # an exception that does not pickle
        conn.send(("error", RuntimeError(repr(result[1]))))


def fork_map(fn, items: list, workers: int) -> list:
    """`[fn(chunk) for chunk in split(items)]` flattened, each chunk in a forked process.

    Fork (not spawn) so the workers share the parent's loaded policy without pickling it
    and without re-importing torch; results come back in item order, so the outcome
    does not depend on the number of workers. One process per chunk, waited on here, rather
    than a pool: multiprocessing.Pool waits for ever when a worker is killed (out of memory, a
    crashing renderer), and concurrent.futures notices that but cannot stop the others."""
    global _JOB
    import multiprocessing as mp
    from multiprocessing.connection import wait

    if not items:
        return []
    n = max(1, min(int(workers), len(items)))
    chunks = [list(c) for c in np.array_split(np.arange(len(items)), n)]
    chunks = [[items[i] for i in c] for c in chunks if len(c)]
    ctx = mp.get_context("fork")
    _JOB = (fn, chunks)
    procs, conns = [], []
    try:
        for i in range(len(chunks)):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_run_chunk, args=(i, send, os.getpid()), daemon=True)
            proc.start()
            send.close()
            procs.append(proc)
            conns.append(recv)
        parts: list = [None] * len(chunks)
        waiting = set(range(len(chunks)))
        while waiting:
            ready = wait([conns[i] for i in waiting] + [procs[i].sentinel for i in waiting])
            for i in sorted(waiting):
                if conns[i] in ready or conns[i].poll():
                    try:
                        kind, value = conns[i].recv()
                    except EOFError:
                        kind, value = "died", None
                elif procs[i].sentinel in ready:
                    kind, value = "died", None
                else:
                    continue
                if kind == "error":
                    raise value
                if kind == "died":
                    procs[i].join()
                    raise MetaWorldError(
                        f"metaworld error: a simulator worker process died (exit code {procs[i].exitcode}; killed, or "
                        f"out of memory?): fewer at once with KUAVO_METAWORLD_WORKERS=1, or --workers 1")
                parts[i] = value
                waiting.discard(i)
    finally:
        _JOB = None
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
    return [r for part in parts for r in part]


WORKERS_ENV = "KUAVO_METAWORLD_WORKERS"


def default_workers() -> int:
    env = os.environ.get(WORKERS_ENV, "").strip()
    if not env:
        return generator_processes()
    if not env.isdigit() or int(env) < 1:
        raise MetaWorldError(f"metaworld error: {WORKERS_ENV}={env!r}: expected a whole number of "
                             f"processes, 1 or more")
    return int(env)
