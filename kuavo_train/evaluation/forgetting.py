"""The spec's forgetting analysis, printed after every multi-task validation (spec section 4).

Absolute mode keeps the spec's rule: an earlier task's validation loss < 0.7 is
"Well Retained", < 1.0 "Slight Degradation", otherwise "Significant
Forgetting" (thresholds configurable). The spec's own defect list says those
numbers were set for an older LeRobot whose loss also averaged the padded
action dims, so they do not transfer across versions. Relative mode therefore
judges each earlier task by the ratio of its loss now to its loss at the end
of its own stage (e.g. ratio <= 1.25 good, <= 2.0 moderate), which is scale
free. `classify_retention` returns short codes; the table prints the spec's
wording next to them.
"""

from __future__ import annotations

import math
from collections.abc import Collection

GOOD, MODERATE, FORGETTING, UNKNOWN = "good", "moderate", "forgetting", "n/a"
SPEC_LABELS = {GOOD: "Well Retained", MODERATE: "Slight Degradation", FORGETTING: "Significant Forgetting",
               UNKNOWN: "n/a"}
SPEC_THRESHOLDS = (0.7, 1.0)


def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def retention_ratio(loss, reference) -> float | None:
    """loss / reference, or None when either is missing or the reference is not positive."""
    if not (_finite(loss) and _finite(reference)) or reference <= 0:
        return None
    return float(loss) / float(reference)


def classify_retention(loss, thresholds=SPEC_THRESHOLDS, *, mode: str = "absolute", reference=None) -> str:
    """"good" / "moderate" / "forgetting" for an earlier task's loss, "n/a" when it cannot be judged.

    absolute: loss < thresholds[0] good, < thresholds[1] moderate (the spec's strict "<");
    relative: r = loss / reference, r <= thresholds[0] good, <= thresholds[1] moderate;
    without a usable reference (e.g. the task's stage recorded no final loss) the answer is "n/a".
    """
    lo, hi = thresholds
    if not _finite(loss):
        return UNKNOWN
    if mode == "relative":
        r = retention_ratio(loss, reference)
        if r is None:
            return UNKNOWN
        return GOOD if r <= lo else MODERATE if r <= hi else FORGETTING
    if mode != "absolute":
        raise ValueError(f"mode must be 'absolute' or 'relative', got {mode!r}")
    return GOOD if loss < lo else MODERATE if loss < hi else FORGETTING


def _fmt_loss(x) -> str:
    return f"{x:.4f}" if _finite(x) else "n/a"


def format_validation_table(stage: int | str, epoch: int, losses: dict[int, float], names: dict[int, str],
                            current_task: int | Collection[int], thresholds, *, mode: str = "absolute",
                            reference_losses: dict[int, float] | None = None) -> str:
    """An aligned plain-text table: one row per task (loss, current / retention verdict), then a summary line.
    `stage`: its number, or how the log names it; `current_task`: the task it learns, or the tasks (the
    joint baseline learns them all, so none is retained from earlier)."""
    refs = reference_losses or {}
    current = {current_task} if isinstance(current_task, int) else set(current_task)
    lo, hi = thresholds
    rule = (f"relative to end-of-own-stage loss: ratio <= {lo:g} good, <= {hi:g} moderate" if mode == "relative"
            else f"absolute: loss < {lo:g} good, < {hi:g} moderate")
    title = f"stage {stage}" if isinstance(stage, int) else stage
    header = f"{title}, epoch {epoch}: multi-task validation (held-out episodes; retention {rule})"
    label = {t: f"{t}. {names.get(t, f'task{t}')}" for t in losses}
    w = max([len("task"), *map(len, label.values())])
    lines = [header, f"  {'task':<{w}}  {'loss':>9}  retention",
             f"  {'-' * w}  {'-' * 9}  {'-' * 9}"]
    for t in sorted(losses):
        loss = losses[t]
        if t in current:
            verdict = "current task"
        elif t > max(current):
            verdict = "not trained yet"
        else:
            ref = refs.get(t)
            code = classify_retention(loss, thresholds, mode=mode, reference=ref)
            if code != UNKNOWN:
                verdict = f"{code} ({SPEC_LABELS[code]})"
            else:
                verdict = "n/a (no reference loss)" if mode == "relative" and _finite(loss) else code
            r = retention_ratio(loss, ref)
            if mode == "relative" and r is not None:
                verdict += f", {r:.2f}x its end-of-stage loss {ref:.4f}"
        lines.append(f"  {label[t]:<{w}}  {_fmt_loss(loss):>9}  {verdict}")
    valid = [v for v in losses.values() if _finite(v)]
    summary = f"  mean loss over {len(valid)} task(s): {_fmt_loss(sum(valid) / len(valid)) if valid else 'n/a'}"
    earlier = {t: v for t, v in losses.items() if t < min(current) and _finite(v)}
    if earlier:
        # "worst" is judged the same way as the rows: by ratio in relative mode, by raw loss otherwise
        ratios = {t: retention_ratio(v, refs.get(t)) for t, v in earlier.items()}
        ratios = {t: r for t, r in ratios.items() if r is not None}
        if mode == "relative" and ratios:
            worst = max(ratios, key=ratios.get)
            summary += f"; worst earlier task: {label[worst]} ({ratios[worst]:.2f}x)"
        else:
            worst = max(earlier, key=earlier.get)
            summary += f"; worst earlier task: {label[worst]} (loss {earlier[worst]:.4f})"
    lines.append(summary)
    return "\n".join(lines)
