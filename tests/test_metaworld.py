"""The MetaWorld closed-loop benchmark: real scripted-expert datasets on disk, the real tiny
SmolVLA, the same pipeline as the Kuavo path, closed-loop evaluation in the simulator."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # headless, before mujoco is imported
pytest.importorskip("metaworld", reason="metaworld is not installed: pip install -e '.[metaworld]' (make metaworld-deps)")

TASKS = ["push-v3", "drawer-open-v3"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`--smoke` sizes on two tasks: 1 demo per task, 1 epoch per stage, 1 held-out seed
    evaluated after stage 1 and 2 for the final model."""
    from kuavo_train.benchmark.metaworld import SMOKE, BenchmarkSpec, run_benchmark

    root = tmp_path_factory.mktemp("metaworld")
    spec = BenchmarkSpec(tasks=list(TASKS), strategies=["replay_freeze_decay", "joint"], seeds=[0], data_dir=root / "data",
                         out_dir=root / "out", workers=2, **{**SMOKE, "final_episodes": 2})
    return spec, run_benchmark(spec)


def test_datasets_are_lerobot_v3_with_the_full_state(smoke):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    spec, _ = smoke
    for task in TASKS:
        root = spec.data_dir / task
        meta = json.loads((root / "meta" / "metaworld.json").read_text())
        assert meta["task"] == task and meta["simulator"] == "metaworld" and meta["horizon"] == 200
        assert meta["render"] == {"shadows": False, "reflections": False, "offsamples": 0, "image_flipped_upright": True}
        assert set(meta["eval_seeds"]).isdisjoint(meta["train_seeds"])
        ds = LeRobotDataset(f"metaworld/{task}", root=root)
        assert ds.meta.info["splits"] == {"train": "0:1", "val": "1:3"}  # 2 held-out seeds for the final row
        item = ds[0]
        assert item["observation.state"].shape == (39,)  # full observation, goal included (not cut at 32)
        assert float(item["observation.state"][36:39].abs().sum()) > 0
        assert item["action"].shape == (4,)
        assert item["observation.images.corner2"].shape == (3, 64, 64)
        assert item["task"] == meta["instruction"]
    # push and drawer-open share the scene seeds (push/pick-place share scenes this way)
    a, b = (json.loads((spec.data_dir / t / "meta" / "metaworld.json").read_text()) for t in TASKS)
    assert a["eval_seeds"] == b["eval_seeds"]


def test_success_matrix_is_filled_for_every_strategy(smoke):
    spec, result = smoke
    mats = result["success_matrices"]
    seq = mats["replay_freeze_decay"][0]
    assert len(seq) == 3 and all(len(r) == 2 for r in seq)
    assert all(v in (0.0, 1.0) for r in seq[:2] for v in r) and all(v in (0.0, 0.5, 1.0) for v in seq[2])
    rows = json.loads((spec.out_dir / "seed0" / "replay_freeze_decay" / "evaluation.json").read_text())["rows"]
    assert {r: v["closed_loop_episodes"] for r, v in rows.items()} == {"0": 1, "1": 1, "2": 2}
    joint = mats["joint"][0]
    assert joint[0] is not None and joint[2] is not None
    for strategy in ("replay_freeze_decay", "joint"):
        report = json.loads((spec.out_dir / "seed0" / strategy / "report.json").read_text())
        assert report["metrics"]["success"]["acc"] is not None
        run = json.loads((spec.out_dir / "seed0" / strategy / "run.json").read_text())
        assert run["config"]["policy"]["max_state_dim"] == 39
    md = (spec.out_dir / "benchmark.md").read_text()
    assert "| before training |" in md and "ACC" in md and "expert success" in md
    # rows named after the run's stages: a task's own stage, or joint's one stage over both tasks
    sections = md.split("\n## ")
    seq_md, joint_md = (next(x for x in sections if x.startswith(f"{s} (")) for s in ("replay_freeze_decay", "joint"))
    assert "| after stage 1 |" in seq_md and "| after stage 2 |" in seq_md and "after joint" not in seq_md
    assert "| after joint training |" in joint_md and "after stage" not in joint_md
    assert "1 held-out seeds evaluated closed loop after every stage and 2 for the final model" in md
    from kuavo_train.benchmark.metaworld import episode_sem

    final = seq[2]  # binomial standard error of the mean over tasks, from the 2 final episodes per task
    sem = (sum(p * (1 - p) / 2 for p in final)) ** 0.5 / len(final)
    assert f"(± {sem:.3f} standard error of the final row's 2 episodes per task)" in md
    assert episode_sem([0.5, 1.0], 20) == pytest.approx((0.25 / 20) ** 0.5 / 2)
    assert result["expert"]["push-v3"]["eval_success_rate"] == 1.0


