"""The strategies: naive drops replay and lr decay; joint trains all tasks at once with exactly
the optimizer steps of the default recipe (replay_freeze_decay, alias sequential_spec)."""

import math

import pytest
from conftest import TASK_NAMES, stage_plans

from kuavo_train.config.loading import load_run_config
from kuavo_train.strategies import get_strategy, names
from kuavo_train.strategies.joint import STAGE_NAME as JOINT_STAGE, sequential_steps


def _spec_steps_by_hand(cfg, sizes):
    """The README's epoch (round(n_k / w_k) samples, whole batches), not the sampler's own count."""
    total = 0
    for s in cfg.ordered_stages():
        w = s.replay_weights  # as configured
        total += (round(sizes[s.task_id] / (w[s.task_id] / sum(w.values()))) // cfg.dataloader.batch_size) * s.max_epoch
    return total


@pytest.mark.parametrize("sizes", [{1: 400, 2: 333, 3: 250, 4: 517}, {1: 40, 2: 40, 3: 40, 4: 40}, {1: 9000, 2: 8000, 3: 7000, 4: 6000}])
def test_joint_gets_the_sequential_step_count(sizes):
    cfg = load_run_config(["profile=demo"])
    expected = _spec_steps_by_hand(cfg, sizes)
    assert sequential_steps(cfg, sizes) == expected
    [plan] = get_strategy(load_run_config(["profile=demo", "strategy=joint"])).plan(sizes)
    assert plan.stage.name == JOINT_STAGE and plan.stage.resume_from == "pretrained"
    epochs = plan.stage.max_epoch
    assert epochs == sum(s.max_epoch for s in cfg.ordered_stages())
    steps = plan.epoch_samples // cfg.dataloader.batch_size * epochs
    # rounded up to whole epochs: never fewer steps, at most one step per epoch more
    assert expected <= steps < expected + epochs
    # the cosine decay spans the whole joint run, not just stage 1's length
    assert plan.stage.scheduler_decay_steps == max(cfg.ordered_stages()[0].scheduler_decay_steps, expected)
    # every task sampled in proportion to its training frames
    assert plan.weights == pytest.approx({t: n / sum(sizes.values()) for t, n in sizes.items()})


def test_naive_has_no_replay_and_no_lr_decay():
    spec = stage_plans(load_run_config(["profile=demo"]))
    naive = stage_plans(load_run_config(["profile=demo", "strategy=sequential_naive"]))
    for name in TASK_NAMES:
        assert naive[name].weights == {naive[name].stage.task_id: 1.0}
        assert naive[name].lr == spec[TASK_NAMES[0]].lr
    assert len(spec[TASK_NAMES[3]].weights) == 4
    assert math.isclose(sum(spec[TASK_NAMES[3]].weights.values()), 1.0)
    assert [spec[n].lr for n in TASK_NAMES] == pytest.approx([2e-3, 1.4e-3, 1e-3, 8e-4])


@pytest.mark.parametrize("strategy, scale", [("sequential_naive", 1), ("experience_replay", 1), ("lora_per_task", 10)])
def test_strategies_without_decay_honour_a_stages_own_lr(strategy, scale):
    """A task config's optimizer_lr replaces the rule for its stage in every strategy; the other stages
    keep stage 1's rate (x lr_scale for adapters)."""
    plans = stage_plans(load_run_config(["profile=demo", f"strategy={strategy}", "stages.task3_placement.optimizer_lr=3e-4"]))
    assert [plans[n].lr for n in TASK_NAMES] == pytest.approx([scale * x for x in (2e-3, 2e-3, 3e-4, 2e-3)])
    assert "stages.task3_placement.optimizer_lr" in plans["task3_placement"].lr_source
    assert "stage 1's" in plans["task4_sorting"].lr_source
    # stage 1's own optimizer_lr is stage 1's rate for the stages without one
    plans = stage_plans(load_run_config(["profile=demo", f"strategy={strategy}", "stages.task1_moving_grasp.optimizer_lr=4e-4"]))
    assert [plans[n].lr for n in TASK_NAMES] == pytest.approx([scale * 4e-4] * 4)


def test_decay_lr_is_checked_against_the_strategys_rates():
    """sequential_naive runs every stage at stage 1's rate: a decay_lr between the recipe's last rate
    and stage 1's is refused for the recipe and fine for naive; an adapter rate below it is refused."""
    from kuavo_train.config.schema import ConfigError

    with pytest.raises(ConfigError, match="learning rate 0.0008 of stage task4_sorting"):
        get_strategy(load_run_config(["profile=demo", "scheduler.decay_lr=9e-4"]))
    assert get_strategy(load_run_config(["profile=demo", "scheduler.decay_lr=9e-4", "strategy=sequential_naive"]))
    assert get_strategy(load_run_config(["profile=demo", "scheduler.decay_lr=9e-4", "strategy=joint"]))
    with pytest.raises(ConfigError, match=r"1e-07 of stage task1_moving_grasp \(strategy.lr of lora_per_task"):
        get_strategy(load_run_config(["profile=demo", "strategy=lora_per_task", "strategy.lr=1e-7"]))


def test_the_old_name_is_the_default_recipe():
    old, new = load_run_config(["strategy=sequential_spec"]), load_run_config([])
    assert old.strategy.name == new.strategy.name == "replay_freeze_decay"
    assert {n: (p.weights, p.lr) for n, p in stage_plans(old).items()} == {n: (p.weights, p.lr) for n, p in stage_plans(new).items()}
    # a run.json written before strategies were a config group still loads
    from kuavo_train.config.schema import parse_run_config

    data = new.to_dict()
    data["strategy"] = "sequential_spec"
    assert get_strategy(parse_run_config(data)).name == "replay_freeze_decay"


def test_joint_run_through_the_pipeline(tmp_path, demo_base, demo_data, caplog):
    import json
    import logging

    from conftest import tiny_overrides

    from kuavo_train.data.task_data import open_task_data
    from kuavo_train.training.pipeline import Pipeline

    cfg = load_run_config(tiny_overrides(tmp_path / "joint", demo_base, demo_data, "strategy=joint"))
    caplog.set_level(logging.INFO)
    Pipeline(cfg).run()
    # its log names the joint stage, not "stage 4", and every task it validates is one it learns
    log = caplog.text
    assert "joint stage epoch 1/" in log and "stage 4" not in log
    assert log.count("current task") == 4 * log.count("multi-task validation") > 0 and "earlier task" not in log
    state = json.loads((tmp_path / "joint" / "run.json").read_text())
    assert list(state["stages"]) == [JOINT_STAGE] and state["stages"][JOINT_STAGE]["status"] == "complete"
    sizes = {s.task_id: open_task_data(s).num_train_frames for s in cfg.ordered_stages()}
    seq = sequential_steps(cfg, sizes)
    epochs = sum(s.max_epoch for s in cfg.ordered_stages())
    assert seq <= state["stages"][JOINT_STAGE]["total_steps"] < seq + epochs
    assert set(state["stages"][JOINT_STAGE]["replay_mix"]) == set(TASK_NAMES)
    report = json.loads((tmp_path / "joint" / "report.json").read_text())
    assert report["extra"]["stage_boundaries"] == {JOINT_STAGE: 0}  # one marker on validation_curves.png
    rows = report["matrices"]["val_loss"]
    assert all(v is not None for v in rows[0] + rows[4]) and all(v is None for r in rows[1:4] for v in r)
    assert report["metrics"]["val_loss"]["bwt"] is None and report["metrics"]["val_loss"]["acc"] is not None
    # the last row is the joint model's, and the report says so instead of "after stage 4"
    md = (tmp_path / "joint" / "report.md").read_text()
    assert "| after joint training | " in md and "after stage" not in md.split("## Validation loss")[0]


@pytest.mark.slow
def test_compare_command_tabulates_all_strategies(tmp_path, demo_base, demo_data, python_exe):
    import json
    import subprocess

    from conftest import REPO, tiny_overrides

    out = tmp_path / "cmp"
    overrides = [o for o in tiny_overrides(tmp_path / "unused", demo_base, demo_data, "~stages.task3_placement",
                                           "~stages.task4_sorting") if not o.startswith("run_dir=")]
    # the default recipe is the shared four-stage run's strategy, tested throughout; here the two
    # others, on two stages each
    # a strategy and a seed named twice: each run once, counted once (n = 1)
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "compare", "--no-demo", "--out", str(out), "--seeds", "0,0",
                        "--strategies", "sequential_naive,joint,sequential_naive", *overrides],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "comparison.json").read_text())["summary"]
    assert set(summary) == {"sequential_naive", "joint"}
    for strategy in summary:
        assert (out / "seed0" / strategy / "report.json").is_file()
        acc = summary[strategy]["action_error"]["acc"]
        assert acc["n"] == 1 and acc["mean"] > 0
    table = (out / "comparison.md").read_text()
    assert all(f"| {s} |" in table for s in summary) and table in r.stdout
    # runs made one after another in one process each keep their own train.log
    logs = {s: (out / "seed0" / s / "train.log").read_text() for s in summary}
    assert "strategy joint:" in logs["joint"]
    assert "strategy joint:" not in logs["sequential_naive"] and "=== " not in logs["sequential_naive"]


