"""The replay sampler: shares keyed by task id, exact quotas, seeded and reproducible."""

import numpy as np
import pytest

from kuavo_train.config.loading import load_run_config
from kuavo_train.data.replay import ProportionalReplaySampler, epoch_quotas


def realised_mix(sampler: ProportionalReplaySampler, epochs: int) -> dict[int, float]:
    draws = np.concatenate([sampler.plan(e) for e in range(epochs)])
    tasks = np.array([sampler.task_of(int(i)) for i in draws])
    return {t: float(np.mean(tasks == t)) for t in sampler.task_ids}, len(draws)


@pytest.mark.parametrize("stage_name", ["task2_weighing", "task3_placement", "task4_sorting"])
def test_realised_mix_matches_config_over_10000_draws(stage_name):
    cfg = load_run_config()
    stage = cfg.stages[stage_name]
    weights = cfg.replay_weights_for(stage)
    # Unequal task sizes, and task ids NOT equal to list positions + 1 offsets.
    sizes = {1: 700, 2: 350, 3: 512, 4: 260}
    ids = sorted(weights)
    sampler = ProportionalReplaySampler(ids, [sizes[t] for t in ids], weights, current_task=stage.task_id, seed=0, stage=stage.task_id)
    epochs = -(-10_000 // len(sampler))
    mix, n = realised_mix(sampler, epochs)
    assert n >= 10_000
    for t, w in weights.items():
        assert abs(mix[t] - w) < 0.02, (t, mix[t], w)


def test_epoch_covers_every_current_task_frame_once():
    weights = {1: 0.1, 2: 0.2, 3: 0.7}
    s = ProportionalReplaySampler([1, 2, 3], [100, 80, 140], weights, current_task=3, seed=1, stage=3)
    plan = s.plan(0)
    current = plan[plan >= 180] - 180
    assert sorted(current.tolist()) == list(range(140))
    assert len(plan) == round(140 / 0.7)


def test_replay_quota_larger_than_task_cycles_without_repeats_within_a_cycle():
    q = epoch_quotas({1: 5, 2: 10}, {1: 0.5, 2: 0.5}, current_task=2)
    assert q == {1: 10, 2: 10}
    s = ProportionalReplaySampler([1, 2], [5, 10], {1: 0.5, 2: 0.5}, current_task=2, seed=0, stage=2)
    old = sorted(i for i in s.plan(0).tolist() if i < 5)
    assert old == sorted(list(range(5)) * 2)


def test_sampler_is_seeded_and_epochs_differ():
    args = ([1, 2], [50, 60], {1: 0.2, 2: 0.8})
    a = ProportionalReplaySampler(*args, current_task=2, seed=7, stage=2)
    b = ProportionalReplaySampler(*args, current_task=2, seed=7, stage=2)
    c = ProportionalReplaySampler(*args, current_task=2, seed=8, stage=2)
    assert np.array_equal(a.plan(3), b.plan(3))
    assert not np.array_equal(a.plan(3), a.plan(4))
    assert not np.array_equal(a.plan(3), c.plan(3))
    a.set_epoch(3)
    assert list(a) == a.plan(3).tolist()


def test_naive_strategy_and_disabled_replay_train_current_task_only():
    cfg = load_run_config(["strategy=sequential_naive"])
    assert cfg.replay_weights_for(cfg.stages["task4_sorting"]) == {4: 1.0}
    cfg = load_run_config(["replay.use_replay_buffer=false"])
    assert cfg.replay_weights_for(cfg.stages["task3_placement"]) == {3: 1.0}


def test_replay_weights_normalised_by_task_id():
    cfg = load_run_config(['stages.task3_placement.replay_weights.1=2', 'stages.task3_placement.replay_weights.2=2', 'stages.task3_placement.replay_weights.3=6'])
    assert cfg.replay_weights_for(cfg.stages["task3_placement"]) == {1: 0.2, 2: 0.2, 3: 0.6}
