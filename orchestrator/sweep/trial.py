"""A trial: one run of the job with the trial's settings, in the trial's process (0/1 worker) or as a Ray Train run.

Every trial is a run like any other in `<sweep>/<trial id>/` (run.json, metrics.jsonl, checkpoints):
the loop restores its own run first, so a restarted trial resumes. Under PBT a Tune checkpoint is
only a pointer to the run's latest committed checkpoint, which an exploiting trial copies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.aggregate import aggregate, fold_metrics, fold_runs
from orchestrator.data import check_data
from orchestrator.executor import DriverHooks, Executor, GroupHooks, choose_executor
from orchestrator.rundir import RUN_RECORD, RunDir
from orchestrator.runrecord import RunRecord, RunStatus
from orchestrator.session import RunPlan, RunSession, TrialOf
from orchestrator.spec import JobSpec, ParamSpec
from orchestrator.sweep.load import _plain, trial_spec

POINTER = "pointer.json"  # a PBT Tune checkpoint: which run's checkpoint a trial stood at
TRIAL_END_TIMEOUT_S = 60  # how long a trial's process waits for a stopped trial to record its end


@dataclasses.dataclass
class TrialPlan:
    """What every trial needs from the driver (shipped once through the object store)."""

    job: dict[str, Any]
    sweep_name: str
    sweep_uri: str
    base_dir: str
    endpoint: str | None
    ranges: dict[str, ParamSpec]
    pbt: bool
    verbose: bool
    job_file: str
    parent_run_id: str | None = None  # the sweep's MLflow run: every trial's run is its child
    experiment: str | None = None  # the sweep's MLflow experiment, where the children must be to nest under it
    data_fingerprint: dict[str, Any] | None = None  # the base job's data, from the driver's preflight
    embedded_ray: bool = False  # the sweep started its own single-node Ray (no preemption to watch for)
    decides_at_reports: bool = False  # the scheduler (ASHA, PBT) may stop or pause a trial at any report
    name_by: str | None = None  # a field that names each trial's directory (cv: data.fold -> fold-0), else its trial id
    cv_folds: int | None = None  # sweep.cv_folds: each trial trains these folds one after another, scored by their mean
    lease: dict[str, Any] | None = None  # the sweep's lease (RunLease.token_ref): every trial's commits check it


def trial_dir_name(trial_id: str, config: dict[str, Any], name_by: str | None) -> str:
    """A trial's directory (and run) name under its sweep: the trial id, or `<field>-<value>` of the field that names trials."""
    if name_by is None or name_by not in config:
        return trial_id
    return f"{name_by.rsplit('.', 1)[-1]}-{_plain(config[name_by])}"


def track_as_trial(spec: JobSpec, plan: TrialPlan, trial_id: str) -> None:
    """Point a trial's trackers at its sweep: MLflow runs in the sweep's experiment, a configured TensorBoard log_dir split per trial."""
    if spec.tracking.mlflow is not None and plan.experiment:
        spec.tracking.mlflow.experiment = plan.experiment
    if spec.tracking.tensorboard is not None and spec.tracking.tensorboard.log_dir:
        spec.tracking.tensorboard.log_dir = f"{spec.tracking.tensorboard.log_dir.rstrip('/')}/{trial_id}"


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """Tune's function trainable: train the job with this trial's settings in `<sweep>/<trial id>`, tracked as a child of the sweep's run."""
    from ray import tune  # ray and torch: only in a trial's process, never to load a sweep file

    # A stopped trial records its end (MLflow calls among it) after Tune has moved on. Tune gives that 2 s before
    # it reuses this process for the next trial, and the sweep goes wrong (it stalls) when it takes longer.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(TRIAL_END_TIMEOUT_S))
    trial_id = trial_dir_name(tune.get_context().get_trial_id(), config, plan.name_by)
    if plan.cv_folds:
        tune.report(run_fold_trial(config, plan, trial_id))
        return
    spec = trial_spec(plan.job, config, f"{plan.sweep_name}-{trial_id}", plan.ranges)
    track_as_trial(spec, plan, trial_id)
    run = RunDir.open(f"{plan.sweep_uri}/{trial_id}", plan.endpoint, spec.checkpoint.upload_timeout_s)
    exploited_from = adopt_exploited_checkpoint(tune.get_checkpoint(), run, spec) if plan.pbt else None
    previous = RunRecord.load(run)
    if previous and previous.finished and previous.summary and exploited_from is None:
        # It finished before the sweep was interrupted, and Tune had not yet recorded that: report where it ended.
        done = previous.summary
        tune.report(
            {
                "step": done.steps,
                "epoch": done.epochs,
                **{k: v for k, v in done.metrics.items() if not isinstance(v, list)},
            }
        )
        return
    train_trial_run(config, plan, trial_id, spec, run, previous, exploited_from)


