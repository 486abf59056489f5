"""Stock `lerobot-eval` in our simulators (the `lerobot_env_kuavo` plugin), and our own
closed-loop evaluation giving the same numbers, episode by episode, on the same checkpoint
and seeds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, FakeHub, final_pretrained

LEROBOT_EVAL = Path(sys.executable).parent / "lerobot-eval"
TASK = "task1_moving_grasp"
SEED = 7  # two held-out scenes in the test data: seeds 7, 8 -> scenes 1, 0


def _start_lerobot_eval(out_dir: Path, *args: str) -> subprocess.Popen:
    """Real lerobot-eval in a subprocess, offline, one torch thread (it runs while we compute ours)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl",
           "TOKENIZERS_PARALLELISM": "false"}  # HF_HOME: the session's, where the tiny VLM is registered
    batch = [] if any(a.startswith("--eval.batch_size=") for a in args) else ["--eval.batch_size=1"]
    cmd = [str(LEROBOT_EVAL), *args, *batch, "--policy.device=cpu", f"--output_dir={out_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _lerobot_eval_result(proc: subprocess.Popen, out_dir: Path) -> dict:
    """Its per-episode metrics (eval_info.json: successes, sum_rewards, max_rewards)."""
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-4000:]
    info = json.loads((out_dir / "eval_info.json").read_text())
    (task,) = info["per_task"]
    return task["metrics"]


