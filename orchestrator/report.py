"""The offline HTML report of a run or a sweep, and the list of runs under a storage.

One self-contained file: every figure is an SVG embedded as a data URI (written by
orchestrator.charts: no JavaScript, no network), so it opens anywhere, from disk or from object
storage. Every value the report did not build itself (names, URIs, settings, errors) is escaped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

from orchestrator import charts, storage
from orchestrator.charts import esc
from orchestrator.errors import BadInput

REPORT = "report.html"
RUN_RECORD = "run.json"
METRICS = "metrics.jsonl"
SWEEP_RECORD = "sweep.json"
TEST_RECORD = "test.json"
LOG_PARAMS = ("loguniform", "qloguniform")
# Per-class curves up to this many classes; beyond, one micro-averaged curve stays readable.
MAX_CLASS_CURVES = 10
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


# ----------------------------------------------------------------------------------------------
# Reading what a run or a sweep left in storage


@dataclass
class RunData:
    """Everything a run left: run.json, the metrics history, the test record."""

    uri: str
    record: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    test: Optional[dict[str, Any]] = None

    @property
    def summary(self) -> dict[str, Any]:
        return self.record.get("summary") or {}

    @property
    def job(self) -> dict[str, Any]:
        return self.record.get("job") or {}

    def entries(self, split: str) -> list[dict[str, Any]]:
        return [e for e in self.history if e.get("split") == split]


def _read_json(fs, path: str) -> Optional[Any]:
    try:
        return json.loads(storage.read_bytes(fs, path))
    except FileNotFoundError:
        return None


def _read_history(fs, path: str) -> list[dict[str, Any]]:
    try:
        text = storage.read_bytes(fs, path).decode()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a crash mid-append leaves a torn last line
    return out


def _open(uri: str, endpoint_url: Optional[str]):
    try:
        return storage.open_storage(uri, endpoint_url)
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(storage.describe_error(uri, exc)) from None


def _guarded(uri: str, fn):
    try:
        return fn()
    except BadInput:
        raise
    except Exception as exc:  # storage that cannot be read: one line naming the URI
        raise BadInput(storage.describe_error(uri, exc)) from None


def load_run(uri: str, endpoint_url: Optional[str] = None) -> RunData:
    """A run's record, history and test record; BadInput when the URI holds no run."""
    fs, root = _open(uri, endpoint_url)
    record = _guarded(uri, lambda: _read_json(fs, storage.join(root, RUN_RECORD)))
    if not isinstance(record, dict):
        raise BadInput(f"{uri}: holds no run (no {RUN_RECORD})")
    history = _guarded(uri, lambda: _read_history(fs, storage.join(root, METRICS)))
    test = _guarded(uri, lambda: _read_json(fs, storage.join(root, TEST_RECORD)))
    return RunData(uri=uri.rstrip("/"), record=record, history=history, test=test)


@dataclass
class SweepData:
    """A sweep's record and its trials (each a run in `<sweep>/<trial id>`)."""

    uri: str
    record: dict[str, Any]
    trials: list[dict[str, Any]]  # trial_id, status, config, metric, best_metric, steps, run (RunData or None)

    @property
    def spec(self) -> dict[str, Any]:
        return self.record.get("spec") or {}

    @property
    def metric(self) -> str:
        return (self.record.get("result") or {}).get("metric") or self.spec.get("metric") or "val_loss"

    @property
    def mode(self) -> str:
        mode = (self.record.get("result") or {}).get("mode") or self.spec.get("mode")
        if mode:
            return mode
        from orchestrator.metrics import default_mode

        try:
            return default_mode(self.metric)
        except ValueError:
            return "min"


