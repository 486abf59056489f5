"""Run several strategies (and seeds) through the same pipeline and tabulate them side by side.

Each (seed, strategy) is an ordinary run directory `<out>/seed<k>/<strategy>/`
with its own report, so a comparison can be interrupted and resumed like any
run. The table gives, per strategy, the mean (and standard deviation across
seeds) of each matrix's ACC / BWT / FWT / mean forgetting.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from kuavo_train.config.loading import load_run_config
from kuavo_train.files import write_json_atomic, write_text_atomic
import kuavo_train.processes as processes

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("acc", "bwt", "fwt", "mean_forgetting")
MATRIX_ORDER = ("success", "action_error", "val_loss")


def run_comparison(overrides: list[str], *, out_dir: Path, strategies: list[str], seeds=(0,), config_dir: str | None = None) -> dict:
    from kuavo_train.strategies import get_strategy
    from kuavo_train.strategies.base import canonical_names

    out_dir = Path(out_dir)
    # a strategy (or alias of one) or seed given twice would count one run twice
    strategies, seeds = canonical_names(strategies), list(dict.fromkeys(seeds))
    # Every run's config (strategy names and options included) is checked before the first one trains.
    runs = []
    for seed in seeds:
        for strategy in strategies:
            run_dir = out_dir / f"seed{seed}" / strategy
            # the base model's row is the same for every strategy and seed: evaluated once (an override wins)
            cfg = load_run_config([f"evaluation.base_row_dir={out_dir / 'base_rows'}", *overrides,
                                   f"strategy={strategy}", f"seed={seed}", f"run_dir={run_dir}"], config_dir)
            get_strategy(cfg)
            runs.append((seed, strategy, cfg))
    reports: dict[str, list[dict]] = {s: [] for s in strategies}
    for seed, strategy, _, report, _ in train_and_evaluate(runs):
        reports[strategy].append(report)
    summary = summarize(reports)
    table = format_summary(summary, seeds=list(seeds))
    if processes.is_main():  # under `accelerate launch` every process has the same summary; one writes it
        write_json_atomic(out_dir / "comparison.json", {"seeds": list(seeds), "summary": summary})
        write_text_atomic(out_dir / "comparison.md", table + "\n")
    return {"summary": summary, "table": table}


def train_and_evaluate(runs: list[tuple[int, str, object]]):
    """Each (seed, strategy, RunConfig) in turn: train it (resumed; a finished run is only read, its
    complete stages and evaluated rows are kept), then evaluate it. Yields (seed, strategy, config,
    report, seconds this took)."""
    from kuavo_train.evaluation.run_evaluation import evaluate_run
    from kuavo_train.training.pipeline import Pipeline

    for seed, strategy, cfg in runs:
        log.info("=== %s, seed %d -> %s", strategy, seed, cfg.run_dir)
        t = time.time()
        Pipeline(cfg).run()
        report = evaluate_run(cfg)
        yield seed, strategy, cfg, report, time.time() - t


def summarize(reports: dict[str, list[dict]]) -> dict:
    """{strategy: {matrix: {key: {"mean", "std", "n"}}}} over the seeds' reports."""
    out = {}
    for strategy, reps in reports.items():
        per = {}
        for matrix in MATRIX_ORDER:
            vals = {k: [] for k in SUMMARY_KEYS}
            for r in reps:
                m = r.get("metrics", {}).get(matrix)
                if m is None:
                    continue
                for k in SUMMARY_KEYS:
                    v = m.get(k)
                    if v is not None:
                        vals[k].append(float(v))
            if any(vals.values()):
                # std over seeds (population, as tabulated); sem: standard error of the mean (sample std / sqrt n)
                per[matrix] = {k: {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v)) if v else None,
                                   "sem": float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None,
                                   "n": len(v)}
                               for k, v in vals.items()}
        out[strategy] = per
    return out


def _cell(stat: dict | None) -> str:
    if not stat or stat["mean"] is None:
        return "–"
    if stat["n"] > 1:
        return f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    return f"{stat['mean']:.3f}"


def format_summary(summary: dict, *, seeds: list[int]) -> str:
    """One markdown table per matrix, strategies as rows."""
    parts = [f"Seeds: {', '.join(map(str, seeds))} (mean ± population standard deviation over seeds when more "
             "than one; the differences below use the standard error of the mean)."]
    for matrix in MATRIX_ORDER:
        if not any(matrix in s for s in summary.values()):
            continue
        better = "higher is better" if matrix == "success" else "lower is better"
        parts.append(f"\n**{matrix}** ({better} for ACC; positive BWT/FWT = better, positive forgetting = worse)\n")
        parts.append("| strategy | ACC | BWT | FWT | mean forgetting |")
        parts.append("|---|---|---|---|---|")
        for strategy, per in summary.items():
            st = per.get(matrix, {})
            parts.append(f"| {strategy} | " + " | ".join(_cell(st.get(k)) for k in SUMMARY_KEYS) + " |")
        parts += _differences(summary, matrix)
    return "\n".join(parts)


def _differences(summary: dict, matrix: str) -> list[str]:
    """Each strategy's ACC minus the first strategy's, against twice the standard error of that
    difference over seeds: which differences are larger than their spread."""
    names = list(summary)
    ref = summary[names[0]].get(matrix, {}).get("acc") if names else None
    lines = []
    for name in names[1:]:
        st = summary[name].get(matrix, {}).get("acc")
        if not ref or not st or ref.get("sem") is None or st.get("sem") is None:
            continue
        diff, two_se = st["mean"] - ref["mean"], 2 * float(np.hypot(st["sem"], ref["sem"]))
        verdict = "larger than" if abs(diff) > two_se else "within"
        lines.append(f"- ACC {name} - {names[0]}: {diff:+.3f}, 2 standard errors {two_se:.3f}: {verdict} its spread")
    return ["", *lines] if lines else []
