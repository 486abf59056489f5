"""Figures of the report (matplotlib, headless Agg backend; files written atomically)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from kuavo_train.files import atomic_path


def _plt():
    # imported lazily and forced to Agg: reports are written on headless training machines
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """savefig atomically, so a crash never leaves a truncated PNG."""
    plt = _plt()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def row_labels(n_rows: int, task_names=(), row_stages: dict | None = None) -> list[str]:
    """'before training', then 'after stage k' where row k's stage is task k's own; a stage that
    trains several tasks at once (joint) ends at the last task's row and keeps its own name.
    `row_stages`: matrix row -> name of the stage that filled it (JSON's string keys accepted)."""
    stages = {int(k): v for k, v in (row_stages or {}).items()}
    labels = ["before training"]
    for k in range(1, n_rows):
        name = stages.get(k)
        own = name is None or k > len(task_names) or name == task_names[k - 1]
        labels.append(f"after stage {k}" if own else f"after {name} training")
    return labels


def plot_matrix_heatmap(R, task_names, title: str, path, *, higher_is_better: bool,
                        row_stages: dict | None = None, value_range: tuple[float, float] | None = None) -> Path:
    """Rows = before training / after stage k (stage k trains task k), columns = tasks; missing cells grey.
    The colour scale spans `value_range`, or the matrix's own values when it is None."""
    plt = _plt()
    data = np.array([[np.nan if v is None else float(v) for v in (row or [None] * len(task_names))] for row in R],
                    dtype=float)
    data[~np.isfinite(data)] = np.nan
    fig, ax = plt.subplots(figsize=(2.0 + 1.5 * len(task_names), 1.3 + 0.5 * len(R)))
    # reversed map for lower-is-better so that "good" is the same (bright) colour in every heatmap
    cmap = plt.get_cmap("viridis" if higher_is_better else "viridis_r").with_extremes(bad="#d9d9d9")
    finite = data[np.isfinite(data)]
    vmin, vmax = value_range or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    if vmin == vmax:  # a constant matrix would give a degenerate colour scale
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(task_names)), [n.replace("_", "\n", 1) for n in task_names], fontsize=8)
    ax.set_yticks(range(len(R)), row_labels(len(R), list(task_names), row_stages), fontsize=8)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                r, g, b, _ = cmap(im.norm(data[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # text colour from the cell's luminance
                ax.text(j, i, f"{data[i, j]:.3g}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
            else:
                ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="#777777")
    ax.set_title(f"{title} ({'higher' if higher_is_better else 'lower'} is better)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return _save(fig, path)


def read_validation_log(validation_jsonl) -> list[dict]:
    """The records of validation.jsonl; a torn last line (crash mid-write) is skipped."""
    p = Path(validation_jsonl)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "task_id" in r and "global_step" in r and r.get("loss") is not None:
            out.append(r)
    return out


def plot_validation_curves(validation_jsonl, path, *, task_names: list[str],
                           stage_boundaries: dict[str, int]) -> Path | None:
    """Held-out loss of every task vs the run's global step, a dashed line named after each stage
    (stage name -> its first step) where it starts; None if no data."""
    records = read_validation_log(validation_jsonl)
    if not records:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for tid in sorted({int(r["task_id"]) for r in records}):
        pts = sorted((r["global_step"], r["loss"]) for r in records
                     if int(r["task_id"]) == tid and math.isfinite(float(r["loss"])))
        if not pts:
            continue
        name = task_names[tid - 1] if 0 < tid <= len(task_names) else next(
            (r.get("task") for r in records if int(r["task_id"]) == tid), f"task {tid}")
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{tid}. {name}")
    # x in data units, y in axes units: labels sit at the top whatever the loss scale
    trans = ax.get_xaxis_transform()
    for name, b in stage_boundaries.items():
        ax.axvline(b, color="grey", linestyle="--", linewidth=0.8)
        ax.text(b, 0.98, f" {name}", transform=trans, fontsize=7, va="top", color="grey")
    ax.set_xlabel("optimizer step (whole run)")
    ax.set_ylabel("validation loss (held-out)")
    ax.set_title("multi-task validation loss", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
