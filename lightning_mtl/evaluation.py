"""Comparing a multi-task model with its single-task twins: Δm%, mean ± std over seeds, text tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Scores = Mapping[str, Mapping[str, float]]  # task -> metric -> value


def delta_m(mtl: Scores, stl: Scores, higher_is_better: Mapping[str, Mapping[str, bool]]) -> dict[str, float]:
    """Δm% of ``mtl`` against ``stl``, positive when the multi-task model is better.

    ``higher_is_better[task][metric]`` lists the metrics compared (and their direction). Returns both
    common definitions: ``per_task_mean`` (LibMTL: the mean over tasks of each task's mean relative
    change over its metrics) and ``flat_mean`` (Nash-MTL / FAMO: the mean over all metrics; they report
    it with the opposite sign).

    Example:
        >>> mtl = {"a": {"acc": 0.9}, "b": {"mae": 1.0, "r2": 0.5}}
        >>> stl = {"a": {"acc": 0.9}, "b": {"mae": 2.0, "r2": 0.5}}
        >>> delta_m(mtl, stl, {"a": {"acc": True}, "b": {"mae": False, "r2": True}})
        {'per_task_mean': 12.5, 'flat_mean': 16.666666666666668}
    """
    per_task: list[float] = []
    flat: list[float] = []
    for task, metrics in higher_is_better.items():
        if task not in mtl or task not in stl:
            raise KeyError(
                f"delta_m: task {task!r} is missing from the {'mtl' if task not in mtl else 'stl'} scores."
            )
        changes = []
        for metric, higher in metrics.items():
            ours, base = float(mtl[task][metric]), float(stl[task][metric])
            if base == 0:
                raise ValueError(
                    f"delta_m: the single-task {task}/{metric} is 0; a relative change is undefined."
                )
            changes.append((1 if higher else -1) * (ours - base) / abs(base) * 100)
        per_task.append(sum(changes) / len(changes))
        flat += changes
    return {"per_task_mean": sum(per_task) / len(per_task), "flat_mean": sum(flat) / len(flat)}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value).

    Example:
        >>> mean_std([1.0, 2.0, 3.0])
        {'mean': 2.0, 'std': 1.0}
    """
    if not values:
        raise ValueError("mean_std: no values.")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": float(mean), "std": math.sqrt(var)}


def per_task(metrics: Mapping[str, Any], stage: str) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from logged ``<stage>/<task>/<metric>`` keys (e.g. ``trainer.test``'s).

    Example:
        >>> per_task({"test/a/accuracy": 0.5, "test/a/loss": 1.0, "val/a/accuracy": 0.4}, "test")
        {'a': {'accuracy': 0.5, 'loss': 1.0}}
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == stage:
            out.setdefault(parts[1], {})[parts[2]] = float(value)
    return out


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first row is the header, columns padded to their widest cell.

    Example:
        >>> print(format_table([["task", "acc"], ["a", "0.9"]]))
        task | acc
        -----+----
        a    | 0.9
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def delta_m_line(delta: Mapping[str, Mapping[str, float]]) -> str:
    """One sentence with both Δm% definitions, given ``{definition: mean_std(...)}`` over seeds."""
    a, b = delta["per_task_mean"], delta["flat_mean"]
    return (
        f"Δm% multi-task vs single-task (+ = multi-task better): {a['mean']:+.2f} ± {a['std']:.2f} "
        f"(LibMTL: mean over tasks of the per-task mean); {b['mean']:+.2f} ± {b['std']:.2f} "
        "(flat mean over metrics)"
    )
