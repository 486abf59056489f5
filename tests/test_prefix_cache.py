"""The prefix cache is exact: loss and gradients equal stock LeRobot's on the same batch, noise and time.

Same tolerance as the frozen-feature cache (rtol 1e-5 / atol 1e-6 in float32):
the cached keys and values come from a prefix pass over another batch
composition, and the state and action tokens attend to them in smaller
matmuls than stock's, so the last bits may round differently.
"""

import logging

import numpy as np
import pytest
import torch
from test_feature_cache import (_assert_same, _batch, _data, _loss_and_grads, _policy, check_nothing_stored_all_exact,
                                check_recomputed, one_pixel_changed)

from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

from kuavo_train.config.schema import FeatureCacheSettings
from kuavo_train.policy.feature_cache import FrozenFeatureCache, cache_level
from kuavo_train.policy.prefix_cache import PrefixCache, create_cache


def _prefix_cache(policy, root, tmp_path, max_bytes=2**30):
    """The cache training makes (prefix level over the vision level), with a prefix budget of `max_bytes`."""
    cache = create_cache(policy, FeatureCacheSettings(dir=str(tmp_path / "cache"), max_gb=1.0,
                                                      prefix_max_gb=max_bytes / 2**30))
    assert isinstance(cache, PrefixCache) and cache.max_bytes == max_bytes and cache.fallback is not None
    cache.register_dataset(1, root)
    cache.attach()
    return cache


@pytest.mark.parametrize("attention", ["cross_attn", "self_attn"])
def test_loss_and_gradients_equal_stock(demo_base, demo_data, tmp_path, attention):
    if attention == "self_attn":  # every layer one joint attention: a fresh model of that shape
        from kuavo_train.policy import factory

        cfg = factory.read_pretrained_config(demo_base)
        cfg.attention_mode = "self_attn"
        torch.manual_seed(0)
        policy = SmolVLAPolicy(cfg)
    else:
        policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    first, second = _batch(ds, [0, 5, 9, 13]), _batch(ds, [5, 13, 20, 31])
    ref_first, ref_second = _loss_and_grads(policy, pre, first), _loss_and_grads(policy, pre, second)

    cache = _prefix_cache(policy, root, tmp_path)
    _assert_same(_loss_and_grads(policy, pre, first, cache), ref_first)  # cold: computed and stored
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stored) == (0, 4, 4)
    assert cache.fallback.stats.misses == 4 * len(policy.config.image_features)  # images went through the level below
    _assert_same(_loss_and_grads(policy, pre, first, cache), ref_first)  # warm: all served
    assert cache.stats.hits == 4
    _assert_same(_loss_and_grads(policy, pre, second, cache), ref_second)  # half served, half computed
    assert (cache.stats.hits, cache.stats.misses) == (6, 6)

    # Without the context the cache steps aside: stock's own forward.
    before = (cache.stats.hits, cache.stats.misses)
    policy.train()
    policy.forward(pre(dict(first)))
    assert (cache.stats.hits, cache.stats.misses) == before
    cache.detach()
    assert "forward" not in vars(policy.model) and "embed_image" not in vars(policy.model.vlm_with_expert)


def test_it_really_skips_the_vlm_on_a_hit(demo_base, demo_data, tmp_path):
    """A served step never runs the image or language tokens through a VLM layer: count the tokens
    that reach the first layer's query projection."""
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    raw = _batch(ds, [0, 1])
    cache = _prefix_cache(policy, root, tmp_path)
    _loss_and_grads(policy, pre, raw, cache)
    tokens = []
    q = policy.model.vlm_with_expert.get_vlm_model().text_model.layers[0].self_attn.q_proj
    hook = q.register_forward_hook(lambda m, i, o: tokens.append(i[0].shape[1]))
    try:
        _loss_and_grads(policy, pre, raw, cache)
        assert tokens == [1], tokens  # the state token alone
        tokens.clear()
        _loss_and_grads(policy, pre, raw)
        assert tokens and tokens[0] > 10  # stock: the whole prefix
    finally:
        hook.remove()