def load_sweep(uri: str, endpoint_url: Optional[str] = None) -> SweepData:
    """A sweep's sweep.json and every trial run under it (finished or not); BadInput when the URI holds no sweep."""
    fs, root = _open(uri, endpoint_url)
    record = _guarded(uri, lambda: _read_json(fs, storage.join(root, SWEEP_RECORD)))
    if not isinstance(record, dict):
        raise BadInput(f"{uri}: holds no sweep (no {SWEEP_RECORD})")
    rows = {row["trial_id"]: dict(row) for row in (record.get("result") or {}).get("trials") or []}
    # A sweep still running (or interrupted) has no result yet: its trial directories say what ran.
    for name in _guarded(uri, lambda: _child_dirs(fs, root)):
        if name not in rows and _guarded(uri, lambda: storage.exists(fs, storage.join(root, name, RUN_RECORD))):
            rows[name] = {"trial_id": name}
    trials = []
    for trial_id, row in sorted(rows.items()):
        run_uri = row.get("run_uri") or f"{uri.rstrip('/')}/{trial_id}"
        try:
            run = load_run(run_uri, endpoint_url)
        except BadInput:
            run = None
        if run is not None:
            row.setdefault("config", run.record.get("config") or {})
            row.setdefault("status", run.record.get("status"))
            row.setdefault("steps", run.summary.get("steps"))
        row.setdefault("config", {})
        row["run"] = run
        trials.append(row)
    data = SweepData(uri=uri.rstrip("/"), record=record, trials=trials)
    for row in trials:
        values = _metric_values(row["run"], data.metric) if row["run"] else []
        if row.get("metric") is None and values:
            row["metric"] = values[-1][1]
        if row.get("best_metric") is None and values:
            row["best_metric"] = (max if data.mode == "max" else min)(v for _, v in values)
    return data


def _child_dirs(fs, root: str) -> list[str]:
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"]


def _metric_values(run: RunData, metric: str) -> list[tuple[int, float]]:
    return [(e["step"], float(e[metric])) for e in run.history if _finite(e.get(metric))]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# Figures: SVG written by orchestrator.charts, each embedded as a data URI


# Figure sizes in SVG pixels; the page scales each to its grid cell.
WIDE, TALL = (590, 330), (515, 425)
BEST_COLOR, STOP_COLOR = "#2ca02c", "#d62728"


def _embed(svg: str, caption: str) -> str:
    cap = esc(caption)
    return f'<figure class="plot"><img alt="{cap}" src="{charts.data_uri(svg)}"><figcaption>{cap}</figcaption></figure>'


def _mark_steps(ax: charts.Axes, best_step: Optional[int], stop_step: Optional[int]) -> None:
    if best_step is not None:
        ax.vline(best_step, BEST_COLOR, f"best checkpoint (step {best_step})", dash="5,3")
    if stop_step is not None:
        ax.vline(stop_step, STOP_COLOR, f"early stop (step {stop_step})", dash="2,3", width=1.8)


def _series(entries: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(e["step"], float(e[key])) for e in entries if _finite(e.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _loss_figure(run: RunData, best_step: Optional[int], stop_step: Optional[int]) -> Optional[str]:
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
    return _embed(charts.figure([ax], *WIDE),
                  "Training and validation loss by step: validation above a falling training loss is overfitting; both high is underfitting.")


def _line_figure(x: list, y: list, title: str, ylabel: str, caption: str, color: str = PALETTE[0], log: bool = False,
                 best_step: Optional[int] = None, stop_step: Optional[int] = None, marker: str = "",
                 test_point: Optional[tuple[int, float]] = None) -> Optional[str]:
    if not x:
        return None
    log = log and all(v > 0 for v in y) and max(y) / min(y) > 10  # a narrow range reads better on a linear axis
    legend = best_step is not None or stop_step is not None or test_point is not None
    ax = charts.Axes(title=title, xlabel="step", ylabel=ylabel, ylog=log, legend_loc="best" if legend else None)
    ax.line(x, y, color, "validation" if test_point else None, marker=marker, size=2.6)
    if test_point:
        ax.points([test_point[0]], [test_point[1]], STOP_COLOR, f"test split (checkpoint of step {test_point[0]})", marker="star", size=8)
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
    ax = charts.Axes(title="Confusion matrix (test)", xlabel="predicted class", ylabel="true class", xlim=(-0.5, n - 0.5),
                     ylim=(n - 0.5, -0.5), grid=False, square=True, xticks=ticks, yticks=ticks,
                     colorbar=(charts.BLUES, 0.0, 1.0, "share of the true class"))
    ax.cells(share.tolist(), charts.BLUES, texts)
    side = min(720.0, 240.0 + 28.0 * n)  # more classes, a larger image: its text shrinks less on the page
    return _embed(charts.figure([ax], side + 120, side),
                  "Confusion matrix of the best checkpoint on the test split: counts, coloured by the share of each true class.")


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
    roc = charts.Axes(title="ROC curves (test)", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02),
                      legend_loc="lower right")
    pr = charts.Axes(title="Precision-recall curves (test)", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), legend_loc="lower left")
    roc.line([0, 1], [0, 1], "#999", dash="4,3", width=0.9)
    for i, (name, positive, score) in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        fpr, tpr = roc_points(positive, score)
        roc.line(*_thin_curve(fpr, tpr), color, f"{name} (AUC {trapezoid_area(fpr, tpr):.3f})", width=1.3)
        precision, recall = pr_points(positive, score)
        pr.line(*_thin_curve(recall, precision), color, f"{name} (AP {average_precision(precision, recall):.3f})", width=1.3)
    return [_embed(charts.figure([roc], *TALL), "ROC curves of the best checkpoint on the test split, one class against the rest."),
            _embed(charts.figure([pr], *TALL), "Precision-recall curves of the best checkpoint on the test split, one class against the rest.")]


