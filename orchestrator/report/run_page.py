"""The report of one run: loss, learning rate, throughput and validation curves, and the figures of its test split
(confusion matrix, ROC and precision-recall curves, regression scatter and residuals), as SVG written by charts.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.report import charts
from orchestrator.report.curves import _thin_curve, average_precision, pr_points, roc_points, trapezoid_area
from orchestrator.report.html import (
    BEST_COLOR,
    PALETTE,
    STOP_COLOR,
    Link,
    _embed,
    _facts,
    _files,
    _fmt,
    _kv_table,
    _page,
    _status,
    _table,
    duration,
    esc,
    took,
    when,
)
from orchestrator.report.read import RunData, _finite, _metric_values
from orchestrator.report.settings import applied_settings
from orchestrator.storage import redact

# Per-class curves up to this many classes; beyond, one micro-averaged curve stays readable.
MAX_CLASS_CURVES = 10
# Figure sizes in SVG pixels; the page scales each to its grid cell.
WIDE, TALL = (590, 330), (515, 425)


def _mark_steps(ax: charts.Axes, best_step: int | None, stop_step: int | None) -> None:
    if best_step is not None:
        ax.vline(best_step, BEST_COLOR, f"best checkpoint (step {best_step})", dash="5,3")
    if stop_step is not None:
        ax.vline(stop_step, STOP_COLOR, f"early stop (step {stop_step})", dash="2,3", width=1.8)


def _series(entries: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(e["step"], float(e[key])) for e in entries if _finite(e.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _loss_figure(run: RunData, best_step: int | None, stop_step: int | None) -> str | None:
    train_x, train_y = _series(run.entries("train"), "loss")
    val_x, val_y = _series(run.entries("val"), "val_loss")
    if not train_x and not val_x:
        return None
    values = train_y + val_y
    log = all(v > 0 for v in values) and max(values) / max(min(values), 1e-12) > 30
    ax = charts.Axes(title="Training and validation loss", xlabel="step", ylabel="loss", ylog=log, legend_loc="best")
    if train_x:
        ax.line(train_x, train_y, PALETTE[0], "training loss")
    if val_x:
        ax.line(val_x, val_y, PALETTE[1], "validation loss", marker="o", size=2.6)
    _mark_steps(ax, best_step, stop_step)
    return _embed(
        charts.figure([ax], *WIDE),
        "Training and validation loss by step: validation above a falling training loss is overfitting; both high is underfitting.",
    )


def _line_figure(
    x: list,
    y: list,
    title: str,
    ylabel: str,
    caption: str,
    color: str = PALETTE[0],
    log: bool = False,
    best_step: int | None = None,
    stop_step: int | None = None,
    marker: str = "",
    test_point: tuple[int, float] | None = None,
) -> str | None:
    if not x:
        return None
    log = log and all(v > 0 for v in y) and max(y) / min(y) > 10  # a narrow range reads better on a linear axis
    legend = best_step is not None or stop_step is not None or test_point is not None
    ax = charts.Axes(title=title, xlabel="step", ylabel=ylabel, ylog=log, legend_loc="best" if legend else None)
    ax.line(x, y, color, "validation" if test_point else None, marker=marker, size=2.6)
    if test_point:
        ax.points(
            [test_point[0]],
            [test_point[1]],
            STOP_COLOR,
            f"test split (checkpoint of step {test_point[0]})",
            marker="star",
            size=8,
        )
    _mark_steps(ax, best_step, stop_step)
    return _embed(charts.figure([ax], *WIDE), caption)


def _confusion_figure(matrix: list[list[int]]) -> str:
    import numpy as np

    cm = np.asarray(matrix, dtype=float)
    n = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    texts = [[str(int(c)) if c and n <= 20 else "" for c in row] for row in cm]
    every = 1 if n <= 30 else max(1, n // 15)
    ticks = [(float(i), str(i)) for i in range(0, n, every)]
    ax = charts.Axes(
        title="Confusion matrix (test)",
        xlabel="predicted class",
        ylabel="true class",
        xlim=(-0.5, n - 0.5),
        ylim=(n - 0.5, -0.5),
        grid=False,
        square=True,
        xticks=ticks,
        yticks=ticks,
        colorbar=(charts.BLUES, 0.0, 1.0, "share of the true class"),
    )
    ax.cells(share.tolist(), charts.BLUES, texts)
    side = min(720.0, 240.0 + 28.0 * n)  # more classes, a larger image: its text shrinks less on the page
    return _embed(
        charts.figure([ax], side + 120, side),
        "Confusion matrix of the best checkpoint on the test split: counts, coloured by the share of each true class.",
    )


def _class_curves(test: dict[str, Any]) -> list[str]:
    """ROC and precision-recall curves, one-vs-rest per class (or micro-averaged past MAX_CLASS_CURVES classes)."""
    import numpy as np

    labels = np.asarray(test.get("labels") or [], dtype=int)
    scores = np.asarray(test.get("scores") or [], dtype=float)
    if labels.size == 0 or scores.ndim != 2 or scores.shape[0] != labels.size:
        return []
    present = [int(c) for c in np.unique(labels)]
    if len(present) < 2:
        return []
    if len(present) == 2:
        curves = [(f"class {present[1]}", labels == present[1], scores[:, present[1]])]
    elif len(present) <= MAX_CLASS_CURVES:
        curves = [(f"class {c}", labels == c, scores[:, c]) for c in present]
    else:
        onehot = np.zeros_like(scores, dtype=bool)
        onehot[np.arange(labels.size), labels] = True
        cols = np.asarray(present)
        curves = [("micro-average", onehot[:, cols].ravel(), scores[:, cols].ravel())]
    roc = charts.Axes(
        title="ROC curves (test)",
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.02),
        legend_loc="lower right",
    )
    pr = charts.Axes(
        title="Precision-recall curves (test)",
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        legend_loc="lower left",
    )
    roc.line([0, 1], [0, 1], "#999", dash="4,3", width=0.9)
    for i, (name, positive, score) in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        fpr, tpr = roc_points(positive, score)
        roc.line(*_thin_curve(fpr, tpr), color, f"{name} (AUC {trapezoid_area(fpr, tpr):.3f})", width=1.3)
        precision, recall = pr_points(positive, score)
        pr.line(
            *_thin_curve(recall, precision), color, f"{name} (AP {average_precision(precision, recall):.3f})", width=1.3
        )
    return [
        _embed(
            charts.figure([roc], *TALL),
            "ROC curves of the best checkpoint on the test split, one class against the rest.",
        ),
        _embed(
            charts.figure([pr], *TALL),
            "Precision-recall curves of the best checkpoint on the test split, one class against the rest.",
        ),
    ]


# Past this many examples the regression scatter shows an even sample (the caption says so): the file stays small.
MAX_SCATTER = 4000


def _regression_figures(test: dict[str, Any]) -> list[str]:
    import numpy as np

    pred = np.asarray(test.get("predictions") or [], dtype=float)
    true = np.asarray(test.get("targets") or [], dtype=float)
    if pred.size == 0 or pred.shape != true.shape:
        return []
    pred, true = pred.ravel(), true.ravel()
    shown = np.linspace(0, pred.size - 1, MAX_SCATTER).astype(int) if pred.size > MAX_SCATTER else np.arange(pred.size)
    sample = f" ({shown.size} of {pred.size} examples shown)" if shown.size < pred.size else ""
    ax = charts.Axes(
        title="Predicted against true (test)", xlabel="true value", ylabel="predicted value", legend_loc="best"
    )
    ax.points(true[shown].tolist(), pred[shown].tolist(), PALETTE[0], size=2.6, opacity=0.6)
    low, high = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.line([low, high], [low, high], STOP_COLOR, "predicted = true", dash="5,3", width=1.1)
    scatter = _embed(
        charts.figure([ax], 478, 425),
        "Predictions of the best checkpoint against the true values of the test split." + sample,
    )
    residual = pred - true
    left = charts.Axes(title="Residuals (test)", xlabel="predicted value", ylabel="residual (predicted - true)")
    left.points(pred[shown].tolist(), residual[shown].tolist(), PALETTE[1], size=2.2, opacity=0.6)
    left.hline(0.0, "#333", width=0.9)
    counts, edges = np.histogram(residual, bins=min(50, max(10, pred.size // 10)))
    right = charts.Axes(title="Distribution of residuals", xlabel="residual", ylabel="examples")
    right.bars(edges.tolist(), counts.tolist(), PALETTE[1])
    return [
        scatter,
        _embed(
            charts.figure([left, right], 700, 330),
            "Residuals of the test split against the prediction, and their distribution." + sample,
        ),
    ]


def _watched(job: dict[str, Any]) -> str:
    early = job.get("early_stopping") or {}
    return early.get("metric") or (job.get("checkpoint") or {}).get("best_metric") or "val_loss"


def _best_and_stop(run: RunData) -> tuple[int | None, int | None]:
    """The best validation's step and, when early stopping ended the run, its last step."""
    summary = run.summary
    best_step = (summary.get("best") or {}).get("step")
    if best_step is None and run.history:
        from orchestrator.metrics import default_mode

        metric = _watched(run.job)
        values = _metric_values(run, metric)
        if values:
            try:
                mode = default_mode(metric)
            except ValueError:
                mode = "min"
            best_step = (max if mode == "max" else min)(values, key=lambda p: p[1])[0]
    stop_step = summary.get("steps") if summary.get("stopped_early") else None
    return best_step, stop_step


