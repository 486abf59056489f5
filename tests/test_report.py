"""The report of a real run: report.json keys, figures, markdown; plus the forgetting table."""

import json

import pytest
from conftest import TASK_NAMES

from kuavo_train.evaluation.forgetting import classify_retention, format_validation_table
from kuavo_train.evaluation.report import write_report


def test_run_report_has_every_matrix_row_and_metric(full_run):
    _, run_dir = full_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task_names"] == TASK_NAMES
    for m in ("val_loss", "action_error"):
        rows = report["matrices"][m]
        assert len(rows) == 5 and all(len(r) == 4 for r in rows)  # row 0 = before training
        assert all(v is not None for r in rows for v in r)
        assert set(report["metrics"][m]) >= {"acc", "bwt", "fwt", "forgetting"}
    # the tiny run has no closed-loop episodes configured, so no success matrix
    assert "success" not in report["matrices"]
    assert report["versions"]["lerobot"] == "0.6.1" and report["seed"] == 42
    for png in ("heatmap_val_loss.png", "heatmap_action_error.png", "validation_curves.png"):
        data = (run_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    md = (run_dir / "report.md").read_text()
    assert f"{report['metrics']['val_loss']['acc']:.3f}" in md and "after stage 4" in md


def test_report_numbers_follow_the_matrices(tmp_path):
    (tmp_path / "validation.jsonl").write_text("".join(
        json.dumps({"stage": s, "epoch": 1, "step": 5, "global_step": 5 * s, "task_id": t, "task": f"t{t}", "loss": 1.0 / s}) + "\n"
        for s in (1, 2) for t in range(1, s + 1)))
    success = [[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]]
    rep = write_report(tmp_path, matrices={"success": success}, directions={"success": True}, task_names=["a", "b"],
                       config={"seed": 3}, extra={"strategy": "x", "stage_boundaries": [0, 5]})
    assert rep["metrics"]["success"]["acc"] == pytest.approx(0.75)
    assert rep["metrics"]["success"]["bwt"] == pytest.approx(-0.5)
    assert json.loads((tmp_path / "report.json").read_text())["matrices"]["success"] == success
    assert "| after stage 2 | 0.500 | 1.000 |" in (tmp_path / "report.md").read_text()


def test_spec_retention_labels_and_relative_mode():
    assert classify_retention(0.5) == "Well Retained"
    assert classify_retention(0.8) == "Slight Degradation"
    assert classify_retention(1.2) == "Significant Forgetting"
    assert classify_retention(0.3, (1.25, 2.0), mode="relative", reference=0.1) == "Significant Forgetting"
    table = format_validation_table(2, 4, {1: 0.3, 2: 0.2}, {1: "task1", 2: "task2"}, 2, (1.25, 2.0),
                                    mode="relative", reference_losses={1: 0.2})
    assert "current task" in table and "Slight Degradation (1.50x" in table
