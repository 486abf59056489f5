"""Continual-learning metrics against matrices computed by hand (rows: before, after stage 1..T)."""

import json
import math

import numpy as np
import pytest

from kuavo_train.evaluation.metrics import all_metrics, continual_metrics

# success (higher is better), 3 tasks
SUCCESS = [
    [0.1, 0.0, 0.2],
    [0.9, 0.1, 0.2],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 1.0],
]

# validation loss (lower is better), 3 tasks
LOSS = [
    [2.0, 2.0, 2.0],
    [0.5, 1.5, 1.8],
    [0.7, 0.4, 1.2],
    [0.9, 0.6, 0.3],
]


def test_success_matrix_by_hand():
    m = continual_metrics(SUCCESS, higher_is_better=True)
    assert m["acc"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    # BWT: task 1 (0.5 - 0.9), task 2 (0.7 - 0.8)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)  # -0.25
    # FWT: task 2 after stage 1 vs baseline (0.1 - 0.0), task 3 after stage 2 vs baseline (0.3 - 0.2)
    assert m["fwt"] == pytest.approx(((0.1 - 0.0) + (0.3 - 0.2)) / 2)  # 0.1
    # forgetting: task 1 best of rows 1..2 = 0.9 -> 0.4; task 2 best of row 2 = 0.8 -> 0.1; last task none
    assert m["forgetting"][0] == pytest.approx(0.4)
    assert m["forgetting"][1] == pytest.approx(0.1)
    assert m["forgetting"][2] is None
    assert m["mean_forgetting"] == pytest.approx(0.25)
    assert m["final"] == [0.5, 0.7, 1.0]


def test_loss_matrix_by_hand_signs_flipped():
    m = continual_metrics(LOSS, higher_is_better=False)
    assert m["acc"] == pytest.approx(0.6)  # raw units: (0.9 + 0.6 + 0.3) / 3
    # BWT = mean(R[i][i] - R[T][i]) = mean(0.5 - 0.9, 0.4 - 0.6) = -0.3: losses grew, negative = worse
    assert m["bwt"] == pytest.approx(-0.3)
    # FWT = mean(R[0][i] - R[i-1][i]) = mean(2.0 - 1.5, 2.0 - 1.2) = 0.65: earlier stages helped, positive
    assert m["fwt"] == pytest.approx(0.65)
    # forgetting = R[T][i] - min_{l=i..T-1} R[l][i]: 0.9 - 0.5 = 0.4, 0.6 - 0.4 = 0.2 (row 0's 2.0 never counts)
    assert m["forgetting"][0] == pytest.approx(0.4)
    assert m["forgetting"][1] == pytest.approx(0.2)
    assert m["forgetting"][2] is None
    assert m["mean_forgetting"] == pytest.approx(0.3)


def test_improvement_gives_positive_bwt_and_negative_forgetting_for_both_directions():
    loss = [[2.0, 2.0], [0.5, 1.5], [0.3, 0.4]]  # task 1's loss kept falling during stage 2
    m = continual_metrics(loss, higher_is_better=False)
    assert m["bwt"] == pytest.approx(0.2) and m["forgetting"][0] == pytest.approx(-0.2)
    assert m["fwt"] == pytest.approx(0.5)
    succ = [[0.0, 0.0], [0.5, 0.2], [0.7, 0.9]]
    m = continual_metrics(succ, higher_is_better=True)
    assert m["bwt"] == pytest.approx(0.2) and m["forgetting"][0] == pytest.approx(-0.2)
    assert m["fwt"] == pytest.approx(0.2)


def test_forgetting_ignores_rows_before_the_task_was_learned():
    # task 1's untrained baseline (0.9) beats everything after: it must not count as "forgotten"
    # task 2 happens to score 0.9 after stage 1 (before its own stage): not counted either
    R = [
        [0.9, 0.0, 0.0],
        [0.5, 0.9, 0.0],
        [0.45, 0.6, 0.1],
        [0.4, 0.5, 0.8],
    ]
    m = continual_metrics(R, higher_is_better=True)
    assert m["forgetting"][0] == pytest.approx(0.5 - 0.4)  # max(rows 1, 2) = 0.5
    assert m["forgetting"][1] == pytest.approx(0.6 - 0.5)  # row 2 only
    assert m["bwt"] == pytest.approx(((0.4 - 0.5) + (0.5 - 0.6)) / 2)
    assert m["fwt"] == pytest.approx(((0.9 - 0.0) + (0.1 - 0.0)) / 2)


def test_one_task():
    m = continual_metrics([[0.0], [0.8]], higher_is_better=True)
    assert m == {"acc": 0.8, "bwt": None, "fwt": None, "forgetting": [None], "mean_forgetting": None, "final": [0.8]}
    m = continual_metrics([[1.3], [0.2]], higher_is_better=False)
    assert m["acc"] == pytest.approx(0.2) and m["bwt"] is None and m["fwt"] is None and m["forgetting"] == [None]


def test_a_task_never_learned_stays_at_baseline():
    # stage 2 did not move task 2 at all (diagonal = baseline 0.0)
    R = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.8, 0.0, 0.1], [0.7, 0.0, 1.0]]
    m = continual_metrics(R, higher_is_better=True)
    assert m["forgetting"] == [pytest.approx(0.3), pytest.approx(0.0), None]
    assert m["bwt"] == pytest.approx(((0.7 - 1.0) + (0.0 - 0.0)) / 2)  # -0.15
    assert m["fwt"] == pytest.approx(((0.0 - 0.0) + (0.1 - 0.0)) / 2)  # 0.05
    assert m["acc"] == pytest.approx(1.7 / 3)


