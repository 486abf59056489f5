"""Figures of the report (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_matrix_heatmap(R, task_names, title: str, path, *, higher_is_better: bool) -> Path:
    plt = _plt()
    data = np.array([[np.nan if v is None else float(v) for v in row] for row in R], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(task_names), 1.2 + 0.55 * len(R)))
    cmap = plt.get_cmap("viridis" if higher_is_better else "viridis_r").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(task_names)), [n.replace("_", "\n", 1) for n in task_names], fontsize=8)
    ax.set_yticks(range(len(R)), ["before"] + [f"after {k}" for k in range(1, len(R))], fontsize=8)
    finite = data[np.isfinite(data)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                good = (data[i, j] > mid) == higher_is_better
                ax.text(j, i, f"{data[i, j]:.3g}", ha="center", va="center", fontsize=8, color="black" if good else "white")
    ax.set_title(f"{title} ({'higher' if higher_is_better else 'lower'} is better)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_validation_curves(validation_jsonl, path, *, task_names: list[str], stage_boundaries: list[int]) -> Path | None:
    p = Path(validation_jsonl)
    if not p.is_file():
        return None
    records = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    if not records:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for tid, name in enumerate(task_names, start=1):
        pts = sorted((r["global_step"], r["loss"]) for r in records if r["task_id"] == tid)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlim(left=0)
    top = ax.get_ylim()[1]
    for k, b in enumerate(stage_boundaries, start=1):
        if k > 1 or b > 0:
            ax.axvline(b, color="grey", linestyle="--", linewidth=0.8)
        ax.text(b, top, f" stage {k}", fontsize=7, va="top", color="grey")
    ax.set_xlabel("optimizer step (whole run)")
    ax.set_ylabel("validation loss (held-out)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
