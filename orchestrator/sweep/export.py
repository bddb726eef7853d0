"""The end of a sweep: one row per trial, ranked; the table people read; the best trial as a job file to run."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator import storage
from orchestrator.aggregate import aggregate, fold_metrics, fold_runs, spread_text
from orchestrator.rundir import RunDir
from orchestrator.runrecord import RunRecord, RunStatus
from orchestrator.spec import JobSpec, apply_overrides
from orchestrator.sweep.load import SweepJob, _override_text, _plain, settings_text, short, trial_spec

BEST_JOB = "best.yaml"


def trial_status(tune_status: str, run_state: str | None) -> str:
    """A trial in words: running, pending, paused, done (trained to its end), stopped (by the scheduler) or error."""
    if tune_status == "TERMINATED":
        # Tune marks both "done"; only the run itself knows whether it reached its end.
        return "done" if run_state == RunStatus.FINISHED else "stopped"
    return {"RUNNING": "running", "PENDING": "pending", "PAUSED": "paused", "ERROR": "error"}.get(
        tune_status, tune_status.lower()
    )


@dataclass
class TrialRow:
    """One trial as the sweep's result lists it (`--json`'s `trials`, sweep.json)."""

    trial_id: str
    status: str  # done, stopped, error (trial_status)
    config: dict[str, Any]
    metric: float | None  # the last reported value of the sweep's metric
    best_metric: float | None  # its best over all validations
    metrics: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    epochs: int | None = None
    run_uri: str | None = None
    checkpoint: str | None = None
    error: str | None = None
    # sweep.cv_folds: `metric` and `best_metric` are the mean over the folds of each fold's best; these say its spread.
    metric_std: float | None = None
    metric_ci95: list[float] | None = None
    fold_metrics: list[float | None] | None = None  # each fold's best, in fold order (None: the fold did not get one)


def collect_trials(results, sweep: SweepJob) -> list[TrialRow]:
    """One row per trial from Tune's results, ranked by the sweep's metric (each trial's best value), best first.

    The best value, not the last: the report ranks by it, and a trial's best checkpoint is the one kept.
    """
    metric, mode = sweep.sweep.metric, sweep.sweep.mode
    rows = []
    for result in results:
        trial_id = Path(result.path).name
        last = dict(result.metrics or {})
        if sweep.sweep.cv_folds:
            rows.append(cross_validated_row(sweep, trial_id, result))
            continue
        run = RunDir.open(f"{sweep.uri}/{trial_id}", sweep.endpoint)
        values = [e.get(metric) for e in run.read_metrics() if e.get("split") == "val"]
        values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
        record = RunRecord.load(run)
        summary = record.summary if record else None
        status = "error" if result.error else trial_status("TERMINATED", record.status if record else None)
        rows.append(
            TrialRow(
                trial_id=trial_id,
                status=status,
                config={k: _plain(v) for k, v in (result.config or {}).items()},
                metric=last.get(metric),
                best_metric=(max(values) if mode == "max" else min(values)) if values else None,
                metrics={k: v for k, v in last.items() if k.startswith("val_") or k in ("step", "epoch", "lr")},
                # The trial may have trained past its last report before it saw a stop (reports are asynchronous).
                steps=max(
                    (v for v in (last.get("step"), summary.steps if summary else None) if isinstance(v, int)),
                    default=None,
                ),
                epochs=last.get("epoch"),
                run_uri=run.uri,
                checkpoint=summary.checkpoint if summary else None,
                error=str(result.error).strip().splitlines()[-1] if result.error else None,
            )
        )

    def rank(row: TrialRow) -> tuple:
        if not isinstance(row.best_metric, (int, float)) or math.isnan(row.best_metric):
            return (1, 0.0)
        return (0, -row.best_metric if mode == "max" else row.best_metric)

    return sorted(rows, key=rank)


def cross_validated_row(sweep: SweepJob, trial_id: str, result) -> TrialRow:
    """A trial scored by k-fold cross-validation, from its fold runs' own records: the mean, std and 95% CI of the
    folds' best values of the metric (a trial is scored only when every fold has one), the folds' steps summed."""
    metric = sweep.sweep.metric
    bests: list[float | None] = []
    statuses, steps = [], 0
    for uri in fold_runs(f"{sweep.uri}/{trial_id}", sweep.sweep.cv_folds or 0):
        run = RunDir.open(uri, sweep.endpoint)
        record = RunRecord.load(run)
        statuses.append(record.status if record else None)
        steps += (record.summary.steps if record and record.summary else 0) or 0
        bests.append((fold_metrics(run).get(metric) or {}).get("best") if record else None)
    scored = [b for b in bests if b is not None]
    agg = aggregate(scored) if scored and len(scored) == len(bests) else None
    done = all(s == RunStatus.FINISHED for s in statuses)
    return TrialRow(
        trial_id=trial_id,
        status="error" if result.error else ("done" if done else "stopped"),
        config={k: _plain(v) for k, v in (result.config or {}).items()},
        metric=agg["mean"] if agg and done else None,
        best_metric=agg["mean"] if agg else None,
        metrics={k: v for k, v in (result.metrics or {}).items() if k.startswith("val_") or k == "step"},
        steps=steps,
        run_uri=f"{sweep.uri}/{trial_id}",
        error=str(result.error).strip().splitlines()[-1] if result.error else None,
        metric_std=agg["std"] if agg else None,
        metric_ci95=agg["ci95"] if agg else None,
        fold_metrics=bests,
    )


def format_trials(rows: list[dict[str, Any]], metric: str):
    """The end-of-sweep table: trials ranked by the metric, with their settings, steps and status."""
    from rich.table import Table
    from rich.text import Text

    params = list(dict.fromkeys(k for row in rows for k in row["config"]))
    folds = max((len(row.get("fold_metrics") or []) for row in rows), default=0)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    if folds:  # scored by cross-validation: the folds' mean, its spread, and each fold's best
        scores = [f"{metric} ({folds}-fold mean)", "std [95% CI]", *(f"fold {i}" for i in range(folds))]
        table = Table("#", "trial", "status", *params, *scores, "steps")
    else:
        table = Table("#", "trial", "status", *params, f"{metric} (last)", f"{metric} (best)", "steps", "epochs")
    for i, row in enumerate(rows, 1):
        if folds:
            each = list(row.get("fold_metrics") or [])
            scored = (
                fmt(row["best_metric"]),
                spread_text(row) or "-",
                *(fmt(v) for v in each + [None] * (folds - len(each))),
            )
            tail: tuple[str, ...] = (fmt(row["steps"]),)
        else:
            scored = (fmt(row["metric"]), fmt(row["best_metric"]))
            tail = (fmt(row["steps"]), fmt(row["epochs"]))
        cells = (
            str(i),
            row["trial_id"],
            row["status"],
            *(short(row["config"].get(p)) for p in params),
            *scored,
            *tail,
        )
        table.add_row(*(Text(str(c)) for c in cells))  # Text: choice values are shown as written, not as markup
    return table


def format_result(result: dict[str, Any]) -> tuple[Any, str]:
    """The human end of a sweep (its result as JSON, from here or from a cluster): the ranked table (rich), then the best trial and its job file."""
    best = result.get("best")
    lines = [
        f"{result['status']}: sweep {result['sweep']}  {len(result['trials'])} trials  {result['total_steps']} steps  wall {result['wall_s']:.1f}s"
    ]
    if best:
        ranked = next((t for t in result["trials"] if t["trial_id"] == best["trial_id"]), {})
        spread = f" {spread_text(ranked)} over {len(ranked['fold_metrics'])} folds" if spread_text(ranked) else ""
        value = best.get("best_metric", best["metric"])  # the trial's best, as the report shows it
        lines.append(
            f"  best {result['metric']} {value:.4f}{spread}: {best['trial_id']}  {settings_text(best['config'])}"
        )
        if best.get("checkpoint"):  # a cross-validated trial has k, one per fold: its job file is the result
            lines.append(f"  checkpoint: {best['checkpoint']}")
        lines.append(f"  best job file: {result['best_job_file']}")
        if spread:  # its job keeps the folds: its cross-validation again, then one model on all the non-test data
            lines.append(f"  train it: orchestrator cv {result['best_job_file']} --refit")
        else:
            lines.append(f"  run it: orchestrator run {result['best_job_file']}")
    if result.get("report"):
        lines.append(f"  report: {result['report']}")
    return format_trials(result["trials"], result["metric"]), "\n".join(lines)


def best_job(sweep: SweepJob, best: TrialRow) -> dict[str, Any]:
    """The best trial as a runnable job: the job file's sections with its settings, its own run name, paths made absolute."""
    ranges = {**sweep.sweep.parameters, **sweep.sweep.scheduler.mutations}
    spec = trial_spec(sweep.job, best.config, f"{sweep.name}-best", ranges)  # validates, and clamps as the trial did
    job = apply_overrides({**sweep.job, "name": spec.name}, [_override_text(p, _dotted(spec, p)) for p in best.config])
    job.setdefault("checkpoint", {})["storage"] = (
        storage.split_uri(spec.checkpoint.storage)[1]
        if storage.split_uri(spec.checkpoint.storage)[0] == "file"
        else spec.checkpoint.storage
    )
    path = spec.data.path
    if path and "://" not in path and not os.path.isabs(path):
        job["data"]["path"] = str(Path(sweep.base_dir) / path)  # the file may be run from anywhere
    return job


def _dotted(spec: JobSpec, path: str) -> Any:
    node: Any = spec.to_dict()
    for part in path.split("."):
        node = node[part]
    return node


def write_best_job(sweep: SweepJob, best: TrialRow, out: str | None) -> str:
    """Write the best trial's job file (to `out`, else `<sweep>/best.yaml`; a remote sweep also gets a local copy); return where."""
    job = best_job(sweep, best)
    header = (
        f"# The best trial of sweep {sweep.name} ({best.trial_id}): {sweep.sweep.metric} {best.best_metric:.4f}\n"
        f"# settings: {settings_text(best.config)}\n"
        + (
            f"# its {sweep.sweep.cv_folds}-fold mean; train it: orchestrator cv <this file> --refit\n"
            if sweep.sweep.cv_folds
            else "# run it: orchestrator run <this file>\n"
        )
    )
    text = header + yaml.safe_dump(job, sort_keys=False)
    home = RunDir.open(sweep.uri, sweep.endpoint)
    storage.write_bytes(home.fs, home.path(BEST_JOB), text.encode())
    target = out
    if target is None and not home.is_local:
        target = f"{sweep.name}.best.yaml"  # runnable here: `orchestrator run` reads local job files
    if target is None:
        return home.path(BEST_JOB)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(text)
    return str(Path(target).resolve())
