"""The report of a cross-validation: every fold's validation curve on one plot per metric, a strip plot of the folds'
best values per metric with their mean and 95% confidence interval, the table of cv.json.
"""

from __future__ import annotations

from typing import Any

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
    num,
)
from orchestrator.report.read import CV_RECORD, CvData, _finite, _metric_values
from orchestrator.report.settings import applied_settings
from orchestrator.storage import redact

WIDE = (626, 386)


def _curves_figure(cv: CvData, metric: str) -> str | None:
    """One metric of every fold by step, each fold's best validation ringed."""
    ax = charts.Axes(title=f"{metric} of every fold", xlabel="step", ylabel=metric, legend_loc="best", legend_cols=2)
    drawn = 0
    for i, fold in enumerate(cv.folds):
        run = fold.get("run")
        values = _metric_values(run, metric) if run else []
        if not values:
            continue
        color = PALETTE[i % len(PALETTE)]
        ax.line([s for s, _ in values], [v for _, v in values], color, f"fold {fold['fold']}", marker="o", size=2)
        best = (fold.get("metrics") or {}).get(metric)
        if best and _finite(best.get("best")) and best.get("step") is not None:
            ax.points([best["step"]], [best["best"]], color, marker="ring", size=7)
        drawn += 1
    if not drawn:
        return None
    return _embed(
        charts.figure([ax], *WIDE),
        f"{metric} of every fold by step, its best validation ringed: curves far apart mean the score depends on the split.",
    )


def _strip_panel(metric: str, agg: dict[str, Any], folds: list[dict[str, Any]], values_of) -> charts.Axes:
    """The folds' values of one metric as points, beside their mean and its 95% confidence interval."""
    shown = [(f["fold"], values_of(f)) for f in folds]
    shown = [(i, v) for i, v in shown if _finite(v)]
    ax = charts.Axes(
        title=metric,
        ylabel=metric,
        xlim=(-0.6, 1.6),
        xticks=[(0.0, "folds"), (1.0, "mean, 95% CI")],
        grid=True,
        legend_loc="best",
        legend_cols=2 if len(shown) > 5 else 1,
    )
    # Spread the points a little sideways, in fold order, so that equal values stay visible.
    width = 0.5 / max(1, len(shown) - 1) if len(shown) > 1 else 0.0
    xs = [-0.25 + k * width for k in range(len(shown))]
    for k, (i, v) in enumerate(shown):
        ax.points([xs[k]], [v], PALETTE[i % len(PALETTE)], f"fold {i}", size=5)  # the curves' colour of the fold
    ax.points([1.0], [agg["mean"]], STOP_COLOR, "mean, 95% CI", marker="star", size=6)
    if agg.get("ci95"):
        low, high = agg["ci95"]
        ax.line([1.0, 1.0], [low, high], STOP_COLOR, width=2)
        ax.line([0.9, 1.1], [low, low], STOP_COLOR, width=2)
        ax.line([0.9, 1.1], [high, high], STOP_COLOR, width=2)
    return ax


def _strip_figures(cv: CvData) -> list[str]:
    """A strip plot per metric: each fold's best validation value (test value for test_*), the mean and its 95% CI."""
    panels = [
        _strip_panel(name, agg, cv.folds, lambda f, name=name: ((f.get("metrics") or {}).get(name) or {}).get("best"))
        for name, agg in cv.metrics.items()
    ]
    panels += [
        _strip_panel(name, agg, cv.folds, lambda f, name=name: (f.get("test") or {}).get(name))
        for name, agg in cv.test.items()
    ]
    return [
        _embed(
            charts.figure([ax], 460, 330),
            f"{ax.title} of each fold as a point ({'its best checkpoint on the test split' if ax.title.startswith('test_') else 'its best validation'}), "
            "in fold order, beside their mean (star) and its 95% confidence interval (Student's t over the folds).",
        )
        for ax in panels
    ]


