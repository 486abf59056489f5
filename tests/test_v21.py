"""LeRobot v2.1 datasets as input: real files in lerobot 0.3's layout, LeRobot's own converter, stock readers."""

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kuavo_train.data.task_data import DataError
from kuavo_train.data.v21 import MARKER, convert_v21, dataset_version, fingerprint, v3_view

sys.path.insert(0, str(Path(__file__).parent))
from v21_fixture import KUAVO_CAMERAS, write_v21_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KUAVO_TRAIN = REPO / ".venv" / "bin" / "kuavo-train"
REPO_ID = "kuavo_v21/task1"
LENGTHS = [12, 15, 9]
CAMS = list(KUAVO_CAMERAS[:2])
NUMERIC = ["observation.state", "action", "timestamp", "frame_index", "episode_index", "index", "task_index"]


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


@pytest.fixture(scope="module")
def v21_src(tmp_path_factory) -> Path:
    return write_v21_dataset(tmp_path_factory.mktemp("v21") / "task1_v21", n_episodes=len(LENGTHS),
                             frames_per_episode=LENGTHS, cameras=CAMS, seed=0)


@pytest.fixture(scope="module")
def converted(v21_src, tmp_path_factory):
    before = _hashes(v21_src)
    out_dir = tmp_path_factory.mktemp("out")
    dst = convert_v21(v21_src, out_dir / "task1", repo_id=REPO_ID)
    return dst, before, _hashes(v21_src), out_dir


def test_fixture_is_v21_layout(v21_src):
    info = json.loads((v21_src / "meta" / "info.json").read_text())
    assert dataset_version(v21_src) == "v2.1"
    assert info["splits"] == {"train": "0:3"} and info["total_videos"] == 6 and info["total_chunks"] == 1
    assert list(info["features"])[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]
    assert info["features"][CAMS[0]]["info"]["video.codec"] in ("av1", "h264")
    stats = [json.loads(line) for line in (v21_src / "meta" / "episodes_stats.jsonl").read_text().splitlines()]
    assert set(stats[0]["stats"]) == set(info["features"])
    assert np.array(stats[0]["stats"][CAMS[0]]["mean"]).shape == (3, 1, 1)
    assert (v21_src / "data/chunk-000/episode_000002.parquet").is_file()
    assert (v21_src / f"videos/chunk-000/{CAMS[1]}/episode_000002.mp4").is_file()
    with pytest.raises(Exception, match="BackwardCompatibility|v2.1|v3.0"):  # what made this module necessary
        from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

        LeRobotDatasetMetadata(REPO_ID, root=v21_src)


def test_original_unchanged_and_nothing_left_behind(v21_src, converted):
    dst, before, after, out_dir = converted
    assert before == after
    assert sorted(p.name for p in out_dir.iterdir()) == ["task1"]  # no temporary or *_old folder
    assert sorted(p.name for p in v21_src.parent.iterdir()) == [v21_src.name]
    assert json.loads((dst / MARKER).read_text())["source"] == str(v21_src)


def test_stock_lerobot_reads_the_copy(v21_src, converted):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dst = converted[0]
    ds = LeRobotDataset(REPO_ID, root=dst)
    info = json.loads((dst / "meta" / "info.json").read_text())
    assert info["codebase_version"].startswith("v3") and info["splits"] == {"train": "0:3"}
    assert ds.meta.total_episodes == 3 and len(ds) == sum(LENGTHS) and (dst / "meta" / "stats.json").is_file()
    src = pd.concat([pd.read_parquet(v21_src / f"data/chunk-000/episode_{e:06d}.parquet") for e in range(3)],
                    ignore_index=True)
    for i in range(len(ds)):
        item = ds[i]
        for key in NUMERIC:
            want = np.stack(src[key].values)[i] if key in ("observation.state", "action") else src[key].values[i]
            np.testing.assert_array_equal(item[key].numpy().reshape(np.shape(want)), want, err_msg=f"{key} row {i}")
        assert item["task"] == "pick up the object and place it in the box"


