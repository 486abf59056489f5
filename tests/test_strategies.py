"""The three strategies: naive drops replay and lr decay; joint trains all tasks at once
with exactly the optimizer steps of the sequential_spec run."""

import math

import pytest
from conftest import TASK_NAMES

from kuavo_train.config.loading import load_run_config
from kuavo_train.training.joint import JOINT_STAGE, joint_plan, sequential_total_steps


def _spec_steps_by_hand(cfg, sizes):
    """The README's epoch (round(n_k / w_k) samples, whole batches), not the sampler's own count."""
    total = 0
    for s in cfg.ordered_stages():
        w = cfg.replay_weights_for(s)
        total += (round(sizes[s.task_id] / (w[s.task_id] / sum(w.values()))) // cfg.dataloader.batch_size) * s.max_epoch
    return total


@pytest.mark.parametrize("sizes", [{1: 400, 2: 333, 3: 250, 4: 517}, {1: 40, 2: 40, 3: 40, 4: 40}, {1: 9000, 2: 8000, 3: 7000, 4: 6000}])
def test_joint_gets_the_sequential_step_count(sizes):
    cfg = load_run_config(["profile=demo"])
    expected = _spec_steps_by_hand(cfg, sizes)
    assert sequential_total_steps(cfg, sizes) == expected
    plan = joint_plan(load_run_config(["profile=demo", "strategy=joint"]), sizes)
    assert plan.stage.name == JOINT_STAGE and plan.stage.resume_from == "pretrained"
    epochs = plan.stage.max_epoch
    assert epochs == sum(s.max_epoch for s in cfg.ordered_stages())
    steps = plan.samples_per_epoch // cfg.dataloader.batch_size * epochs
    # rounded up to whole epochs: never fewer steps, at most one step per epoch more
    assert expected <= steps < expected + epochs
    # the cosine decay spans the whole joint run, not just stage 1's length
    assert plan.stage.scheduler_decay_steps == max(cfg.ordered_stages()[0].scheduler_decay_steps, expected)
    # every task sampled in proportion to its training frames
    w = plan.stage.replay_weights
    assert {t: w[t] / sum(w.values()) for t in w} == pytest.approx({t: n / sum(sizes.values()) for t, n in sizes.items()})


def test_naive_has_no_replay_and_no_lr_decay():
    spec = load_run_config(["profile=demo"])
    naive = load_run_config(["profile=demo", "strategy=sequential_naive"])
    for s_spec, s_naive in zip(spec.ordered_stages(), naive.ordered_stages()):
        assert naive.replay_weights_for(s_naive) == {s_naive.task_id: 1.0}
        assert naive.lr_for(s_naive) == spec.lr_for(spec.ordered_stages()[0])
    assert len(spec.replay_weights_for(spec.stages[TASK_NAMES[3]])) == 4
    assert math.isclose(sum(spec.replay_weights_for(spec.stages[TASK_NAMES[3]]).values()), 1.0)


def test_joint_run_through_the_pipeline(tmp_path, demo_base, demo_data):
    import json

    from conftest import tiny_overrides

    from kuavo_train.data.task_data import open_task_data
    from kuavo_train.training.pipeline import Pipeline

    cfg = load_run_config(tiny_overrides(tmp_path / "joint", demo_base, demo_data, "strategy=joint"))
    Pipeline(cfg).run()
    state = json.loads((tmp_path / "joint" / "run.json").read_text())
    assert list(state["stages"]) == [JOINT_STAGE] and state["stages"][JOINT_STAGE]["status"] == "complete"
    sizes = {s.task_id: open_task_data(s).num_train_frames for s in cfg.ordered_stages()}
    seq = sequential_total_steps(cfg, sizes)
    epochs = sum(s.max_epoch for s in cfg.ordered_stages())
    assert seq <= state["stages"][JOINT_STAGE]["total_steps"] < seq + epochs
    assert set(state["stages"][JOINT_STAGE]["replay_mix"]) == set(TASK_NAMES)
    report = json.loads((tmp_path / "joint" / "report.json").read_text())
    rows = report["matrices"]["val_loss"]
    assert all(v is not None for v in rows[0] + rows[4]) and all(v is None for r in rows[1:4] for v in r)
    assert report["metrics"]["val_loss"]["bwt"] is None and report["metrics"]["val_loss"]["acc"] is not None


def test_compare_command_tabulates_all_strategies(tmp_path, demo_base, demo_data, python_exe):
    import json
    import subprocess

    from conftest import REPO, tiny_overrides

    out = tmp_path / "cmp"
    overrides = [o for o in tiny_overrides(tmp_path / "unused", demo_base, demo_data) if not o.startswith("run_dir=")]
    # sequential_spec is the shared four-stage run's strategy, tested throughout; here the two
    # others (a third four-stage run would add a minute to the suite)
    r = subprocess.run([python_exe, "-m", "kuavo_train.cli.main", "compare", "--no-demo", "--out", str(out), "--seeds", "0",
                        "--strategies", "sequential_naive,joint", *overrides],
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
    assert "joint baseline" in logs["joint"]
    assert "joint baseline" not in logs["sequential_naive"] and "=== " not in logs["sequential_naive"]


def test_compare_runs_all_three_strategies_by_default():
    from kuavo_train.cli.main import build_parser

    assert build_parser().parse_args(["compare"]).strategies == ["sequential_spec", "sequential_naive", "joint"]
