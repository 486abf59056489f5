"""The run's report: report.json (everything), report.md (for people) and the figures."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from kuavo_train.evaluation.metrics import all_metrics
from kuavo_train.evaluation.plots import plot_matrix_heatmap, plot_validation_curves

REPORT_JSON, REPORT_MD = "report.json", "report.md"
DESCRIPTIONS = {
    "val_loss": "deterministic flow-matching validation loss on held-out episodes",
    "action_error": "mean absolute joint error of the sampled action chunk vs the demonstration (robot units)",
    "action_error_normalized": "the same error divided by each action dimension's std",
    "success": "closed-loop success rate in the demo world on held-out scenes",
}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "lerobot", "transformers", "kuavo_train"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _matrix_md(R, task_names) -> list[str]:
    lines = ["| model | " + " | ".join(task_names) + " |", "|---" * (len(task_names) + 1) + "|"]
    for i, row in enumerate(R):
        label = "before training" if i == 0 else f"after stage {i}"
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row) + " |")
    return lines


def render_markdown(report: dict) -> str:
    names = report["task_names"]
    out = ["# Forgetting report", "",
           f"Strategy: {report.get('extra', {}).get('strategy', '?')}; seed {report.get('seed')}; "
           f"LeRobot {report['versions'].get('lerobot')}, torch {report['versions'].get('torch')}.", "",
           "Row k = the model after stage k (stage k trains task k); row 0 = before any training.",
           "Positive BWT/FWT = better, positive forgetting = worse, for every matrix.", ""]
    for m, R in report["matrices"].items():
        met = report["metrics"][m]
        out += [f"## {m}", "", DESCRIPTIONS.get(m, m) + f" ({'higher' if report['directions'][m] else 'lower'} is better)", ""]
        out += _matrix_md(R, names) + [""]
        out += ["| ACC | BWT | FWT | forgetting per task |", "|---|---|---|---|",
                f"| {_fmt(met['acc'])} | {_fmt(met['bwt'])} | {_fmt(met['fwt'])} | "
                + ", ".join(f"{n}: {_fmt(f)}" for n, f in zip(names, met["forgetting"])) + " |", "",
                f"![{m}](heatmap_{m}.png)", ""]
    out += ["## Validation loss over the run", "", "![validation curves](validation_curves.png)", ""]
    return "\n".join(out)


def write_report(run_dir, *, matrices: dict, directions: dict, task_names: list[str], config: dict, extra: dict | None = None) -> dict:
    run_dir = Path(run_dir)
    report = {
        "matrices": matrices,
        "metrics": all_metrics(matrices, directions),
        "task_names": list(task_names),
        "directions": dict(directions),
        "config": config,
        "versions": versions(),
        "seed": config.get("seed"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra or {},
    }
    for m, R in matrices.items():
        plot_matrix_heatmap(R, task_names, m, run_dir / f"heatmap_{m}.png", higher_is_better=directions[m])
    plot_validation_curves(run_dir / "validation.jsonl", run_dir / "validation_curves.png", task_names=list(task_names),
                           stage_boundaries=list((extra or {}).get("stage_boundaries", [])))
    _write_atomic(run_dir / REPORT_JSON, json.dumps(report, indent=2, default=str) + "\n")
    _write_atomic(run_dir / REPORT_MD, render_markdown(report))
    return report


def load_report(run_dir) -> dict:
    return json.loads((Path(run_dir) / REPORT_JSON).read_text())