@pytest.fixture
def one_thread():
    """lerobot-eval runs with OMP_NUM_THREADS=1: compute ours with one thread too (same float sums)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _per_episode(result: dict) -> dict:
    eps = result["episodes"]
    return {"successes": [e["success"] for e in eps], "sum_rewards": [e["sum_reward"] for e in eps],
            "max_rewards": [e["max_reward"] for e in eps]}


def _same(ours: dict, stock: dict) -> None:
    assert ours["successes"] == stock["successes"]
    assert ours["sum_rewards"] == stock["sum_rewards"]  # exact: same actions, same float sums
    assert ours["max_rewards"] == stock["max_rewards"]


def test_the_plugin_distribution_is_what_lerobot_imports():
    """register_third_party_plugins imports a distribution's metadata Name, when it starts with
    `lerobot_env_`, as a module of exactly that name (lerobot-eval below shows it end to end)."""
    import importlib.metadata

    from lerobot.envs.configs import EnvConfig
    from lerobot.utils.import_utils import register_third_party_plugins

    assert importlib.metadata.distribution("lerobot_env_kuavo").metadata["Name"] == "lerobot_env_kuavo"
    register_third_party_plugins()
    assert sys.modules["lerobot_env_kuavo"]
    assert EnvConfig.get_choice_class("kuavo_demo").__name__ == "KuavoDemoEnvConfig"
    assert EnvConfig.get_choice_class("kuavo_metaworld").__name__ == "KuavoMetaWorldEnvConfig"


def test_lerobot_eval_takes_a_copied_checkpoint_on_a_fresh_machine(full_run, demo_data, tmp_path):
    """A stage checkpoint copied elsewhere, an empty model cache, HF_HUB_OFFLINE unset: the plugin
    registers the checkpoint's bundled tiny VLM, so stock lerobot-eval loads and runs it without
    ever asking a hub."""
    import shutil

    _, run_dir = full_run
    ckpt = tmp_path / "copied" / "pretrained_model"
    shutil.copytree(final_pretrained(run_dir, "task4_sorting"), ckpt)
    out = tmp_path / "eval"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    cmd = [str(LEROBOT_EVAL), f"--policy.path={ckpt}", "--env.type=kuavo_demo", f"--env.task={TASK}",
           f"--env.dataset_root={demo_data / TASK}", "--env.episode_length=5", "--eval.n_episodes=1",
           "--eval.batch_size=1", "--policy.device=cpu", f"--output_dir={out}"]
    with FakeHub() as hub:
        env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_ENDPOINT=hub.url, OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (task,) = json.loads((out / "eval_info.json").read_text())["per_task"]
    assert len(task["metrics"]["successes"]) == 1
    assert hub.connections == 0, f"{hub.connections} connection(s) to the hub"


def test_lerobot_eval_and_our_closed_loop_agree_on_the_demo_world(full_run, demo_data, tmp_path, one_thread):
    """Batches of two episodes (the policy acts on both at once) and a last partial batch, which
    both sides run whole and cut."""
    from kuavo_train.evaluation.closed_loop import StockPolicyFn, WrapperPolicyFn, run_closed_loop
    from kuavo_train.policy import factory
    from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper

    _, run_dir = full_run
    ckpt = final_pretrained(run_dir, "task4_sorting")
    out = tmp_path / "eval"
    proc = _start_lerobot_eval(out, f"--policy.path={ckpt}", "--env.type=kuavo_demo", f"--env.task={TASK}",
                               f"--env.dataset_root={demo_data / TASK}", "--eval.n_episodes=3", "--eval.batch_size=2",
                               f"--seed={SEED}")

    # the forgetting matrix's path: stock policy + the checkpoint's processors
    cfg = factory.read_pretrained_config(ckpt)
    policy = factory.load_policy(ckpt, cfg)
    pre, post = factory.make_processors(cfg, pretrained_path=ckpt)
    matrix = run_closed_loop(TASK, demo_data / TASK, StockPolicyFn(policy, pre, post), 3, start_seed=SEED, batch_size=2)
    assert [e["seed"] for e in matrix["episodes"]] == [SEED, SEED + 1, SEED + 2]
    # `kuavo-train infer`'s path: the deployment wrapper
    infer = run_closed_loop(TASK, demo_data / TASK, WrapperPolicyFn(SmolVLAPolicyWrapper.from_pretrained(ckpt)), 3,
                            start_seed=SEED, batch_size=2)
    # the episode seed decides the noise too: seed 9 replays seed 7's scene with other noise
    short = {"episode_length": 20}
    a, b = (run_closed_loop(TASK, demo_data / TASK, StockPolicyFn(policy, pre, post), 1, start_seed=s,
                            env_options=short)["episodes"][0] for s in (SEED, SEED + 2))
    assert a["scene_seed"] == b["scene_seed"] and a["sum_reward"] != b["sum_reward"]

    stock = _lerobot_eval_result(proc, out)
    assert len(stock["successes"]) == 3
    assert all(r > 0 for r in stock["max_rewards"])  # the dense progress reward makes the comparison sensitive
    _same(_per_episode(matrix), stock)
    _same(_per_episode(infer), stock)


def test_a_missing_dataset_is_one_clear_line(tmp_path):
    from kuavo_train.data.demo_world.tasks import DemoWorldError
    from kuavo_train.envs import KuavoDemoEnvConfig

    cfg = KuavoDemoEnvConfig(task=TASK, dataset_root=str(tmp_path / "nope"))
    with pytest.raises(DemoWorldError, match="no scenes for task1_moving_grasp: .*--env.scenes=seed"):
        cfg.create_envs(1)
    with pytest.raises(DemoWorldError, match="unknown task 'task9'"):
        KuavoDemoEnvConfig(task="task9", scenes="seed").create_envs(1)


@pytest.fixture(scope="module")
def metaworld_checkpoint(tmp_path_factory):
    """A one-episode push-v3 dataset of the benchmark's kind and a random-weight SmolVLA checkpoint
    for its features (config, weights, processors with the dataset's statistics)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    pytest.importorskip("metaworld", reason="metaworld is not installed: pip install -e '.[metaworld]'")
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from kuavo_train.data.metaworld import SimSettings, instruction_for, write_task_dataset
    from kuavo_train.policy import factory
    from kuavo_train.policy.base_model import build_base_model

    root = tmp_path_factory.mktemp("mw")
    data = write_task_dataset(root / "data", SimSettings(task="push-v3"), num_train_episodes=1, num_eval_seeds=1, seed=0)
    ckpt = build_base_model(root / "base", instructions=[instruction_for("push-v3")], state_dim=39, action_dim=4,
                            camera_keys=("observation.images.corner2",), chunk_size=10, n_action_steps=5, seed=0)
    cfg = factory.read_pretrained_config(ckpt)
    pre, post = factory.make_processors(cfg, stats=LeRobotDatasetMetadata("metaworld/push-v3", root=data).stats)
    pre.save_pretrained(ckpt)
    post.save_pretrained(ckpt)
    return data, ckpt


def test_lerobot_eval_runs_kuavo_metaworld_and_agrees(metaworld_checkpoint, tmp_path, one_thread):
    from kuavo_train.evaluation.closed_loop import StockPolicyFn, run_closed_loop
    from kuavo_train.policy import factory

    data, ckpt = metaworld_checkpoint
    out = tmp_path / "eval"
    proc = _start_lerobot_eval(out, f"--policy.path={ckpt}", "--env.type=kuavo_metaworld", "--env.task=push-v3",
                               f"--env.dataset_root={data}", "--env.episode_length=15", "--eval.n_episodes=1", "--seed=3")
    cfg = factory.read_pretrained_config(ckpt)
    policy = factory.load_policy(ckpt, cfg)
    pre, post = factory.make_processors(cfg, pretrained_path=ckpt)
    ours = run_closed_loop("push-v3", data, StockPolicyFn(policy, pre, post), 1, start_seed=3, workers=1,
                           env_options={"episode_length": 15})
    assert ours["episodes"][0]["steps"] == 15
    stock = _lerobot_eval_result(proc, out)
    _same(_per_episode(ours), stock)


def test_episode_seeds_from_1000_visit_the_held_out_scenes_from_the_first():
    """Episode k of lerobot-eval (seed 1000 + k) plays held-out scene k for any number of scenes,
    so n episodes are the dataset's first n scenes (those its expert success was measured on)."""
    import numpy as np

    from kuavo_train.envs.seeding import scene_for

    rng = np.random.default_rng(0)
    for n in (1, 20, 30, 7):
        scenes = list(range(100, 100 + n))
        assert [scene_for(scenes, 1000 + k, rng) for k in range(2 * n)] == scenes + scenes
    assert scene_for(None, 1234, rng) == 1234  # no dataset: the seed is the scene


def test_the_env_sends_the_instruction_the_run_trained_with(demo_data):
    """A task config may change a task's instruction: our closed loop (and lerobot-eval with
    --env.instruction) sends the one the model was trained with, not the world's own."""
    from kuavo_train.data.demo_world.tasks import TASKS_BY_NAME
    from kuavo_train.evaluation.closed_loop import env_config_for

    root = demo_data / "task1_moving_grasp"
    own = TASKS_BY_NAME["task1_moving_grasp"].instruction
    assert env_config_for("task1_moving_grasp", root, instruction=own).instruction is None  # lerobot-eval's default
    cfg = env_config_for("task1_moving_grasp", root, instruction="pick the red block up")
    assert cfg.instruction == "pick the red block up"
    envs = cfg.create_envs(n_envs=1)
    (vec,) = [v for group in envs.values() for v in group.values()]
    try:
        assert vec.call("task_description") == ("pick the red block up",)
    finally:
        vec.close()
