"""The replay sampler: shares keyed by task id, exact quotas, seeded and reproducible."""

from fractions import Fraction

import numpy as np
import pytest

from conftest import stage_plans

from kuavo_train.config.loading import load_run_config
from kuavo_train.data.replay import ProportionalReplaySampler, epoch_quotas


def realised_counts(sampler: ProportionalReplaySampler, epoch: int) -> dict[int, int]:
    tasks = [sampler.task_of(int(i)) for i in sampler.plan(epoch)]
    return {t: tasks.count(t) for t in sampler.task_ids}


@pytest.mark.parametrize("stage_name", ["task2_weighing", "task3_placement", "task4_sorting"])
@pytest.mark.parametrize("current_size", [700, 333])
def test_every_epoch_realises_the_exact_quotas(stage_name, current_size):
    """Per epoch, not on average: n_k frames of task k and round(n_k / w_k) samples in all, each earlier
    task getting its share of that total rounded to a neighbouring integer (never further off)."""
    cfg = load_run_config()
    stage = cfg.stages[stage_name]
    weights = {t: w for t, w in stage.replay_weights.items() if w > 0}  # as configured; the sampler normalises
    # Unequal task sizes; task 1 is smaller than some of its replay quotas (it cycles).
    sizes = {1: 90, 2: 350, 3: 512, 4: 260, stage.task_id: current_size}
    ids = sorted(weights)
    sampler = ProportionalReplaySampler(ids, [sizes[t] for t in ids], weights, current_task=stage.task_id, seed=0,
                                        stage=stage.task_id)
    # Exact rational shares, so "whole quota" below is decided without float noise.
    exact = {t: Fraction(w).limit_denominator(10**6) for t, w in weights.items()}
    share = {t: w / sum(exact.values()) for t, w in exact.items()}
    total = round(current_size / share[stage.task_id])
    for epoch in range(5):
        counts = realised_counts(sampler, epoch)
        assert sum(counts.values()) == total == len(sampler)
        assert counts[stage.task_id] == current_size
        for t in ids:
            ideal = total * share[t]
            assert abs(counts[t] - ideal) < 1, (epoch, t, counts[t], float(ideal))
            if ideal.denominator == 1:
                assert counts[t] == ideal, (epoch, t, counts[t], ideal)


def test_sequential_step_count_by_hand():
    """Optimizer steps of a sequential_spec run, counted from the README's definition of an epoch
    (round(n_k / w_k) samples, whole batches only with drop_last) without the sampler's own code."""
    from kuavo_train.strategies.joint import sequential_steps

    cfg = load_run_config(["profile=demo"])
    batch = cfg.dataloader.batch_size
    assert cfg.dataloader.drop_last
    for sizes in ({1: 400, 2: 333, 3: 250, 4: 517}, {1: 40, 2: 40, 3: 40, 4: 40}, {1: 9000, 2: 8000, 3: 7000, 4: 6000}):
        expected = 0
        for s in cfg.ordered_stages():
            w = s.replay_weights  # as configured
            own_share = w[s.task_id] / sum(w.values())
            expected += (round(sizes[s.task_id] / own_share) // batch) * s.max_epoch
        assert sequential_steps(cfg, sizes) == expected, sizes


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
    assert stage_plans(load_run_config(["strategy=sequential_naive"]))["task4_sorting"].weights == {4: 1.0}
    assert stage_plans(load_run_config(["replay.use_replay_buffer=false"]))["task3_placement"].weights == {3: 1.0}


def test_replay_weights_normalised_by_task_id():
    cfg = load_run_config(['stages.task3_placement.replay_weights.1=2', 'stages.task3_placement.replay_weights.2=2', 'stages.task3_placement.replay_weights.3=6'])
    assert stage_plans(cfg)["task3_placement"].weights == {1: 0.2, 2: 0.2, 3: 0.6}
