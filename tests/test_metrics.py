"""Continual-learning metrics against matrices computed by hand."""

import math

import pytest

from kuavo_train.evaluation.metrics import all_metrics, continual_metrics

# success (higher is better), 3 tasks; rows: before, after stage 1..3
SUCCESS = [
    [0.1, 0.0, 0.2],
    [0.9, 0.1, 0.2],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 1.0],
]


def test_success_matrix_by_hand():
    m = continual_metrics(SUCCESS, higher_is_better=True)
    assert m["acc"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    # BWT: (0.5 - 0.9) and (0.7 - 0.8)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    # FWT: task 2 after stage 1 vs before: 0.1 - 0.0; task 3 after stage 2 vs before: 0.3 - 0.2
    assert m["fwt"] == pytest.approx(((0.1 - 0.0) + (0.3 - 0.2)) / 2)
    # forgetting: task 1 best of rows 1..2 = 0.9 -> 0.4; task 2 best of row 2 = 0.8 -> 0.1
    assert m["forgetting"][0] == pytest.approx(0.4) and m["forgetting"][1] == pytest.approx(0.1) and m["forgetting"][2] is None


def test_loss_matrix_signs_flip_so_positive_forgetting_is_worse():
    loss = [[2.0, 2.0], [0.5, 1.5], [0.9, 0.4]]
    m = continual_metrics(loss, higher_is_better=False)
    assert m["acc"] == pytest.approx(0.65)
    assert m["bwt"] == pytest.approx(0.5 - 0.9)  # got worse: negative
    assert m["fwt"] == pytest.approx(2.0 - 1.5)  # learning task 1 helped task 2: positive
    assert m["forgetting"][0] == pytest.approx(0.4) and m["forgetting"][1] is None


def test_one_task():
    m = continual_metrics([[0.0], [0.8]], higher_is_better=True)
    assert m == {"acc": 0.8, "bwt": None, "fwt": None, "forgetting": [None], "final": [0.8]}


def test_missing_cells_and_a_task_never_learned():
    # task 2's stage was never evaluated (None), NaN elsewhere is skipped
    R = [[0.0, 0.0, float("nan")], [1.0, 0.0, 0.0], [None, None, None], [0.5, 0.0, 1.0]]
    m = continual_metrics(R, higher_is_better=True)
    assert m["bwt"] == pytest.approx(0.5 - 1.0)  # only task 1 has both cells
    assert m["fwt"] == pytest.approx(0.0)  # task 2: 0 - 0; task 3's baseline is NaN
    assert m["forgetting"][0] == pytest.approx(0.5) and m["forgetting"][1] is None
    # a task never learned keeps its baseline: zero forgetting, no NaN anywhere
    assert all(v is None or math.isfinite(v) for v in [m["acc"], m["bwt"], m["fwt"], *m["forgetting"]])


def test_shape_is_checked_and_all_metrics_maps_names():
    with pytest.raises(ValueError, match="T\\+1 rows"):
        continual_metrics([[1.0, 2.0]], higher_is_better=True)
    out = all_metrics({"success": SUCCESS, "val_loss": [[1.0], [0.5]]}, {"success": True, "val_loss": False})
    assert set(out) == {"success", "val_loss"} and out["val_loss"]["acc"] == 0.5
