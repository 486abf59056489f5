"""Continual-learning metrics of a forgetting matrix (written here: no library we use has them).

R is a (T+1) x T matrix given as a list of rows: row 0 is the model before any
training (the baseline b), row i the model after stage i (which trained task
i), column j task j. Tasks and rows are 1-based below; None/NaN/inf = not
measured. For a higher-is-better matrix (success rate):

- ACC          = mean_i R[T][i]                                (Lopez-Paz & Ranzato 2017)
- BWT          = mean_{i<T} (R[T][i] - R[i][i])                (same)
- FWT          = mean_{i>=2} (R[i-1][i] - R[0][i])             (same; b_i = row 0)
- forgetting_i = max_{l=i..T-1} R[l][i] - R[T][i], i < T       (Chaudhry et al. 2018)

forgetting_i looks only at rows l >= i, i.e. after task i was learned: row 0
and rows before stage i measure a model that never trained on task i, and
their values say nothing about what was later forgotten. It is None for the
last task (nothing comes after it), and negative when the task improved.

Sign convention. For a lower-is-better matrix (loss, action error) the raw
values are kept (ACC and `final` stay in the matrix's own units, lower =
better) but every difference is negated:
  BWT = mean_{i<T} (R[i][i] - R[T][i]),  FWT = mean_{i>=2} (R[0][i] - R[i-1][i]),
  forgetting_i = R[T][i] - min_{l=i..T-1} R[l][i].
So for every matrix: positive BWT/FWT = better, positive forgetting = worse.

Missing cells are skipped in every mean; a mean with no valid term is None
(e.g. T = 1 has no BWT/FWT; a joint run, which only has rows 0 and T, has no
diagonal and so no BWT/forgetting). A task whose stage was never evaluated
simply contributes nothing. Outputs are plain floats or None, never NaN, so
they serialize to strict JSON.
"""

from __future__ import annotations

import math


def _val(x) -> float | None:
    # inf is treated as missing too: JSON cannot hold it and a mean over it is meaningless
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def _rows(R) -> list[list[float | None]]:
    rows = [None if r is None or len(r) == 0 else list(r) for r in R]
    T = max((len(r) for r in rows if r is not None), default=0)
    # a row that was never evaluated may come as None / [] instead of a row of Nones
    out = [[None] * T if r is None else [_val(x) for x in r] for r in rows]
    if T == 0 or len(out) != T + 1 or any(len(r) != T for r in out):
        raise ValueError(f"a forgetting matrix has T+1 rows of T tasks; got {len(out)} rows of lengths "
                         f"{[len(r) for r in out]}")
    return out


def continual_metrics(R, *, higher_is_better: bool) -> dict:
    """ACC/BWT/FWT/forgetting of one (T+1) x T matrix; see the module docstring for definitions and signs.

    Returns {"acc", "bwt", "fwt", "forgetting": [per task, None for the last],
    "mean_forgetting" (over tasks 1..T-1 that have a value), "final": R[T] as floats/None}.
    """
    rows = _rows(R)
    T = len(rows) - 1
    s = 1.0 if higher_is_better else -1.0

    def gain(a, b):  # how much better a is than b, positive = better, whatever the direction
        return None if a is None or b is None else s * (a - b)

    # 0-based column j is task j+1, learned in row j+1
    final = rows[T]
    acc = _mean(final)
    bwt = _mean(gain(final[j], rows[j + 1][j]) for j in range(T - 1)) if T > 1 else None
    fwt = _mean(gain(rows[j][j], rows[0][j]) for j in range(1, T)) if T > 1 else None
    forgetting: list[float | None] = []
    for j in range(T):
        learned = [rows[l][j] for l in range(j + 1, T) if rows[l][j] is not None]
        if j == T - 1 or not learned or final[j] is None:
            forgetting.append(None)
            continue
        best = max(learned) if higher_is_better else min(learned)
        forgetting.append(gain(best, final[j]))
    return {"acc": acc, "bwt": bwt, "fwt": fwt, "forgetting": forgetting,
            "mean_forgetting": _mean(forgetting), "final": final}


def all_metrics(matrices: dict, directions: dict) -> dict:
    """{name: continual_metrics(R, higher_is_better=directions[name])} for every matrix."""
    return {name: continual_metrics(R, higher_is_better=bool(directions[name])) for name, R in matrices.items()}
