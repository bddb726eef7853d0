"""What cross-validation, a sweep's cross-validated trials and their reports share: fold runs, their best values, the
mean, spread and 95% interval over folds.

A leaf: it imports no other module of the cv, sweep or report layers, so each of them can import it at the top.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.rundir import RunDir

# Two-sided 95% quantiles of Student's t (0.975) for 1..30 degrees of freedom: k-fold with k <= 31 needs no scipy.
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile with `df` degrees of freedom (the half-width factor of a two-sided 95% interval)."""
    if df < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    if df <= len(T_975):
        return T_975[df - 1]
    from scipy.stats import t  # scikit-learn's dependency; only past the table

    return float(t.ppf(0.975, df))


def aggregate(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the 95% confidence interval of the mean (Student's t over the folds)."""
    n = len(values)
    mean = sum(values) / n
    out: dict[str, Any] = {"n": n, "mean": mean, "std": None, "ci95": None, "values": values}
    if n >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile_975(n - 1) * std / math.sqrt(n)
        out.update(std=std, ci95=[mean - half, mean + half])
    return out


def fold_runs(trial_uri: str, folds: int) -> list[str]:
    """The fold runs of a trial scored by cross-validation: `<sweep>/<trial id>/fold-<i>`."""
    return [f"{trial_uri}/fold-{i}" for i in range(folds)]


def fold_metrics(run: RunDir) -> dict[str, dict[str, Any]]:
    """Each validation metric of a fold run: its best value over the run's validations (metrics.jsonl) and the step it came at."""
    best: dict[str, dict[str, Any]] = {}
    for entry in run.read_metrics():
        if entry.get("split") != "val":
            continue
        for key, value in entry.items():
            mode = metric_mode(key)
            if not key.startswith("val_") or not is_number(value) or mode is None:
                continue
            held = best.get(key)
            if held is None or (value > held["best"] if mode == "max" else value < held["best"]):
                best[key] = {"best": float(value), "step": entry.get("step"), "epoch": entry.get("epoch")}
    return best


def spread_text(row: dict[str, Any]) -> str:
    """A cross-validated trial's spread over its folds: `± std [95% CI]`; empty for a trial of one split."""
    if not isinstance(row.get("metric_std"), (int, float)):
        return ""
    low, high = row.get("metric_ci95") or (None, None)
    interval = f" [{low:.4f}, {high:.4f}]" if isinstance(low, (int, float)) else ""
    return f"± {row['metric_std']:.4f}{interval}"


def metric_mode(metric: str) -> str | None:
    """Whether a metric is better high (max) or low (min); None for a metric with no direction (a user's)."""
    from orchestrator.metrics import default_mode  # metrics imports torch: not while a cv file is only checked

    try:
        return default_mode(metric)
    except ValueError:
        return None


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
