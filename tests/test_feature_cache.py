"""The frozen-feature cache is exact: loss and gradients equal stock LeRobot's on the same batch, noise and time.

Tolerance: rtol 1e-5 / atol 1e-6 in float32. Cached features may come from a
SigLIP pass over a different batch composition, and batched matmuls may then
round differently in the last bits; anything beyond that is a bug.
"""

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import final_pretrained, tiny_overrides
from safetensors.torch import load_file

from kuavo_train.data.frames import ChunkedFrameDataset
from kuavo_train.policy import factory
from kuavo_train.policy.feature_cache import FrozenFeatureCache, cache_level, dataset_fingerprint, serving

TOL = {"rtol": 1e-5, "atol": 1e-6}
TASK = "task1_moving_grasp"


def _policy(demo_base, **changes):
    cfg = factory.read_pretrained_config(demo_base)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return factory.load_policy(demo_base, cfg)


def _data(demo_data, policy):
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    root = demo_data / TASK
    meta = LeRobotDatasetMetadata(f"test/{TASK}", root=root)
    pre, _ = factory.make_processors(policy.config, stats=meta.stats)
    ds = ChunkedFrameDataset(f"test/{TASK}", root, episodes=[0, 1, 2], chunk_size=policy.config.chunk_size,
                             camera_keys=list(policy.config.image_features), task="grasp it", task_id=1)
    return root, pre, ds


def _batch(ds, rows):
    return torch.utils.data.default_collate([ds[i] for i in rows])


def _loss_and_grads(policy, pre, raw, cache=None):
    policy.train()
    policy.zero_grad(set_to_none=True)
    batch = pre(dict(raw))
    g = torch.Generator().manual_seed(0)
    n = len(raw["task"])
    noise = torch.randn(n, policy.config.chunk_size, policy.config.max_action_dim, generator=g)
    time = torch.rand(n, generator=g) * 0.9 + 0.05
    with serving(cache, raw, batch):
        loss, _ = policy.forward(batch, noise=noise, time=time)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in policy.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], **TOL, msg=lambda m, k=k: f"gradient of {k}: {m}")


def _cache(policy, root, tmp_path, **kw):
    level, _ = cache_level(policy)
    cache = FrozenFeatureCache(policy, tmp_path / "cache", max_bytes=kw.get("max_bytes", 2**30), level=level,
                               resize=policy.config.resize_imgs_with_padding)
    cache.register_dataset(1, root)
    cache.attach()
    return cache


@pytest.mark.parametrize("expert_only", [True, False], ids=["connector-cached", "vision-cached"])
def test_loss_and_gradients_equal_stock(demo_base, demo_data, tmp_path, expert_only):
    policy = _policy(demo_base, train_expert_only=expert_only)
    root, pre, ds = _data(demo_data, policy)
    cams = len(policy.config.image_features)
    first, second = _batch(ds, [0, 5, 9, 13]), _batch(ds, [5, 13, 20, 31])
    ref_first, ref_second = _loss_and_grads(policy, pre, first), _loss_and_grads(policy, pre, second)

    cache = _cache(policy, root, tmp_path)
    assert cache.level == ("connector" if expert_only else "vision")
    _assert_same(_loss_and_grads(policy, pre, first, cache), ref_first)  # cold: computed and stored
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stored) == (0, 4 * cams, 4 * cams)
    _assert_same(_loss_and_grads(policy, pre, first, cache), ref_first)  # warm: all served
    assert cache.stats.hits == 4 * cams
    _assert_same(_loss_and_grads(policy, pre, second, cache), ref_second)  # half served, half computed
    assert (cache.stats.hits, cache.stats.misses) == (6 * cams, 6 * cams)

    # Without the context (e.g. a user's own forward) the cache steps aside.
    before = (cache.stats.hits, cache.stats.misses)
    policy.train()
    policy.forward(pre(dict(first)))
    assert (cache.stats.hits, cache.stats.misses) == before
    cache.detach()
    assert "embed_image" not in vars(policy.model.vlm_with_expert)


def one_pixel_changed(policy, raw) -> dict:
    """`raw` with one pixel of its first frame changed: same keys, other content."""
    cam = next(iter(policy.config.image_features))
    changed = dict(raw)
    changed[cam] = raw[cam].clone()
    changed[cam][0, :, 10, 10] = 1.0 - changed[cam][0, :, 10, 10]
    return changed


def check_recomputed(policy, pre, cache, changed: dict, rows: int):
    """`changed` (frames already served, other content) gives stock's loss and gradients, `rows` recomputed."""
    ref = _loss_and_grads(policy, pre, changed)
    before = cache.stats.misses
    _assert_same(_loss_and_grads(policy, pre, changed, cache), ref)
    assert cache.stats.misses == before + rows


