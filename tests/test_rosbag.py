"""`kuavo-train convert rosbag` on real ROS1 bag files (synthetic Kuavo recordings), read back
with stock LeRobot: shapes, names, units, alignment, splits, video, bad bags, bad maps."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BAG_EPISODES, BAG_FRAMES, BAG_TASKS, BAG_VAL_EPISODES, REPO, bag_topic_map, task_instruction

from kuavo_train.data.rosbag.convert import BASE_NAMES, STATE_NAMES, BagProblem, convert_bags, nearest, read_episode
from kuavo_train.data.rosbag.synthetic import write_synthetic_bag
from kuavo_train.data.rosbag.topic_map import DEFAULT_MAP_FILE, RosbagError, TopicMap, load_topic_map

KUAVO_TRAIN = Path(sys.executable).parent / "kuavo-train"
SAMPLE_DROP, JUMP = 10, 3


def _table(root: Path):
    """(stock LeRobotDataset, its parquet table as numpy) of a converted dataset."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(f"kuavo/{root.name}", root=root)
    return ds, ds.hf_dataset.with_format("numpy")[:]


# ---------------------------------------------------------------- topic map
def test_default_map_file_is_the_builtin_defaults():
    assert load_topic_map(DEFAULT_MAP_FILE) == TopicMap() == load_topic_map(None)
    m = TopicMap()
    assert (m.fps, m.main_camera_fps, m.jump, m.sample_drop, m.robot_type) == (10, 30, 3, 10, "kuavo4pro")
    assert (m.arm.left, m.arm.right, m.arm.action_in_degrees) == ((12, 19), (19, 26), True)
    assert m.arm.action_topics == ["/kuavo_arm_traj_synced", "/kuavo_arm_traj"]
    assert [c.topic for c in m.cameras] == [f"/cam_{s}/color/image_raw/compressed" for s in "hlr"]
    claw = TopicMap(hand={"kind": "leju_claw"}).hand_resolved
    assert (claw.state_topic, claw.action_topic, claw.state_divisor, claw.action_divisor) == (
        "/leju_claw_state", "/leju_claw_command", 100.0, 100.0)
    rq = m.hand_resolved
    assert (rq.state_topic, rq.action_topic, rq.state_divisor, rq.action_divisor) == ("/gripper/state", "/gripper/command", 0.8, 255.0)
    dex = TopicMap(hand={"kind": "qiangnao"}).hand_resolved
    assert (dex.kind, dex.state_index, dex.action_fields) == ("dexhand", (0, 6), ["left_hand_position", "right_hand_position"])


@pytest.mark.parametrize("text, field", [
    ("hand: {kind: gripperX}\n", "hand.kind"),
    ("fps: 0\n", "fps"),
    ("arm: {left: [12, 18]}\n", "arm.left"),
    ("main_camera: cam_z\n", "main_camera"),
    ("cameras: [{name: head_cam_h, topic: no_slash}]\n", "cameras[0].topic"),
    ("sample_drop: -1\n", "sample_drop"),
    ("unknown_key: 1\n", "unknown_key"),
    ("split: {val_fraction: 1.5}\n", "split.val_fraction"),
    ("fps: [10\n", "not valid YAML"),
    ("fps: 7\n", "fps: 7 must divide main_camera_fps (30)"),  # every 4th frame: 7.5 per second, not 7
])
def test_bad_map_is_one_line_naming_field_and_file(tmp_path, text, field):
    p = tmp_path / "map.yaml"
    p.write_text(text)
    with pytest.raises(RosbagError) as err:
        load_topic_map(p)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and str(p) in msg, msg


# ---------------------------------------------------------------- bags
def test_kuavo_message_types_carry_the_robots_md5():
    """Constants included (lejuClawState's lower-case kError..kGrabbed): ROS's md5 of the definition."""
    from kuavo_train.data.rosbag.types import kuavo_typestore

    md5 = lambda s: hashlib.md5(s.encode()).hexdigest()  # noqa: E731
    header = md5("uint32 seq\ntime stamp\nstring frame_id")
    eed = md5("string[] name\nfloat64[] position\nfloat64[] velocity\nfloat64[] effort")
    want = md5("int8 kError=-1\nint8 kUnknown=0\nint8 kMoving=1\nint8 kReached=2\nint8 kGrabbed=3\n"
               f"{header} header\nint8[] state\n{eed} data")
    assert kuavo_typestore().generate_msgdef("kuavo_msgs/msg/lejuClawState")[1] == want


