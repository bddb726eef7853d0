"""The Tune run of a sweep: start it, or continue an interrupted one; record what came of it in sweep.json.

A sweep lives in `<checkpoint.storage>/<sweep name>/`: one run directory per trial, Tune's experiment
state in `tune/` (what a rerun of an interrupted sweep restores), `sweep.json` (the record) and
`best.yaml` (the best trial as a job).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.aggregate import fold_runs
from orchestrator.errors import BadInput
from orchestrator.lease import RunLease
from orchestrator.preflight import preflight
from orchestrator.provenance import collect_provenance
from orchestrator.ray_runtime import resolve_address, start_ray
from orchestrator.rundir import REPORT, RUN_RECORD, RunDir
from orchestrator.runrecord import RunRecord, RunStatus, summary_from_checkpoints
from orchestrator.spec import JobSpec, build_spec
from orchestrator.spec.identity import changes, refusal, sweep_settings_of
from orchestrator.spec.identity import fingerprint as settings_fingerprint
from orchestrator.sweep.export import TrialRow, collect_trials, write_best_job
from orchestrator.sweep.load import SweepJob
from orchestrator.sweep.schedulers import build_scheduler, build_search, trial_resources
from orchestrator.sweep.space import build_param_space
from orchestrator.sweep.trial import TrialPlan, trial_dir_name, trial_trainable
from orchestrator.tracking import TrackingSession, mlflow_tracking_uri

SWEEP_RECORD = "sweep.json"
TUNE_DIR = "tune"  # Tune's experiment directory inside the sweep's

log = logging.getLogger(__name__)


def tune_storage(sweep_uri: str, endpoint_url: str | None) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Tune's experiment state under the sweep's URI."""
    protocol, path = storage.split_uri(sweep_uri)
    if protocol == "file":
        return path, None
    if protocol in ("s3", "s3a"):
        from pyarrow import fs as pafs

        kwargs: dict[str, Any] = {}
        endpoint = endpoint_url or storage.endpoint_from_env()
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "http" if endpoint.startswith("http://") else "https"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return path, pafs.S3FileSystem(**kwargs)
    return sweep_uri, None


def sweep_tracking_spec(spec: JobSpec) -> JobSpec:
    """The job as the sweep's own run tracks it: in MLflow only (TensorBoard events are the trials', each under its run)."""
    out = spec.model_copy(deep=True)
    out.tracking.tensorboard = None
    return out


# What a caller of run_sweep makes of its finished result: metrics for the sweep's MLflow run, files to attach to it.
Conclude = Callable[[dict[str, Any]], tuple[dict[str, float], list[str]]]


def run_sweep(
    sweep: SweepJob,
    address: str | None = None,
    best_out: str | None = None,
    quiet: bool = False,
    verbose: bool = False,
    name_by: str | None = None,
    conclude: Conclude | None = None,
) -> dict[str, Any]:
    """Validate, then run (or continue) the sweep with Ray Tune; return the result (also in sweep.json).

    With a `tracking` section the sweep is an MLflow run of its own, and each trial's run is its child.
    `name_by` names each trial's directory by a searched field (`trial_dir_name`); `conclude`, when given,
    replaces the best trial (no best.yaml) as what closes the sweep's MLflow run: cross-validation's aggregate.
    """
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if quiet else (lambda msg: print(msg, flush=True))
    t0 = time.time()
    home = RunDir.open(sweep.uri, sweep.endpoint)
    if sweep.spec.data.engine == "ray":
        # Tune's trials hold the CPUs Ray Data's read tasks would need (a sweep at full concurrency would wait
        # forever), and a trial's resources do not count them: sweeps stay with the native reader.
        raise BadInput(
            "data.engine: ray is for `orchestrator run`; sweep and cv trials read parquet natively (engine: native)"
        )
    address = resolve_address(address)
    try:
        data_info = preflight(sweep.spec, sweep.base_dir, address)
    except BadInput as exc:
        if sweep.sweep.cv_folds and exc.lines[0].startswith("data.folds:"):  # the job's folds are sweep.cv_folds' here
            raise BadInput("sweep.cv_folds:" + exc.lines[0].removeprefix("data.folds:")) from None
        raise
    # One lease for the whole sweep: its trials' directories live under the sweep's, and only this driver starts them.
    lease = RunLease.for_run(home, sweep.spec.checkpoint.lease_ttl_s).acquire()
    try:
        check_identity(sweep, home.read_json(SWEEP_RECORD))
        leased = dataclasses.replace(sweep, lease=lease.token_ref())
        return _run_leased(leased, home, address, data_info, best_out, say, verbose, t0, name_by, conclude)
    finally:
        lease.release()


