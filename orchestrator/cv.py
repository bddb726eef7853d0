"""K-fold cross-validation of a job: every fold a run, trained side by side as a grid sweep over `data.fold`.

A cross-validation is a sweep (orchestrator.sweep) whose only parameter is `data.fold`, FIFO, its trials
named `fold-<i>`; so the folds run in parallel on Ray, each is a normal run with its own checkpoints,
a rerun of a killed cross-validation trains only the folds that did not finish, and with a `tracking`
section the cross-validation is an MLflow run with the folds as its children. What it adds is the
aggregate, written to `cv.json` beside the fold runs:

```
<checkpoint.storage>/<job name>-cv/
  fold-0/ ... fold-<k-1>/   the fold runs (run.json, metrics.jsonl, checkpoints, test.json)
  sweep.json  tune/         the sweep machinery's record and Tune's experiment state
  cv.json                   per fold: each validation metric's best value and its step; mean, std, 95% CI
  report.html               the folds' curves, a strip plot per metric, the table (orchestrator.report.cv_page)
```

On a cluster's dashboard address the cross-validation is submitted through the Jobs API (`submit_cv`: the
sweep's submission with `orchestrator cv` as its entrypoint); `orchestrator k8s render --cv` makes it a RayJob.
"""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.aggregate import aggregate, fold_metrics, is_number, metric_mode
from orchestrator.errors import BadInput
from orchestrator.rundir import REPORT, RunDir, run_uri_for
from orchestrator.runrecord import RunRecord, RunStatus
from orchestrator.spec import ParamSpec, SweepSpec, apply_overrides, build_spec, read_job_file
from orchestrator.sweep.load import SweepJob

CV_RECORD = "cv.json"
FOLD_FIELD = "data.fold"


def load_cv(path: str, overrides: list[str] | None = None, fresh: bool = False) -> SweepJob:
    """A job file read as a cross-validation: the grid sweep over its `data.folds` folds; BadInput/SpecError first."""
    raw = read_job_file(path)
    raw = apply_overrides(raw, overrides or [])
    spec = build_spec(raw)
    if spec.entrypoint:
        raise BadInput("entrypoint: a bring-your-own loop reports its own metrics; cv runs the built-in loop")
    folds = spec.data.folds
    if folds is None:
        raise BadInput("data.folds: cv needs the number of folds, e.g. `orchestrator cv job.yaml data.folds=5`")
    job = {k: v for k, v in raw.items() if k != "sweep"}  # a sweep section is another command's
    spec = build_spec(job)
    metric = spec.checkpoint.best_metric or (spec.early_stopping.metric if spec.early_stopping else "val_loss")
    name = f"{spec.name}-cv"
    if fresh:
        name = f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    sweep = SweepSpec(
        name=name,
        parameters={FOLD_FIELD: ParamSpec(type="grid", values=list(range(folds)))},
        search="grid",
        metric=metric,
        # Every fold at once as far as Ray's CPUs go: each trial reserves its own, so Ray paces the rest.
        max_concurrent_trials=folds,
    )
    return SweepJob(
        job=job,
        spec=spec,
        sweep=sweep,
        name=name,
        uri=run_uri_for(spec, name),
        job_file=str(path),
        base_dir=str(Path(path).resolve().parent),
        kind="cross-validation",
        name_field="name",
    )


