"""The MetaWorld closed-loop benchmark: real scripted-expert datasets on disk, the real tiny
SmolVLA, the same pipeline as the Kuavo path, closed-loop evaluation in the simulator."""

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # headless, before mujoco is imported
pytest.importorskip("metaworld", reason="metaworld is not installed: pip install -e '.[metaworld]' (make metaworld-deps)")

TASKS = ["push-v3", "drawer-open-v3"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`--smoke` sizes on two tasks: 1 demo + 1 held-out seed per task, 1 epoch per stage."""
    from kuavo_train.benchmark.metaworld import SMOKE, BenchmarkSpec, run_benchmark

    root = tmp_path_factory.mktemp("metaworld")
    spec = BenchmarkSpec(tasks=list(TASKS), strategies=["sequential_spec", "joint"], seeds=[0], data_dir=root / "data",
                         out_dir=root / "out", workers=2, **SMOKE)
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
        assert ds.meta.info["splits"] == {"train": "0:1", "val": "1:2"}
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
    seq = mats["sequential_spec"][0]
    assert len(seq) == 3 and all(len(r) == 2 and all(v in (0.0, 1.0) for v in r) for r in seq)
    joint = mats["joint"][0]
    assert joint[0] is not None and joint[2] is not None
    for strategy in ("sequential_spec", "joint"):
        report = json.loads((spec.out_dir / "seed0" / strategy / "report.json").read_text())
        assert report["metrics"]["success"]["acc"] is not None
        run = json.loads((spec.out_dir / "seed0" / strategy / "run.json").read_text())
        assert run["config"]["policy"]["max_state_dim"] == 39
    md = (spec.out_dir / "benchmark.md").read_text()
    assert "| before training |" in md and "ACC" in md and "expert success" in md
    assert result["expert"]["push-v3"]["eval_success_rate"] == 1.0


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