def test_missing_cells_are_skipped_and_output_has_no_nan():
    # stage 2 was never evaluated (row of None); task 3's baseline is NaN
    R = [[0.0, 0.0, float("nan")], [1.0, 0.0, 0.0], [None, None, None], [0.5, 0.0, 1.0]]
    m = continual_metrics(R, higher_is_better=True)
    assert m["bwt"] == pytest.approx(0.5 - 1.0)  # only task 1 has both cells
    assert m["fwt"] == pytest.approx(0.0)  # task 2: 0 - 0; task 3 has no baseline
    assert m["forgetting"][0] == pytest.approx(0.5)  # rows 1..2, row 2 missing -> row 1
    assert m["forgetting"][1] is None  # its only post-learning row (2) is missing
    assert m["mean_forgetting"] == pytest.approx(0.5)
    json.dumps(m, allow_nan=False)  # strict JSON: would raise on NaN
    assert all(v is None or math.isfinite(v) for v in [m["acc"], m["bwt"], m["fwt"], *m["forgetting"]])


def test_whole_rows_missing_as_none_and_joint_layout():
    # a partial/joint run: only the baseline and the final model were evaluated
    m = continual_metrics([[0.0, 0.0], None, [0.5, 1.0]], higher_is_better=True)
    assert m == {"acc": 0.75, "bwt": None, "fwt": None, "forgetting": [None, None], "mean_forgetting": None,
                 "final": [0.5, 1.0]}
    # final row missing: nothing about the end of the run can be said
    m = continual_metrics([[1.0, 1.0], [0.2, 0.9], [None, None]], higher_is_better=False)
    assert m["acc"] is None and m["bwt"] is None and m["forgetting"] == [None, None]
    assert m["fwt"] == pytest.approx(1.0 - 0.9)


def test_numpy_input_gives_plain_floats():
    m = continual_metrics(np.array(LOSS), higher_is_better=False)
    assert type(m["acc"]) is float and type(m["bwt"]) is float and type(m["final"][0]) is float
    assert m["bwt"] == pytest.approx(-0.3)


def test_shape_is_checked_and_all_metrics_maps_names():
    with pytest.raises(ValueError, match="T\\+1 rows"):
        continual_metrics([[1.0, 2.0]], higher_is_better=True)
    with pytest.raises(ValueError, match="T\\+1 rows"):
        continual_metrics([[1.0, 2.0], [1.0], [1.0, 2.0]], higher_is_better=True)
    out = all_metrics({"success": SUCCESS, "val_loss": LOSS}, {"success": True, "val_loss": False})
    assert set(out) == {"success", "val_loss"}
    assert out["success"]["bwt"] == pytest.approx(-0.25) and out["val_loss"]["bwt"] == pytest.approx(-0.3)
