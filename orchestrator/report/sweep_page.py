"""The report of a sweep: its metric against each parameter, every trial's curve (the best ones in colours of their own,
the ones the scheduler stopped marked), parallel coordinates and the table of trials.

Trials are named by their settings (`lr=0.003 hidden=64`), not by Tune's ids, wherever a person reads them in a figure.
"""

from __future__ import annotations

import json
import math
from typing import Any

from orchestrator.aggregate import spread_text  # the end-of-sweep table's words for it, not a second format
from orchestrator.report import charts
from orchestrator.report.html import (
    PALETTE,
    STOP_COLOR,
    Link,
    Status,
    _embed,
    _facts,
    _files,
    _kv_table,
    _page,
    _status,
    _table,
    duration,
    esc,
    took,
    when,
)
from orchestrator.report.read import SweepData, _finite, _metric_values
from orchestrator.report.settings import _pruned
from orchestrator.storage import redact

LOG_PARAMS = ("loguniform", "qloguniform")
# The best trials' curves in colours far apart (no red: it marks stopped trials and the best one); the rest in grey.
TRIAL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
OTHER_TRIALS_COLOR = "#b8b8b8"


def trial_label(config: dict[str, Any], params: list[str]) -> str:
    """A trial as a person tells it apart: its settings, each under the last part of its name where that is unique."""
    tails = [p.rsplit(".", 1)[-1] for p in params]
    names = {p: (t if tails.count(t) == 1 else p) for p, t in zip(params, tails, strict=True)}
    shown = [f"{names[p]}={_value_text(config[p])}" for p in params if p in config]
    return " ".join(shown) or "no settings"


def _value_text(value: Any) -> str:
    # Four significant digits as in the tables, less trailing zeros: a name, not a column (lr=0.0001, not 0.0001000).
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _ranked(sweep: SweepData) -> list[dict[str, Any]]:
    """The trials, best first by their best value of the metric; those without one last."""
    sign = -1 if sweep.mode == "max" else 1
    return sorted(
        sweep.trials,
        key=lambda t: (0, sign * t["best_metric"]) if _finite(t.get("best_metric")) else (1, 0),
    )


def _scheduler(sweep: SweepData) -> str:
    return (sweep.spec.get("scheduler") or {}).get("name") or "fifo"


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
    """Whether the scheduler ended a trial: its status says so, or under ASHA it ended short of the others without early stopping.

    A FIFO scheduler stops no trial: there a trial that ended short failed or stopped early by itself.
    """
    if _scheduler(sweep) == "fifo":
        return False
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
        ax.points([xs[at]], [best["best_metric"]], STOP_COLOR, "best trial", marker="ring", size=8)
    caption = f"Each trial's best {metric} against {param}" + (
        " on a log axis: equal distances are equal factors." if log else "."
    )
    return _embed(charts.figure([ax], 515, 350), caption)


def _trials_figure(sweep: SweepData, params: list[str]) -> str | None:
    """The metric of every trial by step: the best few in colours of their own, named by their settings, the others in
    grey; an X where the scheduler stopped one."""
    metric = sweep.metric
    curves = [(t, _metric_values(t["run"], metric)) for t in _ranked(sweep) if t.get("run")]
    curves = [(t, v) for t, v in curves if v]
    if not curves:
        return None
    longest = max(v[-1][0] for _, v in curves)
    named, others = curves[: len(TRIAL_COLORS)], curves[len(TRIAL_COLORS) :]
    ax = charts.Axes(title=f"{metric} of every trial", xlabel="step", ylabel=metric, legend_loc="best")
    stopped = []
    for k, (_, values) in enumerate(others):  # first, so that the named ones are drawn over them
        label = (f"{len(others)} other trials" if len(others) > 1 else "1 other trial") if k == 0 else None
        ax.line([s for s, _ in values], [v for _, v in values], OTHER_TRIALS_COLOR, label, width=1.0)
    for rank, (t, values) in enumerate(named, 1):
        label = f"{rank}. {trial_label(t['config'], params)}"
        ax.line(
            [s for s, _ in values],
            [v for _, v in values],
            TRIAL_COLORS[rank - 1],
            label,
            width=1.6,
            marker="o",
            size=2.2,
        )
    for t, values in curves:
        if _stopped_by_scheduler(sweep, t, values[-1][0], longest):
            stopped.append(values[-1])
    if stopped:
        ax.points(
            [s for s, _ in stopped], [v for _, v in stopped], STOP_COLOR, "stopped by the scheduler", marker="x", size=7
        )
    caption = f"{metric} of every trial by step, the best {len(named)} named by their settings"
    caption += f" (the other {len(others)} in grey)" if others else ""
    caption += "; an X marks where the scheduler stopped a trial." if stopped else "."
    return _embed(charts.figure([ax], 626, 386), caption)


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


