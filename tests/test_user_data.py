"""What users bring, trained end to end: Kuavo rosbags of all four tasks (task 4 walks: 20-dim action)
and a LeRobot v2.1 dataset, through the real pipeline and the inference wrapper."""

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TASK_NAMES, tiny_overrides
from v21_fixture import KUAVO_CAMERAS, write_v21_dataset

from kuavo_train.config.loading import load_run_config
from kuavo_train.training.pipeline import Pipeline
from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper

ARM = [f"zarm_l{i}" for i in range(1, 8)] + ["left_claw"] + [f"zarm_r{i}" for i in range(1, 8)] + ["right_claw"]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_four_stages_from_kuavo_bags(tmp_path, demo_base, kuavo_bag_datasets):
    data_root = Path(next(iter(kuavo_bag_datasets.values()))).parent
    run_dir = tmp_path / "run"
    cfg = load_run_config(tiny_overrides(run_dir, demo_base, data_root, "evaluation.after_each_stage=false"))
    Pipeline(cfg).run()

    state = json.loads((run_dir / "run.json").read_text())
    assert all(state["stages"][t]["status"] == "complete" for t in TASK_NAMES)
    assert state["features"]["names"]["action"] == ARM + ["cmd_pos_x", "cmd_pos_y", "cmd_pos_yaw", "ctrl_change_cmd"]
    stats = json.loads((run_dir / "normalization_stats.json").read_text())
    # the base-command dims' statistics come from task 4's training episodes alone (the other tasks lack them)
    import pandas as pd

    root4 = Path(kuavo_bag_datasets["task4_sorting"])
    train = json.loads((root4 / "meta" / "info.json").read_text())["splits"]["train"].split(":")
    df = pd.concat([pd.read_parquet(f) for f in sorted((root4 / "data").rglob("*.parquet"))])
    df = df[(df["episode_index"] >= int(train[0])) & (df["episode_index"] < int(train[1]))]
    np.testing.assert_allclose(stats["action"]["mean"][16:], np.stack(df["action"].to_numpy())[:, 16:].mean(0), rtol=1e-4, atol=1e-6)
    # validation ran on each task's own dims: finite losses for all four tasks
    val = [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert {v["task_id"] for v in val if v["stage"] == 4} == {1, 2, 3, 4}
    assert all(np.isfinite(v["loss"]) for v in val)
    # a log that suits a file: LeRobot's torchcodec traceback (no FFmpeg libraries here) is one line, once
    log = (run_dir / "train.log").read_text()
    assert "Traceback" not in log and log.count("LeRobot decodes video with PyAV") <= 1

    policy = SmolVLAPolicyWrapper.from_pretrained(run_dir, seed=0)
    first = Path(kuavo_bag_datasets["task1_moving_grasp"])
    info = json.loads((first / "meta" / "info.json").read_text())
    h, w, _ = info["features"][KUAVO_CAMERAS[0]]["shape"]
    images = {k.rsplit(".", 1)[-1]: np.zeros((h, w, 3), np.uint8) for k in policy.camera_keys}
    for task, dims in (("task1_moving_grasp", 16), ("task4_sorting", 20)):
        instruction = cfg.stages[task].instruction
        policy.reset()
        action = policy.select_action({"observation.images": images, "observation.state": np.zeros(16, np.float32),
                                       "task": instruction})
        assert action.shape == (dims,) and torch.isfinite(action).all()
        assert len(policy.action_names(instruction)) == dims
    assert policy.action_names(cfg.stages["task4_sorting"].instruction)[16:] == ["cmd_pos_x", "cmd_pos_y", "cmd_pos_yaw",
                                                                                  "ctrl_change_cmd"]
    # one batch with a row of each: their actions (16 and 20 values) would not stack
    from kuavo_train.wrapper.policy.smolvla import WrapperInputError

    policy.reset()
    with pytest.raises(WrapperInputError, match=r"^task: the batch mixes tasks with different action dims \(\[16, 20\]\)"):
        policy.select_action({"observation.images": {k: np.stack([v, v]) for k, v in images.items()},
                              "observation.state": np.zeros((2, 16), np.float32),
                              "task": [cfg.stages["task1_moving_grasp"].instruction, cfg.stages["task4_sorting"].instruction]})


@pytest.mark.slow
def test_v21_dataset_trains_through_a_converted_copy(tmp_path, demo_base, demo_data, caplog):
    """Task 2's data is a v2.1 dataset as lerobot 0.3 wrote it: the run converts a copy and leaves it untouched."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    for t in TASK_NAMES:
        if t != "task2_weighing":
            os.symlink(demo_data / t, data_root / t)
    info = json.loads((demo_data / "task1_moving_grasp" / "meta" / "info.json").read_text())
    h, w, _ = info["features"][KUAVO_CAMERAS[0]]["shape"]
    v21 = write_v21_dataset(data_root / "task2_weighing", n_episodes=5, frames_per_episode=20, cameras=KUAVO_CAMERAS,
                            task="weigh the parcel", height=h, width=w, seed=3)
    before = _tree_digest(v21)
    run_dir = tmp_path / "run"
    cfg = load_run_config(tiny_overrides(run_dir, demo_base, data_root, "~stages.task3_placement", "~stages.task4_sorting",
                                         "stages.task2_weighing.dataset.val_episodes=[3,5]",
                                         "evaluation.after_each_stage=false"))
    with caplog.at_level(logging.INFO):
        Pipeline(cfg).run()
    assert any("v2.1" in r.getMessage() and "left unchanged" in r.getMessage() for r in caplog.records)
    assert _tree_digest(v21) == before, "the original v2.1 dataset was modified"
    state = json.loads((run_dir / "run.json").read_text())
    assert state["stages"]["task2_weighing"]["status"] == "complete"
    assert state["config"]["stages"]["task2_weighing"]["dataset"]["root"] == str(v21)
    assert not (Path(str(v21) + "_old")).exists()
    # the report of a finished run from its folder alone (the config recorded in run.json)
    import subprocess
    import sys

    done = subprocess.run([str(Path(sys.executable).with_name("kuavo-train")), "evaluate", "--run", str(run_dir)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["matrices"]["val_loss"]) == 3  # before training + two stages


def _two_sizes(tmp_path, demo_data) -> Path:
    """Task 1's demo data at 64 px beside task 2's recorded at 48 px (cameras of another resolution)."""
    from kuavo_train.data.demo_world.writer import write_task_dataset

    data_root = tmp_path / "data"
    data_root.mkdir()
    os.symlink(demo_data / TASK_NAMES[0], data_root / TASK_NAMES[0])
    write_task_dataset(data_root, TASK_NAMES[1], num_train_episodes=3, num_val_episodes=2, seed=0, image_size=48)
    return data_root


def test_tasks_whose_cameras_differ_in_size_train_and_infer(tmp_path, demo_base, demo_data):
    """Stage 2 replays task 1 (64 px) beside task 2 (48 px) in the same batches; the final model takes
    each task's frames at the size its data had."""
    data_root = _two_sizes(tmp_path, demo_data)
    run_dir = tmp_path / "run"
    cfg = load_run_config(tiny_overrides(run_dir, demo_base, data_root, "~stages.task3_placement", "~stages.task4_sorting",
                                         "evaluation.after_each_stage=false", "dataloader.batch_size=8"))
    Pipeline(cfg).run()
    state = json.loads((run_dir / "run.json").read_text())
    assert state["stages"][TASK_NAMES[1]]["status"] == "complete"
    assert set(state["stages"][TASK_NAMES[1]]["replay_mix"]) == set(TASK_NAMES[:2])

    policy = SmolVLAPolicyWrapper.from_pretrained(run_dir)
    cams = [k.rsplit(".", 1)[-1] for k in policy.camera_keys]
    for task, size in ((TASK_NAMES[0], 64), (TASK_NAMES[1], 48)):
        policy.reset()
        action = policy.select_action({"observation.images": {c: np.zeros((size, size, 3), np.uint8) for c in cams},
                                       "observation.state": np.zeros(16, np.float32),
                                       "task": cfg.stages[task].instruction})
        assert torch.isfinite(action).all()
    from kuavo_train.wrapper.policy.smolvla import WrapperInputError

    with pytest.raises(WrapperInputError, match="expected 48x48 images .* got 64x64"):
        policy.select_action({"observation.images": {c: np.zeros((64, 64, 3), np.uint8) for c in cams},
                              "observation.state": np.zeros(16, np.float32), "task": cfg.stages[TASK_NAMES[1]].instruction})
