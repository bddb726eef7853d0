"""The report of a sweep: its metric against each parameter, every trial's curve (the ones the scheduler stopped marked),
parallel coordinates and the table of trials.
"""

from __future__ import annotations

import json
import math
from typing import Any

from orchestrator.report import charts
from orchestrator.report.html import PALETTE, STOP_COLOR, Status, _embed, _facts, _kv_table, _page, _status, _table, esc
from orchestrator.report.read import SweepData, _finite, _metric_values
from orchestrator.storage import redact

LOG_PARAMS = ("loguniform", "qloguniform")


def _is_log_param(spec: dict[str, Any] | None, values: list[Any]) -> bool:
    """Log-scaled when the sweep samples it on a log scale, or its positive values span two decades or more."""
    if spec and spec.get("type") in LOG_PARAMS:
        return True
    numbers = [v for v in values if _finite(v)]
    return len(numbers) == len(values) and bool(numbers) and min(numbers) > 0 and max(numbers) / min(numbers) >= 100


def _param_axis(values: list[Any], log: bool):
    """(positions in [0, 1], tick positions, tick labels) of a parameter's values on a parallel-coordinates axis."""
    numeric = all(_finite(v) for v in values)
    if numeric:
        xs = [math.log10(v) if log else float(v) for v in values]
        low, high = min(xs), max(xs)
        span = (high - low) or 1.0
        pos = [(x - low) / span for x in xs]
        labels = sorted(set(values))
        ticks = [((math.log10(v) if log else v) - low) / span for v in labels]
        if len(labels) > 6:
            labels, ticks = [min(values), max(values)], [0.0, 1.0]
        return pos, ticks, [f"{v:.3g}" for v in labels]
    cats = list(dict.fromkeys(json.dumps(v) for v in values))
    step = 1.0 / max(1, len(cats) - 1)
    pos = [cats.index(json.dumps(v)) * step if len(cats) > 1 else 0.5 for v in values]
    return (
        pos,
        [i * step if len(cats) > 1 else 0.5 for i in range(len(cats))],
        [json.loads(c) if len(c) < 14 else c[:12] for c in cats],
    )


def _stopped_by_scheduler(sweep: SweepData, trial: dict[str, Any], last_step: int, longest: int) -> bool:
    """Whether the scheduler ended a trial: its status says so, or under ASHA it ended short of the others without early stopping."""
    if trial.get("status") == "stopped":
        return True
    run = trial.get("run")
    asha = (sweep.spec.get("scheduler") or {}).get("name") == "asha"
    return (
        asha
        and trial.get("status") != "error"
        and last_step < longest
        and not (run and run.summary.get("stopped_early"))
    )


def _param_figure(
    param: str, rows: list[dict[str, Any]], spec: dict[str, Any] | None, metric: str, best: dict[str, Any] | None
) -> str:
    """Each trial's best metric against one parameter: a log axis where the sweep samples it on one, categories as ticks."""
    values = [t["config"][param] for t in rows]
    numeric = all(_finite(v) for v in values)
    log = numeric and _is_log_param(spec, values)
    positions, ticks, labels = _param_axis(values, False)
    xs = values if numeric else positions
    ax = charts.Axes(
        title=f"{metric} against {param}",
        xlabel=param + (" (log scale)" if log else ""),
        ylabel=f"best {metric}",
        xlog=log,
        xticks=None if numeric else [(t, str(label)) for t, label in zip(ticks, labels, strict=False)],
        legend_loc="best",
    )
    ax.points(xs, [t["best_metric"] for t in rows], PALETTE[0], size=4.5)
    at = next((i for i, t in enumerate(rows) if t is best), None)
    if at is not None:
        ax.points([xs[at]], [best["best_metric"]], STOP_COLOR, f"best ({best['trial_id']})", marker="ring", size=8)
    caption = f"Each trial's best {metric} against {param}" + (
        " on a log axis: equal distances are equal factors." if log else "."
    )
    return _embed(charts.figure([ax], 515, 350), caption)


def _trials_figure(sweep: SweepData) -> str | None:
    """The metric of every trial by step, an X where the scheduler stopped one."""
    metric = sweep.metric
    curves = [(t, _metric_values(t["run"], metric)) for t in sweep.trials if t.get("run")]
    curves = [(t, v) for t, v in curves if v]
    if not curves:
        return None
    longest = max(v[-1][0] for _, v in curves)
    ax = charts.Axes(title=f"{metric} of every trial", xlabel="step", ylabel=metric, legend_loc="best", legend_cols=2)
    stopped = []
    for i, (t, values) in enumerate(curves):
        label = str(t["trial_id"]) if len(curves) <= 12 else None
        ax.line(
            [s for s, _ in values],
            [v for _, v in values],
            PALETTE[i % len(PALETTE)],
            label,
            width=1.3,
            marker="o",
            size=2,
        )
        if _stopped_by_scheduler(sweep, t, values[-1][0], longest):
            stopped.append(values[-1])
    if stopped:
        ax.points(
            [s for s, _ in stopped], [v for _, v in stopped], STOP_COLOR, "stopped by the scheduler", marker="x", size=7
        )
    return _embed(
        charts.figure([ax], 626, 386),
        f"{metric} of every trial by step; an X marks where the scheduler stopped a trial.",
    )