def test_videos_decode_to_the_source_frames(v21_src, converted):
    """The converter re-muxes without re-encoding: every frame equals the v2.1 episode file's frame."""
    import av
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(REPO_ID, root=converted[0])
    start = np.cumsum([0, *LENGTHS])
    for cam in CAMS:
        for ep, n in enumerate(LENGTHS):
            with av.open(str(v21_src / f"videos/chunk-000/{cam}/episode_{ep:06d}.mp4")) as c:
                frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            assert len(frames) == n
            for fi in (0, n // 2, n - 1):
                img = ds[int(start[ep] + fi)][cam]
                assert tuple(img.shape) == (3, 48, 64)
                got = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                np.testing.assert_array_equal(got, frames[fi], err_msg=f"{cam} episode {ep} frame {fi}")


def test_image_stored_kuavo_style(tmp_path):
    """Cameras as PNG bytes in the parquet files, features declared as Kuavo's converter did ((3, H, W))."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from PIL import Image

    src = write_v21_dataset(tmp_path / "img_v21", n_episodes=2, frames_per_episode=[5, 7], cameras=CAMS[:1],
                            seed=1, video=False, kuavo_style=True)
    dst = convert_v21(src, tmp_path / "img_v30")
    ds = LeRobotDataset("local/img_v21", root=dst)
    assert len(ds) == 12 and ds.meta.features[CAMS[0]]["dtype"] == "image"
    row = pd.read_parquet(src / "data/chunk-000/episode_000001.parquet").iloc[3]
    want = np.asarray(Image.open(io.BytesIO(row[CAMS[0]]["bytes"])))
    got = (ds[5 + 3][CAMS[0]].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(got, want)


def test_v3_view_converts_once_and_reuses(v21_src, converted, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="kuavo_train.data.v21"):
        first = v3_view(v21_src, cache)
    assert first == cache / f"{v21_src.name}-{fingerprint(v21_src)}"
    assert any("converting the LeRobot v2.1 dataset at" in r.getMessage() and "left unchanged" in r.getMessage()
               for r in caplog.records)
    stamp = (first / MARKER).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kuavo_train.data.v21"):
        again = v3_view(v21_src, cache)
    assert again == first and (first / MARKER).stat().st_mtime_ns == stamp
    assert not any("converting" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [first.name]  # and its lock
    assert v3_view(converted[0], cache) == converted[0]  # v3.x: used as it is


def test_processes_opening_one_v21_dataset_at_once_convert_it_once(v21_src, tmp_path):
    """The processes of a launch open every dataset at the same moment: one converts, the others
    wait and use its copy (each converting its own would cost the disk and cores N times)."""
    import subprocess
    import sys

    script = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
              "from kuavo_train.data.v21 import v3_view; print(v3_view(sys.argv[1], sys.argv[2]))")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(v21_src), str(tmp_path / "cache")], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1
    assert sum(e.count("converting the LeRobot v2.1 dataset") for _, e in outs) == 1, [e for _, e in outs]


def test_fingerprint_follows_the_files(v21_src, tmp_path):
    copy = tmp_path / v21_src.name
    shutil.copytree(v21_src, copy)
    fp = fingerprint(copy)
    with open(copy / "meta" / "episodes.jsonl", "a") as f:
        f.write("\n")
    assert fingerprint(copy) != fp


def test_broken_v21_fails_in_one_line_and_leaves_nothing(v21_src, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(v21_src, broken)
    (broken / "data/chunk-000/episode_000001.parquet").unlink()
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        convert_v21(broken, out / "x")
    msg = str(err.value)
    assert "\n" not in msg and str(broken) in msg and "cannot convert" in msg
    assert not (out / "x").exists() and list(out.iterdir()) == []


@pytest.mark.parametrize("missing", ["episodes_stats.jsonl", "tasks.jsonl", "episodes.jsonl"])
def test_v21_without_its_metadata_files_is_refused_before_anything_is_written(v21_src, tmp_path, missing):
    """Without them LeRobot's converter failed seconds in, naming its own temporary copy, and the
    pipeline left an empty cache folder."""
    from kuavo_train.data.v21 import v3_view

    broken = tmp_path / "broken"
    shutil.copytree(v21_src, broken)
    (broken / "meta" / missing).unlink()
    for convert in (lambda: convert_v21(broken, tmp_path / "out" / "x"),
                    lambda: v3_view(broken, tmp_path / ".v30", label="stages.t.dataset.root")):
        with pytest.raises(DataError) as err:
            convert()
        msg = str(err.value)
        assert "\n" not in msg and f"{broken} is a LeRobot v2.1 dataset without meta/{missing}" in msg, msg
    assert msg.startswith("data error: stages.t.dataset.root: ")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".v30").exists()


@pytest.mark.parametrize("version, hint", [("v2.0", "v2.0 -> v2.1"), ("v1.6", "convert_dataset_v1_to_v2"),
                                           ("v9.0", "cannot read")])
def test_other_versions_one_line(tmp_path, version, hint):
    root = tmp_path / "old"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps({"codebase_version": version, "fps": 10, "features": {}}))
    for call in (lambda: v3_view(root, tmp_path / "cache"), lambda: convert_v21(root, tmp_path / "dst")):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and version in msg and hint in msg and str(root) in msg
    assert not (tmp_path / "cache").exists() and not (tmp_path / "dst").exists()


def test_cli_convert_v21(v21_src, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dst = tmp_path / "cli_v30"
    ok = subprocess.run([str(KUAVO_TRAIN), "convert", "v21", str(v21_src), str(dst), "--repo-id", REPO_ID],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert str(dst) in ok.stdout and dataset_version(dst).startswith("v3")
    again = subprocess.run([str(KUAVO_TRAIN), "convert", "v21", str(v21_src), str(dst)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and str(dst) in lines[0]
