"""The spec's forgetting analysis printed after every multi-task validation.

Absolute mode keeps the spec's rule (loss < 0.7 "Well Retained", < 1.0
"Slight Degradation", else "Significant Forgetting"; thresholds configurable).
Those thresholds were set for an older LeRobot whose loss also averaged the
padded dims, so relative mode judges each earlier task by its loss now divided
by its loss at the end of its own stage (e.g. <= 1.25x retained, <= 2x slight).
"""

from __future__ import annotations

import math

LABELS = ("Well Retained", "Slight Degradation", "Significant Forgetting")


def classify_retention(loss: float, thresholds=(0.7, 1.0), *, mode: str = "absolute", reference: float | None = None) -> str:
    if loss is None or not math.isfinite(loss):
        return "n/a"
    if mode == "relative":
        if reference is None or not math.isfinite(reference) or reference <= 0:
            return "n/a"
        value = loss / reference
        return LABELS[0] if value <= thresholds[0] else LABELS[1] if value <= thresholds[1] else LABELS[2]
    return LABELS[0] if loss < thresholds[0] else LABELS[1] if loss < thresholds[1] else LABELS[2]


def format_validation_table(stage: int, epoch: int, losses: dict[int, float], names: dict[int, str], current_task: int,
                            thresholds, *, mode: str = "absolute", reference_losses: dict[int, float] | None = None) -> str:
    reference_losses = reference_losses or {}
    width = max(len(n) for n in names.values()) + 2
    lines = [f"stage {stage}, epoch {epoch}: multi-task validation (held-out episodes)",
             f"  {'task':<{width}}{'loss':>9}  retention"]
    for tid in sorted(losses):
        loss = losses[tid]
        if tid == current_task:
            verdict = "current task"
        else:
            ref = reference_losses.get(tid)
            verdict = classify_retention(loss, thresholds, mode=mode, reference=ref)
            if mode == "relative" and ref is not None:
                verdict += f" ({loss / ref:.2f}x its end-of-stage loss {ref:.4f})"
        lines.append(f"  {tid}. {names[tid]:<{width - 3}}{loss:>9.4f}  {verdict}")
    earlier = {t: l for t, l in losses.items() if t != current_task}
    mean = sum(losses.values()) / len(losses)
    summary = f"  mean loss {mean:.4f}"
    if earlier:
        if mode == "relative" and any(t in reference_losses for t in earlier):
            worst = max((t for t in earlier if t in reference_losses), key=lambda t: earlier[t] / reference_losses[t])
        else:
            worst = max(earlier, key=earlier.get)
        summary += f"; most degraded earlier task: {names[worst]}"
    lines.append(summary)
    return "\n".join(lines)
