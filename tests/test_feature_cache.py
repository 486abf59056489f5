"""The frozen-feature cache is exact: loss and gradients equal stock LeRobot's on the same batch, noise and time.

Tolerance: rtol 1e-5 / atol 1e-6 in float32. Cached features may come from a
SigLIP pass over a different batch composition, and batched matmuls may then
round differently in the last bits; anything beyond that is a bug.
"""

import json
import logging

import pytest
import torch
from conftest import final_pretrained, tiny_overrides

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


def test_a_changed_image_is_recomputed_not_served(demo_base, demo_data, tmp_path):
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    raw = _batch(ds, [0, 1])
    cache = _cache(policy, root, tmp_path)
    _loss_and_grads(policy, pre, raw, cache)
    cam = next(iter(policy.config.image_features))
    changed = dict(raw)
    changed[cam] = raw[cam].clone()
    changed[cam][0, :, 10, 10] = 1.0 - changed[cam][0, :, 10, 10]  # one pixel of one frame, same key
    ref = _loss_and_grads(policy, pre, changed)
    before = cache.stats.misses
    _assert_same(_loss_and_grads(policy, pre, changed, cache), ref)
    assert cache.stats.misses == before + 1


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


def test_budget_limits_what_is_stored_not_what_is_right(demo_base, demo_data, tmp_path):
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    raw = _batch(ds, [0, 1, 2])
    ref = _loss_and_grads(policy, pre, raw)
    cache = _cache(policy, root, tmp_path, max_bytes=0)
    for _ in range(2):
        _assert_same(_loss_and_grads(policy, pre, raw, cache), ref)
    assert cache.stats.stored == 0 and cache.stats.hits == 0


def test_trained_vision_encoder_turns_it_off_with_a_reason(demo_base, caplog):
    from kuavo_train.config.schema import FeatureCacheSettings

    policy = _policy(demo_base, freeze_vision_encoder=False, train_expert_only=False)
    with caplog.at_level(logging.INFO, logger="kuavo_train.policy.feature_cache"):
        assert FrozenFeatureCache.create(policy, FeatureCacheSettings(dir="unused")) is None
    assert "off: the vision encoder is trained" in caplog.text


def test_stage_with_cache_trains_like_stage_without(tmp_path, demo_base, demo_data, full_run):
    """Stage 1 of the shared run (cache on) vs the same stage with the cache off: same validation losses."""
    from kuavo_train.config.loading import load_run_config
    from kuavo_train.training.pipeline import Pipeline
    from conftest import FULL_RUN_EXTRA

    _, shared_dir = full_run
    run_dir = tmp_path / "run"
    cfg = load_run_config(tiny_overrides(run_dir, demo_base, demo_data, *FULL_RUN_EXTRA,
                                         f"task=tasks/{TASK}", "feature_cache.enabled=false"))
    Pipeline(cfg).run()

    def stage1(d):
        rows = [json.loads(x) for x in (d / "validation.jsonl").read_text().splitlines()]
        return [(r["epoch"], r["loss"]) for r in rows if r["stage"] == 1]

    with_cache, without = stage1(shared_dir), stage1(run_dir)
    assert [e for e, _ in with_cache] == [e for e, _ in without] == [1, 2]
    torch.testing.assert_close(torch.tensor([v for _, v in with_cache]), torch.tensor([v for _, v in without]),
                               rtol=1e-4, atol=1e-6)
    assert final_pretrained(run_dir, TASK).is_dir()