def check_identity(sweep: SweepJob, record: dict[str, Any] | None) -> None:
    """The rerun rule of runs (spec.identity), for a sweep or a cross-validation: other settings are refused, naming each."""
    if not record:
        return
    if "settings" not in record and record.get("fingerprint") == sweep.fingerprint():
        return  # recorded before settings were kept field by field, and the same
    recorded = _recorded_settings(record)
    found = changes(recorded, sweep.settings()) if recorded is not None else []
    if recorded is None or found:
        finished = record.get("status") == RunStatus.FINISHED
        raise refusal(sweep.uri, sweep.kind, finished, found, sweep.name_field, None)


def _recorded_settings(record: dict[str, Any]) -> dict[str, Any] | None:
    """The identity a sweep.json holds; for one written before it kept it, read again from its job and search."""
    if "settings" in record:
        return record["settings"]
    try:
        return sweep_settings_of(build_spec(record["job"]).to_dict(), record["spec"])
    except (BadInput, KeyError, TypeError, ValueError):
        return None


def _run_leased(
    sweep: SweepJob,
    home: RunDir,
    address: str | None,
    data_info: Any,
    best_out: str | None,
    say,
    verbose: bool,
    t0: float,
    name_by: str | None,
    conclude: Conclude | None,
) -> dict[str, Any]:
    """The rest of `run_sweep`, with the sweep directory's lease held."""
    record = home.read_json(SWEEP_RECORD)
    if record and record.get("status") == RunStatus.FINISHED:
        say(f"{sweep.uri}: already finished; nothing to do (use --fresh for a new sweep)")
        return {**record["result"], "already_finished": True, "wall_s": round(time.time() - t0, 3)}
    fingerprint = getattr(data_info, "fingerprint", None)
    prov = collect_provenance(sweep.spec, sweep.base_dir, fingerprint, hosts=1 if address is None else None)
    tracking_spec = sweep_tracking_spec(sweep.spec)
    session = None
    if sweep.spec.tracking.mlflow is not None:
        session = TrackingSession.start(
            tracking_spec, sweep.uri, sweep.name, prov, previous=(record or {}).get("tracking")
        )
    tracked = session.to_record() if session else {}

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables off: the live view replaces them
    # Tune's result.json, progress.csv and TensorBoard files per trial: each trial's run directory keeps its metrics
    # (metrics.jsonl, its own TensorBoard), and nothing reads Tune's copies. Writing them is the driver's work on every
    # report of every trial, and TensorBoardX's import (0.3 s) comes first.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # A restored sweep's analysis looks for trial results before any exist, and warns about each: noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.logger.logger").setLevel(logging.ERROR)  # the same about a PBT-restored trial
    connected = start_ray(address, log_to_driver=verbose)
    try:
        plan = TrialPlan(
            job=sweep.job,
            sweep_name=sweep.name,
            sweep_uri=sweep.uri,
            base_dir=sweep.base_dir,
            endpoint=sweep.endpoint,
            ranges={**sweep.sweep.parameters, **sweep.sweep.scheduler.mutations},
            pbt=sweep.sweep.scheduler.name == "pbt",
            decides_at_reports=sweep.sweep.scheduler.name != "fifo",
            verbose=verbose,
            job_file=sweep.job_file,
            parent_run_id=session.mlflow_run_id if session else None,
            experiment=session.experiment if session else None,
            data_fingerprint=fingerprint,
            embedded_ray=connected and not address,
            name_by=name_by,
            cv_folds=sweep.sweep.cv_folds,
            lease=sweep.lease,
        )
        results, resumed = _fit(sweep, home, plan, record, say, prov, tracked, t0)
    except Exception:
        if session is not None:
            session.finish(tracking_spec, RunStatus.FAILED, None, [])
        raise
    finally:
        if connected:
            from orchestrator.ray_runtime import stop_ray  # Ray is loaded by start_ray already; never in local mode

            stop_ray()
    end_unfinished_trials(sweep, results)
    rows = collect_trials(results, sweep)
    return _finish(sweep, home, rows, resumed, tracked, best_out, session, tracking_spec, t0, conclude)


