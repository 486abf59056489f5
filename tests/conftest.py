"""Shared fixtures: the real tiny SmolVLA base and real demo-world datasets, built once per session."""

import atexit
import os
import shutil
import sys
import tempfile


def _private_folder(prefix: str) -> str:
    """A temporary folder removed when this process exits: a suite's feature cache reaches
    hundreds of megabytes, and every pytest process (each xdist worker too) makes its own."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# Before anything imports huggingface_hub: never touch the network, and keep
# the embedded VLM registration in a private cache for this session.
os.environ["HF_HUB_OFFLINE"] = "1"
if "HF_HOME" not in os.environ:
    os.environ["HF_HOME"] = _private_folder("kuavo-test-hf-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runs share one frozen-feature cache folder per test session, never the user's.
os.environ["KUAVO_FEATURE_CACHE"] = _private_folder("kuavo-test-features-")

import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK_NAMES = ["task1_moving_grasp", "task2_weighing", "task3_placement", "task4_sorting"]


def stage_plans(cfg, sizes: dict[int, int] | None = None) -> dict:
    """The run's strategy's plan by stage name (training frames per task: 100 each unless given)."""
    from kuavo_train.strategies import get_strategy

    sizes = sizes or {s.task_id: 100 for s in cfg.ordered_stages()}
    return {p.stage.name: p for p in get_strategy(cfg).plan(sizes)}


def shared(tmp_path_factory, name: str, build):
    """`build(folder)`'s value, built once per test session even with several pytest-xdist workers.

    The first worker that asks builds it under a file lock in the folder all workers share;
    the others wait and reuse it. Per-worker session fixtures would repeat minutes of data
    generation and training in every worker. Tests must not modify what this returns
    (copy it first)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder; each worker's own is popen-gw<N> under it
    folder = base / f"shared-{name}"
    value_file = folder / ".value.pickle"
    with FileLock(str(folder) + ".lock"):
        if not value_file.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir(parents=True)
            value = build(folder)
            value_file.write_bytes(pickle.dumps(value))
            return value
    return pickle.loads(value_file.read_bytes())


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory) -> Path:
    """The embedded base (tiny random SmolVLA), chunk 10 / 5 action steps like the demo profile."""

    def build(folder: Path) -> Path:
        from kuavo_train.config.loading import load_run_config
        from kuavo_train.policy.base_model import build_base_model

        cfg = load_run_config(["profile=demo"])
        return build_base_model(
            folder / "base",
            instructions=[s.instruction for s in cfg.ordered_stages()],
            chunk_size=cfg.policy.chunk_size,
            n_action_steps=cfg.policy.n_action_steps,
            seed=0,
        )

    return shared(tmp_path_factory, "demo_base", build)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """Small demo-world datasets for the four tasks: 3 training + 2 held-out episodes each."""

    def build(folder: Path) -> Path:
        from kuavo_train.data.demo_world import write_demo_world

        write_demo_world(folder / "datasets", tasks=TASK_NAMES, num_train_episodes=3, num_val_episodes=2, seed=0,
                         image_size=64)
        return folder / "datasets"

    return shared(tmp_path_factory, "demo_data", build)


def tiny_overrides(run_dir: Path, demo_base: Path, demo_data: Path, *extra: str) -> list[str]:
    """The demo profile, shrunk so that a four-stage run takes seconds."""
    return [
        "profile=demo",
        f"run_dir={run_dir}",
        f"data_root={demo_data}",
        f"policy.pretrained_path={demo_base}",
        "dataloader.batch_size=16",
        "validation.validation_episodes=2",
        "validation.validation_freq_epoch=1",
        "logging.progress_bars=false",
        "logging.log_freq_steps=1",
        "evaluation.closed_loop_episodes=0",
        *[f"stages.{t}.max_epoch=1" for t in TASK_NAMES],
        *extra,
    ]