def run_cv(
    cv: SweepJob, address: str | None = None, quiet: bool = False, verbose: bool = False, refit: bool = False
) -> dict[str, Any]:
    """Train every fold (the unfinished ones of an interrupted cross-validation), then aggregate; the result is cv.json's.

    With `refit`, a finished cross-validation is followed by one run on all the non-test data (`refit_job`).
    """
    from orchestrator.sweep.run import run_sweep

    done: dict[str, Any] = {}

    def conclude(result: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
        done["cv"] = write_cv(cv, result)
        return tracked_metrics(done["cv"]), [RunDir.open(cv.uri, cv.endpoint).uri_of(CV_RECORD)]

    result = run_sweep(cv, address=address, quiet=quiet, verbose=verbose, name_by=FOLD_FIELD, conclude=conclude)
    if "cv" not in done:  # finished before: the fold runs' records say it all again
        done["cv"] = {**write_cv(cv, result), "already_finished": True}
    out = done["cv"]
    if refit and out["status"] == RunStatus.FINISHED:
        from orchestrator.report import write_report_safely

        out["refit"] = run_refit(cv, out, address, quiet)
        home = RunDir.open(cv.uri, cv.endpoint)
        home.write_json(CV_RECORD, {k: v for k, v in out.items() if k != "already_finished"}, indent=1)
        write_report_safely(home)
    return out


def submit_cv(
    path: str, overrides: list[str], address: str, fresh: bool = False, refit: bool = False, out=None
) -> dict[str, Any]:
    """Submit the cross-validation to a cluster's Jobs API (`orchestrator cv ... --ray-address auto` there), follow it, return cv.json's content.

    Everything is checked here first (the job, the package, the cluster and its token); a fresh name is decided here,
    once, as a `name` override, so that the cluster does not pick another one.
    """
    from orchestrator.sweep.submit import submit_sweep

    if fresh:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        overrides = [*overrides, f"name={build_spec(apply_overrides(read_job_file(path), overrides)).name}-{stamp}"]
    cv = load_cv(path, overrides)
    return submit_sweep(cv, overrides, address, out=out, command="cv", flags=("--refit",) if refit else ())


REFIT_RUN = "refit"  # the refit's run directory inside the cross-validation's


def refit_epochs(cv_result: dict[str, Any]) -> int:
    """The refit's length: the mean over the folds of the epoch at which each reached its best of the cv's metric."""
    metric = cv_result["metric"]
    epochs = [
        f["metrics"][metric]["epoch"] for f in cv_result["folds"] if (f["metrics"].get(metric) or {}).get("epoch")
    ]
    if not epochs:
        raise BadInput(f"--refit: no fold recorded the epoch of its best {metric}")
    return max(1, round(sum(epochs) / len(epochs)))


def refit_job(cv: SweepJob, epochs: int) -> dict[str, Any]:
    """The job trained on all the non-test data: no folds, no validation split (nothing left to stop early on), `epochs` long."""
    job = copy.deepcopy(cv.job)
    data = {k: v for k, v in (job.get("data") or {}).items() if k not in ("folds", "fold", "stratify")}
    job["data"] = data  # the test split depends on the seed and test_split only: the same one the folds never saw
    job["validation"] = {**(job.get("validation") or {}), "split": 0.0, "every_n_steps": None}
    job.pop("early_stopping", None)
    job["train"] = {**(job.get("train") or {}), "epochs": epochs, "max_steps": None}
    job["checkpoint"] = {**(job.get("checkpoint") or {}), "storage": cv.uri, "best_metric": None, "best_mode": None}
    if (job.get("schedule") or {}).get("name") == "plateau":
        raise BadInput(
            "--refit: schedule.name plateau follows a validation metric, and a refit has no validation split"
        )
    job["name"] = REFIT_RUN
    return job


def run_refit(cv: SweepJob, cv_result: dict[str, Any], address: str | None, quiet: bool) -> dict[str, Any]:
    """Train the refit job (a run in `<cv>/refit`, resumable like any) and evaluate it on the test split; what cv.json says of it."""
    from orchestrator.launch import run_job

    epochs = refit_epochs(cv_result)
    spec = build_spec(refit_job(cv, epochs))
    summary = run_job(spec, job_file=cv.job_file, address=address, quiet=quiet)
    test = summary.test
    return {
        "run_uri": summary.run_uri,
        "status": str(summary.status),
        "epochs": epochs,
        "steps": summary.steps,
        # The result of the cross-validation as a model: the refit's last checkpoint, the one evaluated on the test split.
        "checkpoint": (test.checkpoint if test else None) or summary.checkpoint,
        "test": {k: v for k, v in (test.metrics if test else {}).items() if is_number(v)},
    }


def summarize_folds(cv: SweepJob, sweep_result: dict[str, Any]) -> dict[str, Any]:
    """cv.json from the fold runs' own records: per fold its status, steps, best validation values and test metrics; the aggregate."""
    by_fold = {(t.get("config") or {}).get(FOLD_FIELD): t for t in sweep_result.get("trials") or []}
    folds = []
    for i in range(cv.spec.data.folds or 0):
        run = RunDir.open(f"{cv.uri}/fold-{i}", cv.endpoint)
        record = RunRecord.load(run)
        summary = record.summary if record else None
        test = summary.test.metrics if summary and summary.test else {}
        folds.append(
            {
                "fold": i,
                "run_uri": run.uri,
                "status": str(record.status) if record else (by_fold.get(i) or {}).get("status", "missing"),
                "steps": summary.steps if summary else None,
                "checkpoint": summary.checkpoint if summary else None,
                "metrics": fold_metrics(run) if record else {},
                "test": {k: v for k, v in test.items() if is_number(v)},
            }
        )
    names = sorted({k for f in folds for k in f["metrics"]})
    metrics = {}
    for name in names:
        scored = [f for f in folds if name in f["metrics"]]
        metrics[name] = {
            **aggregate([f["metrics"][name]["best"] for f in scored]),
            "mode": metric_mode(name),
            "best_step": aggregate([float(f["metrics"][name]["step"]) for f in scored])["mean"],
        }
    test_names = sorted({k for f in folds for k in f["test"]})
    test = {name: aggregate([f["test"][name] for f in folds if name in f["test"]]) for name in test_names}
    finished = all(f["status"] == RunStatus.FINISHED for f in folds)
    return {
        "cv": cv.name,
        "cv_uri": cv.uri,
        "status": str(
            RunStatus.FINISHED if finished and sweep_result.get("status") == "finished" else RunStatus.FAILED
        ),
        "folds_count": len(folds),
        "metric": cv.sweep.metric,
        "folds": folds,
        "metrics": metrics,
        "test": test,
        "total_steps": sum(f["steps"] or 0 for f in folds),
        "resumed": bool(sweep_result.get("resumed")),
        "tracking": sweep_result.get("tracking") or {},
        "wall_s": sweep_result.get("wall_s"),
        "job_file": cv.job_file,
    }


def write_cv(cv: SweepJob, sweep_result: dict[str, Any]) -> dict[str, Any]:
    """Aggregate the folds and write cv.json, then its report (`<cv>/report.html`); return cv.json's content."""
    from orchestrator.report import write_report_safely  # the report's figures: only once the folds are done

    home = RunDir.open(cv.uri, cv.endpoint)
    out = {**summarize_folds(cv, sweep_result), "report": home.uri_of(REPORT)}
    home.write_json(CV_RECORD, out, indent=1)
    if write_report_safely(home) is None:
        out["report"] = None
    return out


def tracked_metrics(cv_result: dict[str, Any]) -> dict[str, float]:
    """The aggregate as MLflow metrics of the cross-validation's run: cv_<metric>_mean, _std, _ci95_low, _ci95_high."""
    out: dict[str, float] = {}
    for section in (cv_result["metrics"], cv_result["test"]):
        for name, agg in section.items():
            out[f"cv_{name}_mean"] = agg["mean"]
            if agg["std"] is not None:
                out[f"cv_{name}_std"] = agg["std"]
                out[f"cv_{name}_ci95_low"], out[f"cv_{name}_ci95_high"] = agg["ci95"]
    return {k: float(v) for k, v in out.items() if is_number(v)}


def format_cv(result: dict[str, Any]):
    """The table people read: one row per metric, the best value (and its step) of each fold, mean, std, 95% CI."""
    from rich.table import Table

    folds = result["folds"]
    table = Table("metric", *(f"fold {f['fold']}" for f in folds), "mean", "std", "95% CI")
    for name, agg in result["metrics"].items():
        cells = []
        for f in folds:
            got = f["metrics"].get(name)
            cells.append(f"{got['best']:.4f} @{got['step']}" if got else "-")
        table.add_row(name, *cells, *_summary_cells(agg))
    for name, agg in result["test"].items():
        cells = [f"{f['test'][name]:.4f}" if name in f["test"] else "-" for f in folds]
        table.add_row(name, *cells, *_summary_cells(agg))
    lines = [
        f"{result['status']}: cv {result['cv']}  {result['folds_count']} folds  {result['total_steps']} steps"
        + (f"  wall {result['wall_s']:.1f}s" if is_number(result.get("wall_s")) else ""),
        "  val_*: each fold's best validation value @ its step; test_*: each fold's best checkpoint on the test split",
        f"  record: {result['cv_uri']}/{CV_RECORD}",
        *([f"  report: {result['report']}"] if result.get("report") else []),
        *_refit_lines(result.get("refit")),
    ]
    return table, "\n".join(lines)


def _refit_lines(refit: dict[str, Any] | None) -> list[str]:
    if not refit:
        return []
    tested = "  ".join(f"{k} {v:.4f}" for k, v in refit["test"].items())
    return [
        f"  refit on all non-test data, {refit['epochs']} epochs (the folds' mean best epoch): {refit['status']}",
        f"    test: {tested or '-'}",
        f"    checkpoint: {refit['checkpoint']}",
    ]


def _summary_cells(agg: dict[str, Any]) -> list[str]:
    if agg["std"] is None:
        return [f"{agg['mean']:.4f}", "-", "-"]
    low, high = agg["ci95"]
    return [f"{agg['mean']:.4f}", f"{agg['std']:.4f}", f"[{low:.4f}, {high:.4f}]"]
