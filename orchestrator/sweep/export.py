"""The end of a sweep: one row per trial, ranked; the table people read; the best trial as a job file to run."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator import storage
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


def collect_trials(results, sweep: SweepJob) -> list[TrialRow]:
    """One row per trial from Tune's results, ranked by the sweep's metric (last reported value), best first."""
    metric, mode = sweep.sweep.metric, sweep.sweep.mode
    rows = []
    for result in results:
        trial_id = Path(result.path).name
        last = dict(result.metrics or {})
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
        if not isinstance(row.metric, (int, float)) or math.isnan(row.metric):
            return (1, 0.0)
        return (0, -row.metric if mode == "max" else row.metric)

    return sorted(rows, key=rank)


def format_trials(rows: list[dict[str, Any]], metric: str):
    """The end-of-sweep table: trials ranked by the metric, with their settings, steps and status."""
    from rich.table import Table
    from rich.text import Text

    params = list(dict.fromkeys(k for row in rows for k in row["config"]))
    table = Table("#", "trial", "status", *params, f"{metric} (last)", f"{metric} (best)", "steps", "epochs")
    for i, row in enumerate(rows, 1):
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
        cells = (
            str(i),
            row["trial_id"],
            row["status"],
            *(short(row["config"].get(p)) for p in params),
            fmt(row["metric"]),
            fmt(row["best_metric"]),
            fmt(row["steps"]),
            fmt(row["epochs"]),
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
        lines.append(
            f"  best {result['metric']} {best['metric']:.4f}: {best['trial_id']}  {settings_text(best['config'])}"
        )
        lines.append(f"  checkpoint: {best['checkpoint']}")
        lines.append(f"  best job file: {result['best_job_file']}")
        lines.append(f"  run it: orchestrator run {result['best_job_file']}")
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
        f"# The best trial of sweep {sweep.name} ({best.trial_id}): {sweep.sweep.metric} {best.metric:.4f}\n"
        f"# settings: {settings_text(best.config)}\n"
        f"# run it: orchestrator run <this file>\n"
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
