"""Two training processes (accelerate launch, gloo on the CPU) through two stages, killed once and resumed.

Each process gets one thread: two 2-thread torch processes on a 2-core machine thrash.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def _launch(run_dir, demo_base, demo_data, log_path):
    overrides = tiny_overrides(run_dir, demo_base, demo_data, "~stages.task3_placement", "~stages.task4_sorting",
                               "stages.task2_weighing.max_epoch=3", "evaluation.after_each_stage=false")
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kuavo_train.cli.main", "train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_tree(proc) -> None:
    """SIGKILL the launcher and every worker (torch's elastic agent may start workers in their own sessions)."""
    import psutil

    procs = [psutil.Process(proc.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs[1:], timeout=30)


@pytest.mark.slow
def test_two_processes_two_stages_kill_and_resume(tmp_path, demo_base, demo_data):
    run_dir = tmp_path / "run"
    stage2_last = run_dir / "stage2_task2_weighing" / "checkpoints" / "last" / "kuavo_checkpoint.json"
    first = _launch(run_dir, demo_base, demo_data, tmp_path / "first.log")
    deadline = time.time() + 600
    while first.poll() is None and not stage2_last.is_file() and time.time() < deadline:
        time.sleep(0.2)
    killed = first.poll() is None
    _kill_tree(first)
    assert killed, "the first launch ended before stage 2's first checkpoint: nothing was killed\n" + (tmp_path / "first.log").read_text()[-3000:]
    state = json.loads((run_dir / "run.json").read_text())
    assert state["stages"]["task1_moving_grasp"]["status"] == "complete"
    assert state["stages"]["task2_weighing"]["status"] == "running"

    second = _launch(run_dir, demo_base, demo_data, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-4000:]
    out = (tmp_path / "second.log").read_text()

    state = json.loads((run_dir / "run.json").read_text())
    assert state["num_processes"] == 2
    for name in ("task1_moving_grasp", "task2_weighing"):
        s = state["stages"][name]
        assert s["status"] == "complete", name
        assert (run_dir / s["final_checkpoint"] / "pretrained_model" / "model.safetensors").is_file()
    # stage 1 ran whole in the first launch: both processes trained on equal shares, none twice
    s1 = state["stages"]["task1_moving_grasp"]
    n1, n2 = s1["samples_per_process"]
    assert n1 == n2 > 0
    assert s1["first_epoch_distinct_samples"] == s1["first_epoch_samples"] > 0
    # stage 2 resumed after the kill, in both processes, and finished all its steps
    s2 = state["stages"]["task2_weighing"]
    assert "resuming from last" in out
    meta = json.loads((run_dir / s2["final_checkpoint"] / "kuavo_checkpoint.json").read_text())
    assert meta["epoch"] == 3 and meta["step"] == s2["total_steps"]
    # what the run records of it is the second launch's part: both processes' samples since the
    # step it resumed at, none twice in the first epoch it trained
    assert s2["samples_per_process"] == [(s2["total_steps"] - s2["samples_counted_from_step"]) * 16] * 2
    assert s2["samples_counted_from_step"] > 0
    assert s2["first_epoch_distinct_samples"] == s2["first_epoch_samples"] > 0
    # one process logs: every stage line once per launch, in the terminal and in train.log
    assert out.count("stage 2 task2_weighing complete") == 1
    log = (run_dir / "train.log").read_text()
    assert log.count("stage 1 task1_moving_grasp complete") == 1
    assert log.count("stage 2 task2_weighing complete") == 1


@pytest.mark.slow
def test_two_processes_share_validation_fisher_and_the_matrices(tmp_path, demo_base, demo_data):
    """The side work of a stage (validation, EWC's Fisher pass, the forgetting matrices' cells) is
    split between the processes, and they get what one process computes alone."""
    import shutil

    from conftest import final_pretrained, stage_plans
    from safetensors.torch import load_file

    from kuavo_train.config.loading import load_run_config
    from kuavo_train.data.features import build_feature_space, make_task_dataset
    from kuavo_train.data.stats import STATS_FILE, stats_from_json
    from kuavo_train.data.task_data import open_task_data
    from kuavo_train.evaluation.validation import validation_frames, validation_loss
    from kuavo_train.policy import factory
    from kuavo_train.strategies import get_strategy
    from kuavo_train.training.stage_trainer import VALIDATION_FRAMES_PER_EPISODE, TaskBatches
    import torch

    run_dir = tmp_path / "run"
    extra = ("strategy=ewc", "validation.batch_size=4", "evaluation.after_each_stage=true",
             "evaluation.closed_loop_episodes=2", "evaluation.closed_loop_batch_size=2")
    overrides = tiny_overrides(run_dir, demo_base, demo_data, "~stages.task3_placement", "~stages.task4_sorting", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kuavo_train.cli.main", "train", *overrides]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the main process reports its own cells: half of each row's, the other process did the rest
    cells = [ln for ln in r.stdout.splitlines() if ": evaluated in " in ln]
    assert len(cells) == 3 * 1 and all(ln.endswith("(process 1 of 2)") for ln in cells), r.stdout[-3000:]
    two = json.loads((run_dir / "evaluation.json").read_text())
    assert sorted(two["rows"]) == ["0", "1", "2"] and all(len(row["val_loss"]) == 2 for row in two["rows"].values())

    # the same matrices from one process, the same run's checkpoints
    one_dir = tmp_path / "one"
    shutil.copytree(run_dir, one_dir)
    for name in ("evaluation.json", "report.json", "report.md"):
        (one_dir / name).unlink()
    r = subprocess.run([str(Path(sys.executable).with_name("kuavo-train")), "evaluate",
                        *tiny_overrides(one_dir, demo_base, demo_data, "~stages.task3_placement", "~stages.task4_sorting",
                                        *extra)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((one_dir / "evaluation.json").read_text())["rows"] == two["rows"]

    # stage 1's Fisher (split) against one process's pass over the same batches of the same model
    cfg = load_run_config(overrides)
    tasks = {s.task_id: open_task_data(s) for s in cfg.ordered_stages()}
    space = build_feature_space(list(tasks.values()), max_state_dim=cfg.policy.max_state_dim,
                                max_action_dim=cfg.policy.max_action_dim)
    stats = stats_from_json(json.loads((run_dir / STATS_FILE).read_text()))
    path = final_pretrained(run_dir, "task1_moving_grasp")
    pcfg = factory.read_pretrained_config(path)
    policy = factory.load_policy(path, pcfg)
    pre, _ = factory.make_processors(pcfg, pretrained_path=path)
    batches = TaskBatches(make_task_dataset(tasks[1], tasks[1].train_episodes, pcfg.chunk_size, space, stats),
                          cfg.dataloader.batch_size, pre, "cpu")
    assert len(batches) >= 2
    ewc = get_strategy(cfg)
    ewc.after_stage(policy, stage_plans(cfg)["task1_moving_grasp"], batches)
    saved = load_file(str(path.parent / "strategy_state_final.safetensors"))
    assert ewc.fisher and set(ewc.fisher) == {k[len("fisher."):] for k in saved if k.startswith("fisher.")}
    for n, f in ewc.fisher.items():
        assert torch.allclose(saved[f"fisher.{n}"], f, rtol=1e-4, atol=1e-12), n

    # stage 1's last validation (split, 5 batches of 4) against one process's
    eps = list(tasks[1].val_episodes)[: cfg.validation.validation_episodes]
    ds = make_task_dataset(tasks[1], eps, pcfg.chunk_size, space, stats)
    idx = validation_frames(ds, eps, VALIDATION_FRAMES_PER_EPISODE)
    assert len(idx) > 2 * cfg.validation.batch_size
    alone = validation_loss(policy, pre, ds, idx, task_id=1, seed=cfg.validation.seed,
                            batch_size=cfg.validation.batch_size, device="cpu")
    logged = json.loads((path.parent / "kuavo_checkpoint.json").read_text())["val_losses"]["1"]
    assert abs(logged - alone) <= 1e-5 * abs(alone), (logged, alone)


def test_each_process_draws_its_own_step_noise(demo_base):
    """The flow-matching noise and time of a step come from `step_seed`: each process of a launch
    gets its own (the same for all would add one noise to every process's samples), process 0 the
    one-process run's, so a one-process run is unchanged by the launch support."""
    import numpy as np
    import torch

    from kuavo_train.policy import factory
    from kuavo_train.training.stage_trainer import step_seed

    seeds = [step_seed(42, 2, 17, p) for p in range(4)]
    assert len(set(seeds)) == 4
    assert seeds[0] == step_seed(42, 2, 17) == int(np.random.SeedSequence([42, 2, 17]).generate_state(1)[0])
    assert step_seed(42, 2, 17, 1) == seeds[1]  # resumable: the same process and step, the same draws

    policy = factory.load_policy(demo_base, factory.read_pretrained_config(demo_base))

    def noise(seed):
        torch.manual_seed(seed)
        return policy.model.sample_noise((2, 10, 32), "cpu"), policy.model.sample_time(2, "cpu")

    (n0, t0), (n1, t1), (again, t_again) = noise(seeds[0]), noise(seeds[1]), noise(seeds[0])
    assert torch.equal(n0, again) and torch.equal(t0, t_again)
    assert not torch.allclose(n0, n1) and not torch.allclose(t0, t1)


@pytest.mark.slow
def test_a_launch_builds_missing_demo_inputs_once(tmp_path):
    """`accelerate launch ... demo` on a fresh machine: the main process builds the embedded base and
    the datasets while the other waits at a barrier of its own, before either has an Accelerator;
    both train on one copy of each, and the results are printed once."""
    from conftest import TASK_NAMES

    run_dir, base, data = tmp_path / "run", tmp_path / "base", tmp_path / "datasets"
    overrides = tiny_overrides(run_dir, base / "pretrained_model", data, *[f"~stages.{t}" for t in TASK_NAMES[1:]],
                               f"demo.base_dir={base}", "demo.num_train_episodes=3", "demo.num_val_episodes=2",
                               "demo.pretrain_vision_steps=0", "demo.pretrain_skill_steps=0",
                               "evaluation.after_each_stage=false")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kuavo_train.cli.main", "demo", *overrides[1:]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("demo wall time") == 1 and r.stdout.count("(matrices and metrics in report.json") == 1, r.stdout[-3000:]
    assert r.stdout.count("building the embedded base model") == 1, r.stdout[-3000:]
    assert r.stdout.count("generating the Kuavo demo world datasets") == 1, r.stdout[-3000:]
    # one copy of each, nothing left of a second build beside it
    assert sorted(p.name for p in base.iterdir()) == ["base_info.json", "pretrained_model", "vlm"], list(base.iterdir())
    assert sorted(p.name for p in data.iterdir()) == [TASK_NAMES[0]], list(data.iterdir())
    state = json.loads((run_dir / "run.json").read_text())
    assert state["num_processes"] == 2 and state["stages"][TASK_NAMES[0]]["status"] == "complete"


@pytest.mark.slow
def test_compare_and_the_metaworld_benchmark_under_a_launch(tmp_path, demo_base, demo_data):
    """`compare` and `benchmark metaworld` run their runs one after another, each run's work shared
    by the launched processes: the benchmark's datasets and base are built by the main process
    alone, one process writes the tables, and they are printed once."""
    pytest.importorskip("metaworld")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kuavo_train.cli.main"]

    out = tmp_path / "cmp"
    overrides = [o for o in tiny_overrides(tmp_path / "unused", demo_base, demo_data, "~stages.task3_placement",
                                           "~stages.task4_sorting") if not o.startswith("run_dir=")]
    r = subprocess.run([*launch, "compare", "--no-demo", "--out", str(out), "--seeds", "0",
                        "--strategies", "sequential_naive,joint", *overrides], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("comparison: ") == 1 and r.stdout.count("**action_error**") == 1, r.stdout[-3000:]
    assert set(json.loads((out / "comparison.json").read_text())["summary"]) == {"sequential_naive", "joint"}
    for strategy in ("sequential_naive", "joint"):
        assert json.loads((out / "seed0" / strategy / "run.json").read_text())["num_processes"] == 2

    data, bench = tmp_path / "mw-data", tmp_path / "mw"
    # batches of 8: the smoke's one demonstration has 59 samples, fewer than 2 processes x 32
    r = subprocess.run([*launch, "benchmark", "metaworld", "dataloader.batch_size=8", "--smoke", "--tasks", "push-v3",
                        "--strategies", "sequential_naive", "--data", str(data), "--out", str(bench)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("benchmark: ") == 1, r.stdout[-3000:]
    assert [p.name for p in data.iterdir()] == ["push-v3"]
    assert len(list(bench.glob("base-*"))) == 1
    report = json.loads((bench / "benchmark.json").read_text())
    assert report["runs"]["sequential_naive"] and report["success_matrices"]["sequential_naive"][0]
    assert json.loads((bench / "seed0" / "sequential_naive" / "run.json").read_text())["num_processes"] == 2


@pytest.mark.slow
def test_infer_under_a_launch_splits_the_episodes(full_run, python_exe):
    """`kuavo-train infer` under a launch: each process runs its share of whole episode batches and the
    success per task equals one process's (each batch is seeded by its first episode either way)."""
    _, run_dir = full_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = ["-m", "kuavo_train.cli.main", "infer", "--run", str(run_dir), "--episodes", "4", "--batch-size", "2"]
    one = subprocess.run([python_exe, *args], env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", *args],
                         env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    def rates(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.startswith("  task") and "success" in line]

    assert len(rates(one.stdout)) == 4 and rates(two.stdout) == rates(one.stdout), two.stdout[-3000:]
    # 4 tasks x 2 batches of 2 episodes, 4 batches per process (the main process logs; the other is quiet)
    assert two.stdout.count("process 1 of 2 runs 4 of 8 parts of the tasks' episodes") == 1, two.stdout[-3000:]



def _as_two_machines(overrides: list[list[str]]):
    """`kuavo-train train` in two processes started as a two-machine launcher starts them (rank,
    world size, one process per machine and the main process's address in the environment), each
    with its own overrides; (processes, (stdout, stderr) of each) once both have ended."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, args in enumerate(overrides):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": str(len(overrides)), "RANK": str(rank), "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "kuavo_train.cli.main", "train", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
    try:
        return procs, [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)

def test_machines_without_a_shared_run_dir_stop_in_one_line(tmp_path, demo_base, demo_data):
    """Two machines of one launch whose `run_dir` is a folder of each's own disk, played by two
    processes started as a multi-machine launcher starts them (rank, world size and the main
    process's address in the environment), each given its own folder: both stop with the same
    line within seconds, where they trained apart and then waited at a meeting point for hours."""
    procs, results = _as_two_machines(
        [tiny_overrides(tmp_path / f"machine{rank}" / "run", demo_base, demo_data, "evaluation.after_each_stage=false")
         for rank in (0, 1)])
    for rank, (p, (out, err)) in enumerate(zip(procs, results)):
        lines = err.strip().splitlines()
        assert p.returncode == 2 and "Traceback" not in err, (rank, err[-3000:])
        assert lines[-1] == (f"error: run_dir {tmp_path / f'machine{rank}' / 'run'} is not one folder for every process: "
                             "process(es) 1 of 2 do not see the run.json the main process has just written there; on "
                             "several machines run_dir, the datasets and the base must be on a file system every "
                             "machine sees (a shared mount)"), (rank, err[-3000:])
    # the main process's folder has the run's first files; the other machine's folder was never made
    assert (tmp_path / "machine0" / "run" / "run.json").is_file()
    assert not (tmp_path / "machine1" / "run").exists()
    assert not list((tmp_path / "machine0" / "run").glob("stage*"))


@pytest.mark.slow
def test_a_machine_that_cannot_start_stops_the_others_in_one_line(tmp_path, demo_base, demo_data):
    """One machine of a launch lacks the datasets (played by a second process given another
    data_root): it stops with its line, and the other, which was about to wait for it at the
    process group's first meeting for hours (its launcher does not see the other machine), stops
    within seconds with the same line naming the process."""
    procs, results = _as_two_machines(
        [tiny_overrides(tmp_path / "run", demo_base, data, "evaluation.after_each_stage=false")
         for data in (demo_data, tmp_path / "not_copied_here")])
    missing = f"no LeRobot dataset at {tmp_path / 'not_copied_here' / 'task1_moving_grasp'}"
    lines = [err.strip().splitlines()[-1] for _, err in results]
    assert all(p.returncode == 2 for p in procs) and not any("Traceback" in err for _, err in results), results
    assert lines[1].startswith("error: ") and missing in lines[1], lines
    assert lines[0].startswith("error: process 1 of 2 stopped: ") and missing in lines[0], lines
    assert not (tmp_path / "run").exists()

def test_data_workers_die_with_their_killed_parent(tmp_path):
    """`make-data` killed outright (SIGKILL, out of memory) runs no clean-up: its two generator
    processes must not go on writing and then wait forever beside the rerun."""
    import psutil

    cmd = [sys.executable, "-m", "kuavo_train.cli.main", "make-data", "--out", str(tmp_path / "data"),
           "--tasks", "task1_moving_grasp", "task3_placement", "--train-episodes", "30", "--val-episodes", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        data = tmp_path / "data"

        def staged():
            return sorted(p.name for p in data.iterdir() if p.name.startswith(".tmp-")) if data.is_dir() else []

        deadline, workers = time.time() + 120, []
        while time.time() < deadline and (len(workers) < 2 or len(staged()) < 2) and proc.poll() is None:
            time.sleep(0.2)
            # the spawned workers, once they have imported what they run (their parent's import time)
            workers = [c for c in psutil.Process(proc.pid).children() if c.cpu_times().user > 1.0]
        assert len(workers) == 2 and len(staged()) == 2, "the generator processes never started"
        proc.send_signal(signal.SIGKILL)  # the parent alone
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"{len(alive)} worker(s) outlived their parent"
        # their staging folders stay (nothing ran their clean-up) until the next build of the same name
        from kuavo_train.files import staging_dir

        assert len(staged()) == 2
        for task in ("task1_moving_grasp", "task3_placement"):
            staging_dir(data, task).rmdir()
        assert staged() == []
    finally:
        for p in [proc.pid, *[w.pid for w in workers]]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