def _parallel_figure(
    sweep: SweepData, params: list[str], scored: list[dict[str, Any]], best: dict[str, Any] | None
) -> str:
    """Every scored trial as a line through one vertical axis per parameter and one for its best metric."""
    metric, spec = sweep.metric, sweep.spec.get("parameters") or {}
    columns = []
    for param in params:
        values = [t["config"].get(param) for t in scored]
        log = _is_log_param(spec.get(param), [v for v in values if v is not None])
        columns.append(
            (param + (" (log)" if log and all(_finite(v) for v in values) else ""), *_param_axis(values, log))
        )
    metric_values = [t["best_metric"] for t in scored]
    columns.append((metric, *_param_axis(metric_values, False)))
    low, high = min(metric_values), max(metric_values)
    cmap = charts.VIRIDIS.reversed() if sweep.mode == "min" else charts.VIRIDIS  # the best trials are yellow either way
    ax = charts.Axes(
        title="Parallel coordinates of the trials",
        xlim=(-0.2, len(columns) - 0.6),
        ylim=(-0.05, 1.05),
        grid=False,
        xticks=[(float(i), c[0]) for i, c in enumerate(columns)],
        yticks=[],
        colorbar=(cmap, low, high, f"best {metric}"),
    )
    order = sorted(range(len(scored)), key=lambda r: scored[r] is best)  # the best trial's line on top
    for row in order:
        color = cmap((metric_values[row] - low) / ((high - low) or 1.0))
        ax.line(range(len(columns)), [col[1][row] for col in columns], color, width=2.6 if scored[row] is best else 1.4)
    for i, (_, _, ticks, labels) in enumerate(columns):
        ax.vline(float(i), "#444", width=0.8)
        ax.text([i] * len(ticks), ticks, [str(label) for label in labels])
    return _embed(
        charts.figure([ax], max(590, 130 * len(columns) + 120), 386),
        f"Parallel coordinates: every trial as a line through its settings and its best {metric} (colour: the metric; thick: the best trial).",
    )


def render_sweep(sweep: SweepData) -> str:
    """The HTML report of a sweep: metric against each parameter, every trial's curve, parallel coordinates, the table."""
    metric, mode = sweep.metric, sweep.mode
    params_spec = sweep.spec.get("parameters") or {}
    params = list(dict.fromkeys([*params_spec, *(k for t in sweep.trials for k in t.get("config", {}))]))
    scored = [t for t in sweep.trials if _finite(t.get("best_metric"))]
    best = (max if mode == "max" else min)(scored, key=lambda t: t["best_metric"]) if scored else None
    figures = []
    for param in params:
        rows = [t for t in scored if param in t["config"]]
        if rows:
            figures.append(_param_figure(param, rows, params_spec.get(param), metric, best))
    figures.append(_trials_figure(sweep))
    if scored and params:
        figures.append(_parallel_figure(sweep, params, scored, best))
    figures = [f for f in figures if f]

    record = sweep.record
    rank = sorted(
        sweep.trials,
        key=lambda t: (
            (0, -t["best_metric"] if mode == "max" else t["best_metric"]) if _finite(t.get("best_metric")) else (1, 0)
        ),
    )
    from orchestrator.sweep.export import spread_text  # the end-of-sweep table's words for it, not a second format

    folds = (record.get("spec") or {}).get("cv_folds")
    rows = []
    for i, t in enumerate(rank, 1):
        scores = [t.get("metric"), t.get("best_metric")]
        if folds:  # scored by cross-validation: the folds' mean and, next to it, its spread
            scores = [t.get("best_metric"), spread_text(t) or None]
        rows.append(
            [i, t["trial_id"], Status(t.get("status")), *(t["config"].get(p) for p in params), *scores, t.get("steps")]
        )
    score_heads = [f"{metric} (last)", f"{metric} (best)"]
    if folds:
        score_heads = [f"{metric} ({folds}-fold mean)", "std [95% CI]"]
    table = _table(rows, ["#", "trial", "status", *params, *score_heads, "steps"])
    facts = [
        ("status", record.get("status")),
        ("trials", len(sweep.trials)),
        (f"best {metric}", best["best_metric"] if best else None),
        ("best trial", best["trial_id"] if best else None),
        ("wall (s)", (record.get("result") or {}).get("wall_s")),
    ]
    body = [_facts(facts), "<h2>Trials</h2>", table]
    body.append("<h2>Figures</h2>")
    body.append(
        '<div class="grid">' + "".join(figures) + "</div>"
        if figures
        else '<p class="note">No trial has reported the metric yet.</p>'
    )
    body.append("<h2>Search</h2>" + _kv_table(sweep.spec))
    body.append("<h2>Base job</h2>" + _kv_table(record.get("job") or {}))
    subtitle = f"{_status(record.get('status'))} &middot; <code>{esc(redact(sweep.uri))}</code> &middot; metric {esc(metric)} ({esc(mode)}) &middot; started {esc(str(record.get('started')))}"
    return _page(f"Sweep {record.get('sweep') or sweep.uri.rsplit('/', 1)[-1]}", subtitle, "".join(body))