def test_every_strategy_has_its_config_and_compare_runs_them_all_by_default():
    from conftest import REPO

    from kuavo_train.cli.main import build_parser

    assert build_parser().parse_args(["compare"]).strategies is None  # = names()
    assert {"replay_freeze_decay", "sequential_naive", "joint"} <= set(names())
    for name in names():
        assert load_run_config([f"strategy={name}"]).strategy.name == name
        assert (REPO / "configs" / "policy" / "strategy" / f"{name}.yaml").is_file()


def test_a_strategy_or_seed_named_twice_is_one_run():
    """Named twice (or by its alias), one run would be counted twice and its spread look smaller."""
    from kuavo_train.cli.main import build_parser
    from kuavo_train.strategies.base import canonical_names

    args = build_parser().parse_args(["compare", "--strategies", "ewc,joint,ewc", "--seeds", "2,0,2"])
    assert (args.strategies, args.seeds) == (["ewc", "joint"], [2, 0])
    assert canonical_names(["sequential_spec", "joint", "replay_freeze_decay"]) == ["replay_freeze_decay", "joint"]
    args = build_parser().parse_args(["benchmark", "metaworld", "--strategies", "joint,joint", "--seeds", "1,1"])
    assert (args.strategies, args.seeds) == (["joint"], [1])