def stage_2_killed_and_resumed(tmp_path: Path, python_exe: str, demo_base: Path, demo_data: Path, *extra: str):
    """Two runs of stages 1-2 (`stages.task2_weighing.max_epoch=3`, one CLI invocation per stage):
    `ref` uninterrupted, `cut` killed after stage 2's first checkpoint and resumed. Returns
    (ref, cut) run dirs; the resumed invocation must say it resumed."""
    import subprocess

    def args(run_dir, task):
        return [python_exe, "-m", "kuavo_train.cli.main", "train",
                *tiny_overrides(run_dir, demo_base, demo_data, *extra, f"task=tasks/{task}",
                                "evaluation.after_each_stage=false", "stages.task2_weighing.max_epoch=3")]

    def run(run_dir, task):
        r = subprocess.run(args(run_dir, task), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for run_dir in (ref, cut):
        run(run_dir, TASK_NAMES[0])
    run(ref, TASK_NAMES[1])
    kill_after_first_checkpoint(args(cut, TASK_NAMES[1]),
                                cut / f"stage2_{TASK_NAMES[1]}" / "checkpoints" / "last" / "kuavo_checkpoint.json", 3)
    r = run(cut, TASK_NAMES[1])
    assert "resuming from last" in r.stdout + r.stderr
    return ref, cut


def kill_after_first_checkpoint(cmd: list[str], meta: Path, max_epoch: int) -> None:
    """Run `cmd` and SIGKILL its whole process group as soon as the checkpoint `meta` file
    (kuavo_checkpoint.json of a stage's `last`) appears, before the stage's last epoch."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not meta.is_file() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(meta.read_text())["epoch"] < max_epoch, "the run finished before it could be killed"


@pytest.fixture
def python_exe() -> str:
    return sys.executable


# The shared four-stage run: task 1 gets two epochs so that best and last can differ.
FULL_RUN_EXTRA = ("stages.task1_moving_grasp.max_epoch=2",)


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, demo_base, demo_data):
    """One real four-stage sequential run on the tiny data, shared by every test module."""
    from kuavo_train.config.loading import load_run_config
    from kuavo_train.training.pipeline import Pipeline

    def build(folder: Path) -> Path:
        Pipeline(load_run_config(tiny_overrides(folder / "run", demo_base, demo_data, *FULL_RUN_EXTRA))).run()
        return folder / "run"

    run_dir = shared(tmp_path_factory, "full_run", build)
    return load_run_config(tiny_overrides(run_dir, demo_base, demo_data, *FULL_RUN_EXTRA)), run_dir


def final_pretrained(run_dir: Path, name: str) -> Path:
    import json

    state = json.loads((run_dir / "run.json").read_text())
    return run_dir / state["stages"][name]["final_checkpoint"] / "pretrained_model"


def moved_run(run_dir, demo_data, origin):
    """A copy of `run_dir` whose run.json records paths relative to `origin`, as a run started there
    with run_dir=runs/r data_root=data records them."""
    import json

    shutil.copytree(run_dir, origin / "runs" / "r", symlinks=True)
    (origin / "data").symlink_to(demo_data, target_is_directory=True)
    state_file = origin / "runs" / "r" / "run.json"
    state = json.loads(state_file.read_text())
    state["config"]["run_dir"], state["config"]["data_root"] = "runs/r", "data"
    for name, stage in state["config"]["stages"].items():
        stage["dataset"]["root"] = f"data/{name}"
    state_file.write_text(json.dumps(state))
    return origin / "runs" / "r"


# --- Kuavo ROS1 bags (kuavo-train convert rosbag) ---------------------------------------------
# Per task: hand kind and whether the base walks (task 4: 20-dim action). 5 episodes of 40 frames
# (140 head-camera frames at 30 Hz, sample_drop 10 at each end, every 3rd kept); the last 2 are `val`.
BAG_TASKS = {
    "task1_moving_grasp": ("leju_claw", True),
    "task2_weighing": ("rq2f85", True),
    "task3_placement": ("dexhand", True),
    "task4_sorting": ("leju_claw", False),
}
BAG_EPISODES, BAG_VAL_EPISODES, BAG_HEAD_FRAMES, BAG_FRAMES = 5, 2, 140, 40


def task_instruction(task: str) -> str:
    """The spec's instruction of a task, from its stage config."""
    import yaml

    return yaml.safe_load((REPO / "configs" / "policy" / "tasks" / f"{task}.yaml").read_text())["instruction"]


def bag_topic_map(task: str):
    """The default topic map, set up for one synthetic task (64x48 images kept as recorded)."""
    from kuavo_train.data.rosbag.topic_map import TopicMap

    hand, only_arm = BAG_TASKS[task]
    return TopicMap(image_size=None, instruction=task_instruction(task), only_arm=only_arm, hand={"kind": hand},
                    split={"val_episodes": BAG_VAL_EPISODES})


@pytest.fixture(scope="session")
def kuavo_bags(tmp_path_factory) -> dict:
    """{task: [SyntheticBag, ...]}: realistic synthetic Kuavo recordings, seeds 0..4."""
    def build(root: Path) -> dict:
        from kuavo_train.data.rosbag.synthetic import write_synthetic_bag

        return {task: [write_synthetic_bag(root / task / f"{task}_{i:02d}.bag", task=task, hand_kind=hand,
                                           only_arm=only_arm, n_frames=BAG_HEAD_FRAMES, seed=i) for i in range(BAG_EPISODES)]
                for task, (hand, only_arm) in BAG_TASKS.items()}

    return shared(tmp_path_factory, "kuavo_bags", build)


@pytest.fixture(scope="session")
def kuavo_bag_datasets(tmp_path_factory, kuavo_bags) -> dict:
    """{task: dataset root}: the four tasks' bags converted to LeRobot v3.0 (video), repo_id kuavo/<task>."""
    def build(out: Path) -> dict:
        from kuavo_train.data.rosbag.convert import convert_bags

        roots = {}
        for task, bags in kuavo_bags.items():
            result = convert_bags([b.path for b in bags], out / task, bag_topic_map(task), repo_id=f"kuavo/{task}",
                                  progress=False)
            assert not result.failures, result.failures
            roots[task] = result.out
        return roots

    return shared(tmp_path_factory, "kuavo_bag_datasets", build)


class FakeHub:
    """A local stand-in for the model hub that counts the connections it gets and drops each one
    at once: set `HF_ENDPOINT=hub.url` for a subprocess that must never ask a hub (one that
    cannot be reached would be waited on and retried for minutes)."""

    def __enter__(self):
        import socket
        import threading

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.server.close()