def _fit(
    sweep: SweepJob,
    home: RunDir,
    plan: TrialPlan,
    record: dict[str, Any] | None,
    say,
    prov: dict[str, Any],
    tracked: dict[str, Any],
    t0: float,
):
    """Tune's fit of the trials: a new Tuner, or the interrupted sweep's restored (finished trials kept); (results, resumed)."""
    from ray import tune
    from ray.air._internal import usage

    from orchestrator.sweep.progress import live_view

    usage.tag_callbacks = _tag_callbacks_without_imports  # a new and a restored Tuner both call it

    storage_path, storage_fs = tune_storage(sweep.uri, sweep.endpoint)
    experiment = (
        storage.join(storage_path, TUNE_DIR) if storage_fs is not None else os.path.join(storage_path, TUNE_DIR)
    )
    trainable = tune.with_resources(trial_trainable(plan), trial_resources(sweep.spec))
    # A restored Tuner keeps the interrupted sweep's live view, which prints through this process's `say` from here on.
    progress = live_view(
        sweep.uri,
        sweep.endpoint,
        sweep.sweep.metric,
        sweep.sweep.mode,
        say,
        name_by=plan.name_by,
        cv_folds=sweep.sweep.cv_folds,
    )
    if record and plan.name_by is not None:
        # Trials named by a field (cv's folds) are known by their run directories, whose records say which finished:
        # a new Tuner over the same grid continues them (a finished one reports its end, the others resume from their
        # checkpoints) without Tune's experiment state, which a kill in the middle of its writing leaves torn.
        say(f"continuing {sweep.name} from {sweep.uri} (finished trials are kept, the others resume)")
        home.write_json(
            SWEEP_RECORD,
            {**record, "status": str(RunStatus.RUNNING), "provenance": prov, "tracking": tracked},
            indent=1,
        )
        return _new_tuner(sweep, trainable, plan, storage_path, storage_fs, progress).fit(), True
    if record and tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        say(f"continuing sweep {sweep.name} from {sweep.uri} (finished trials are kept)")
        home.write_json(SWEEP_RECORD, {**record, "provenance": prov, "tracking": tracked}, indent=1)
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage_fs
        )
        return tuner.fit(), True
    s = sweep.sweep
    say(
        f"sweep {sweep.name}: {s.trial_count} trial(s), {s.search} search, {s.scheduler.name} scheduler, {s.max_concurrent_trials} at once -> {sweep.uri}"
    )
    home.write_json(
        SWEEP_RECORD,
        {
            "sweep": sweep.name,
            "status": str(RunStatus.RUNNING),
            "started": datetime.fromtimestamp(t0, timezone.utc).isoformat(),  # the command's start, as a run's
            "fingerprint": settings_fingerprint(sweep.settings()),
            "settings": sweep.settings(),
            "job_file": sweep.job_file,
            "job": sweep.job,
            "spec": s.model_dump(mode="json"),
            "command": sys.argv,
            "provenance": prov,
            "tracking": tracked,
        },
        indent=1,
    )
    return _new_tuner(sweep, trainable, plan, storage_path, storage_fs, progress).fit(), False


def callback_counts(callbacks) -> dict[str, int]:
    """What Ray's usage tag counts of a Tune run's callbacks other than Ray's built-in ones: `CustomLoggerCallback`
    and `CustomCallback` (`ray.air._internal.usage._count_callbacks`)."""
    from ray.tune import Callback
    from ray.tune.logger import LoggerCallback

    counts: dict[str, int] = {}
    for callback in callbacks or []:
        if isinstance(callback, Callback):
            name = "CustomLoggerCallback" if isinstance(callback, LoggerCallback) else "CustomCallback"
            counts[name] = counts.get(name, 0) + 1
    return counts


def _tag_callbacks_without_imports(callbacks) -> bool:
    """Ray's usage tag of a Tune run's callbacks, recorded as `ray.air._internal.usage.tag_callbacks` records it.

    Ray's own function imports its MLflow, W&B, Comet and Aim integrations to tell built-in callbacks from a user's:
    1.9 s of the driver's CPU (MLflow alone 1.2 s), every sweep, before the first trial starts. A sweep passes only
    callbacks of its own, which Ray counts as custom ones.
    """
    import json

    from ray._common.usage.usage_lib import TagKey, record_extra_usage_tag

    counts = callback_counts(callbacks)
    if counts:
        record_extra_usage_tag(TagKey.AIR_CALLBACKS, json.dumps(counts))
    return bool(counts)


def _new_tuner(sweep: SweepJob, trainable, plan: TrialPlan, storage_path: str, storage_fs, progress):
    """Tune's Tuner of the sweep's search, its experiment state in `<sweep>/tune`."""
    from ray import tune

    s = sweep.sweep
    return tune.Tuner(
        trainable,
        param_space=build_param_space(s),
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            num_samples=s.num_samples,
            scheduler=build_scheduler(s, sweep.spec),
            search_alg=build_search(s),
            trial_name_creator=lambda t: trial_dir_name(t.trial_id, t.config, plan.name_by),
            trial_dirname_creator=lambda t: trial_dir_name(t.trial_id, t.config, plan.name_by),
            reuse_actors=True,  # a new trial in a warm process: no second torch import
        ),
        run_config=tune.RunConfig(
            # Every Tune checkpoint is kept: PBT's are pointers of a few bytes, and a PBT exploit may
            # restore from one that a smaller num_to_keep would already have deleted.
            name=TUNE_DIR,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            verbose=0,
            callbacks=[progress],
        ),
    )