def test_compare_without_strategies_runs_every_one_against_the_recipe():
    from kuavo_train.cli.main import build_parser, compare_strategies
    from kuavo_train.strategies import names

    every = compare_strategies(build_parser().parse_args(["compare"]).strategies)
    assert every[0] == "replay_freeze_decay" and sorted(every) == names() and len(every) > 2
    assert compare_strategies(["joint", "ewc"]) == ["joint", "ewc"]


def test_comparison_says_which_differences_exceed_twice_their_standard_error():
    import numpy as np

    from kuavo_train.benchmark.compare import format_summary, summarize

    def report(acc):
        return {"metrics": {"success": {"acc": acc, "bwt": 0.0, "fwt": None, "mean_forgetting": 0.0}}}

    accs = {"ref": [0.5, 0.6, 0.55], "worse": [0.1, 0.15, 0.12], "same": [0.55, 0.5, 0.6]}
    table = format_summary(summarize({k: [report(a) for a in v] for k, v in accs.items()}), seeds=[0, 1, 2])
    for name, verdict in (("worse", "larger than"), ("same", "within")):
        sem = [np.std(accs[k], ddof=1) / np.sqrt(3) for k in ("ref", name)]
        diff, two_se = np.mean(accs[name]) - np.mean(accs["ref"]), 2 * np.hypot(*sem)
        assert f"- ACC {name} - ref: {diff:+.3f}, 2 standard errors {two_se:.3f}: {verdict} its spread" in table
