"""Continual-learning metrics of a forgetting matrix (written here: no library we use has them).

R is a (T+1) x T matrix: row 0 the model before any training, row i the model
after stage i (which trained task i), column j task j; None/NaN = not measured.

- ACC = mean_j R[T][j]                                   (Lopez-Paz & Ranzato 2017)
- BWT = mean_{j<T} (R[T][j] - R[j][j])                   (same)
- FWT = mean_{j>1} (R[j-1][j] - R[0][j])                 (same; b_j = row 0)
- forgetting_j = max_{l=j..T-1} R[l][j] - R[T][j], j<T   (Chaudhry et al. 2018;
  only rows after task j was learned count)

Sign convention: for lower-is-better matrices (loss, error) the differences are
negated, so for every matrix positive BWT/FWT mean better and positive
forgetting means worse. ACC stays in the matrix's own units.
"""

from __future__ import annotations

import math


def _val(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def continual_metrics(R, *, higher_is_better: bool) -> dict:
    rows = [[_val(x) for x in row] for row in R]
    T = len(rows[0]) if rows else 0
    if len(rows) != T + 1:
        raise ValueError(f"a forgetting matrix has T+1 rows for T tasks; got {len(rows)} rows of {T} tasks")
    s = 1.0 if higher_is_better else -1.0

    def diff(a, b):  # "a better than b" as a positive number
        return None if a is None or b is None else s * (a - b)

    final = rows[T]
    acc = _mean(final)
    bwt = _mean(diff(final[j], rows[j + 1][j]) for j in range(T - 1)) if T > 1 else None
    fwt = _mean(diff(rows[j][j], rows[0][j]) for j in range(1, T)) if T > 1 else None
    forgetting = []
    for j in range(T):
        if j == T - 1:
            forgetting.append(None)
            continue
        earlier = [rows[l][j] for l in range(j + 1, T) if rows[l][j] is not None]
        if not earlier or final[j] is None:
            forgetting.append(None)
            continue
        best = max(earlier) if higher_is_better else min(earlier)
        forgetting.append(diff(best, final[j]))
    return {"acc": acc, "bwt": bwt, "fwt": fwt, "forgetting": forgetting, "final": final}


def all_metrics(matrices: dict, directions: dict) -> dict:
    return {name: continual_metrics(R, higher_is_better=directions[name]) for name, R in matrices.items()}