def _finish(
    sweep: SweepJob,
    home: RunDir,
    rows: list[TrialRow],
    resumed: bool,
    tracked: dict[str, Any],
    best_out: str | None,
    session,
    tracking_spec: JobSpec,
    t0: float,
    conclude: Conclude | None = None,
) -> dict[str, Any]:
    """The sweep's result: the ranked trials, the best one's job file; recorded in sweep.json and closing the sweep's MLflow run."""
    ranked = [r for r in rows if isinstance(r.metric, (int, float))]
    best = ranked[0] if ranked else None
    best_file = write_best_job(sweep, best, best_out) if best and conclude is None else None
    status = RunStatus.FINISHED if rows and all(r.status in ("done", "stopped") for r in rows) else RunStatus.FAILED
    result = {
        "sweep": sweep.name,
        "sweep_uri": sweep.uri,
        "status": str(status),
        "metric": sweep.sweep.metric,
        "mode": sweep.sweep.mode,
        "trials": [asdict(r) for r in rows],
        "best": {
            k: getattr(best, k)
            for k in ("trial_id", "config", "metric", "best_metric", "metrics", "checkpoint", "run_uri")
        }
        if best
        else None,
        "best_job_file": best_file,
        "total_steps": sum(r.steps or 0 for r in rows),
        "resumed": resumed,
        "tracking": tracked,
        "wall_s": round(time.time() - t0, 3),
    }
    if conclude is None:  # a cross-validation's own report comes with its aggregate (cv.write_cv)
        result["report"] = home.uri_of(REPORT)
    record = home.read_json(SWEEP_RECORD) or {}
    record.update(status=str(status), ended=datetime.now(timezone.utc).isoformat(), result=result)
    home.write_json(SWEEP_RECORD, record, indent=1)
    if conclude is None:
        from orchestrator.report import write_report_safely  # the report's figures: only once the trials are done

        if write_report_safely(home) is None:
            result["report"] = None
    if conclude is not None:
        metrics, files = conclude(result)
        if session is not None:
            session.finish(tracking_spec, status, None, [("", f) for f in [home.uri_of(SWEEP_RECORD), *files]], metrics)
        return result
    if session is not None:
        # The sweep's run closes with what its best trial's run closed with (test_* and best_* metrics).
        best_record = RunRecord.load(RunDir.open(best.run_uri, sweep.endpoint)) if best else None
        session.finish(
            tracking_spec,
            status,
            best_record.summary if best_record else None,
            [("", home.uri_of(SWEEP_RECORD)), ("", best_file)],
        )
    return result


def end_unfinished_trials(sweep: SweepJob, results) -> None:
    """Record the end of trials whose process went away before they could: run.json still running, MLflow run still RUNNING."""
    for result in results:
        trial_uri = f"{sweep.uri}/{Path(result.path).name}"  # the trial's directory name
        for run_uri in fold_runs(trial_uri, sweep.sweep.cv_folds) if sweep.sweep.cv_folds else [trial_uri]:
            _end_if_unfinished(RunDir.open(run_uri, sweep.endpoint), result)


def _end_if_unfinished(run: RunDir, result) -> None:
    """One run of a trial (the trial's own, or a fold of it): end its records if its process went away first."""
    record = RunRecord.load(run)
    if not record:
        return
    spec = JobSpec.model_validate(record.job)
    cut_off = record.status == RunStatus.RUNNING
    if cut_off:
        status = RunStatus.FAILED if result.error else RunStatus.STOPPED
        record.end(status, summary_from_checkpoints(run, status))
        record.save(run)
    # TensorBoard's hyper-parameters only when the trial surely did not write them (it writes them after run.json).
    session = TrackingSession(
        run_uri=run.uri,
        endpoint_url=run.endpoint_url,
        tensorboard_dir=(record.tracking.get("tensorboard") or {}).get("log_dir") if cut_off else None,
    )
    mlflow = record.tracking.get("mlflow")
    if mlflow and _mlflow_run_is_running(mlflow_tracking_uri(spec), mlflow["run_id"]):
        session.mlflow_uri, session.mlflow_run_id = (
            mlflow_tracking_uri(spec),
            mlflow["run_id"],
        )  # run.json has it without credentials
    if session.mlflow_run_id or session.tensorboard_dir:
        session.finish(spec, record.status, record.summary, [("", run.uri_of(RUN_RECORD))])


def _mlflow_run_is_running(tracking_uri: str, run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(run_id).info.status == "RUNNING"
    except Exception as exc:  # the run cannot be read (server gone, run deleted): nothing to end
        log.warning("mlflow: cannot read run %s (%s)", run_id, type(exc).__name__)
        return False
