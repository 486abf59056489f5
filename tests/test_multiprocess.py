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
    assert s2["first_epoch_distinct_samples"] == s2["first_epoch_samples"]
    # one process logs: every stage line once per launch, in the terminal and in train.log
    assert out.count("stage 2 task2_weighing complete") == 1
    log = (run_dir / "train.log").read_text()
    assert log.count("stage 1 task1_moving_grasp complete") == 1
    assert log.count("stage 2 task2_weighing complete") == 1