class _ScriptedExpert:
    """MetaWorld's scripted expert as a closed-loop policy: it reads the full 39-dim observation,
    which the benchmark's default state layout passes through unnormalized."""

    def __init__(self, task: str):
        from metaworld.policies import ENV_POLICY_MAP

        self.expert = ENV_POLICY_MAP[task]()

    def reset(self):
        pass

    def __call__(self, batch):
        import numpy as np
        import torch

        return torch.stack([torch.as_tensor(np.clip(self.expert.get_action(s.double().numpy()), -1, 1), dtype=torch.float32)
                            for s in batch["observation.state"]])


def test_the_expert_ceiling_is_reproduced_by_the_evaluation_env(smoke):
    """The expert's success stored with each dataset (the ceiling row of benchmark.md) is what
    the expert achieves in the very environment and scenes the success matrix evaluates in; at
    smoke size the writer keeps only scenes the expert solved, so the stored rate alone proves
    nothing."""
    from kuavo_train.evaluation.closed_loop import run_closed_loop

    spec, _ = smoke
    for task in TASKS:
        root = spec.data_dir / task
        meta = json.loads((root / "meta" / "metaworld.json").read_text())
        n = len(meta["eval_seeds"])
        ours = run_closed_loop(task, root, _ScriptedExpert(task), n, start_seed=0, workers=1)
        assert [e["scene_seed"] for e in ours["episodes"]] == meta["eval_seeds"]
        assert [e["success"] for e in ours["episodes"]] == meta["expert_eval_successes"]


def test_episodes_run_in_this_process_as_in_forked_workers(smoke):
    """`workers=0`, what a process that has used CUDA always gets (a forked child cannot use CUDA),
    runs the batches in the calling process with the outcome of forked workers. That process is
    a subprocess here: rendering in this one would spoil the forks of later tests."""
    from kuavo_train.evaluation.closed_loop import run_closed_loop

    spec, _ = smoke
    task, root = TASKS[0], spec.data_dir / TASKS[0]
    forked = run_closed_loop(task, root, _ScriptedExpert(task), 3, start_seed=0, batch_size=2, workers=2)
    # the subprocess cannot fork: its episodes must run in it
    script = ("import json, os, sys; sys.path.insert(0, sys.argv[1]); from test_metaworld import _ScriptedExpert; "
              "os.fork = None; "
              "from kuavo_train.evaluation.closed_loop import run_closed_loop; "
              "r = run_closed_loop(sys.argv[2], sys.argv[3], _ScriptedExpert(sys.argv[2]), 3, start_seed=0, batch_size=2, "
              "workers=0); print(json.dumps(r['episodes'], default=float))")
    r = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), task, str(root)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    here = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(here) == 3 and here == json.loads(json.dumps(forked["episodes"], default=float))


def test_a_resumed_runs_time_is_marked_as_the_last_calls_part(smoke):
    """A run finished by an earlier call keeps the time it took; a run begun before this call (its
    timing file missing: that call was killed) is timed by this call alone, and says so. Runs
    last among the smoke tests: it re-renders the shared benchmark files."""
    from kuavo_train.benchmark.metaworld import TIMING_FILE, run_benchmark

    spec, first = smoke
    assert first["run_resumed"] == {"replay_freeze_decay": [False], "joint": [False]}
    (spec.out_dir / "seed0" / "joint" / TIMING_FILE).unlink()
    again = run_benchmark(spec)
    assert again["run_resumed"] == {"replay_freeze_decay": [False], "joint": [True]}
    assert again["run_seconds"]["replay_freeze_decay"] == first["run_seconds"]["replay_freeze_decay"]
    md = (spec.out_dir / "benchmark.md").read_text()
    [joint] = [ln for ln in md.splitlines() if ln.startswith("## joint (")]
    [recipe] = [ln for ln in md.splitlines() if ln.startswith("## replay_freeze_decay (")]
    assert joint.endswith(" min, the last call's part of a resumed run)") and recipe.endswith(" min)"), (joint, recipe)