def test_a_changed_image_or_instruction_is_recomputed_not_served(demo_base, demo_data, tmp_path):
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    raw = _batch(ds, [0, 1])
    cache = _prefix_cache(policy, root, tmp_path)
    _loss_and_grads(policy, pre, raw, cache)
    check_recomputed(policy, pre, cache, one_pixel_changed(policy, raw), rows=1)
    check_recomputed(policy, pre, cache, {**raw, "task": ["put it somewhere else"] * 2}, rows=2)  # another instruction


def test_over_budget_computes_exactly_from_the_level_below(demo_base, demo_data, tmp_path):
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    cache = check_nothing_stored_all_exact(policy, pre, _batch(ds, [0, 1, 2]),
                                           lambda: _prefix_cache(policy, root, tmp_path, max_bytes=0))
    assert cache.fallback.stats.hits == 3 * len(policy.config.image_features)  # the second pass: image features served


def test_fp32_and_bf16_entries_are_kept_apart(demo_base, demo_data, tmp_path):
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    raw = _batch(ds, [0, 7])

    def bf16(cache=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _loss_and_grads(policy, pre, raw, cache)

    ref_fp32, ref_bf16 = _loss_and_grads(policy, pre, raw), bf16()
    cache = _prefix_cache(policy, root, tmp_path)
    _assert_same(_loss_and_grads(policy, pre, raw, cache), ref_fp32)
    _assert_same(bf16(cache), ref_bf16)  # computed, stored apart
    assert (cache.stats.hits, cache.stats.stored) == (0, 4)
    _assert_same(bf16(cache), ref_bf16)  # served from the bf16 entries
    _assert_same(_loss_and_grads(policy, pre, raw, cache), ref_fp32)
    assert cache.stats.hits == 4
    dtypes = {p.name: {np.load(f, mmap_mode="r").dtype for f in p.rglob("*.features.npy")}
              for p in cache.root.iterdir() if p.is_dir()}
    assert dtypes == {"none": {np.dtype(np.float32)}, "autocast-bfloat16": {np.dtype(np.uint16)}}
    assert not torch.equal(ref_fp32[0], ref_bf16[0])


def test_the_level_follows_what_is_frozen(demo_base, tmp_path, caplog):
    settings = FeatureCacheSettings(dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="kuavo_train.policy"):
        assert isinstance(create_cache(_policy(demo_base), settings), PrefixCache)
        trained_vlm = create_cache(_policy(demo_base, train_expert_only=False), settings)
        assert type(trained_vlm) is FrozenFeatureCache and trained_vlm.level == "vision"
        assert type(create_cache(_policy(demo_base), FeatureCacheSettings(dir=settings.dir, prefix=False))) \
            is FrozenFeatureCache
    assert "prefix cache: on" in caplog.text
    assert "prefix cache: off, the VLM is trained (train_expert_only=false)" in caplog.text


def test_an_entry_holds_every_layers_keys_and_values_of_the_prefix(demo_base, demo_data, tmp_path):
    """Per prefix token (stock's prefix minus the state token): every layer's key and value, and its pad flag."""
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    raw = _batch(ds, [0])
    cache = _prefix_cache(policy, root, tmp_path)
    _loss_and_grads(policy, pre, raw, cache)
    batch = pre(dict(raw))
    with torch.no_grad():
        images, img_masks = policy.prepare_images(batch)
        embs, _, _ = policy.model.embed_prefix(images, img_masks, batch["observation.language.tokens"],
                                               batch["observation.language.attention_mask"],
                                               state=policy.prepare_state(batch))
    vwe = policy.model.vlm_with_expert
    (features,) = list(cache.root.rglob("*.features.npy"))
    arr = np.load(features, mmap_mode="r")
    width = vwe.num_vlm_layers * 2 * vwe.num_key_value_heads * vwe.vlm.config.text_config.head_dim + 1
    lang = batch["observation.language.tokens"].shape[1]  # padded to the batch's longest instruction
    assert lang < policy.config.tokenizer_max_length
    # image tokens, then the language at its full length whatever its batch's padding
    assert arr.shape[1:] == (embs.shape[1] - 1 - lang + policy.config.tokenizer_max_length, width)


def test_an_entry_serves_batches_padded_to_other_lengths(demo_base, demo_data, tmp_path):
    """With `pad_language_to: longest` a frame's tokens are padded to its batch's longest instruction;
    the entry does not depend on it."""
    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    alone, mixed = _batch(ds, [0, 1]), _batch(ds, [0, 2])
    mixed["task"] = ["grasp it", "grasp the moving object on the belt and lift it"]
    assert pre(dict(mixed))["observation.language.tokens"].shape[1] > pre(dict(alone))["observation.language.tokens"].shape[1]
    ref = _loss_and_grads(policy, pre, mixed)
    cache = _prefix_cache(policy, root, tmp_path)
    _loss_and_grads(policy, pre, alone, cache)
    _assert_same(_loss_and_grads(policy, pre, mixed, cache), ref)
    assert (cache.stats.hits, cache.stats.misses) == (1, 3)  # frame 0 served from the shorter batch's entry


def _undecoding(ds, cache, precision="none"):
    """The same samples, through a loader that leaves frames with all their image features cached undecoded."""
    from kuavo_train.data.frames import ChunkedFrameDataset

    cams = {1: list(ds.camera_map)}
    return ChunkedFrameDataset(ds.repo_id, ds.root, episodes=ds.episodes, chunk_size=ds.chunk_size,
                               camera_keys=list(ds.camera_map), task=ds.task, task_id=ds.task_id,
                               cached_frames=cache.cached_frames(precision, cams))


@pytest.mark.parametrize("level", ["prefix", "vision"])
def test_cached_frames_are_not_decoded_and_train_exactly(demo_base, demo_data, tmp_path, level):
    from kuavo_train.data.frames import NOT_DECODED_KEY

    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    if level == "prefix":
        cache = _prefix_cache(policy, root, tmp_path)
    else:
        cache = FrozenFeatureCache(policy, tmp_path / "cache", max_bytes=2**30, level=cache_level(policy)[0],
                                   resize=policy.config.resize_imgs_with_padding)
        cache.register_dataset(1, root)
        cache.attach()
    _loss_and_grads(policy, pre, _batch(ds, [0, 5]), cache)  # frames 0 and 5 decoded, their entries stored
    fast = _undecoding(ds, cache)
    mixed = _batch(fast, [0, 5, 20])
    assert mixed[NOT_DECODED_KEY].tolist() == [True, True, False]
    cam = next(iter(policy.config.image_features))
    assert not mixed[cam][:2].any() and mixed[cam][2].any()  # zero placeholders, a real image
    ref = _loss_and_grads(policy, pre, _batch(ds, [0, 5, 20]))
    hits = cache.stats.hits
    _assert_same(_loss_and_grads(policy, pre, mixed, cache), ref)
    per_row = 1 if level == "prefix" else len(policy.config.image_features)
    assert cache.stats.hits == hits + 2 * per_row and cache.stats.undecoded == 2
    if level == "prefix":  # another instruction on undecoded frames: computed from the cached image features
        other = dict(mixed)
        other["task"] = ["put it somewhere else"] * 3
        decoded = _batch(ds, [0, 5, 20])
        decoded["task"] = other["task"]
        _assert_same(_loss_and_grads(policy, pre, other, cache), _loss_and_grads(policy, pre, decoded))


def test_a_cache_deleted_under_undecoded_frames_stops_with_one_line(demo_base, demo_data, tmp_path):
    import shutil

    from kuavo_train.errors import KuavoError

    policy = _policy(demo_base)
    root, pre, ds = _data(demo_data, policy)
    cache = _prefix_cache(policy, root, tmp_path)
    _loss_and_grads(policy, pre, _batch(ds, [0]), cache)
    raw = _batch(_undecoding(ds, cache), [0])
    shutil.rmtree(tmp_path / "cache")
    fresh = _prefix_cache(policy, root, tmp_path)  # e.g. the next stage, after the folder was deleted
    with pytest.raises(KuavoError) as err:
        _loss_and_grads(policy, pre, raw, fresh)
    msg = str(err.value)
    assert "\n" not in msg and "frame 0" in msg and "deleted during training" in msg and "run the command again" in msg