def test_synthetic_bag_is_deterministic(tmp_path):
    kw = dict(task="task2_weighing", hand_kind="rq2f85", only_arm=True, n_frames=30, seed=7)
    a = write_synthetic_bag(tmp_path / "a.bag", **kw).path.read_bytes()
    b = write_synthetic_bag(tmp_path / "b.bag", **kw).path.read_bytes()
    c = write_synthetic_bag(tmp_path / "c.bag", **{**kw, "seed": 8}).path.read_bytes()
    assert a == b and a != c


def test_depth_gap_fill_and_header_stamps(tmp_path):
    """Opt-in depth (3-channel uint8), the arm action while walking without a _synced copy (the
    nearest command, or the reference's 999 fill), and header-stamp alignment: straight from
    `read_episode`."""
    bag = write_synthetic_bag(tmp_path / "walk.bag", task="task4_sorting", hand_kind="rq2f85", only_arm=False,
                              n_frames=140, seed=3, depth=True)
    tm = TopicMap(image_size=[32, 24], instruction="walk", only_arm=False, depth={"enabled": True})
    ep = read_episode(bag.path, tm)
    assert len(ep) == len(range(SAMPLE_DROP, 140 - SAMPLE_DROP, JUMP))
    for key in ("observation.depth_h", "observation.depth_l", "observation.depth_r", "observation.images.head_cam_h"):
        assert ep.images[key].shape == (len(ep), 24, 32, 3) and ep.images[key].dtype == np.uint8
    d = ep.images["observation.depth_h"]
    assert (d[..., 0] == d[..., 2]).all() and d.min() == 0 and d.max() == 255  # per-frame min-max normalised
    walking = ep.action[:, 19] == 1
    assert walking.any() and (~walking).any()
    assert np.abs(ep.action[:, :7]).max() < np.pi  # the _synced copy: no fill needed

    raw_only = tm.with_overrides(**{"arm.action_topics": ["/kuavo_arm_traj"]})
    ep2 = read_episode(bag.path, raw_only)  # the nearest command held: no 999 to skew the statistics
    assert np.abs(ep2.action[:, :7]).max() < np.pi and np.abs(ep2.action[:, 8:15]).max() < np.pi
    assert np.allclose(ep2.action[~walking], ep.action[~walking])
    ep2 = read_episode(bag.path, raw_only.with_overrides(**{"base.gap_arm_fill": 999.0}))  # the reference's
    assert (ep2.action[walking][:, :7] == 999.0).all() and (ep2.action[walking][:, 8:15] == 999.0).all()
    assert np.allclose(ep2.action[~walking], ep.action[~walking])

    ep3 = read_episode(bag.path, tm.with_overrides(stamp_source="header"))
    assert abs(len(ep3) - len(ep)) <= 1 and ep3.action.shape[1] == 20


def test_nearest_prefers_the_earlier_message_on_ties():
    stamps = np.array([0.0, 1.0, 2.0])
    assert nearest(stamps, np.array([-5.0, 0.5, 0.6, 1.5, 9.0])).tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("defect, reason", [
    ("truncated", "unreadable"),
    ("missing_topic", "missing topic /leju_claw_state"),
    ("too_short", "too short"),
    ("stamps_out_of_order", "stamps out of order on /cam_h/color/image_raw/compressed"),
    ("raw_image", "camera topic /cam_r/color/image_raw/compressed carries sensor_msgs/msg/Image; the converter reads "
                  "sensor_msgs/CompressedImage"),
])
def test_bad_bag_has_one_reason(tmp_path, defect, reason):
    bag = write_synthetic_bag(tmp_path / f"{defect}.bag", task="task1_moving_grasp", hand_kind="leju_claw",
                              only_arm=True, n_frames=60, seed=1, defect=defect)
    with pytest.raises(BagProblem) as err:
        read_episode(bag.path, TopicMap(hand={"kind": "leju_claw"}, instruction="x"))
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_a_camera_at_another_rate_than_the_map_says_is_refused(tmp_path):
    """The synthetic head camera runs at 30 Hz; a map saying 60 would keep every 6th frame and label
    frames 0.2 s apart as 10 fps."""
    bag = write_synthetic_bag(tmp_path / "b.bag", task="task1_moving_grasp", hand_kind="leju_claw", only_arm=True,
                              n_frames=60, seed=1)
    with pytest.raises(BagProblem, match=r"the head_cam_h camera runs at 30\.\d Hz, the topic map says main_camera_fps 60"):
        read_episode(bag.path, TopicMap(hand={"kind": "leju_claw"}, instruction="x", main_camera_fps=60))


