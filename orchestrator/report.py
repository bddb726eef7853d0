"""The offline HTML report of a run or a sweep, and the list of runs under a storage.

One self-contained file: every figure is an SVG embedded as a data URI (matplotlib, no
JavaScript, no network), so it opens anywhere, from disk or from object storage.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

from orchestrator import storage
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
# Figures: matplotlib without pyplot (no global state), each embedded as an SVG data URI


def _new_figure(width: float = 6.4, height: float = 3.6, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _embed(fig, caption: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    data = base64.b64encode(buf.getvalue()).decode()
    cap = html.escape(caption)
    return f'<figure class="plot"><img alt="{cap}" src="data:image/svg+xml;base64,{data}"><figcaption>{cap}</figcaption></figure>'


def _mark_steps(ax, best_step: Optional[int], stop_step: Optional[int]) -> None:
    if best_step is not None:
        ax.axvline(best_step, color="#2ca02c", linestyle="--", linewidth=1, label=f"best checkpoint (step {best_step})")
    if stop_step is not None:
        ax.axvline(stop_step, color="#d62728", linestyle=":", linewidth=1.5, label=f"early stop (step {stop_step})")


def _series(entries: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(e["step"], float(e[key])) for e in entries if _finite(e.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _loss_figure(run: RunData, best_step: Optional[int], stop_step: Optional[int]) -> Optional[str]:
    train_x, train_y = _series(run.entries("train"), "loss")
    val_x, val_y = _series(run.entries("val"), "val_loss")
    if not train_x and not val_x:
        return None
    fig, ax = _new_figure()
    if train_x:
        ax.plot(train_x, train_y, color=PALETTE[0], label="training loss")
    if val_x:
        ax.plot(val_x, val_y, color=PALETTE[1], marker="o", markersize=3, label="validation loss")
    _mark_steps(ax, best_step, stop_step)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v > 0 for v in train_y + val_y) and max(train_y + val_y) / max(min(train_y + val_y), 1e-12) > 30:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Training and validation loss")
    return _embed(fig, "Training and validation loss by step: validation above a falling training loss is overfitting; both high is underfitting.")


def _line_figure(x: list, y: list, title: str, ylabel: str, caption: str, color: str = PALETTE[0], log: bool = False,
                 best_step: Optional[int] = None, stop_step: Optional[int] = None, marker: Optional[str] = None,
                 test_point: Optional[tuple[int, float]] = None) -> Optional[str]:
    if not x:
        return None
    fig, ax = _new_figure()
    ax.plot(x, y, color=color, marker=marker, markersize=3, label="validation" if test_point else None)
    if test_point:
        ax.scatter([test_point[0]], [test_point[1]], marker="*", s=140, color="#d62728", zorder=4, label=f"test split (checkpoint of step {test_point[0]})")
    _mark_steps(ax, best_step, stop_step)
    if log and all(v > 0 for v in y) and max(y) / min(y) > 10:  # a narrow range reads better on a linear axis
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if best_step is not None or stop_step is not None or test_point:
        ax.legend(fontsize=8)
    return _embed(fig, caption)


def _confusion_figure(matrix: list[list[int]]) -> str:
    import numpy as np

    cm = np.asarray(matrix, dtype=float)
    n = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = min(9.0, 3.0 + 0.35 * n)
    fig, ax = _new_figure(size + 1.0, size)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8, color="white" if share[i, j] > 0.5 else "black")
    ticks = range(n) if n <= 30 else range(0, n, max(1, n // 15))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (test)")
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    return _embed(fig, "Confusion matrix of the best checkpoint on the test split: counts, coloured by the share of each true class.")


def _class_curves(test: dict[str, Any]) -> list[str]:
    """ROC and precision-recall curves, one-vs-rest per class (or micro-averaged past MAX_CLASS_CURVES classes)."""
    import numpy as np
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    labels = np.asarray(test.get("labels") or [], dtype=int)
    scores = np.asarray(test.get("scores") or [], dtype=float)
    if labels.size == 0 or scores.ndim != 2:
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
    fig_roc, ax_roc = _new_figure(5.6, 4.6)
    fig_pr, ax_pr = _new_figure(5.6, 4.6)
    for i, (name, positive, score) in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        fpr, tpr, _ = roc_curve(positive, score)
        ax_roc.plot(fpr, tpr, color=color, linewidth=1.2, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(positive, score)
        ax_pr.plot(recall, precision, color=color, linewidth=1.2, label=f"{name} (AP {average_precision_score(positive, score):.3f})")
    ax_roc.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=0.8)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curves (test)", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall", ylabel="precision", title="Precision-recall curves (test)", xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
    return [_embed(fig_roc, "ROC curves of the best checkpoint on the test split, one class against the rest."),
            _embed(fig_pr, "Precision-recall curves of the best checkpoint on the test split, one class against the rest.")]


def _regression_figures(test: dict[str, Any]) -> list[str]:
    import numpy as np

    pred = np.asarray(test.get("predictions") or [], dtype=float)
    true = np.asarray(test.get("targets") or [], dtype=float)
    if pred.size == 0 or pred.shape != true.shape:
        return []
    fig, ax = _new_figure(5.2, 4.6)
    ax.scatter(true, pred, s=8, alpha=0.6, color=PALETTE[0], rasterized=pred.size > 2000)
    low, high = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([low, high], [low, high], color="#d62728", linestyle="--", linewidth=1, label="predicted = true")
    ax.set(xlabel="true value", ylabel="predicted value", title="Predicted against true (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    scatter = _embed(fig, "Predictions of the best checkpoint against the true values of the test split.")
    residual = pred - true
    fig, (left, right) = _new_figure(8.4, 3.6, ncols=2)
    left.scatter(pred, residual, s=8, alpha=0.6, color=PALETTE[1], rasterized=pred.size > 2000)
    left.axhline(0, color="#333", linewidth=0.8)
    left.set(xlabel="predicted value", ylabel="residual (predicted - true)", title="Residuals (test)")
    left.grid(alpha=0.3)
    right.hist(residual, bins=min(50, max(10, pred.size // 10)), color=PALETTE[1], alpha=0.8)
    right.set(xlabel="residual", ylabel="examples", title="Distribution of residuals")
    right.grid(alpha=0.3)
    return [scatter, _embed(fig, "Residuals of the test split against the prediction, and their distribution.")]


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
.status-finished,.status-done{color:#2e7d32;font-weight:bold}.status-failed,.status-error{color:#c62828;font-weight:bold}
.status-stopped{color:#ef6c00;font-weight:bold}.status-running{color:#1565c0;font-weight:bold}
.tables{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.tables table{margin:0}details{margin:8px 0}summary{cursor:pointer;font-weight:bold}p.note{color:#666;font-size:13px}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(json.dumps(value))
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return f"<code>{html.escape(json.dumps(value, default=str))}</code>"
    return html.escape(str(value))


def _table(rows: list[list[Any]], head: list[str], raw: bool = False) -> str:
    out = ["<table><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for cell in row:
            text = cell if raw and isinstance(cell, str) and cell.startswith("<") else _fmt(cell)
            cls = ' class="num"' if isinstance(cell, (int, float)) and not isinstance(cell, bool) else ""
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv_table(data: dict[str, Any]) -> str:
    """One table per top-level section (dotted keys inside), laid out side by side."""
    from orchestrator.tracking import flatten

    plain = [[k, v] for k, v in data.items() if not isinstance(v, dict) or not v]
    tables = [_table(plain, ["field", "value"])] if plain else []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            tables.append(_table([[k, v] for k, v in flatten(value).items()], [key, "value"]))
    return '<div class="tables">' + "".join(tables) + "</div>"


def _facts(items: list[tuple[str, Any]]) -> str:
    cells = [f'<div class="fact"><b>{_fmt(v)}</b><span>{html.escape(k)}</span></div>' for k, v in items if v is not None]
    return '<div class="facts">' + "".join(cells) + "</div>"


def _page(title: str, subtitle: str, body: str) -> str:
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body><header><h1>{html.escape(title)}</h1>"
            f'<div class="sub">{subtitle}</div></header><main>{body}<p class="note">Written by orchestrator report on {generated}.</p></main></body></html>\n')


def _status(status: Optional[str]) -> str:
    s = html.escape(str(status or "unknown"))
    return f'<span class="status-{s}">{s}</span>'


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
        body.append(f"<p><b>error:</b> <code>{html.escape(str(summary['error']))}</code></p>")

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
        body.append(f'<p class="note">{html.escape(note)}, <code>{html.escape(str(t.get("checkpoint")))}</code>, on {examples}.</p>')
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
    body.append(f"<p>command: <code>{html.escape(' '.join(str(a) for a in record.get('command') or []))}</code></p>")
    body.append(_kv_table(job))
    body.append("<h2>Provenance</h2>")
    body.append(_kv_table(record.get("provenance") or {}) if record.get("provenance") else '<p class="note">No provenance recorded.</p>')
    if record.get("tracking"):
        body.append("<h3>Tracking</h3>" + _kv_table(record["tracking"]))
    subtitle = f"{_status(record.get('status'))} &middot; <code>{html.escape(run.uri)}</code> &middot; started {html.escape(str(record.get('started')))} &middot; ended {html.escape(str(record.get('ended')))}"
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


def render_sweep(sweep: SweepData) -> str:
    """The HTML report of a sweep: metric against each parameter, every trial's curve, parallel coordinates, the table."""
    import matplotlib
    import matplotlib.cm as cm
    from matplotlib.colors import Normalize

    metric, mode = sweep.metric, sweep.mode
    params_spec = sweep.spec.get("parameters") or {}
    params = list(dict.fromkeys([*params_spec, *(k for t in sweep.trials for k in t.get("config", {}))]))
    scored = [t for t in sweep.trials if _finite(t.get("best_metric"))]
    best = (max if mode == "max" else min)(scored, key=lambda t: t["best_metric"]) if scored else None
    figures = []

    for param in params:
        rows = [t for t in scored if param in t["config"]]
        if not rows:
            continue
        values = [t["config"][param] for t in rows]
        log = _is_log_param(params_spec.get(param), values)
        fig, ax = _new_figure(5.6, 3.8)
        numeric = all(_finite(v) for v in values)
        xs = values if numeric else _param_axis(values, False)[0]
        ax.scatter(xs, [t["best_metric"] for t in rows], s=36, color=PALETTE[0], zorder=3)
        if best is not None and param in best["config"]:
            bx = best["config"][param] if numeric else xs[rows.index(best)]
            ax.scatter([bx], [best["best_metric"]], s=120, facecolors="none", edgecolors="#d62728", linewidths=2, zorder=4, label=f"best ({best['trial_id']})")
            ax.legend(fontsize=8)
        if log and numeric:
            ax.set_xscale("log")
        if not numeric:
            _, ticks, labels = _param_axis(values, False)
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(label) for label in labels])
        ax.set(xlabel=param + (" (log scale)" if log and numeric else ""), ylabel=f"best {metric}", title=f"{metric} against {param}")
        ax.grid(alpha=0.3, which="both")
        figures.append(_embed(fig, f"Each trial's best {metric} against {param}" + (" on a log axis: equal distances are equal factors." if log and numeric else ".")))

    curves = [(t, _metric_values(t["run"], metric)) for t in sweep.trials if t.get("run")]
    curves = [(t, v) for t, v in curves if v]
    longest = max((v[-1][0] for _, v in curves), default=0)
    if curves:
        fig, ax = _new_figure(6.8, 4.2)
        stopped_label = False
        for i, (t, values) in enumerate(curves):
            color = PALETTE[i % len(PALETTE)]
            ax.plot([s for s, _ in values], [v for _, v in values], color=color, marker="o", markersize=2.5, linewidth=1.2, label=t["trial_id"] if len(curves) <= 12 else None)
            if _stopped_by_scheduler(sweep, t, values[-1][0], longest):
                ax.scatter([values[-1][0]], [values[-1][1]], marker="X", s=90, color="#d62728", zorder=4,
                           label=None if stopped_label else "stopped by the scheduler")
                stopped_label = True
        ax.set(xlabel="step", ylabel=metric, title=f"{metric} of every trial")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        figures.append(_embed(fig, f"{metric} of every trial by step; an X marks where the scheduler stopped a trial."))

    if scored and params:
        fig, ax = _new_figure(max(6.0, 1.6 * (len(params) + 1)), 4.2)
        norm = Normalize(min(t["best_metric"] for t in scored), max(t["best_metric"] for t in scored) or 1.0)
        cmap = matplotlib.colormaps["viridis_r" if mode == "min" else "viridis"]
        columns = []
        for param in params:
            values = [t["config"].get(param) for t in scored]
            log = _is_log_param(params_spec.get(param), [v for v in values if v is not None])
            columns.append((param + (" (log)" if log and all(_finite(v) for v in values) else ""), *_param_axis(values, log)))
        metric_values = [t["best_metric"] for t in scored]
        columns.append((metric, *_param_axis(metric_values, False)))
        for row in range(len(scored)):
            ys = [col[1][row] for col in columns]
            ax.plot(range(len(columns)), ys, color=cmap(norm(metric_values[row])), linewidth=2 if scored[row] is best else 1.2, alpha=0.9)
        for i, (name, _, ticks, labels) in enumerate(columns):
            ax.axvline(i, color="#444", linewidth=0.8)
            for tick, label in zip(ticks, labels):
                ax.text(i + 0.03, tick, str(label), fontsize=7, va="center")
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels([c[0] for c in columns], fontsize=8)
        ax.set_yticks([])
        ax.set_xlim(-0.2, len(columns) - 0.6)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("Parallel coordinates of the trials")
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"best {metric}", shrink=0.8)
        figures.append(_embed(fig, f"Parallel coordinates: every trial as a line through its settings and its best {metric} (colour: the metric; thick: the best trial)."))

    record = sweep.record
    rank = sorted(sweep.trials, key=lambda t: (0, -t["best_metric"] if mode == "max" else t["best_metric"]) if _finite(t.get("best_metric")) else (1, 0))
    rows = []
    for i, t in enumerate(rank, 1):
        rows.append([i, t["trial_id"], _status(t.get("status")), *(t["config"].get(p) for p in params), t.get("metric"), t.get("best_metric"), t.get("steps")])
    table = _table(rows, ["#", "trial", "status", *params, f"{metric} (last)", f"{metric} (best)", "steps"], raw=True)
    facts = [("status", record.get("status")), ("trials", len(sweep.trials)), (f"best {metric}", best["best_metric"] if best else None),
             ("best trial", best["trial_id"] if best else None), ("wall (s)", (record.get("result") or {}).get("wall_s"))]
    body = [_facts(facts), "<h2>Trials</h2>", table]
    body.append("<h2>Figures</h2>")
    body.append('<div class="grid">' + "".join(figures) + "</div>" if figures else '<p class="note">No trial has reported the metric yet.</p>')
    body.append("<h2>Search</h2>" + _kv_table(sweep.spec))
    body.append("<h2>Base job</h2>" + _kv_table(record.get("job") or {}))
    subtitle = f"{_status(record.get('status'))} &middot; <code>{html.escape(sweep.uri)}</code> &middot; metric {html.escape(metric)} ({html.escape(mode)}) &middot; started {html.escape(str(record.get('started')))}"
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