def test_replay_shares_follow_the_spec_for_four_tasks_and_generalise():
    from kuavo_train.benchmark.metaworld import replay_shares

    assert replay_shares(2) == {1: 0.2, 2: 0.8}
    assert replay_shares(3) == pytest.approx({1: 0.1, 2: 0.2, 3: 0.7})
    assert replay_shares(4) == pytest.approx({1: 0.1, 2: 0.1, 3: 0.2, 4: 0.6})
    six = replay_shares(6)
    assert sum(six.values()) == pytest.approx(1.0) and six[6] == 0.6 and six[5] > six[1]


def test_bad_task_name_is_one_clear_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "kuavo_train.cli.main", "benchmark", "metaworld", "--smoke", "--tasks", "push-v3,pik-place-v3",
         "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert err[0].startswith("error: metaworld error: unknown task 'pik-place-v3': did you mean pick-place-v3")
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()



def _kill_self(chunk):
    import signal

    if chunk == [1]:
        os.kill(os.getpid(), signal.SIGKILL)
    return [c * 10 for c in chunk]


def _raise(chunk):
    raise ValueError(f"bad chunk {chunk}")


def test_a_killed_worker_is_one_error_not_a_hang():
    """A simulator worker killed outright (out of memory, a crashing renderer) ends the map with
    one error line; the others are stopped. A process pool would wait for ever."""
    import time

    from kuavo_train.data.metaworld.env import MetaWorldError, fork_map

    assert fork_map(lambda c: [x * 10 for x in c], [0, 2, 3], 2) == [0, 20, 30]
    t0 = time.time()
    with pytest.raises(MetaWorldError, match=r"a simulator worker process died \(exit code -9"):
        fork_map(_kill_self, [0, 1, 2], 3)
    assert time.time() - t0 < 60
    with pytest.raises(ValueError, match=r"bad chunk \[0\]"):
        fork_map(_raise, [0], 1)