def run_fold_trial(config: dict[str, Any], plan: TrialPlan, trial_id: str) -> dict[str, Any]:
    """A trial scored by k-fold cross-validation: each fold a run in `<trial>/fold-<i>`, one after another (a finished
    fold is kept, an interrupted one resumes); the result Tune ranks by is the folds' mean best validation values."""
    assert plan.cv_folds
    folds, steps = [], 0
    for i, uri in enumerate(fold_runs(f"{plan.sweep_uri}/{trial_id}", plan.cv_folds)):
        spec = trial_spec(plan.job, {**config, "data.fold": i}, f"{plan.sweep_name}-{trial_id}-fold-{i}", plan.ranges)
        track_as_trial(spec, plan, f"{trial_id}/fold-{i}")
        run = RunDir.open(uri, plan.endpoint, spec.checkpoint.upload_timeout_s)
        previous = RunRecord.load(run)
        if not (previous and previous.finished and previous.summary):
            # No reports to Tune on the way: under FIFO nothing is decided by them, and one fold's values are not the trial's.
            train_trial_run(config, plan, f"{trial_id}/fold-{i}", spec, run, previous, None, to_tune=False)
            previous = RunRecord.load(run)
        steps += (previous.summary.steps if previous and previous.summary else 0) or 0
        folds.append(fold_metrics(run))
    out: dict[str, Any] = {"step": steps, "cv_folds": plan.cv_folds}
    for name in sorted({k for f in folds for k in f}):
        values = [f[name]["best"] for f in folds if name in f]
        if len(values) == len(folds):  # a metric only some folds have is no k-fold score
            agg = aggregate(values)
            out[name] = agg["mean"]
            out[f"{name}_std"] = agg["std"]
    return out


