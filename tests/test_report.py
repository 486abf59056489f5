"""The report (report.json / report.md / figures), the comparison table and the spec's forgetting printout."""

import datetime
import json
import os
import shutil

import matplotlib.image
import pytest

from kuavo_train.evaluation.forgetting import classify_retention, format_validation_table
from kuavo_train.evaluation.plots import plot_validation_curves
from kuavo_train.evaluation.report import load_report, render_markdown, write_report

NAMES = ["grasp", "weigh", "place"]
SUCCESS = [[0.1, 0.0, 0.2], [0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.5, 0.7, 1.0]]
LOSS = [[2.0, 2.0, 2.0], [0.5, 1.5, 1.8], [0.7, 0.4, 1.2], [0.9, 0.6, 0.3]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_validation_log(run_dir, *, torn_tail=False):
    # stage s (10 steps each, offsets 0/10/20) validates tasks 1..s at its steps 5 and 10
    lines = [json.dumps({"stage": s, "epoch": e, "step": 5 * e, "global_step": 10 * (s - 1) + 5 * e, "task_id": t,
                         "task": NAMES[t - 1], "loss": 1.0 / s + 0.1 * t})
             for s in (1, 2, 3) for e in (1, 2) for t in range(1, s + 1)]
    text = "\n".join(lines) + "\n" + ('{"stage": 3, "epo' if torn_tail else "")
    (run_dir / "validation.jsonl").write_text(text)


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_write_report_files_and_numbers(tmp_path):
    _write_validation_log(tmp_path)
    rep = write_report(tmp_path, matrices={"success": SUCCESS, "val_loss": LOSS},
                       directions={"success": True, "val_loss": False}, task_names=NAMES,
                       config={"seed": 7, "strategy": "sequential"},
                       extra={"strategy": "sequential", "stage_boundaries": {"a": 0, "b": 10, "c": 20}})
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == load_report(tmp_path) == json.loads(json.dumps(rep))
    assert set(on_disk) >= {"matrices", "metrics", "task_names", "directions", "config", "versions", "seed",
                            "created", "extra"}
    assert on_disk["matrices"] == {"success": SUCCESS, "val_loss": LOSS}  # keys and rows kept, row 0 first
    assert on_disk["directions"] == {"success": True, "val_loss": False}
    assert on_disk["task_names"] == NAMES and on_disk["seed"] == 7 and on_disk["extra"]["stage_boundaries"] == {"a": 0, "b": 10, "c": 20}
    assert set(on_disk["versions"]) == {"python", "torch", "lerobot", "transformers", "kuavo_train"}
    assert datetime.datetime.fromisoformat(on_disk["created"]).tzinfo is not None
    # hand-computed (see test_metrics): success BWT -0.25, FWT 0.1; loss ACC 0.6, BWT -0.3, FWT 0.65
    s, l = on_disk["metrics"]["success"], on_disk["metrics"]["val_loss"]
    assert s["acc"] == pytest.approx(2.2 / 3) and s["bwt"] == pytest.approx(-0.25) and s["fwt"] == pytest.approx(0.1)
    assert s["forgetting"][:2] == [pytest.approx(0.4), pytest.approx(0.1)] and s["forgetting"][2] is None
    assert l["acc"] == pytest.approx(0.6) and l["bwt"] == pytest.approx(-0.3) and l["fwt"] == pytest.approx(0.65)
    assert l["mean_forgetting"] == pytest.approx(0.3)
    for png in ("heatmap_success.png", "heatmap_val_loss.png", "validation_curves.png"):
        _assert_png(tmp_path / png)
    md = (tmp_path / "report.md").read_text()
    assert "| after stage 2 | 0.600 | 0.800 | 0.300 |" in md and "| before training | 2.000 | 2.000 | 2.000 |" in md
    assert "| 0.733 | -0.250 | 0.100 | 0.250 | 0.400 | 0.100 | – |" in md  # success metrics row
    assert "| 0.600 | -0.300 | 0.650 | 0.300 | 0.400 | 0.200 | – |" in md  # val_loss metrics row
    assert "positive BWT/FWT = better and positive forgetting = worse" in md
    for png in ("heatmap_success.png", "heatmap_val_loss.png", "validation_curves.png"):
        assert f"]({png})" in md
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temp files


def test_report_without_log_with_missing_cells(tmp_path):
    # a joint run: only rows 0 and T; a NaN cell must become null, not invalid JSON
    loss = [[1.0, float("nan")], [None, None], [0.25, 0.5]]
    rep = write_report(tmp_path, matrices={"action_error": loss}, directions={"action_error": False},
                       task_names=["a", "b"], config={})
    assert rep["matrices"]["action_error"] == [[1.0, None], [None, None], [0.25, 0.5]]
    assert rep["seed"] is None and "extra" not in rep
    m = load_report(tmp_path)["metrics"]["action_error"]
    assert m["acc"] == pytest.approx(0.375) and m["bwt"] is None and m["fwt"] is None and m["forgetting"] == [None, None]
    _assert_png(tmp_path / "heatmap_action_error.png")
    assert not (tmp_path / "validation_curves.png").exists()
    assert "No validation log" in (tmp_path / "report.md").read_text()


def test_rows_are_named_after_the_stage_that_filled_them(tmp_path):
    # a joint run fills the last row with a stage that trained every task: not "after stage 2"
    loss = [[1.0, 1.0], [None, None], [0.25, 0.5]]
    write_report(tmp_path / "j", matrices={"val_loss": loss}, directions={"val_loss": False}, task_names=["a", "b"],
                 config={}, extra={"row_stages": {2: "joint"}})
    md = (tmp_path / "j" / "report.md").read_text()
    assert "| after joint training | 0.250 | 0.500 |" in md and "after stage" not in md
    # report.json's keys are strings; re-rendering from it names the rows the same way
    assert render_markdown(load_report(tmp_path / "j")) == md
    write_report(tmp_path / "s", matrices={"val_loss": loss}, directions={"val_loss": False}, task_names=["a", "b"],
                 config={}, extra={"row_stages": {1: "a", 2: "b"}})
    assert "| after stage 2 | 0.250 | 0.500 |" in (tmp_path / "s" / "report.md").read_text()


def test_a_report_keeps_no_figure_of_a_matrix_it_no_longer_has(tmp_path):
    """`evaluate --run DIR evaluation.closed_loop_episodes=0` after a run with success: the old
    success heatmap (and curves without validation.jsonl) would show numbers the report does not."""
    _write_validation_log(tmp_path)
    write_report(tmp_path, matrices={"success": SUCCESS, "val_loss": LOSS}, directions={"success": True, "val_loss": False},
                 task_names=NAMES, config={}, extra={"stage_boundaries": {"a": 0, "b": 10}})
    assert (tmp_path / "heatmap_success.png").is_file() and (tmp_path / "validation_curves.png").is_file()
    (tmp_path / "validation.jsonl").unlink()
    rep = write_report(tmp_path, matrices={"val_loss": LOSS}, directions={"val_loss": False}, task_names=NAMES, config={})
    assert rep["figures"] == {"val_loss": "heatmap_val_loss.png", "validation_curves": None}
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["heatmap_val_loss.png"]


def test_stage_starts_name_only_the_stages_that_have_begun(tmp_path):
    from kuavo_train.run_state import RunState

    def starts(stages):
        (tmp_path / "run.json").write_text(json.dumps({"stages": stages}))
        return RunState.load(tmp_path).stage_starts()

    # after stage 2 began: no marker for stages 3 and 4, which have not
    assert starts({"t2": {"task_id": 2, "status": "running", "total_steps": 12},
                   "t1": {"task_id": 1, "status": "complete", "total_steps": 10}}) == {"t1": 0, "t2": 10}
    # the joint baseline: one stage, recorded with the last task's id, starting at 0
    assert starts({"joint": {"task_id": 4, "status": "complete", "total_steps": 40}}) == {"joint": 0}


def test_validation_curves_skip_torn_line_and_missing_file(tmp_path):
    assert plot_validation_curves(tmp_path / "validation.jsonl", tmp_path / "v.png", task_names=NAMES,
                                  stage_boundaries={"a": 0}) is None
    (tmp_path / "validation.jsonl").write_text("")
    assert plot_validation_curves(tmp_path / "validation.jsonl", tmp_path / "v.png", task_names=NAMES,
                                  stage_boundaries={"a": 0}) is None
    _write_validation_log(tmp_path, torn_tail=True)
    out = plot_validation_curves(tmp_path / "validation.jsonl", tmp_path / "v.png", task_names=NAMES,
                                 stage_boundaries={"a": 0, "b": 10, "c": 20})
    assert out == tmp_path / "v.png"
    _assert_png(out)


def test_spec_retention_thresholds():
    # spec section 4: loss < 0.7 well retained, < 1.0 slight degradation, else significant forgetting
    assert classify_retention(0.5) == "good"
    assert classify_retention(0.7) == "moderate" and classify_retention(0.99) == "moderate"
    assert classify_retention(1.0) == "forgetting"
    assert classify_retention(0.15, (0.1, 0.2)) == "moderate"
    assert classify_retention(float("nan")) == "n/a" and classify_retention(None) == "n/a"
    # relative: loss / reference, inclusive bounds
    assert classify_retention(0.125, (1.25, 2.0), mode="relative", reference=0.1) == "good"
    assert classify_retention(0.2, (1.25, 2.0), mode="relative", reference=0.1) == "moderate"
    assert classify_retention(0.3, (1.25, 2.0), mode="relative", reference=0.1) == "forgetting"
    assert classify_retention(0.3, (1.25, 2.0), mode="relative", reference=None) == "n/a"
    with pytest.raises(ValueError):
        classify_retention(0.3, mode="bogus")


def test_validation_table_absolute_and_relative():
    names = {1: "task1_moving_grasp", 2: "task2_weighing", 3: "task3_placement"}
    table = format_validation_table(3, 2, {1: 0.5, 2: 0.8, 3: 0.3}, names, 3, (0.7, 1.0))
    lines = table.splitlines()
    assert lines[0].startswith("stage 3, epoch 2: multi-task validation")
    row = {l.split()[1]: l for l in lines if l.strip()[:2] in ("1.", "2.", "3.")}
    assert "0.5000" in row["task1_moving_grasp"] and "good (Well Retained)" in row["task1_moving_grasp"]
    assert "moderate (Slight Degradation)" in row["task2_weighing"]
    assert "current task" in row["task3_placement"]
    assert lines[-1] == "  mean loss over 3 task(s): 0.5333; worst earlier task: 2. task2_weighing (loss 0.8000)"
    # columns line up: every loss ends at the same offset
    assert len({l.index("0.", len("  2. task3_placement")) for l in row.values()}) == 1

    table = format_validation_table(3, 4, {1: 0.3, 2: 0.2, 3: 0.1}, names, 3, (1.25, 2.0),
                                    mode="relative", reference_losses={1: 0.1, 2: 0.16})
    assert "forgetting (Significant Forgetting), 3.00x its end-of-stage loss 0.1000" in table
    assert "good (Well Retained), 1.25x its end-of-stage loss 0.1600" in table
    assert table.splitlines()[-1].endswith("worst earlier task: 1. task1_moving_grasp (3.00x)")
    table = format_validation_table(2, 1, {1: 0.3, 2: 0.2}, names, 2, (1.25, 2.0), mode="relative")
    assert "n/a (no reference loss)" in table


def test_evaluate_a_run_from_another_folder(full_run, demo_data, tmp_path):
    """`kuavo-train evaluate --run` finds the datasets run.json records relative to the folder the
    run was started from, whatever the current folder."""
    import os
    import subprocess
    import sys

    from conftest import REPO, moved_run

    run = moved_run(full_run[1], demo_data, tmp_path / "origin")
    (run / "report.json").unlink()
    r = subprocess.run([sys.executable, "-m", "kuavo_train.cli.main", "evaluate", "--run", str(run)], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads((run / "report.json").read_text())["matrices"]["val_loss"]) == 5


def test_rows_evaluated_with_other_settings_are_evaluated_again(full_run, tmp_path, caplog):
    """A cached row is reused only with the settings it was made with: `evaluate` with fewer
    action-error episodes evaluates every row again, and the report's numbers are the new ones."""
    import logging
    import shutil

    from kuavo_train.config.loading import load_run_config
    from kuavo_train.evaluation.run_evaluation import evaluate_run
    from conftest import FULL_RUN_EXTRA, tiny_overrides

    cfg, run = full_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    before = json.loads((copy / "evaluation.json").read_text())["rows"]
    assert {r["settings"]["action_error_episodes"] for r in before.values()} == {cfg.evaluation.action_error_episodes}
    base, data = cfg.policy.pretrained_path, cfg.data_root
    fewer = load_run_config(tiny_overrides(copy, base, data, *FULL_RUN_EXTRA, "evaluation.action_error_episodes=1"))
    with caplog.at_level(logging.INFO, logger="kuavo_train"):
        report = evaluate_run(fewer)
    again = [r.getMessage() for r in caplog.records if "evaluated again" in r.getMessage()]
    assert len(again) == 5 and f"action_error_episodes {cfg.evaluation.action_error_episodes} (now 1)" in again[0], again
    after = json.loads((copy / "evaluation.json").read_text())["rows"]
    assert {r["settings"]["action_error_episodes"] for r in after.values()} == {1}
    assert report["matrices"]["action_error"] != [before[str(i)]["action_error"] for i in range(5)]
    assert report["matrices"]["action_error"] == [after[str(i)]["action_error"] for i in range(5)]
    # the same settings again: every row reused
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kuavo_train"):
        evaluate_run(fewer)
    assert not [r for r in caplog.records if "evaluated again" in r.getMessage() or "evaluating" in r.getMessage()]


def test_evaluate_a_run_with_overrides_of_its_recorded_config(full_run, demo_data, tmp_path):
    """`evaluate --run DIR key=value`: the recorded config with that field changed (data_root= moves
    the datasets it held); a key the run does not have, or a config group, is one line."""
    import subprocess
    import sys

    from conftest import REPO

    cfg, run = full_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    state = json.loads((copy / "run.json").read_text())
    state["config"]["data_root"] = str(tmp_path / "gone")  # the datasets have moved since the run was trained
    for name, stage in state["config"]["stages"].items():
        stage["dataset"]["root"] = str(tmp_path / "gone" / name)
    (copy / "run.json").write_text(json.dumps(state))
    (copy / "report.json").unlink()

    def evaluate(*overrides):
        return subprocess.run([sys.executable, "-m", "kuavo_train.cli.main", "evaluate", "--run", str(copy), *overrides],
                              cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})

    for bad, says in [("not_a_key=3", "'not_a_key=3': with --run, give key=value for a field of the run's recorded config"),
                      ("profile=demo", "'profile=demo': with --run"),
                      ("evaluation=3", "'evaluation=3': with --run"),
                      ("evaluation.closed_loop_episodes=-1", "evaluation.closed_loop_episodes: must be >= 0")]:
        r = evaluate(f"data_root={demo_data}", bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, (bad, r.stderr[-2000:])
        assert "run.json" in r.stderr and not (copy / "report.json").exists()
    r = evaluate()
    assert r.returncode == 2 and f"no LeRobot dataset at {tmp_path / 'gone'}" in r.stderr, r.stderr[-2000:]
    r = evaluate(f"data_root={demo_data}", "evaluation.action_error_episodes=1")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((copy / "report.json").read_text())
    assert report["config"]["evaluation"]["action_error_episodes"] == 1
    assert report["config"]["stages"]["task2_weighing"]["dataset"]["root"] == str(demo_data / "task2_weighing")
    rows = json.loads((copy / "evaluation.json").read_text())["rows"]
    assert {r["settings"]["action_error_episodes"] for r in rows.values()} == {1}
    # the run's log has the evaluation's lines, as it has the training's
    log = (copy / "train.log").read_text()
    assert log.count("was evaluated with") == len(rows) and f"report: {copy / 'report.md'}" in log


def test_a_row_killed_midway_keeps_the_tasks_it_finished(full_run, tmp_path):
    """Each task's cell of a row is saved when done: `evaluate` killed after the first task of a
    row keeps that task, and the rerun reuses it and ends with the uninterrupted row."""
    import signal
    import subprocess
    import sys

    from conftest import REPO

    _, run = full_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    ev = json.loads((copy / "evaluation.json").read_text())
    whole = ev["rows"].pop("4")
    others = {k for r in ev["rows"].values() for k in r["cells"]}
    ev["cells"] = {k: v for k, v in ev["cells"].items() if k not in set(whole["cells"]) - others}
    (copy / "evaluation.json").write_text(json.dumps(ev))
    cmd = [sys.executable, "-m", "kuavo_train.cli.main", "evaluate", "--run", str(copy)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("row 4, ") and " evaluated in " in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    kept = json.loads((copy / "evaluation.json").read_text())
    assert "4" not in kept["rows"]
    done = [k for k in whole["cells"] if k in kept["cells"]]
    assert 1 <= len(done) < len(whole["cells"]), done
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("the same model as row 4's, which was evaluated: reused") == len(done), r.stdout
    again = json.loads((copy / "evaluation.json").read_text())["rows"]["4"]
    assert {m: again[m] for m in ("val_loss", "action_error")} == {m: whole[m] for m in ("val_loss", "action_error")}