def _summary_rows(cv: CvData) -> list[list[Any]]:
    rows = []
    for section, pick in ((cv.metrics, "val"), (cv.test, "test")):
        for name, agg in section.items():
            cells = []
            for f in cv.folds:
                if pick == "val":
                    got = (f.get("metrics") or {}).get(name)
                    cells.append(f"{num(got['best'])} @ step {got['step']}" if got else None)
                else:
                    cells.append((f.get("test") or {}).get(name))
            ci = agg.get("ci95")
            rows.append([name, *cells, agg["mean"], agg.get("std"), f"[{num(ci[0])}, {num(ci[1])}]" if ci else None])
    return rows


def _fold_rows(cv: CvData, link_base: str | None) -> list[list[Any]]:
    """A row per fold: its number, status, steps, run (linked to its report) and newest checkpoint."""
    rows = []
    for f in cv.folds:
        run, where = f.get("run"), f.get("run_uri")
        if run is not None and "report.html" in run.files and where == f"{cv.uri}/fold-{f['fold']}":
            where = Link((f"fold-{f['fold']}", "report.html"), str(where), link_base)
        rows.append([f["fold"], Status(f.get("status")), f.get("steps"), where, f.get("checkpoint")])
    return rows


def render_cv(cv: CvData, link_base: str | None = None) -> str:
    """The HTML report of a cross-validation: the aggregate table, the folds, curves per metric, strip plots.

    Links to its records and the folds' reports are relative, or under `link_base` for a page written elsewhere.
    """
    record = cv.record
    folds = cv.folds
    summary = _table(_summary_rows(cv), ["metric", *(f"fold {f['fold']}" for f in folds), "mean", "std", "95% CI"])
    fold_rows = _fold_rows(cv, link_base)
    figures = [_curves_figure(cv, name) for name in cv.metrics] + _strip_figures(cv)
    figures = [f for f in figures if f]
    watched = cv.metrics.get(record.get("metric") or "") or {}
    facts = [
        ("status", record.get("status")),
        ("folds", record.get("folds_count")),
        (f"mean {record.get('metric')}", watched.get("mean")),
        ("std", watched.get("std")),
        ("steps", record.get("total_steps")),
        ("wall", duration(record.get("wall_s"))),
    ]
    body = [
        _facts(facts),
        _files([Link((n,), n, link_base) for n in (CV_RECORD, "sweep.json") if n in cv.files]),
        "<h2>Cross-validation</h2>",
        "<p class=\"note\">val_*: each fold's best validation value @ its step; test_*: each fold's best checkpoint "
        "evaluated on the test split, which no fold validates on. 95% CI: Student's t over the folds.</p>",
        summary,
        "<h2>Figures</h2>",
        '<div class="grid">' + "".join(figures) + "</div>"
        if figures
        else '<p class="note">No fold has validated yet.</p>',
        "<h2>Folds</h2>",
        _table(fold_rows, ["fold", "status", "steps", "run", "newest checkpoint"]),
    ]
    refit = record.get("refit")
    if refit:
        body.append("<h2>Refit on all non-test data</h2>")
        body.append(
            _table(
                [["status", Status(refit.get("status"))], ["epochs (the folds' mean best)", refit.get("epochs")]]
                + [["steps", refit.get("steps")], ["checkpoint", refit.get("checkpoint")]]
                + [[k, v] for k, v in (refit.get("test") or {}).items()],
                ["refit", "value"],
            )
        )
    job = (cv.sweep_record or {}).get("job")
    if job:
        body.append("<h2>Job</h2>" + _kv_table(applied_settings(job)))
    subtitle = (
        f"{_status(record.get('status'))} &middot; <code>{esc(redact(cv.uri))}</code> &middot; "
        f"{esc(str(record.get('folds_count')))} folds &middot; record <code>{esc(CV_RECORD)}</code>"
    )
    return _page(f"Cross-validation {record.get('cv') or cv.uri.rsplit('/', 1)[-1]}", subtitle, "".join(body))