def _task(run: RunData) -> str | None:
    """classification, regression or lm: what the test split says, else the job file (digits is classification)."""
    job = run.job
    return (
        (run.test or {}).get("task")
        or (job.get("data") or {}).get("task")
        or ("classification" if (job.get("data") or {}).get("name") == "digits" else None)
    )


def _run_facts(run: RunData, best_step: int | None, stop_step: int | None) -> list[str]:
    """The facts table at the top of the page, and the error when the run ended with one."""
    record, summary = run.record, run.summary
    best = summary.get("best") or {}
    test_metrics = (run.test or {}).get("metrics") or {}
    facts = [
        ("status", record.get("status")),
        ("steps", summary.get("steps")),
        ("epochs", summary.get("epochs")),
        (f"best {best.get('metric') or ''}".strip(), best.get("value")),
        ("best step", best_step),
        ("early stop at step", stop_step),
        ("wall", duration(summary.get("wall_s"))),
    ]
    facts += [(k, v) for k, v in test_metrics.items() if _finite(v)]
    body = [_facts(facts)]
    if summary.get("error"):
        body.append(f"<p><b>error:</b> <code>{esc(str(summary['error']))}</code></p>")
    return body


def _training_figures(run: RunData, task: str | None, best_step: int | None, stop_step: int | None) -> list[str]:
    """Loss, learning rate, throughput, each scalar validation metric and (for lm) perplexity, by step."""
    train, val = run.entries("train"), run.entries("val")
    test_metrics = (run.test or {}).get("metrics") or {}
    figures = [_loss_figure(run, best_step, stop_step)]
    lr_x, lr_y = _series(train, "lr")
    figures.append(
        _line_figure(lr_x, lr_y, "Learning rate", "learning rate", "The learning-rate schedule by step.", PALETTE[4])
    )
    tp_x, tp_y = _series(train, "samples_per_s")
    figures.append(
        _line_figure(tp_x, tp_y, "Throughput", "samples / s", "Training throughput (all workers) by step.", PALETTE[2])
    )
    scalar_val = [
        k
        for k in dict.fromkeys(k for e in val for k in e)
        if k.startswith("val_") and k != "val_loss" and any(_finite(e.get(k)) for e in val)
    ]
    for i, key in enumerate(scalar_val):
        x, y = _series(val, key)
        log = key == "val_perplexity"
        test_value = test_metrics.get(f"test_{key[4:]}")
        test_point = (
            (run.test["step"], float(test_value)) if _finite(test_value) and run.test.get("step") is not None else None
        )
        figures.append(
            _line_figure(
                x,
                y,
                f"Validation {key[4:]}",
                key[4:],
                _marked_caption(f"{key} at each validation", best_step, stop_step, test_point),
                PALETTE[(i + 5) % len(PALETTE)],
                log=log,
                best_step=best_step,
                stop_step=stop_step,
                marker="o",
                test_point=test_point,
            )
        )
    figures += _reported_figures(train)
    if task == "lm" and train:
        x, y = _series(train, "loss")
        figures.append(
            _line_figure(
                x,
                [math.exp(min(v, 700)) for v in y],
                "Training perplexity",
                "perplexity",
                "exp(training loss) by step: the perplexity of the training batches.",
                PALETTE[0],
                log=True,
            )
        )
    return [f for f in figures if f]