def train_trial_run(
    config: dict[str, Any],
    plan: TrialPlan,
    trial_id: str,
    spec: JobSpec,
    run: RunDir,
    previous: RunRecord | None,
    exploited_from: str | None,
    to_tune: bool = True,
) -> None:
    """Train one run of a trial (the trial's own, or one of its folds) to its end: a run session like any run's.

    With `to_tune` false nothing reaches Tune from the loop: the caller reports the trial's result itself.
    SystemExit when the scheduler stopped the trial (as Tune ends a trial it stops); RuntimeError when it failed.
    """
    fingerprint = plan.data_fingerprint
    if any(path.startswith("data.") for path in config):
        fingerprint = check_data(spec, plan.base_dir).fingerprint  # this trial reads other data than the base job
    executor = choose_executor(spec, in_sweep=True)
    run_plan = RunPlan(
        spec,
        run,
        executor,
        plan.base_dir,
        job_file=plan.job_file,
        address=None if plan.embedded_ray else "auto",
        previous=previous,
        data_fingerprint=fingerprint,
        lease=plan.lease,
        trial=TrialOf(
            plan.sweep_name,
            trial_id,
            {k: _plain(v) for k, v in config.items()},
            parent_run_id=plan.parent_run_id,
            exploited_from=exploited_from,
        ),
    )
    session = RunSession(run_plan, say=lambda line: print(line, flush=True))
    session.begin()
    loop_config = session.loop_config()

    def reporting() -> DriverHooks:  # each attempt its own reporter: a closed one would stop the next at once
        reporter = TrialReporter(run.uri, plan.endpoint, plan.pbt, wait=plan.decides_at_reports) if to_tune else None
        reporter = reporter or Unreported()
        return DriverHooks(
            report=reporter, should_stop=reporter.stopped, log=None if plan.verbose else _silent, close=reporter.close
        )

    group = GroupHooks(
        embedded=plan.embedded_ray,
        in_sweep=True,
        callbacks=[_tune_report_callback()] if to_tune and executor == Executor.GROUP else [],
        run_name=f"{plan.sweep_name}-{trial_id.replace('/', '-')}-{int(time.time())}",
    )
    summary = session.end(session.host(lambda: session.execute(loop_config, driver=reporting, group=group)))
    session.finish(summary, [("", run.uri_of(RUN_RECORD))])
    if summary.status == RunStatus.STOPPED:
        raise SystemExit(0)  # as Tune itself ends a trial it stops at a report
    if summary.status != RunStatus.FINISHED:
        raise RuntimeError(summary.error or f"the trial's run {summary.status}")


def _tune_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()


def trial_trainable(plan: TrialPlan):
    """Tune's trainable for the trials: `run_trial`, in a process that lives until the trial has recorded its end.

    Tune stops a trial at a report by ending the report with SystemExit, and its `cleanup` does not wait for the
    trial's thread: the process is then terminated (at the end of a sweep, or when it is not reused) while the trial
    still writes run.json and drains its trackers, and those last metrics are lost. This trainable's cleanup waits
    for that thread; Tune itself allows a stopping trial 10 s at the end of a sweep before it kills it.
    """
    from ray import tune
    from ray.train._internal.session import get_session
    from ray.tune.trainable.function_trainable import wrap_function

    class Trial(wrap_function(tune.with_parameters(run_trial, plan=plan))):
        def cleanup(self):
            thread = getattr(get_session(), "training_thread", None)
            try:
                super().cleanup()
            finally:
                if thread is not None:
                    thread.join(TRIAL_END_TIMEOUT_S)

    return Trial


def _silent(msg: str) -> None:
    """A trial's progress lines, unless --verbose: they would drown the sweep's live view."""


class Unreported:
    """The loop's `report` in a fold of a cross-validated trial: nothing goes to Tune until the trial's folds are all done."""

    def __call__(self, metrics: dict[str, Any]) -> None:
        pass

    def stopped(self) -> bool:
        return False

    def close(self, flush: bool = True) -> None:
        pass


