"""The run's report: report.json (everything), report.md (for people) and the figures.

Every file is written atomically (kuavo_train/files.py), so an interrupted
evaluation leaves either the previous report or the new one, never half.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from pathlib import Path

from kuavo_train.evaluation.metrics import all_metrics
from kuavo_train.evaluation.plots import plot_matrix_heatmap, plot_validation_curves, row_labels
from kuavo_train.files import write_text_atomic

REPORT_JSON, REPORT_MD, CURVES_PNG = "report.json", "report.md", "validation_curves.png"
DESCRIPTIONS = {
    "val_loss": "deterministic flow-matching validation loss on held-out episodes",
    "action_error": "mean absolute joint error of the sampled action chunk vs the demonstration (robot units)",
    "action_error_normalized": "the same error divided by each action dimension's std",
    "success": "closed-loop success rate in the demo world on held-out scenes",
}
SIGN_CONVENTION = ("Sign convention: for every matrix positive BWT/FWT = better and positive forgetting = worse "
                   "(differences are negated for lower-is-better matrices); ACC is in the matrix's own units.")


# Matrices whose values have fixed bounds: their heatmaps use the whole range, so that a colour means
# the same rate in every run (15% is not drawn as the best colour because nothing did better).
BOUNDED = {"success": (0.0, 1.0)}


def heatmap_name(matrix: str) -> str:
    return f"heatmap_{matrix}.png"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "lerobot", "transformers", "kuavo_train"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _clean(R) -> list[list[float | None]]:
    # NaN/inf cannot go into strict JSON; they mean "no usable measurement" like None
    return [[None if v is None or not math.isfinite(float(v)) else float(v) for v in row] for row in R]


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def matrix_md(R, task_names, row_stages=None, digits: int = 3) -> list[str]:
    """A matrix as a markdown table, one line per row some model filled, named by `row_labels`."""
    lines = ["| model | " + " | ".join(task_names) + " |", "|---" * (len(task_names) + 1) + "|"]
    for label, row in zip(row_labels(len(R), list(task_names), row_stages), R):
        if all(v is None for v in row):  # no model was evaluated there (a joint run's rows 1..T-1, a partial run)
            continue
        lines.append(f"| {label} | " + " | ".join(_fmt(v, digits) for v in row) + " |")
    return lines


def _metrics_md(met: dict, names) -> list[str]:
    head = ["ACC", "BWT", "FWT", "mean forgetting", *(f"forgetting {n}" for n in names)]
    vals = [met["acc"], met["bwt"], met["fwt"], met.get("mean_forgetting"), *met["forgetting"]]
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|", "| " + " | ".join(_fmt(v) for v in vals) + " |"]


def render_markdown(report: dict) -> str:
    names = report["task_names"]
    extra = report.get("extra") or {}
    v = report["versions"]
    out = ["# Forgetting report", "",
           f"Strategy: {extra.get('strategy', '?')}; seed {report.get('seed')}; created {report['created']}; "
           f"LeRobot {v.get('lerobot')}, torch {v.get('torch')}, transformers {v.get('transformers')}.", "",
           "Each matrix evaluates every task (columns) with the model before any training (row 0) and after "
           "each stage k (stage k trains task k), on held-out episodes. A blank/– cell was not evaluated.", "",
           "Metrics: ACC = mean of the last row; BWT = mean over tasks 1..T-1 of (last row - own-stage row); "
           "FWT = mean over tasks 2..T of (row before the task's stage - row 0); forgetting of task i = "
           "(best value after task i was learned, before the last stage) - last row.", "",
           SIGN_CONVENTION, ""]
    for m, R in report["matrices"].items():
        met = report["metrics"][m]
        out += [f"## {m}", "", f"{DESCRIPTIONS.get(m, m)} ({'higher' if report['directions'][m] else 'lower'} is better).",
                ""]
        out += matrix_md(R, names, extra.get("row_stages")) + [""] + _metrics_md(met, names) + ["", f"![{m}]({heatmap_name(m)})", ""]
    out += ["## Validation loss over the run", ""]
    if report.get("figures", {}).get("validation_curves"):
        out += ["Held-out loss of each task trained so far, logged during training; dashed lines mark where each "
                "stage that has begun starts.",
                "", f"![validation curves]({CURVES_PNG})", ""]
    else:
        out += ["No validation log (validation.jsonl) was found.", ""]
    return "\n".join(out)


def write_report(run_dir, *, matrices: dict, directions: dict, task_names: list[str], config: dict,
                 extra: dict | None = None) -> dict:
    """Write report.json, report.md, heatmap_<matrix>.png and validation_curves.png into run_dir; return the report."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mats = {m: _clean(R) for m, R in matrices.items()}
    dirs = {m: bool(directions[m]) for m in mats}
    figures = {}
    for m, R in mats.items():
        figures[m] = plot_matrix_heatmap(R, task_names, m, run_dir / heatmap_name(m), higher_is_better=dirs[m],
                                         row_stages=(extra or {}).get("row_stages"),
                                         value_range=BOUNDED.get(m)).name
    curves = plot_validation_curves(run_dir / "validation.jsonl", run_dir / CURVES_PNG, task_names=list(task_names),
                                    stage_boundaries=dict((extra or {}).get("stage_boundaries") or {}))
    figures["validation_curves"] = curves.name if curves else None
    # a figure of an earlier report whose matrix or curves this one no longer has would show numbers
    # the report does not
    for old in [*run_dir.glob(heatmap_name("*")), run_dir / CURVES_PNG]:
        if old.name not in figures.values():
            old.unlink(missing_ok=True)
    report = {
        "matrices": mats,
        "metrics": all_metrics(mats, dirs),
        "task_names": list(task_names),
        "directions": dirs,
        "config": config,
        "versions": versions(),
        "seed": config.get("seed"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "figures": figures,
        **({"extra": extra} if extra is not None else {}),
    }
    # default=str: configs may hold Paths/tuples; allow_nan=False: fail loudly rather than write invalid JSON
    write_text_atomic(run_dir / REPORT_JSON, json.dumps(report, indent=2, default=str, allow_nan=False) + "\n")
    write_text_atomic(run_dir / REPORT_MD, render_markdown(report))
    return report


def load_report(run_dir) -> dict:
    return json.loads((Path(run_dir) / REPORT_JSON).read_text())