def test_overrides_the_benchmark_sets_itself_are_refused_before_any_data(tmp_path):
    """`seed=`, `strategy=`... would be overridden per run, silently; a key that does not exist
    is reported before minutes of dataset generation, not after."""
    base = [sys.executable, "-m", "kuavo_train.cli.main", "benchmark", "metaworld"]
    tail = ["--smoke", "--tasks", "reach-v3", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")]
    env = {**os.environ, "KUAVO_METAWORLD_WORKERS": "1"}
    for override, expected in (("seed=3", "the benchmark sets seed itself; use --seeds"),
                               ("evaluation.closed_loop_episode=3", "Could not override 'evaluation.closed_loop_episode'")):
        r = subprocess.run([*base, override, *tail], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert expected in r.stderr, r.stderr
    r = subprocess.run([*base, *tail], capture_output=True, text=True, timeout=120,
                       env={**env, "KUAVO_METAWORLD_WORKERS": "two"})
    assert r.returncode == 2 and r.stderr.strip() == ("error: metaworld error: KUAVO_METAWORLD_WORKERS='two': expected "
                                                      "a whole number of processes, 1 or more"), r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()

# ---- --observation stock: LeRobot's own metaworld env -------------------------------------------

STOCK_TASK = "coffee-button-v3"  # its expert needs ~35 steps: the cheapest recording at stock's 480 px
STOCK_SEED = 1000  # lerobot-eval's default --seed; the dataset's held-out scene


# Its tests are all marked slow: rendering stock's 480 px frames makes this fixture cost about
# 2.5 min, and `make test` stays under its 15-minute budget only without it.
@pytest.fixture(scope="module")
def stock_smoke(tmp_path_factory):
    """`--observation stock --smoke` on one task. The success matrix is off: a stock episode is
    500 steps of 480 px full-quality renders (minutes); the lerobot-eval test runs one."""
    from kuavo_train.benchmark.metaworld import SMOKE, BenchmarkSpec, run_benchmark

    root = tmp_path_factory.mktemp("metaworld-stock")
    spec = BenchmarkSpec(tasks=[STOCK_TASK], strategies=["replay_freeze_decay"], seeds=[0], observation="stock",
                         data_dir=root / "data", out_dir=root / "out", workers=2,
                         overrides=["evaluation.closed_loop_episodes=0"], **SMOKE)
    return spec, run_benchmark(spec)


def _stock_first_frame(seed: int, size: int):
    """LeRobot's env after reset(seed): its frame resized as SmolVLA resizes it, and agent_pos
    (rendered in a forked child: this process later forks renderers and must not own one)."""
    from kuavo_train.data.metaworld.env import fork_map, resize_like_smolvla

    def one(seeds):
        from lerobot.envs.metaworld import MetaworldEnv

        env = MetaworldEnv(task=STOCK_TASK, obs_type="pixels_agent_pos")
        try:
            obs, _ = env.reset(seed=seeds[0])
            return [(resize_like_smolvla(obs["pixels"], size), obs["agent_pos"])]
        finally:
            env.close()

    return fork_map(one, [seed], 1)[0]


@pytest.mark.slow
def test_stock_observation_data_is_what_lerobots_env_shows(stock_smoke):
    import numpy as np
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.envs.metaworld import MetaworldEnv

    spec, result = stock_smoke
    stock = MetaworldEnv(task=STOCK_TASK)  # its facts (MetaWorld itself is built only at reset)
    root = spec.data_dir / STOCK_TASK
    meta = json.loads((root / "meta" / "metaworld.json").read_text())
    instruction = stock.task_description  # "Push a button on the coffee machine"
    assert meta["observation"] == "stock" and meta["instruction"] == instruction
    assert meta["horizon"] == stock._max_episode_steps == 500 and meta["camera"] == stock.camera_name
    assert meta["state_mode"] == "agent" and meta["eval_seeds"] == [STOCK_SEED] == meta["val_seeds"]
    assert STOCK_SEED not in meta["train_seeds"]
    ds = LeRobotDataset(f"metaworld/{STOCK_TASK}", root=root)
    assert set(ds.meta.camera_keys) == {"observation.image"}  # stock's key: no rename map anywhere
    assert ds.meta.features["observation.state"]["shape"] == (4,)
    val_start = int(ds.meta.episodes["dataset_from_index"][1])
    item = ds[val_start]
    assert item["task"] == instruction and item["observation.image"].shape == (3, 64, 64)
    # pixel for pixel and exactly: the held-out episode's first frame is stock's own frame of that scene
    frame, agent_pos = _stock_first_frame(STOCK_SEED, 64)
    ours = (item["observation.image"].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(ours, frame)
    assert np.array_equal(item["observation.state"].numpy(), agent_pos.astype(np.float32))
    # the checkpoint's inputs are stock's features
    ckpt = json.loads((spec.out_dir / "seed0" / "replay_freeze_decay" / "run.json").read_text())
    cfg = json.loads((spec.out_dir / "seed0" / "replay_freeze_decay" / ckpt["stages"][STOCK_TASK]["final_checkpoint"]
                      / "pretrained_model" / "config.json").read_text())
    assert {k: v["shape"] for k, v in cfg["input_features"].items()} == {"observation.state": [4],
                                                                         "observation.image": [3, 64, 64]}
    assert "LeRobot's own `metaworld` env" in result["markdown"]


@pytest.mark.slow
def test_stock_dataset_evaluates_in_lerobots_own_env(stock_smoke):
    from lerobot.envs.metaworld import MetaworldEnv

    from kuavo_train.data.metaworld import MetaWorldError
    from kuavo_train.envs import KuavoMetaWorldEnvConfig

    spec, _ = stock_smoke
    cfg = KuavoMetaWorldEnvConfig(task=STOCK_TASK, dataset_root=str(spec.data_dir / STOCK_TASK))
    assert cfg.features_map["agent_pos"] == "observation.state" and cfg.features_map["pixels/top"] == "observation.image"
    vec = cfg.create_envs(1)["kuavo_metaworld"][0]  # MetaWorld is built at the first reset only: no render here
    try:
        assert isinstance(vec.env.envs[0], MetaworldEnv)
        assert list(vec.call("task_description")) == [MetaworldEnv(task=STOCK_TASK).task_description]
        assert vec.call("_max_episode_steps")[0] == 500
    finally:
        vec.close()
    bad = KuavoMetaWorldEnvConfig(task=STOCK_TASK, dataset_root=str(spec.data_dir / STOCK_TASK), episode_length=15)
    with pytest.raises(MetaWorldError, match=r"stock observation: .*\(drop --env.episode_length\)$"):
        bad.create_envs(1)


@pytest.mark.slow
def test_lerobot_eval_metaworld_runs_a_stock_checkpoint_as_we_do(stock_smoke, tmp_path, monkeypatch):
    """Stock `lerobot-eval --env.type=metaworld` on our stock-mode checkpoint, no rename map, and
    our evaluation of the same episode: the same scene, observations, instruction and horizon.
    The policy's noise differs by design: lerobot-eval seeds the RNG once, before building the
    policy (which draws from it), ours seeds every episode with its seed. So ours starts from
    the RNG state lerobot-eval has at its first step; then every action, the success and the
    rewards must be equal. (Slow: stock renders 480 px with shadows and MSAA, twice a step.)"""
    import torch
    from conftest import final_pretrained
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from lerobot.utils.random_utils import set_seed

    from kuavo_train.envs.metaworld import stock_config
    from kuavo_train.evaluation.closed_loop import StockPolicyFn, run_closed_loop
    from kuavo_train.policy import factory

    spec, _ = stock_smoke
    ckpt = final_pretrained(spec.out_dir / "seed0" / "replay_freeze_decay", STOCK_TASK)
    out = tmp_path / "eval"
    # HF_HOME: the session's (tests/conftest.py), where the tiny VLM of the base is registered
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "lerobot-eval"), f"--policy.path={ckpt}",
           "--env.type=metaworld", f"--env.task={STOCK_TASK}", "--eval.n_episodes=1", "--eval.batch_size=1",
           f"--seed={STOCK_SEED}", f"--output_dir={out}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as the child: the same float sums
        # lerobot-eval's own start: set_seed, then its policy and processors (they draw from the RNG)
        set_seed(STOCK_SEED)
        pcfg = PreTrainedConfig.from_pretrained(ckpt)
        pcfg.pretrained_path = ckpt
        make_policy(cfg=pcfg, env_cfg=stock_config(STOCK_TASK))
        make_pre_post_processors(policy_cfg=pcfg, pretrained_path=str(ckpt))
        at_first_step = torch.get_rng_state()
        monkeypatch.setattr("lerobot.utils.random_utils.set_seed", lambda seed: torch.set_rng_state(at_first_step))
        cfg = factory.read_pretrained_config(ckpt)
        policy = factory.load_policy(ckpt, cfg)
        pre, post = factory.make_processors(cfg, pretrained_path=ckpt)
        ours = run_closed_loop(STOCK_TASK, spec.data_dir / STOCK_TASK, StockPolicyFn(policy, pre, post), 1,
                               start_seed=STOCK_SEED, workers=1)
        _, err = proc.communicate(timeout=1800)
    finally:
        proc.kill()
        torch.set_num_threads(threads)
    assert proc.returncode == 0, err[-4000:]
    info = json.loads((out / "eval_info.json").read_text())
    (task,) = info["per_task"]
    stock = task["metrics"]
    (ep,) = ours["episodes"]
    assert ours["env"]["type"] == "kuavo_metaworld" and ep["scene_seed"] == STOCK_SEED
    assert [ep["success"]] == stock["successes"]
    assert [ep["sum_reward"]] == stock["sum_rewards"] and [ep["max_reward"]] == stock["max_rewards"]


@pytest.mark.slow
def test_the_wrapper_drives_a_stock_observation_checkpoint(stock_smoke):
    """Stock's single camera key (observation.image) at stock's render size, as `kuavo-train infer`
    feeds it from LeRobot's env; a size check on request still refuses it in one line."""
    import numpy as np

    from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper, WrapperInputError

    spec, _ = stock_smoke
    run_dir = spec.out_dir / "seed0" / "replay_freeze_decay"
    instruction = json.loads((spec.data_dir / STOCK_TASK / "meta" / "metaworld.json").read_text())["instruction"]
    obs = {"observation.image": np.full((480, 480, 3), 128, np.uint8), "observation.state": np.zeros(4, np.float32),
           "task": instruction}
    wrapper = SmolVLAPolicyWrapper.from_pretrained(run_dir, strict_image_size=False, seed=0)
    assert wrapper.camera_keys == ["observation.image"]
    action = np.asarray(wrapper.select_action(obs))
    assert action.shape[-1] == 4 and np.isfinite(action).all()
    strict = SmolVLAPolicyWrapper.from_pretrained(run_dir, seed=0)
    with pytest.raises(WrapperInputError, match=r"observation.image: expected 64x64 images .* got 480x480"):
        strict.select_action(obs)