def test_a_changed_image_is_recomputed_not_served(demo_base, demo_data, tmp_path):
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    raw, cache = _batch(ds, [0, 1]), _cache(policy, root, tmp_path)
    _loss_and_grads(policy, pre, raw, cache)
    check_recomputed(policy, pre, cache, one_pixel_changed(policy, raw), rows=1)



def test_each_machine_keeps_its_own_entries_on_a_shared_disk(demo_base, demo_data, tmp_path, monkeypatch):
    """Memory-mapped entries written by two machines into one NFS folder would reach it page by
    page in any order: another host name is another namespace."""
    import socket

    policy = _policy(demo_base)
    root, _, _ = _data(demo_data, policy)
    here = _cache(policy, root, tmp_path)
    monkeypatch.setattr(socket, "gethostname", lambda: "another-machine")
    there = _cache(policy, root, tmp_path)
    assert there.namespace != here.namespace
    assert json.loads((there.root / "key.json").read_text())["host"] == "another-machine"

def test_other_weights_or_data_never_share_entries(demo_base, demo_data, tmp_path):
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    a = _cache(policy, root, tmp_path)
    _loss_and_grads(policy, pre, _batch(ds, [0, 1]), a)
    a.detach()
    with torch.no_grad():
        next(policy.model.vlm_with_expert.get_vlm_model().vision_model.parameters()).add_(1e-3)
    b = _cache(policy, root, tmp_path)
    assert b.namespace != a.namespace
    _loss_and_grads(policy, pre, _batch(ds, [0, 1]), b)
    assert b.stats.hits == 0
    fp = dataset_fingerprint(root)
    assert fp != dataset_fingerprint(demo_data / "task2_weighing")
    assert fp == dataset_fingerprint(root)


def check_nothing_stored_all_exact(policy, pre, raw, make_cache):
    """A cache with no budget (`make_cache()`, made after stock's reference ran), two passes over `raw`:
    stock's loss and gradients each time, nothing stored or served at its level. Returns the cache."""
    ref = _loss_and_grads(policy, pre, raw)
    cache = make_cache()
    for _ in range(2):
        _assert_same(_loss_and_grads(policy, pre, raw, cache), ref)
    assert cache.stats.stored == 0 and cache.stats.hits == 0
    return cache


def test_budget_limits_what_is_stored_not_what_is_right(demo_base, demo_data, tmp_path):
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    check_nothing_stored_all_exact(policy, pre, _batch(ds, [0, 1, 2]), lambda: _cache(policy, root, tmp_path, max_bytes=0))



def test_the_processes_of_a_machine_share_the_budget(demo_base, demo_data, tmp_path, monkeypatch):
    """Each process counts the folder once, then only its own stores: with two processes of a
    launch on this machine, each may store half of the room that was left."""
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    raw = _batch(ds, [0, 1, 2])
    alone = _cache(policy, root, tmp_path / "alone")
    _loss_and_grads(policy, pre, raw, alone)
    alone.detach()
    entry = alone.stats.bytes_stored // alone.stats.stored
    assert alone.stats.stored > 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    shared = _cache(policy, root, tmp_path / "shared", max_bytes=4 * entry)
    _loss_and_grads(policy, pre, raw, shared)
    assert shared.stats.stored == 2

def test_trained_vision_encoder_turns_it_off_with_a_reason(demo_base, caplog):
    from kuavo_train.config.schema import FeatureCacheSettings

    policy = _policy(demo_base, freeze_vision_encoder=False, train_expert_only=False)
    with caplog.at_level(logging.INFO, logger="kuavo_train.policy.feature_cache"):
        assert FrozenFeatureCache.create(policy, FeatureCacheSettings(dir="unused")) is None
    assert "off: the vision encoder is trained" in caplog.text