def _marked_caption(what: str, best_step: int | None, stop_step: int | None, test_point) -> str:
    """A caption that names only what its figure marks: no "early stop" where the run did not stop early."""
    marks = [
        name
        for name, shown in (
            ("the best checkpoint", best_step is not None),
            ("the early stop", stop_step is not None),
            ("the test value", test_point is not None),
        )
        if shown
    ]
    if not marks:
        return f"{what}."
    listed = marks[0] if len(marks) == 1 else ", ".join(marks[:-1]) + " and " + marks[-1]
    return f"{what}, with {listed} marked."


# What every train entry of the built-in loop holds; anything else is a metric the loop reported of its own.
TRAIN_FIELDS = {"step", "epoch", "split", "time", "loss", "lr", "samples_per_s"}


def _reported_figures(train: list[dict[str, Any]]) -> list[str]:
    """A figure for each other scalar a loop reported with its training metrics (a bring-your-own loop's accuracy)."""
    keys = [
        k
        for k in dict.fromkeys(k for e in train for k in e)
        if k not in TRAIN_FIELDS and not k.startswith("val_") and any(_finite(e.get(k)) for e in train)
    ]
    figures = []
    for i, key in enumerate(keys):
        x, y = _series(train, key)
        figures.append(
            _line_figure(
                x,
                y,
                f"Reported {key}",
                key,
                f"{key} as the loop reported it, by step.",
                PALETTE[(i + 3) % 10],
                marker="o",
            )
        )
    return figures


