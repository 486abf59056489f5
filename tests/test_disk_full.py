"""Disk full: one line naming the path and the bytes, nothing lost or half-written; the frozen-feature
cache computes instead of dying by SIGBUS.

The full disk is a small tmpfs mounted for the test (root only: skipped with the reason elsewhere)."""

import json
import logging
import os
import shutil
import subprocess

import pytest
import torch
from conftest import REPO, TASK_NAMES, tiny_overrides

from kuavo_train.policy import factory
from kuavo_train.policy.feature_cache import FrozenFeatureCache, cache_level, serving
from kuavo_train.training import checkpoint as ckpt

CLI = ["-m", "kuavo_train.cli.main"]
MiB = 2**20


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size) -> a directory on a tmpfs of `size` bytes; unmounted at teardown."""
    mounted = []

    def mount(name: str, size: int):
        if os.geteuid() != 0:
            pytest.skip("the disk-full tests mount a small tmpfs, which needs root")
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size)}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)  # a file still open: detach lazily


def _resize(d, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={int(size)}", str(d)], check=True)


def _cli(python_exe, *args):
    return subprocess.run([python_exe, *CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    return lines[0]


def _leftovers(folder) -> list:
    return sorted(str(p) for p in folder.rglob("*") if p.name.startswith((".tmp-", ".old-")))


# ---- checkpoints -----------------------------------------------------------------------------------

def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(python_exe, tmpfs, demo_base, demo_data):
    """Stage 1 is trained; the disk then has room for half a checkpoint: stage 2 trains, its first
    checkpoint is refused before a byte is written, and stage 1's checkpoints load as before."""
    from kuavo_train.wrapper.policy.smolvla import SmolVLAPolicyWrapper

    disk = tmpfs("disk", 400 * MiB)
    run_dir = disk / "run"
    extra = ("evaluation.after_each_stage=false",)
    r = _cli(python_exe, "train", *tiny_overrides(run_dir, demo_base, demo_data, "task=tasks/task1_moving_grasp", *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    stage1 = run_dir / "stage1_task1_moving_grasp" / "checkpoints"
    size = ckpt.tree_bytes(stage1 / "last")
    step = ckpt.read_meta(stage1 / "last")["step"]
    _resize(disk, shutil.disk_usage(disk).used + size // 2)

    line = _one_line(_cli(python_exe, "train", *tiny_overrides(run_dir, demo_base, demo_data,
                                                               "task=tasks/task2_weighing", *extra)))
    dest = run_dir / "stage2_task2_weighing" / "checkpoints" / "last"
    assert line.startswith(f"error: disk full: cannot write the checkpoint {dest}: it needs about "), line
    needed = int(line.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert size * 0.9 < needed < size * 1.5, (needed, size)  # the estimate is about the real size
    assert "are free there" in line and "the earlier checkpoints are intact" in line
    assert _leftovers(run_dir) == []
    assert not dest.exists()
    assert ckpt.is_complete(stage1 / "last") and ckpt.read_meta(stage1 / "last")["step"] == step
    assert ckpt.is_complete(stage1 / "best")
    SmolVLAPolicyWrapper.from_pretrained(stage1 / "last" / "pretrained_model")
    state = json.loads((run_dir / "run.json").read_text())
    assert state["stages"]["task1_moving_grasp"]["status"] == "complete"


@pytest.fixture(scope="module")
def checkpoint_parts(demo_base, demo_data):
    """What the stage trainer hands to write_checkpoint: policy, processors, optimizer (with state), scheduler."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    cfg = factory.read_pretrained_config(demo_base)
    policy = factory.load_policy(demo_base, cfg)
    meta = LeRobotDatasetMetadata("t/task1", root=demo_data / TASK_NAMES[0])
    pre, post = factory.make_processors(policy.config, stats=meta.stats)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Adam's moments exist, as in a real checkpoint
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return {"policy": policy, "preprocessor": pre, "postprocessor": post, "optimizer": optimizer, "scheduler": scheduler}


def _write(parts, dest, step):
    return ckpt.write_checkpoint(dest, **parts, step=step, meta={"stage": 1}, trained_tasks=[])


MODES = ["refused before writing", "failed while writing"]


def _skip_the_check(monkeypatch, mode):
    """The estimate can be short, or another process fills the disk after the check: the write's
    own error (SafetensorError, OSError, shutil.Error) must then give the same line."""
    if mode == MODES[1]:
        monkeypatch.setattr(ckpt, "_ensure_space", lambda dest, needed: None)


@pytest.mark.parametrize("mode", MODES)
def test_write_checkpoint_on_a_full_disk(tmpfs, checkpoint_parts, monkeypatch, mode):
    needed = ckpt.checkpoint_bytes(checkpoint_parts["policy"], checkpoint_parts["optimizer"])
    disk = tmpfs("disk", int(needed * 1.5))
    last = disk / "checkpoints" / "last"
    _write(checkpoint_parts, last, 1)
    _skip_the_check(monkeypatch, mode)
    with pytest.raises(ckpt.DiskFullError) as err:
        _write(checkpoint_parts, last, 2)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"disk full: cannot write the checkpoint {last}"), msg
    assert f"it needs about {needed:,} bytes" in msg and "are free there" in msg
    if mode == MODES[1]:
        assert "(no space left on device)" in msg
    assert _leftovers(disk) == []
    assert ckpt.is_complete(last) and ckpt.read_meta(last)["step"] == 1
    factory.load_policy(last / "pretrained_model", factory.read_pretrained_config(last / "pretrained_model"))


@pytest.mark.parametrize("mode", MODES)
def test_copy_checkpoint_on_a_full_disk(tmp_path, tmpfs, monkeypatch, mode):
    src = tmp_path / "src"
    (src / "pretrained_model").mkdir(parents=True)
    (src / "pretrained_model" / "model.safetensors").write_bytes(os.urandom(800 * 1024))
    (src / ckpt.META_FILE).write_text('{"step": 2}')
    disk = tmpfs("disk", 1 * MiB)
    best = disk / "checkpoints" / "best"
    (best / "pretrained_model").mkdir(parents=True)
    (best / "pretrained_model" / "model.safetensors").write_bytes(b"old" * 100_000)
    (best / ckpt.META_FILE).write_text('{"step": 1}')
    _skip_the_check(monkeypatch, mode)
    with pytest.raises(ckpt.DiskFullError) as err:
        ckpt.copy_checkpoint(src, best)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"disk full: cannot write the checkpoint {best}"), msg
    assert f"it needs about {ckpt.tree_bytes(src):,} bytes" in msg
    assert _leftovers(disk) == []
    assert ckpt.read_meta(best)["step"] == 1
    assert (best / "pretrained_model" / "model.safetensors").read_bytes() == b"old" * 100_000


# ---- frozen-feature cache --------------------------------------------------------------------------

def _cache_setup(demo_base, demo_data, cache_dir):
    from kuavo_train.data.frames import ChunkedFrameDataset
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    policy = factory.load_policy(demo_base, factory.read_pretrained_config(demo_base))
    root = demo_data / TASK_NAMES[0]
    pre, _ = factory.make_processors(policy.config, stats=LeRobotDatasetMetadata("t/task1", root=root).stats)
    ds = ChunkedFrameDataset("t/task1", root, episodes=[0, 1, 2], chunk_size=policy.config.chunk_size,
                             camera_keys=list(policy.config.image_features), task="grasp it", task_id=1)
    cache = FrozenFeatureCache(policy, cache_dir, max_bytes=2**30, level=cache_level(policy)[0],
                               resize=policy.config.resize_imgs_with_padding)
    cache.register_dataset(1, root)
    cache.attach()
    return policy, pre, ds, cache


def _loss(policy, pre, ds, rows, cache=None):
    raw = torch.utils.data.default_collate([ds[i] for i in rows])
    batch = pre(dict(raw))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(rows), policy.config.chunk_size, policy.config.max_action_dim, generator=g)
    time = torch.rand(len(rows), generator=g) * 0.9 + 0.05
    policy.train()
    with torch.no_grad(), serving(cache, raw, batch):
        loss, _ = policy.forward(batch, noise=noise, time=time)
    return loss


def test_feature_cache_stores_what_fits_and_computes_the_rest(tmpfs, demo_base, demo_data, caplog):
    """Room for one camera's store of the three: that one is cached, the others computed; the disk
    then fills up (say, with a checkpoint): nothing more is stored, and the process lives on."""
    policy, pre, ds, cache = _cache_setup(demo_base, demo_data, tmpfs("cache", 3 * MiB))
    cams = len(policy.config.image_features)
    first, second = list(range(0, 40, 3)), list(range(1, 40, 3))
    ref = [_loss(policy, pre, ds, rows) for rows in (first, second)]
    with caplog.at_level(logging.WARNING, logger="kuavo_train.policy.feature_cache"):
        torch.testing.assert_close(_loss(policy, pre, ds, first, cache), ref[0], rtol=1e-5, atol=1e-6)
        assert cache.stats.stored == len(first) and cache.stats.misses == cams * len(first)
        torch.testing.assert_close(_loss(policy, pre, ds, first, cache), ref[0], rtol=1e-5, atol=1e-6)
        assert cache.stats.hits == len(first)  # the one stored camera is served
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "not enough disk space" in warnings[0] and "computed, not stored" in warnings[0]

        root = cache.root
        filler = root.parent / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(root).free - 16 * 1024))
        stored = cache.stats.stored
        torch.testing.assert_close(_loss(policy, pre, ds, second, cache), ref[1], rtol=1e-5, atol=1e-6)
        assert cache.stats.stored == stored  # the store had holes for these frames, the disk had no room
        torch.testing.assert_close(_loss(policy, pre, ds, first, cache), ref[0], rtol=1e-5, atol=1e-6)
    assert len(caplog.records) == 1  # one warning per cache
    cache.detach()


def test_feature_cache_on_a_full_disk_does_not_kill_training(python_exe, tmp_path, tmpfs, demo_base, demo_data):
    """The cache's folder on a disk smaller than one store: the stage trains (features computed),
    where writing into the sparse memory map used to end the process by SIGBUS without a word."""
    cache_dir = tmpfs("cache", 512 * 1024)
    run_dir = tmp_path / "run"
    r = _cli(python_exe, "train", *tiny_overrides(run_dir, demo_base, demo_data, "task=tasks/task1_moving_grasp",
                                                  "evaluation.after_each_stage=false", f"feature_cache.dir={cache_dir}"))
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    warnings = [ln for ln in r.stdout.splitlines() if "frozen-feature cache: not enough disk space" in ln]
    assert len(warnings) == 1, r.stdout[-3000:]
    assert str(cache_dir) in warnings[0] and "computed, not stored" in warnings[0]
    assert ckpt.is_complete(run_dir / "stage1_task1_moving_grasp" / "checkpoints" / "last")
    assert not list(cache_dir.rglob("*.npy"))  # no store could fit: none was created