def test_fp32_and_bf16_entries_are_kept_apart(demo_base, demo_data, tmp_path):
    """Features computed under bf16 autocast are never served to an fp32 step, nor the reverse."""
    import numpy as np

    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    raw = _batch(ds, [0, 7])
    cams = len(policy.config.image_features)

    def bf16(cache=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _loss_and_grads(policy, pre, raw, cache)

    ref_fp32, ref_bf16 = _loss_and_grads(policy, pre, raw), bf16()
    cache = _cache(policy, root, tmp_path)
    _assert_same(_loss_and_grads(policy, pre, raw, cache), ref_fp32)  # fp32 entries stored
    assert (cache.stats.hits, cache.stats.stored) == (0, 2 * cams)
    _assert_same(bf16(cache), ref_bf16)  # bf16 finds no entry of its own: computed, stored apart
    assert (cache.stats.hits, cache.stats.stored) == (0, 4 * cams)
    _assert_same(bf16(cache), ref_bf16)  # now served, from the bf16 entries
    _assert_same(_loss_and_grads(policy, pre, raw, cache), ref_fp32)  # and fp32 from its own
    assert cache.stats.hits == 2 * 2 * cams
    folders = {p.name: p for p in cache.root.iterdir() if p.is_dir()}
    assert sorted(folders) == ["autocast-bfloat16", "none"]
    dtypes = {name: {np.load(f, mmap_mode="r").dtype for f in d.rglob("*.features.npy")} for name, d in folders.items()}
    assert dtypes == {"none": {np.dtype(np.float32)}, "autocast-bfloat16": {np.dtype(np.uint16)}}  # bf16 as raw bits
    assert not torch.equal(ref_fp32[0], ref_bf16[0])  # the precisions really differ


def _cache_summary(train_log: Path, stage: int) -> tuple[int, int, int, str]:
    """(hits, misses, frames not decoded, level) of a stage, from the summary line the stage trainer logs at its end."""
    m = re.search(rf"stage {stage} frozen-feature cache: ([\d,]+) hits, ([\d,]+) misses .*?, ([\d,]+) frames not decoded "
                  r"at the (\w+) level", train_log.read_text())
    assert m, f"no cache summary for stage {stage} in {train_log}"
    return int(m[1].replace(",", "")), int(m[2].replace(",", "")), int(m[3].replace(",", "")), m[4]


def test_stage_with_cache_trains_like_stage_without(tmp_path, demo_base, demo_data, caplog):
    """A whole stage 1 (two epochs, validation after each) with the cache on (its default: the prefix level,
    frames already cached not decoded), in a folder of its own, and the same stage with it off: the on-run
    must really serve entries (hits, undecoded frames), and the validation losses and trained weights must
    agree within the README's tolerance."""
    from conftest import FULL_RUN_EXTRA

    from kuavo_train.config.loading import load_run_config
    from kuavo_train.training.pipeline import Pipeline

    runs = {}
    for cache in ("on", "off"):
        run_dir = tmp_path / cache
        cfg = load_run_config(tiny_overrides(run_dir, demo_base, demo_data, *FULL_RUN_EXTRA, f"task=tasks/{TASK}",
                                             "evaluation.after_each_stage=false", f"feature_cache.enabled={cache == 'on'}",
                                             f"feature_cache.dir={tmp_path / 'features'}"))
        with caplog.at_level(logging.INFO, logger="kuavo_train"):  # the INFO lines go to train.log, as in the CLI
            Pipeline(cfg).run()
        runs[cache] = run_dir
    hits, misses, undecoded, level = _cache_summary(runs["on"] / "train.log", 1)
    assert level == "prefix"  # the default level for train_expert_only
    assert hits > 0 and misses > 0, (hits, misses)  # computed in epoch 1, served afterwards
    assert undecoded > 0  # and in epoch 2 the loader decoded no image of a frame already cached
    off_log = (runs["off"] / "train.log").read_text()
    assert "stage 1: frozen-feature cache: off (feature_cache.enabled=false)" in off_log
    assert not re.search(r"stage 1 frozen-feature cache: \d", off_log)  # nothing served there

    def stage1(d):
        rows = [json.loads(x) for x in (d / "validation.jsonl").read_text().splitlines()]
        return [(r["epoch"], r["loss"]) for r in rows if r["stage"] == 1]

    with_cache, without = stage1(runs["on"]), stage1(runs["off"])
    assert [e for e, _ in with_cache] == [e for e, _ in without] == [1, 2]
    torch.testing.assert_close(torch.tensor([v for _, v in with_cache], dtype=torch.float64),
                               torch.tensor([v for _, v in without], dtype=torch.float64), **TOL)
    # The trained weights too: the validation loss of this tiny random model hardly depends on the
    # image features (scaling them by 10% moves it by ~1e-5), the weights trained on them do. The
    # prefix level's matmuls have other shapes than stock's, so gradients differ in their last bits,
    # and AdamW (update ~ m / sqrt(v)) magnifies that where a gradient is near zero: after 16 steps a
    # few elements differ by ~1e-6. Bound: each tensor's largest difference between the runs is under
    # 1% of how far training moved that tensor.
    on, off = (load_file(str(final_pretrained(runs[c], TASK) / "model.safetensors")) for c in ("on", "off"))
    init = load_file(str(demo_base / "model.safetensors"))
    assert on.keys() == off.keys()
    for k in on:
        diff = float((on[k] - off[k]).abs().max())
        moved = float((off[k] - init[k]).abs().max()) if k in init and init[k].shape == off[k].shape else 0.0
        assert diff <= 1e-2 * moved + 1e-7, f"trained weight {k}: runs differ by {diff:.3g}, training moved it {moved:.3g}"
    assert any(float((off[k] - init[k]).abs().max()) > 1e-4 for k in off if k in init)  # it did train