class TrialReporter:
    """The loop's `report` inside a trial: metrics to Tune (under PBT with a pointer to the run's latest committed checkpoint).

    Tune's function API holds a reporting thread until its controller has taken the result and decided
    on it, which can be tens of milliseconds or more on a busy machine. So the reports go to Tune from a
    thread of their own, in order. Under FIFO the training step never waits for them: nothing is decided.
    Under a scheduler that decides at reports (`wait`: ASHA, PBT) the loop waits for Tune's answer, as
    Tune's own trainables do: a trial stopped at a rung does no more work than the rung, whatever the
    machine's load. When Tune stops or pauses the trial, `stopped` says so and the loop ends there.
    """

    def __init__(self, run_uri: str, endpoint: str | None, pbt: bool, wait: bool = False):
        self.run_uri, self.endpoint, self.pbt, self.wait = run_uri, endpoint, pbt, wait
        self._pending: queue.Queue[tuple[dict[str, Any], threading.Event] | None] = queue.Queue()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="tune-report", daemon=True)
        self._thread.start()

    def __call__(self, metrics: dict[str, Any]) -> None:
        if self._stopped.is_set():
            return
        taken = threading.Event()
        # A confusion matrix is no metric to rank by.
        self._pending.put(({k: v for k, v in metrics.items() if not isinstance(v, list)}, taken))
        if self.wait:
            taken.wait()

    def stopped(self) -> bool:
        """Whether Tune has stopped (or paused) this trial at one of its reports."""
        return self._stopped.is_set()

    def close(self, flush: bool = True) -> None:
        """Hand Tune the reports still queued (unless `flush` is false), then end the thread; SystemExit when Tune stopped the trial."""
        if not flush:
            self._stopped.set()
        self._pending.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if flush and self._stopped.is_set():
            raise SystemExit(0)  # as Tune itself ends a trial it stops at a report

    def _work(self) -> None:
        while (item := self._pending.get()) is not None:
            metrics, taken = item
            try:
                if not self._stopped.is_set():
                    self._report(metrics)
            except SystemExit:  # Tune's answer to a report: the trial is stopped
                self._stopped.set()
            except BaseException as exc:  # surfaced on the trial's thread by close()
                self._error = exc
                self._stopped.set()
            finally:
                taken.set()

    def _report(self, metrics: dict[str, Any]) -> None:
        from ray import tune

        if not self.pbt:
            tune.report(metrics)
            return
        fs, root = storage.open_storage(self.run_uri, self.endpoint)
        found = ckpt.list_checkpoints(fs, root)
        if not found:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, POINTER).write_text(json.dumps({"run_uri": self.run_uri, "step": found[-1].step}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def adopt_exploited_checkpoint(tune_checkpoint, run: RunDir, spec: JobSpec) -> str | None:
    """PBT exploit: replace this run's checkpoints by the donor's, with this trial's optimizer settings; the loop then restores it."""
    if tune_checkpoint is None:
        return None
    with tune_checkpoint.as_directory() as d:
        pointer = json.loads(Path(d, POINTER).read_text())
    if pointer["run_uri"] == run.uri:
        return None  # its own checkpoint (a restarted trial): the loop restores it
    donor = RunDir.open(pointer["run_uri"], run.endpoint_url)
    found = ckpt.list_checkpoints(donor.fs, donor.root, uri_prefix=donor.uri)
    if not found:
        raise RuntimeError(f"PBT: {donor.uri} has no committed checkpoint to copy")
    # The donor trains on while we copy and keeps only its newest checkpoints: take the pointed one if it is still there.
    info = next((c for c in found if c.step == pointer["step"]), found[-1])
    files = ckpt.read_verified(donor.fs, info)
    state = ckpt.deserialize_state(files["state.pt"])
    for i, group in enumerate(state["optimizer"]["param_groups"]):
        _apply_optim_settings(group, spec, decays=(i == 0))
    files["state.pt"] = ckpt.serialize_state(state)
    files["job.yaml"] = yaml.safe_dump(spec.to_dict(), sort_keys=False).encode()
    # The losing lineage goes as retention removes a checkpoint: manifest first, so none is ever half visible.
    ckpt.delete_checkpoints(run.fs, ckpt.list_checkpoints(run.fs, run.root))
    ckpt.commit_checkpoint(run.fs, run.root, info.step, info.epoch, files, info.metrics, info.manifest.train)
    return info.uri


def _apply_optim_settings(group: dict[str, Any], spec: JobSpec, decays: bool) -> None:
    """Write the trial's (mutated) optimizer settings over a copied param group; the LR keeps its place on the schedule."""
    o = spec.optim
    old_peak = group.get("initial_lr", group["lr"])
    group["initial_lr"] = o.lr
    group["lr"] = group["lr"] * (o.lr / old_peak) if old_peak else o.lr
    if decays:
        group["weight_decay"] = o.weight_decay
    for key, value in (("momentum", o.momentum), ("betas", o.betas), ("eps", o.eps), ("alpha", o.alpha)):
        if key in group:
            group[key] = tuple(value) if key == "betas" else value
