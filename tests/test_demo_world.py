"""The Kuavo demo world: real LeRobot v3 datasets, an expert that succeeds closed loop,
seeded regeneration, tasks 1 and 2 told apart only by the instruction, one-line errors."""

import json
import subprocess

import numpy as np
import pytest
from conftest import REPO, TASK_NAMES

from kuavo_train.data.demo_world import (
    DEMO_TASKS,
    JOINT_NAMES,
    DemoWorldError,
    ExpertPolicy,
    KuavoDemoWorld,
    load_scene_seeds,
    run_closed_loop,
    write_demo_world,
)

CAMS = [f"observation.images.{c}" for c in ("head_cam_h", "wrist_cam_l", "wrist_cam_r")]


def test_stock_lerobot_loads_every_task(demo_data):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    for task in DEMO_TASKS:
        ds = LeRobotDataset(f"kuavo_demo/{task.name}", root=demo_data / task.name)
        assert ds.meta.info.codebase_version == "v3.0" if hasattr(ds.meta.info, "codebase_version") else True
        info = json.loads((demo_data / task.name / "meta" / "info.json").read_text())
        assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["robot_type"] == "kuavo"
        assert info["splits"] == {"train": "0:3", "val": "3:5"}
        assert ds.meta.features["observation.state"]["shape"] in ((16,), [16])
        assert list(ds.meta.features["action"]["names"]) == list(JOINT_NAMES)
        assert sorted(ds.meta.camera_keys) == sorted(CAMS)
        item = ds[0]
        assert item["task"] == task.instruction
        assert item["observation.state"].shape == (16,) and item["action"].shape == (16,)
        assert item[CAMS[0]].shape == (3, 64, 64)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_expert_succeeds_closed_loop(task):
    result = run_closed_loop(task, list(range(100, 120)), ExpertPolicy(), image_size=64)
    assert result["success_rate"] >= 0.95, result


def test_doing_nothing_fails():
    class Still:
        def reset(self):
            pass

        def __call__(self, obs, instruction):
            return obs["observation.state"]

    for task in TASK_NAMES:
        assert run_closed_loop(task, [1, 2], Still())["success_rate"] == 0.0


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    import pyarrow.parquet as pq

    def table(root):
        return pq.read_table(root / "task4_sorting" / "data" / "chunk-000" / "file-000.parquet").to_pydict()

    kw = dict(tasks=["task4_sorting"], num_train_episodes=2, num_val_episodes=1, image_size=32)
    write_demo_world(tmp_path / "a", seed=3, **kw)
    write_demo_world(tmp_path / "b", seed=3, **kw)
    write_demo_world(tmp_path / "c", seed=4, **kw)
    a, b, c = table(tmp_path / "a"), table(tmp_path / "b"), table(tmp_path / "c")
    assert a == b
    assert a["observation.state"] != c["observation.state"]


def test_two_writer_processes_write_what_one_writes(tmp_path, caplog):
    import logging

    import pyarrow.parquet as pq

    kw = dict(tasks=["task3_placement", "task4_sorting"], num_train_episodes=2, num_val_episodes=1, image_size=32, seed=3)
    with caplog.at_level(logging.INFO, logger="kuavo_train.data.demo_world.writer"):
        one = write_demo_world(tmp_path / "one", **kw)
        two = write_demo_world(tmp_path / "two", workers=2, **kw)
    assert [p.name for p in two] == ["task3_placement", "task4_sorting"]
    # each finished task says so, in either mode (the datasets take most of a minute in make demo)
    done = [r.getMessage() for r in caplog.records if "written, 2 + 1 episodes" in r.getMessage()]
    assert sorted(m.split()[2] for m in done) == ["task3_placement", "task3_placement", "task4_sorting", "task4_sorting"]
    for a, b in zip(one, two):
        rel = "data/chunk-000/file-000.parquet"
        assert pq.read_table(a / rel).to_pydict() == pq.read_table(b / rel).to_pydict()
        assert (a / "meta" / "demo_world.json").read_text() == (b / "meta" / "demo_world.json").read_text()
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".tmp")]


def test_tasks_1_and_2_share_scenes_and_differ_in_behaviour():
    w1, w2 = KuavoDemoWorld("task1_moving_grasp"), KuavoDemoWorld("task2_weighing")
    o1, o2 = w1.reset(5), w2.reset(5)
    for k in o1:
        assert np.array_equal(o1[k], o2[k]), k
    diverged = False
    for _ in range(60):
        a1, a2 = w1.expert_action(), w2.expert_action()
        diverged |= not np.allclose(a1, a2)
        w1.step(a1)
        w2.step(a2)
    assert diverged


def test_object_position_is_visible_in_the_head_camera():
    w = KuavoDemoWorld("task1_moving_grasp")
    a, b = w.reset(1)["observation.images.head_cam_h"], w.reset(2)["observation.images.head_cam_h"]
    assert not np.array_equal(a, b)


def test_held_out_scenes_are_recorded_and_disjoint(demo_data):
    for task in TASK_NAMES:
        train, val = load_scene_seeds(demo_data / task, "train"), load_scene_seeds(demo_data / task, "val")
        assert len(train) == 3 and len(val) == 2 and not set(train) & set(val)


@pytest.mark.parametrize("args,fragment", [
    (["--tasks", "task9_dancing"], "unknown task 'task9_dancing'"),
    (["--train-episodes", "-3"], "num_train_episodes must be an integer >= 1 (got -3)"),
])
def test_bad_input_one_line_nothing_written(tmp_path, python_exe, args, fragment):
    out = tmp_path / "out"
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "make-data", "--out", str(out), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert not out.exists()


def test_unwritable_output_directory(tmp_path, python_exe):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "make-data", "--out", str(blocker / "out")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "cannot write to" in r.stderr
    assert blocker.read_text() == "not a folder"


def test_existing_dataset_with_other_parameters_is_not_overwritten(tmp_path):
    kw = dict(tasks=["task3_placement"], num_val_episodes=1, image_size=32, seed=0)
    write_demo_world(tmp_path, num_train_episodes=1, **kw)
    before = (tmp_path / "task3_placement" / "meta" / "demo_world.json").read_text()
    with pytest.raises(DemoWorldError, match=r"made with other settings \(num_train_episodes 1 -> 2\)"):
        write_demo_world(tmp_path, num_train_episodes=2, **kw)
    assert (tmp_path / "task3_placement" / "meta" / "demo_world.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]



def test_make_demo_warns_when_existing_data_has_fewer_held_out_scenes_and_never_rewrites_it(tmp_path, demo_base, caplog):
    """Data of an older, smaller default (or `make-data` with other sizes) is the user's: kept
    byte for byte, with one warning that scenes will be revisited."""
    from kuavo_train.cli.main import ensure_demo_inputs
    from kuavo_train.config.loading import load_run_config

    write_demo_world(tmp_path, tasks=TASK_NAMES, num_train_episodes=1, num_val_episodes=1, image_size=32, seed=0)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cfg = load_run_config(["profile=demo", f"data_root={tmp_path}", f"policy.pretrained_path={demo_base}",
                           "evaluation.closed_loop_episodes=2"])
    with caplog.at_level("WARNING", logger="kuavo_train"):
        ensure_demo_inputs(cfg)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    warned = [r.getMessage() for r in caplog.records if "held-out scenes for 2 closed-loop episodes" in r.getMessage()]
    assert len(warned) == len(TASK_NAMES), warned
