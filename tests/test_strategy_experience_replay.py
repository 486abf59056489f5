"""experience_replay: every task seen so far in an equal share, an epoch as long as the current
task alone (the no-replay stages' cost), stage 1's learning rate throughout."""

import json

import pytest
from conftest import TASK_NAMES, stage_plans, tiny_overrides

from kuavo_train.config.loading import load_run_config


def test_every_seen_task_gets_an_equal_share_at_a_no_replay_stages_cost():
    sizes = {1: 400, 2: 333, 3: 250, 4: 517}
    er = stage_plans(load_run_config(["profile=demo", "strategy=experience_replay"]), sizes)
    naive_cfg = load_run_config(["profile=demo", "strategy=sequential_naive"])
    naive = stage_plans(naive_cfg, sizes)
    for k, name in enumerate(TASK_NAMES, start=1):
        assert er[name].weights == pytest.approx({t: 1 / k for t in range(1, k + 1)})
        assert er[name].epoch_samples == sizes[k] == naive[name].epoch_samples
        assert er[name].total_steps(naive_cfg, 1) == naive[name].total_steps(naive_cfg, 1)
        assert er[name].lr == naive[name].lr == er[TASK_NAMES[0]].lr


def test_a_stage_draws_its_epoch_equally_from_every_seen_task(tmp_path, demo_base, demo_data):
    from kuavo_train.data.task_data import open_task_data
    from kuavo_train.training.pipeline import Pipeline

    run = tmp_path / "er"
    cfg = load_run_config(tiny_overrides(run, demo_base, demo_data, "strategy=experience_replay",
                                         "~stages.task4_sorting"))
    Pipeline(cfg).run()
    stages = json.loads((run / "run.json").read_text())["stages"]
    for k, name in enumerate(TASK_NAMES[:3], start=1):
        mix = stages[name]["replay_mix"]
        n = open_task_data(cfg.stages[name]).num_train_frames
        # the epoch is the current task's frame count, split as evenly as whole samples allow
        assert set(mix) == set(TASK_NAMES[:k]) and sum(mix.values()) == n
        assert max(mix.values()) - min(mix.values()) <= 1
        assert stages[name]["status"] == "complete" and stages[name]["lr"] == stages[TASK_NAMES[0]]["lr"]