def _trial_rows(sweep: SweepData, params: list[str], link_base: str | None) -> tuple[list[list[Any]], list[str]]:
    """The table of trials, best first: rank, trial (linked to its report), status, settings, scores, steps."""
    metric = sweep.metric
    folds = (sweep.record.get("spec") or {}).get("cv_folds")
    rows = []
    for i, t in enumerate(_ranked(sweep), 1):
        scores = [t.get("metric"), t.get("best_metric")]
        if folds:  # scored by cross-validation: the folds' mean and, next to it, its spread
            scores = [t.get("best_metric"), spread_text(t) or None]
        run = t.get("run")
        name = t["trial_id"]
        cell = Link((name, "report.html"), name, link_base) if run is not None and "report.html" in run.files else name
        rows.append([i, cell, Status(t.get("status")), *(t["config"].get(p) for p in params), *scores, t.get("steps")])
    score_heads = [f"{metric} (last)", f"{metric} (best)"]
    if folds:
        score_heads = [f"{metric} ({folds}-fold mean)", "std [95% CI]"]
    return rows, ["#", "trial", "status", *params, *score_heads, "steps"]


def _sweep_subtitle(sweep: SweepData) -> str:
    record = sweep.record
    parts = [
        _status(record.get("status")),
        f"<code>{esc(redact(sweep.uri))}</code>",
        f"metric {esc(sweep.metric)} ({esc(sweep.mode)})",
    ]
    if record.get("started"):
        parts.append(f"started {esc(when(record['started']))}")
    if record.get("ended"):
        length = took(record, (record.get("result") or {}).get("wall_s"))
        parts.append(f"ended {esc(when(record['ended']))}" + (f" ({esc(length)})" if length else ""))
    return " &middot; ".join(parts)


# A sweep's own files that its page links to, when they are there.
SWEEP_FILES = ("sweep.json", "best.yaml")


def render_sweep(sweep: SweepData, link_base: str | None = None) -> str:
    """The HTML report of a sweep: metric against each parameter, every trial's curve, parallel coordinates, the table.

    Links to the sweep's files and its trials' reports are relative, or under `link_base` for a page written elsewhere.
    """
    metric = sweep.metric
    params_spec = sweep.spec.get("parameters") or {}
    params = list(dict.fromkeys([*params_spec, *(k for t in sweep.trials for k in t.get("config", {}))]))
    scored = [t for t in sweep.trials if _finite(t.get("best_metric"))]
    best = _ranked(sweep)[0] if scored else None
    figures = []
    for param in params:
        rows = [t for t in scored if param in t["config"]]
        if rows:
            figures.append(_param_figure(param, rows, params_spec.get(param), metric, best))
    figures.append(_trials_figure(sweep, params))
    if scored and params:
        figures.append(_parallel_figure(sweep, params, scored, best))
    figures = [f for f in figures if f]

    record = sweep.record
    rows, heads = _trial_rows(sweep, params, link_base)
    facts = [
        ("status", record.get("status")),
        ("trials", len(sweep.trials)),
        (f"best {metric}", best["best_metric"] if best else None),
        ("best trial", trial_label(best["config"], params) if best else None),
        ("wall", duration((record.get("result") or {}).get("wall_s"))),
    ]
    body = [_facts(facts), _files([Link((n,), n, link_base) for n in SWEEP_FILES if n in sweep.files])]
    body += ["<h2>Trials</h2>", _table(rows, heads), "<h2>Figures</h2>"]
    body.append(
        '<div class="grid">' + "".join(figures) + "</div>"
        if figures
        else '<p class="note">No trial has reported the metric yet.</p>'
    )
    body.append("<h2>Search</h2>" + _kv_table(_pruned(sweep.spec)))
    body.append("<h2>Base job</h2>" + _kv_table(_pruned(record.get("job") or {})))
    return _page(f"Sweep {record.get('sweep') or sweep.uri.rsplit('/', 1)[-1]}", _sweep_subtitle(sweep), "".join(body))