def test_frames_before_a_late_sensor_are_cut_and_a_stalled_camera_is_noted(tmp_path):
    """Frames exist only where every sensor stream has begun (a hand state starting 1 s late would
    give the first frames the hand's future values); a camera that stalls is named in a note, and
    so is a command that stops before the end (its last message held)."""
    from kuavo_train.data.rosbag.synthetic import LATE_S

    tm = TopicMap(hand={"kind": "leju_claw"}, instruction="x")
    kw = dict(task="task1_moving_grasp", hand_kind="leju_claw", only_arm=True, n_frames=150, seed=1)
    plain = read_episode(write_synthetic_bag(tmp_path / "plain.bag", **kw).path, tm)
    late = read_episode(write_synthetic_bag(tmp_path / "late.bag", **kw, defect="late_hand_state").path, tm)
    assert len(plain) - len(late) == pytest.approx(LATE_S * tm.fps - SAMPLE_DROP / JUMP, abs=1.5)
    assert np.array_equal(late.stamps, plain.stamps[len(plain) - len(late):])
    assert not plain.notes and not late.notes
    # a command that stops early (a claw command sent on change) stays in force: held, not cut
    stopped = read_episode(write_synthetic_bag(tmp_path / "stop.bag", **kw, defect="hand_command_stops").path, tm)
    assert np.array_equal(stopped.stamps, plain.stamps)
    [note] = stopped.notes
    assert note.startswith("/leju_claw_command: its last message is ") and "frames hold it" in note, note
    assert (stopped.action[-1, [7, 15]] == stopped.action[len(stopped) // 2, [7, 15]]).all()
    stalled = read_episode(write_synthetic_bag(tmp_path / "stall.bag", **kw, defect="camera_stall").path, tm)
    assert len(stalled) == len(plain)
    [note] = stalled.notes
    assert note.startswith("/cam_l/color/image_raw/compressed: frame ") and "more than two frame periods away" in note, note


def test_overwrite_replaces_a_dataset_and_nothing_else(tmp_path, kuavo_bags):
    """--overwrite never deletes a folder that is not a LeRobot dataset (a mistyped --out), nor the
    folder holding the input bags."""
    import shutil

    bag = kuavo_bags["task2_weighing"][0].path
    tm = bag_topic_map("task2_weighing")
    folder = tmp_path / "recordings"
    folder.mkdir()
    own = shutil.copy(bag, folder / "ep0.bag")
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(RosbagError, match=r"--out .*recordings holds the input bag .*ep0.bag"):
        convert_bags([Path(own)], folder, tm, overwrite=True, progress=False)
    with pytest.raises(RosbagError, match="--overwrite replaces a LeRobot dataset, and .* is not one"):
        convert_bags([bag], folder, tm, overwrite=True, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["ep0.bag", "notes.txt"]
    assert not list(tmp_path.glob(".tmp-*"))
    # a dataset is replaced, and each episode's bag is recorded by path too
    out = tmp_path / "ds"
    convert_bags([bag], out, tm, progress=False)
    convert_bags([bag, Path(own)], out, tm, overwrite=True, progress=False)
    meta = json.loads((out / "meta" / "kuavo_rosbag.json").read_text())
    assert [(e["bag"], e["path"]) for e in meta["episodes"]] == [(bag.name, str(bag.resolve())),
                                                                 ("ep0.bag", str((folder / "ep0.bag").resolve()))]


# ---------------------------------------------------------------- converted datasets
def test_datasets_open_with_stock_lerobot(kuavo_bag_datasets):
    for task, root in kuavo_bag_datasets.items():
        ds, table = _table(root)
        hand, only_arm = BAG_TASKS[task]
        info = json.loads((root / "meta" / "info.json").read_text())
        assert info["codebase_version"].startswith("v3") and info["robot_type"] == "kuavo4pro" and ds.fps == 10
        n_train = BAG_EPISODES - BAG_VAL_EPISODES
        assert info["splits"] == {"train": f"0:{n_train}", "val": f"{n_train}:{BAG_EPISODES}"}
        assert ds.meta.total_episodes == BAG_EPISODES
        assert [int(x) for x in ds.meta.episodes["length"]] == [BAG_FRAMES] * BAG_EPISODES  # after sample_drop
        feats = ds.meta.features
        assert feats["observation.state"]["shape"] == (16,) or list(feats["observation.state"]["shape"]) == [16]
        assert list(feats["observation.state"]["names"]) == list(STATE_NAMES)
        want_action = list(STATE_NAMES) + ([] if only_arm else list(BASE_NAMES))
        assert list(feats["action"]["names"]) == want_action and list(feats["action"]["shape"]) == [len(want_action)]
        assert sorted(ds.meta.video_keys) == sorted(f"observation.images.{c}" for c in ("head_cam_h", "wrist_cam_l", "wrist_cam_r"))
        for key in ds.meta.video_keys:
            assert list(feats[key]["shape"]) == [48, 64, 3]
        assert list(ds.meta.tasks.index) == [task_instruction(task)]
        assert table["action"].shape == (BAG_EPISODES * BAG_FRAMES, len(want_action))
        grip_cols = [7, 15]
        for col in ("observation.state", "action"):
            g = table[col][:, grip_cols]
            assert g.min() >= -1e-6 and g.max() <= 1 + 1e-6 and g.max() > 0.5, (task, col)  # scaled to [0, 1]
            assert np.abs(np.delete(table[col][:, :16], grip_cols, axis=1)).max() < np.pi  # radians
        if not only_arm:
            flag = table["action"][:, 19]
            assert set(np.unique(flag)) == {0.0, 1.0}  # ctrl_change_cmd: walking and standing frames
            assert np.abs(table["action"][:, 16:19]).max() > 0.5  # base pose targets

    # video decodes, and the images follow the recording (not constant)
    ds, _ = _table(kuavo_bag_datasets["task1_moving_grasp"])
    a, b = ds[0], ds[BAG_FRAMES - 1]
    img = a["observation.images.head_cam_h"]
    assert tuple(img.shape) == (3, 48, 64) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert float((a["observation.images.wrist_cam_r"] - b["observation.images.wrist_cam_r"]).abs().mean()) > 0.01


def test_action_is_the_degree_command_in_radians_at_the_aligned_frame(kuavo_bag_datasets, kuavo_bags):
    """Frame k of episode e = head-camera message sample_drop + 3k; its arm action = deg2rad of the
    arm command nearest in time (the _synced copy for task 4)."""
    import pandas as pd

    for task in ("task1_moving_grasp", "task4_sorting"):
        table = pd.read_parquet(kuavo_bag_datasets[task] / "data")
        for e, bag in enumerate(kuavo_bags[task][:2]):
            rows = table[table["episode_index"] == e]
            frame_t = bag.head_stamps[SAMPLE_DROP:len(bag.head_stamps) - SAMPLE_DROP][::JUMP]
            assert len(rows) == len(frame_t) == BAG_FRAMES
            want = np.deg2rad(bag.arm_deg[nearest(bag.arm_stamps, frame_t)])
            got = np.stack(rows["action"].to_numpy())
            np.testing.assert_allclose(got[:, :7], want[:, :7], atol=1e-5)
            np.testing.assert_allclose(got[:, 8:15], want[:, 7:], atol=1e-5)
            # the measured joints lag the command: close to it, not equal
            state = np.stack(rows["observation.state"].to_numpy())
            assert 0 < np.abs(state[:, :7] - got[:, :7]).mean() < 0.2


# ---------------------------------------------------------------- the real CLI
def _cli(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(KUAVO_TRAIN), "convert", "rosbag", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module", autouse=True)
def cli_run(tmp_path_factory):
    """The CLI on 2 good and 4 bad bags, started before the first test of this file so that it
    runs (mostly importing LeRobot) while the other tests build their datasets."""
    tmp = tmp_path_factory.mktemp("cli")
    bags = tmp / "bags"
    for i in range(2):
        write_synthetic_bag(bags / f"good_{i}.bag", task="task2_weighing", hand_kind="rq2f85", only_arm=True, n_frames=50, seed=i)
    for defect in ("truncated", "missing_topic", "too_short", "stamps_out_of_order"):
        write_synthetic_bag(bags / f"bad_{defect}.bag", task="task2_weighing", hand_kind="rq2f85", only_arm=True,
                            n_frames=50, seed=5, defect=defect)
    (tmp / "map.yaml").write_text("image_size: null\nsample_drop: 4\n")
    out = tmp / "data" / "task2_weighing"
    proc = _cli(bags, "--out", out, "--map", "map.yaml", "--instruction", task_instruction("task2_weighing"),
                "--val-fraction", "0.5", "--jobs", "2", cwd=tmp)
    yield proc, out
    if proc.poll() is None:  # (only when its test was deselected) its reading processes hold the pipes too
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.communicate()


def test_cli_converts_the_good_bags_and_names_the_bad_ones(cli_run):
    proc, out = cli_run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr[-2000:]
    failed = sorted(line for line in stderr.splitlines() if line.startswith("failed: "))
    assert len(failed) == 4, stderr[-2000:]
    for line, reason in zip(failed, ("missing topic /gripper/state", "stamps out of order", "too short", "unreadable")):
        assert "bad_" in line and reason in line, line
    assert "Traceback" not in stderr
    assert "2 episodes" in stdout and "4 of 6 bags failed" in stdout, stdout
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["splits"] == {"train": "0:1", "val": "1:2"} and info["total_episodes"] == 2
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp")]  # published atomically, nothing left over
    prov = json.loads((out / "meta" / "kuavo_rosbag.json").read_text())
    assert [e["bag"] for e in prov["episodes"]] == ["good_0.bag", "good_1.bag"] and len(prov["failed"]) == 4


def test_cli_bad_map_nothing_converted_or_no_such_bag_exits_2_and_writes_nothing(tmp_path, capsys):
    """The CLI entry point in-process (a subprocess would spend seconds importing torch on the way out)."""
    from kuavo_train.cli.main import main

    (tmp_path / "bad.yaml").write_text("hand:\n  kind: robotiq\n")
    good = write_synthetic_bag(tmp_path / "a.bag", task="task1_moving_grasp", hand_kind="rq2f85", only_arm=True,
                               n_frames=30, seed=0).path
    short = write_synthetic_bag(tmp_path / "short.bag", task="task1_moving_grasp", hand_kind="rq2f85", only_arm=True,
                                n_frames=30, seed=0, defect="too_short").path
    out = tmp_path / "out" / "task1"
    cases = (
        ([str(good), "--map", str(tmp_path / "bad.yaml")], "rosbag map error: hand.kind: Input should be"),
        ([str(good), "--map", str(tmp_path / "missing.yaml")], "missing.yaml: no such file"),
        ([str(good), "--val-fraction", "2"], "split.val_fraction"),
        ([str(good), "--jobs", "0"], "--jobs must be >= 1"),
        ([str(short)], "error: rosbag error: none of the 1 bags could be converted"),
        ([str(tmp_path / "nope.bag")], "nope.bag: no such file"),
    )
    for argv, says in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["convert", "rosbag", *argv, "--out", str(out), "--instruction", "x"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and says in err and "Traceback" not in err, (argv, err)
        error_lines = [line for line in err.splitlines() if not line.startswith("failed: ")]
        assert len(error_lines) == 1, err
        assert "failed: " not in err, err  # one bag: its reason is the error line, not said twice
        if "--map" in argv:
            assert "bad.yaml" in err or "missing.yaml" in err
    assert not (tmp_path / "out").exists()


def test_out_must_not_exist_and_instruction_is_required(tmp_path, kuavo_bags):
    bag = kuavo_bags["task2_weighing"][0].path
    (tmp_path / "taken").mkdir()
    with pytest.raises(RosbagError, match="exists already"):
        convert_bags([bag], tmp_path / "taken", bag_topic_map("task2_weighing"))
    with pytest.raises(RosbagError, match="no instruction"):
        convert_bags([bag], tmp_path / "new", TopicMap(image_size=None))
    assert not (tmp_path / "new").exists()


def test_sigterm_mid_conversion_leaves_nothing_and_says_so_in_one_line(tmp_path):
    """`timeout` or a job scheduler stops a conversion with SIGTERM: the staged folder and the folders
    made for --out go, the input stays, and the process says so in one line with exit code 143."""
    import signal
    import time

    bags = [write_synthetic_bag(tmp_path / "bags" / f"b{i}.bag", task="task1_moving_grasp", hand_kind="rq2f85",
                                only_arm=True, n_frames=120, seed=i).path for i in range(6)]
    out = tmp_path / "new" / "deeper" / "task1"
    proc = _cli(*bags, "--out", out, "--instruction", "x", "--images", cwd=tmp_path)
    deadline = time.time() + 120
    while not list((tmp_path / "new" / "deeper").glob(".tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    # the staging folder is made once the command has started converting, before the first bag is read
    assert proc.poll() is None, f"the conversion ended (exit {proc.returncode}) before its staging folder was seen"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # (a child inherits blocked signals: say so if this test process had SIGTERM blocked)
    assert proc.returncode == 128 + signal.SIGTERM, (err[-3000:], signal.pthread_sigmask(signal.SIG_BLOCK, []))
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM: its temporary files removed"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "new").exists()
    assert all(b.is_file() for b in bags)


def test_default_map_is_documented_for_every_field():
    text = (REPO / "configs" / "data" / "kuavo_rosbag.yaml").read_text()
    for key in TopicMap.model_fields:
        assert f"\n{key}:" in text, key