def _test_section(t: dict[str, Any]) -> list[str]:
    """The test split's heading, which checkpoint it scored, its metrics and its figures."""
    test_metrics = t.get("metrics") or {}
    body = [f"<h2>Test split: the checkpoint of step {_fmt(t.get('step'))}</h2>"]
    note = (
        "the best checkpoint"
        if t.get("step") == t.get("best_step")
        else "the latest checkpoint (the best one was not kept: set checkpoint.keep_best)"
    )
    examples = f"{_fmt(t.get('examples'))} held-out examples" if t.get("examples") else "the held-out test split"
    body.append(f'<p class="note">{esc(note)}, <code>{esc(str(t.get("checkpoint")))}</code>, on {examples}.</p>')
    body.append(_table([[k, v] for k, v in test_metrics.items() if not isinstance(v, list)], ["metric", "value"]))
    test_figures = []
    if t.get("task") == "classification":
        if isinstance(test_metrics.get("test_confusion_matrix"), list):
            test_figures.append(_confusion_figure(test_metrics["test_confusion_matrix"]))
        test_figures += _class_curves(t)
    elif t.get("task") == "regression":
        test_figures += _regression_figures(t)
    if test_figures:
        body.append('<div class="grid">' + "".join(test_figures) + "</div>")
    return body


# A run's own files that its page links to, when they are there.
RUN_FILES = ("run.json", "metrics.jsonl", "run.log", "test.json")


def _subtitle(run: RunData) -> str:
    record = run.record
    parts = [_status(record.get("status")), f"<code>{esc(redact(run.uri))}</code>"]
    if record.get("started"):
        parts.append(f"started {esc(when(record['started']))}")
    if record.get("ended"):
        length = took(record, run.summary.get("wall_s"))
        parts.append(f"ended {esc(when(record['ended']))}" + (f" ({esc(length)})" if length else ""))
    return " &middot; ".join(parts)


def render_run(run: RunData, link_base: str | None = None) -> str:
    """The HTML report of one run; its links to the run's files are relative, or under `link_base` (a page elsewhere)."""
    record, job = run.record, run.job
    best_step, stop_step = _best_and_stop(run)
    body = _run_facts(run, best_step, stop_step)
    body.append(_files([Link((name,), name, link_base) for name in RUN_FILES if name in run.files]))
    figures = _training_figures(run, _task(run), best_step, stop_step)
    body.append("<h2>Training</h2>")
    body.append(
        '<div class="grid">' + "".join(figures) + "</div>"
        if figures
        else '<p class="note">No metrics were recorded (metrics.jsonl is empty).</p>'
    )
    if run.test:
        body += _test_section(run.test)

    body.append("<h2>Settings</h2>")
    body.append(f"<p>command: <code>{esc(' '.join(str(a) for a in record.get('command') or []))}</code></p>")
    body.append(_kv_table(applied_settings(job)))
    body.append("<h2>Provenance</h2>")
    body.append(
        _kv_table(record.get("provenance") or {})
        if record.get("provenance")
        else '<p class="note">No provenance recorded.</p>'
    )
    if record.get("tracking"):
        body.append("<h3>Tracking</h3>" + _kv_table(record["tracking"]))
    return _page(f"Run {record.get('run') or run.uri.rsplit('/', 1)[-1]}", _subtitle(run), "".join(body))