def _thin_curve(x, y, columns: int = 1000) -> tuple[list[float], list[float]]:
    """A curve in [0, 1] with monotone x, cut to what a plot shows: the first, last, lowest and highest point of each of
    `columns` slices of x (a micro-averaged curve has a point per example and class: millions)."""
    import numpy as np

    if x.size <= 4 * columns:
        return x.tolist(), y.tolist()
    bins = np.floor(np.clip(x, 0, 1) * columns)
    starts = np.r_[0, np.flatnonzero(np.diff(bins)) + 1]
    ends = np.r_[starts[1:] - 1, x.size - 1]
    group = np.repeat(np.arange(starts.size), ends - starts + 1)
    by_value = np.lexsort((y, group))  # each slice's points in order of y, slices in curve order
    keep = np.unique(np.r_[starts, ends, by_value[starts], by_value[ends]])
    return x[keep].tolist(), y[keep].tolist()


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
    ax = charts.Axes(title="Predicted against true (test)", xlabel="true value", ylabel="predicted value", legend_loc="best")
    ax.points(true[shown].tolist(), pred[shown].tolist(), PALETTE[0], size=2.6, opacity=0.6)
    low, high = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.line([low, high], [low, high], STOP_COLOR, "predicted = true", dash="5,3", width=1.1)
    scatter = _embed(charts.figure([ax], 478, 425), "Predictions of the best checkpoint against the true values of the test split." + sample)
    residual = pred - true
    left = charts.Axes(title="Residuals (test)", xlabel="predicted value", ylabel="residual (predicted - true)")
    left.points(pred[shown].tolist(), residual[shown].tolist(), PALETTE[1], size=2.2, opacity=0.6)
    left.hline(0.0, "#333", width=0.9)
    counts, edges = np.histogram(residual, bins=min(50, max(10, pred.size // 10)))
    right = charts.Axes(title="Distribution of residuals", xlabel="residual", ylabel="examples")
    right.bars(edges.tolist(), counts.tolist(), PALETTE[1])
    return [scatter, _embed(charts.figure([left, right], 700, 330), "Residuals of the test split against the prediction, and their distribution." + sample)]


# ----------------------------------------------------------------------------------------------
# ROC and precision-recall points, NumPy only: the same points and areas as scikit-learn's roc_curve, auc,
# precision_recall_curve and average_precision_score (tests/test_charts.py checks), without its import (seconds).


def _binary_clf_curve(positive, score):
    """False and true positives at each distinct score, highest score first."""
    import numpy as np

    order = np.argsort(score, kind="mergesort")[::-1]
    score, positive = np.asarray(score)[order], np.asarray(positive, dtype=bool)[order]
    last = np.r_[np.nonzero(np.diff(score))[0], score.size - 1]  # the last example of each run of equal scores
    tps = np.cumsum(positive, dtype=np.float64)[last]
    return 1 + last - tps, tps


def roc_points(positive, score):
    """(false positive rates, true positive rates) of the ROC curve of scores `score` for the boolean labels `positive`."""
    import numpy as np

    fps, tps = _binary_clf_curve(positive, score)
    if fps.size > 2:  # points in line with their neighbours add nothing to the curve or its area
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1]


def pr_points(positive, score):
    """(precision, recall) of the precision-recall curve, from the highest recall down to (1, 0)."""
    import numpy as np

    fps, tps = _binary_clf_curve(positive, score)
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted != 0)
    recall = tps / tps[-1] if tps[-1] else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def trapezoid_area(x, y) -> float:
    """The area under a curve through the points (x, y), x sorted (scikit-learn's `auc`)."""
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(abs(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2)))


def average_precision(precision, recall) -> float:
    """Precision averaged over the recall steps, with no interpolation (scikit-learn's average_precision_score)."""
    import numpy as np

    return float(-np.sum(np.diff(recall) * np.asarray(precision)[:-1]))


# ----------------------------------------------------------------------------------------------
# HTML


STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:18px 28px}header h1{margin:0 0 6px;font-size:22px}
header .sub{opacity:.85;font-size:14px}main{padding:8px 28px 40px}
h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
.facts{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.fact{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px 12px;min-width:110px}
.fact b{display:block;font-size:18px}.fact span{font-size:12px;color:#666}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:14px}
figure.plot{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:0;padding:10px}
figure.plot img{width:100%;height:auto;display:block}figcaption{font-size:12px;color:#555;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:8px 0}
td,th{border:1px solid #e0e0e0;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:12px;word-break:break-all}
.status{font-weight:bold}.status-ok{color:#2e7d32}.status-bad{color:#c62828}.status-warn{color:#ef6c00}.status-busy{color:#1565c0}.status-idle{color:#666}
.tables{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.tables table{margin:0}details{margin:8px 0}summary{cursor:pointer;font-weight:bold}p.note{color:#666;font-size:13px}
"""


# The CSS class of each status a run or trial records; any other status shows in the neutral colour.
STATUS_CLASS = {"finished": "ok", "done": "ok", "failed": "bad", "error": "bad", "stopped": "warn", "running": "busy",
                "pending": "idle", "paused": "idle"}


@dataclass(frozen=True)
class Status:
    """A status shown as a coloured word: the class comes from STATUS_CLASS, the word is escaped like any value."""

    value: Any

    def html(self) -> str:
        word = str(self.value or "unknown")
        return f'<span class="status status-{STATUS_CLASS.get(word, "idle")}">{esc(word)}</span>'


def _fmt(value: Any) -> str:
    """Any value from a record as HTML text: escaped, whatever its type."""
    if isinstance(value, Status):
        return value.html()
    if isinstance(value, bool) or value is None:
        return esc(json.dumps(value))
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return f"<code>{esc(json.dumps(value, default=str))}</code>"
    return esc(value)


def _table(rows: list[list[Any]], head: list[str]) -> str:
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for cell in row:
            text = _fmt(cell)
            cls = ' class="num"' if isinstance(cell, (int, float)) and not isinstance(cell, bool) else ""
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv_table(data: dict[str, Any]) -> str:
    """One table per top-level section (dotted keys inside), laid out side by side."""
    from orchestrator.spec import flatten

    plain = [[k, v] for k, v in data.items() if not isinstance(v, dict) or not v]
    tables = [_table(plain, ["field", "value"])] if plain else []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            tables.append(_table([[k, v] for k, v in flatten(value).items()], [key, "value"]))
    return '<div class="tables">' + "".join(tables) + "</div>"


def _facts(items: list[tuple[str, Any]]) -> str:
    cells = [f'<div class="fact"><b>{_fmt(v)}</b><span>{esc(k)}</span></div>' for k, v in items if v is not None]
    return '<div class="facts">' + "".join(cells) + "</div>"


def _page(title: str, subtitle: str, body: str) -> str:
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><header><h1>{esc(title)}</h1>"
            f'<div class="sub">{subtitle}</div></header><main>{body}<p class="note">Written by orchestrator report on {generated}.</p></main></body></html>\n')


def _status(status: Any) -> str:
    return Status(status).html()


def _watched(job: dict[str, Any]) -> str:
    early = job.get("early_stopping") or {}
    return early.get("metric") or (job.get("checkpoint") or {}).get("best_metric") or "val_loss"


def _best_and_stop(run: RunData) -> tuple[Optional[int], Optional[int]]:
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


def render_run(run: RunData) -> str:
    """The HTML report of one run."""
    record, summary, job = run.record, run.summary, run.job
    task = (run.test or {}).get("task") or (job.get("data") or {}).get("task") or ("classification" if (job.get("data") or {}).get("name") == "digits" else None)
    best_step, stop_step = _best_and_stop(run)
    train, val = run.entries("train"), run.entries("val")
    best = summary.get("best") or {}
    test_metrics = (run.test or {}).get("metrics") or {}
    facts = [("status", record.get("status")), ("steps", summary.get("steps")), ("epochs", summary.get("epochs")),
             (f"best {best.get('metric') or ''}".strip(), best.get("value")), ("best step", best_step),
             ("early stop at step", stop_step), ("wall (s)", summary.get("wall_s"))]
    facts += [(k, v) for k, v in test_metrics.items() if _finite(v)]
    body = [_facts(facts)]
    if summary.get("error"):
        body.append(f"<p><b>error:</b> <code>{esc(str(summary['error']))}</code></p>")

    figures = [_loss_figure(run, best_step, stop_step)]
    lr_x, lr_y = _series(train, "lr")
    figures.append(_line_figure(lr_x, lr_y, "Learning rate", "learning rate", "The learning-rate schedule by step.", PALETTE[4]))
    tp_x, tp_y = _series(train, "samples_per_s")
    figures.append(_line_figure(tp_x, tp_y, "Throughput", "samples / s", "Training throughput (all workers) by step.", PALETTE[2]))
    scalar_val = [k for k in dict.fromkeys(k for e in val for k in e) if k.startswith("val_") and k != "val_loss" and any(_finite(e.get(k)) for e in val)]
    for i, key in enumerate(scalar_val):
        x, y = _series(val, key)
        log = key == "val_perplexity"
        test_value = test_metrics.get(f"test_{key[4:]}")
        test_point = (run.test["step"], float(test_value)) if _finite(test_value) and run.test.get("step") is not None else None
        figures.append(_line_figure(x, y, f"Validation {key[4:]}", key[4:], f"{key} at each validation, with the best checkpoint, the early stop and the test value marked.",
                                    PALETTE[(i + 5) % len(PALETTE)], log=log, best_step=best_step, stop_step=stop_step, marker="o", test_point=test_point))
    if task == "lm" and train:
        x, y = _series(train, "loss")
        figures.append(_line_figure(x, [math.exp(min(v, 700)) for v in y], "Training perplexity", "perplexity",
                                    "exp(training loss) by step: the perplexity of the training batches.", PALETTE[0], log=True))
    figures = [f for f in figures if f]
    body.append("<h2>Training</h2>")
    body.append('<div class="grid">' + "".join(figures) + "</div>" if figures else '<p class="note">No metrics were recorded (metrics.jsonl is empty).</p>')

    if run.test:
        t = run.test
        body.append(f"<h2>Test split: the checkpoint of step {_fmt(t.get('step'))}</h2>")
        note = "the best checkpoint" if t.get("step") == t.get("best_step") else "the latest checkpoint (the best one was not kept: set checkpoint.keep_best)"
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

    body.append("<h2>Settings</h2>")
    body.append(f"<p>command: <code>{esc(' '.join(str(a) for a in record.get('command') or []))}</code></p>")
    body.append(_kv_table(job))
    body.append("<h2>Provenance</h2>")
    body.append(_kv_table(record.get("provenance") or {}) if record.get("provenance") else '<p class="note">No provenance recorded.</p>')
    if record.get("tracking"):
        body.append("<h3>Tracking</h3>" + _kv_table(record["tracking"]))
    subtitle = f"{_status(record.get('status'))} &middot; <code>{esc(run.uri)}</code> &middot; started {esc(str(record.get('started')))} &middot; ended {esc(str(record.get('ended')))}"
    return _page(f"Run {record.get('run') or run.uri.rsplit('/', 1)[-1]}", subtitle, "".join(body))


# ----------------------------------------------------------------------------------------------
# The sweep report


def _is_log_param(spec: Optional[dict[str, Any]], values: list[Any]) -> bool:
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
    return pos, [i * step if len(cats) > 1 else 0.5 for i in range(len(cats))], [json.loads(c) if len(c) < 14 else c[:12] for c in cats]


def _stopped_by_scheduler(sweep: SweepData, trial: dict[str, Any], last_step: int, longest: int) -> bool:
    """Whether the scheduler ended a trial: its status says so, or under ASHA it ended short of the others without early stopping."""
    if trial.get("status") == "stopped":
        return True
    run = trial.get("run")
    asha = (sweep.spec.get("scheduler") or {}).get("name") == "asha"
    return asha and trial.get("status") != "error" and last_step < longest and not (run and run.summary.get("stopped_early"))


def _param_figure(param: str, rows: list[dict[str, Any]], spec: Optional[dict[str, Any]], metric: str, best: Optional[dict[str, Any]]) -> str:
    """Each trial's best metric against one parameter: a log axis where the sweep samples it on one, categories as ticks."""
    values = [t["config"][param] for t in rows]
    numeric = all(_finite(v) for v in values)
    log = numeric and _is_log_param(spec, values)
    positions, ticks, labels = _param_axis(values, False)
    xs = values if numeric else positions
    ax = charts.Axes(title=f"{metric} against {param}", xlabel=param + (" (log scale)" if log else ""), ylabel=f"best {metric}", xlog=log,
                     xticks=None if numeric else [(t, str(label)) for t, label in zip(ticks, labels)], legend_loc="best")
    ax.points(xs, [t["best_metric"] for t in rows], PALETTE[0], size=4.5)
    at = next((i for i, t in enumerate(rows) if t is best), None)
    if at is not None:
        ax.points([xs[at]], [best["best_metric"]], STOP_COLOR, f"best ({best['trial_id']})", marker="ring", size=8)
    caption = f"Each trial's best {metric} against {param}" + (" on a log axis: equal distances are equal factors." if log else ".")
    return _embed(charts.figure([ax], 515, 350), caption)


def _trials_figure(sweep: SweepData) -> Optional[str]:
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
        ax.line([s for s, _ in values], [v for _, v in values], PALETTE[i % len(PALETTE)], label, width=1.3, marker="o", size=2)
        if _stopped_by_scheduler(sweep, t, values[-1][0], longest):
            stopped.append(values[-1])
    if stopped:
        ax.points([s for s, _ in stopped], [v for _, v in stopped], STOP_COLOR, "stopped by the scheduler", marker="x", size=7)
    return _embed(charts.figure([ax], 626, 386), f"{metric} of every trial by step; an X marks where the scheduler stopped a trial.")


def _parallel_figure(sweep: SweepData, params: list[str], scored: list[dict[str, Any]], best: Optional[dict[str, Any]]) -> str:
    """Every scored trial as a line through one vertical axis per parameter and one for its best metric."""
    metric, spec = sweep.metric, sweep.spec.get("parameters") or {}
    columns = []
    for param in params:
        values = [t["config"].get(param) for t in scored]
        log = _is_log_param(spec.get(param), [v for v in values if v is not None])
        columns.append((param + (" (log)" if log and all(_finite(v) for v in values) else ""), *_param_axis(values, log)))
    metric_values = [t["best_metric"] for t in scored]
    columns.append((metric, *_param_axis(metric_values, False)))
    low, high = min(metric_values), max(metric_values)
    cmap = charts.VIRIDIS.reversed() if sweep.mode == "min" else charts.VIRIDIS  # the best trials are yellow either way
    ax = charts.Axes(title="Parallel coordinates of the trials", xlim=(-0.2, len(columns) - 0.6), ylim=(-0.05, 1.05), grid=False,
                     xticks=[(float(i), c[0]) for i, c in enumerate(columns)], yticks=[], colorbar=(cmap, low, high, f"best {metric}"))
    order = sorted(range(len(scored)), key=lambda r: scored[r] is best)  # the best trial's line on top
    for row in order:
        color = cmap((metric_values[row] - low) / ((high - low) or 1.0))
        ax.line(range(len(columns)), [col[1][row] for col in columns], color, width=2.6 if scored[row] is best else 1.4)
    for i, (_, _, ticks, labels) in enumerate(columns):
        ax.vline(float(i), "#444", width=0.8)
        ax.text([i] * len(ticks), ticks, [str(label) for label in labels])
    return _embed(charts.figure([ax], max(590, 130 * len(columns) + 120), 386),
                  f"Parallel coordinates: every trial as a line through its settings and its best {metric} (colour: the metric; thick: the best trial).")


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
    rank = sorted(sweep.trials, key=lambda t: (0, -t["best_metric"] if mode == "max" else t["best_metric"]) if _finite(t.get("best_metric")) else (1, 0))
    rows = []
    for i, t in enumerate(rank, 1):
        rows.append([i, t["trial_id"], Status(t.get("status")), *(t["config"].get(p) for p in params), t.get("metric"), t.get("best_metric"), t.get("steps")])
    table = _table(rows, ["#", "trial", "status", *params, f"{metric} (last)", f"{metric} (best)", "steps"])
    facts = [("status", record.get("status")), ("trials", len(sweep.trials)), (f"best {metric}", best["best_metric"] if best else None),
             ("best trial", best["trial_id"] if best else None), ("wall (s)", (record.get("result") or {}).get("wall_s"))]
    body = [_facts(facts), "<h2>Trials</h2>", table]
    body.append("<h2>Figures</h2>")
    body.append('<div class="grid">' + "".join(figures) + "</div>" if figures else '<p class="note">No trial has reported the metric yet.</p>')
    body.append("<h2>Search</h2>" + _kv_table(sweep.spec))
    body.append("<h2>Base job</h2>" + _kv_table(record.get("job") or {}))
    subtitle = f"{_status(record.get('status'))} &middot; <code>{esc(sweep.uri)}</code> &middot; metric {esc(metric)} ({esc(mode)}) &middot; started {esc(str(record.get('started')))}"
    return _page(f"Sweep {record.get('sweep') or sweep.uri.rsplit('/', 1)[-1]}", subtitle, "".join(body))


# ----------------------------------------------------------------------------------------------
# Entry points


def render(uri: str, endpoint_url: Optional[str] = None) -> str:
    """The report of whatever `uri` holds, a run or a sweep; BadInput when it holds neither."""
    fs, root = _open(uri, endpoint_url)
    if _guarded(uri, lambda: storage.exists(fs, storage.join(root, SWEEP_RECORD))):
        return render_sweep(load_sweep(uri, endpoint_url))
    if not _guarded(uri, lambda: storage.exists(fs, storage.join(root, RUN_RECORD))):
        raise BadInput(f"{uri}: holds no run or sweep (no {RUN_RECORD} or {SWEEP_RECORD})")
    return render_run(load_run(uri, endpoint_url))


def write_report(uri: str, out: Optional[str] = None, endpoint_url: Optional[str] = None) -> str:
    """Write the report of a run or sweep to `out` (a local file) or to `<uri>/report.html`; return where it went."""
    page = render(uri, endpoint_url).encode()
    if out:
        import os

        folder = os.path.dirname(os.path.abspath(out))
        os.makedirs(folder, exist_ok=True)
        tmp = f"{out}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(page)
        os.replace(tmp, out)
        return os.path.abspath(out)
    fs, root = _open(uri, endpoint_url)
    storage.write_bytes(fs, storage.join(root, REPORT), page)
    return f"{uri.rstrip('/')}/{REPORT}"


def list_runs(storage_uri: str, endpoint_url: Optional[str] = None) -> list[dict[str, Any]]:
    """The runs and sweeps directly under a storage, newest first: status, steps, best metric, wall time."""
    fs, root = _open(storage_uri, endpoint_url)
    if not _guarded(storage_uri, lambda: storage.exists(fs, root)):
        raise BadInput(f"{storage_uri}: no such storage")
    rows = []
    for name in _guarded(storage_uri, lambda: _child_dirs(fs, root)):
        uri = f"{storage_uri.rstrip('/')}/{name}"
        run = _guarded(uri, lambda: _read_json(fs, storage.join(root, name, RUN_RECORD)))
        if isinstance(run, dict):
            summary = run.get("summary") or {}
            best = summary.get("best") or {}
            rows.append({"name": name, "kind": "run", "uri": uri, "status": run.get("status"), "started": run.get("started"),
                         "ended": run.get("ended"), "steps": summary.get("steps"), "best_metric": best.get("metric"),
                         "best_value": best.get("value"), "wall_s": _wall(run, summary.get("wall_s"))})
            continue
        sweep = _guarded(uri, lambda: _read_json(fs, storage.join(root, name, SWEEP_RECORD)))
        if isinstance(sweep, dict):
            result = sweep.get("result") or {}
            best = result.get("best") or {}
            rows.append({"name": name, "kind": "sweep", "uri": uri, "status": sweep.get("status"), "started": sweep.get("started"),
                         "ended": sweep.get("ended"), "steps": result.get("total_steps"), "best_metric": result.get("metric") or (sweep.get("spec") or {}).get("metric"),
                         "best_value": best.get("metric"), "wall_s": _wall(sweep, result.get("wall_s"))})
    return sorted(rows, key=lambda r: str(r.get("started") or ""), reverse=True)


def _wall(record: dict[str, Any], wall_s: Optional[float]) -> Optional[float]:
    if _finite(wall_s):
        return round(float(wall_s), 1)
    try:
        start = datetime.fromisoformat(record["started"])
        end = datetime.fromisoformat(record["ended"]) if record.get("ended") else None
    except (KeyError, TypeError, ValueError):
        return None
    return round((end - start).total_seconds(), 1) if end else None
