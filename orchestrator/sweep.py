"""Hyper-parameter sweeps with Ray Tune: the search space from the job file, schedulers, resume, best-config export.

Render, then act: `load_sweep` validates everything (before Ray starts); `build_param_space`,
`build_scheduler` and `build_search` are pure; `run_sweep` starts Ray and fits the Tuner.

A sweep lives in `<checkpoint.storage>/<sweep name>/`: every trial is a run of the job with the
trial's settings in `<trial id>/` (run.json, metrics.jsonl, checkpoints: the loop restores its
own run first, so a restarted trial resumes), Tune's experiment state in `tune/` (what a rerun of
an interrupted sweep restores), `sweep.json` (the record) and `best.yaml` (the best trial as a job).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from orchestrator import storage
from orchestrator.errors import BadInput
from orchestrator.spec import JobSpec, ParamSpec, SpecError, SweepSpec, apply_overrides, build_spec, read_job_file

SWEEP_RECORD = "sweep.json"
BEST_JOB = "best.yaml"
TUNE_DIR = "tune"  # Tune's experiment directory inside the sweep's
POINTER = "pointer.json"  # a PBT Tune checkpoint: which run's checkpoint a trial stood at

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SweepJob:
    """A validated sweep: the job every trial starts from, the sweep section, and where it all lives."""

    job: dict[str, Any]  # the raw job (overrides applied, no sweep section): each trial applies its settings to it
    spec: JobSpec  # the base job, validated
    sweep: SweepSpec
    name: str
    uri: str  # <checkpoint.storage>/<name>, absolute for local storage
    job_file: str
    base_dir: str  # where user code and relative data paths resolve: the job file's directory

    @property
    def endpoint(self) -> Optional[str]:
        return self.spec.checkpoint.endpoint_url

    def fingerprint(self) -> str:
        """What makes two sweeps the same sweep: the job and the search (not how many run at once)."""
        search = self.sweep.model_dump(mode="json", exclude={"max_concurrent_trials"})
        return hashlib.sha256(json.dumps({"job": self.job, "sweep": search}, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Loading and validation: everything wrong with the input is found before Ray starts


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_sweep_file(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The raw job of a sweep file and the directory its code resolves from.

    A sweep file is a job file with a `sweep` section, or a file naming one (`job: digits_mlp.yaml`)
    whose other sections are laid over that job.
    """
    raw = read_job_file(path)
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: a sweep file must be a mapping of sections"])
    if "job" not in raw:
        return raw, str(Path(path).resolve().parent)
    ref = raw["job"]
    if not isinstance(ref, str):
        raise SpecError([f"{path}: job: must name a job file, e.g. job: digits_mlp.yaml"])
    job_path = (Path(path).resolve().parent / ref).resolve()
    if not job_path.is_file():
        raise SpecError([f"{path}: job: {ref}: no such job file"])
    return _deep_merge(read_job_file(job_path), {k: v for k, v in raw.items() if k != "job"}), str(job_path.parent)


def _override_text(path: str, value: Any) -> str:
    # JSON is YAML: the value survives apply_overrides' YAML parsing exactly (strings stay strings).
    return f"{path}={json.dumps(_plain(value))}"


def _plain(value: Any) -> Any:
    """Python scalars for what Tune samples (numpy ints and floats do not serialize)."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_parameters(job: dict[str, Any], sweep: SweepSpec) -> None:
    """Build the job with every value (or both ends of every range) of every searched field; SpecError naming the field."""
    problems = []
    searched = dict(sweep.parameters)
    if sweep.scheduler.name == "pbt":
        searched.update(sweep.scheduler.mutations)
    for path, param in searched.items():
        field = f"sweep.parameters.{path}" if path in sweep.parameters else f"sweep.scheduler.mutations.{path}"
        if _is_section(path):
            problems.append(f"{field}: is a section of the job, not a field; name a field in it (e.g. {path}.{_first_field(path)})")
            continue
        for value in param.sample_values():
            try:
                build_spec(job, [_override_text(path, value)])
            except SpecError as exc:
                reason = exc.lines[0]
                if "unknown field" in reason or "is a value, not a section" in reason:
                    problems.append(f"{field}: not a field of the job ({reason})")
                else:
                    problems.append(f"{field}: the value {value!r} does not make a valid job ({reason})")
                break
    if problems:
        raise SpecError(problems)


def _section_at(path: str):
    """The JobSpec section class a dotted path names, or None when it names a field (or nothing)."""
    from pydantic import BaseModel

    model: Any = JobSpec
    for part in path.split("."):
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        candidates = [field.annotation, *(getattr(field.annotation, "__args__", ()) or ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _is_section(path: str) -> bool:
    return _section_at(path) is not None


def _first_field(path: str) -> str:
    section = _section_at(path)
    return next(iter(section.model_fields)) if section is not None else ""


def default_max_t(sweep: SweepSpec, spec: JobSpec) -> int:
    """ASHA's horizon when the job file gives none: the trial's length in the scheduler's clock."""
    s = sweep.scheduler
    if s.max_t is not None:
        return s.max_t
    if s.time_attr == "epoch" or (s.time_attr == "training_iteration" and not spec.validation.every_n_steps):
        return spec.train.epochs
    if s.time_attr == "step" and spec.train.max_steps:
        return spec.train.max_steps
    raise BadInput(f"sweep.scheduler.max_t: required with time_attr={s.time_attr} (the trial's length in that clock is not known before it runs)")


def trial_length(sweep: SweepSpec, spec: JobSpec) -> Optional[float]:
    """How long a trial runs in the scheduler's clock, when the job file says (None when only the data knows)."""
    t = sweep.scheduler.time_attr
    if t == "epoch" or (t == "training_iteration" and not spec.validation.every_n_steps):
        return spec.train.epochs if not spec.train.max_steps else None
    if t == "step" and spec.train.max_steps:
        return spec.train.max_steps
    return None


def load_sweep(path: str, overrides: list[str] | None = None, fresh: bool = False) -> SweepJob:
    """Read, merge and validate a sweep file with dotted overrides; BadInput/SpecError on the first problem."""
    raw, base_dir = read_sweep_file(path)
    raw = apply_overrides(raw, overrides or [])
    spec = build_spec(raw)
    if spec.sweep is None:
        raise BadInput(f"{path}: no sweep section (add `sweep:` with parameters, or name a job file with `job:`)")
    sweep = spec.sweep
    job = {k: v for k, v in raw.items() if k != "sweep"}
    check_parameters(job, sweep)
    if spec.entrypoint:
        raise BadInput("entrypoint: a bring-your-own loop reports its own metrics; sweeps run the built-in loop (model/data sections)")
    if sweep.scheduler.name == "pbt" and spec.scaling.max_workers > 1:
        raise BadInput("sweep.scheduler: pbt hands checkpoints between trials inside their processes; use scaling.num_workers 0 or 1")
    if sweep.scheduler.name == "asha":
        max_t = default_max_t(sweep, spec)
        if sweep.scheduler.grace_period > max_t:
            raise BadInput(f"sweep.scheduler.grace_period: {sweep.scheduler.grace_period} is above max_t={max_t}")
    name = sweep.name or f"{spec.name}-sweep"
    if fresh:
        name = f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    from orchestrator.launch import run_uri_for

    return SweepJob(job=job, spec=spec, sweep=sweep, name=name, uri=run_uri_for(spec, name), job_file=str(path), base_dir=base_dir)


def trial_spec(job: dict[str, Any], config: dict[str, Any], name: str, ranges: Optional[dict[str, ParamSpec]] = None) -> JobSpec:
    """The job of one trial: the base job with the trial's settings (clamped into their ranges: PBT perturbs past them)."""
    overrides = []
    for path, value in config.items():
        value = _plain(value)
        param = (ranges or {}).get(path)
        if param is not None and param.low is not None and isinstance(value, (int, float)):
            value = type(value)(min(max(value, param.low), param.high))
        overrides.append(_override_text(path, value))
    return build_spec({**job, "name": name}, overrides)


# ----------------------------------------------------------------------------------------------
# Render: the Tune search space, scheduler and search algorithm of a SweepSpec (pure)


def tune_domain(param: ParamSpec, enumerate_choices: bool = False):
    """The Tune search-space object of one parameter."""
    from ray import tune

    if param.type == "grid" or (param.type == "choice" and enumerate_choices):
        return tune.grid_search(list(param.values))
    if param.type == "choice":
        return tune.choice(list(param.values))
    if param.type == "uniform":
        return tune.uniform(param.low, param.high)
    if param.type == "loguniform":
        return tune.loguniform(param.low, param.high)
    if param.type == "randint":
        return tune.randint(int(param.low), int(param.high) + 1)  # Tune's upper bound is exclusive; ours is included
    return tune.qloguniform(param.low, param.high, param.q)


def mutation_space(sweep: SweepSpec) -> dict[str, Any]:
    """PBT's hyperparam_mutations: lists for choice/grid values, Tune domains for ranges."""
    out = {}
    for path, param in (sweep.scheduler.mutations or sweep.parameters).items():
        out[path] = list(param.values) if param.values is not None else tune_domain(param)
    return out


def build_param_space(sweep: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: one entry per dotted field (PBT mutations not otherwise searched start sampled)."""
    space = {path: tune_domain(param, enumerate_choices=sweep.search == "grid") for path, param in sweep.parameters.items()}
    if sweep.scheduler.name == "pbt":
        from ray import tune

        for path, param in sweep.scheduler.mutations.items():
            if path not in space:
                space[path] = tune.choice(list(param.values)) if param.values is not None else tune_domain(param)
    return space


def build_scheduler(sweep: SweepSpec, spec: JobSpec):
    """FIFO, ASHA or PBT, acting on the metric the loop reports after every validation."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    if s.name == "asha":
        max_t, length = default_max_t(sweep, spec), trial_length(sweep, spec)
        if length is not None and max_t >= length and s.grace_period < length:
            # Trials end by themselves (with their last checkpoint); a rung at their last report would decide
            # nothing, so the horizon goes just below it and the top rung with it.
            return ASHAScheduler(time_attr=s.time_attr, max_t=length - 1e-6, grace_period=s.grace_period, reduction_factor=s.reduction_factor, stop_last_trials=False)
        return ASHAScheduler(time_attr=s.time_attr, max_t=max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        return PopulationBasedTraining(
            time_attr=s.time_attr,
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=mutation_space(sweep),
            quantile_fraction=s.quantile_fraction,
        )
    return FIFOScheduler()


def build_search(sweep: SweepSpec):
    """Tune's search algorithm: its variant generator (random, grid) or Optuna, each running at most max_concurrent_trials."""
    if sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=sweep.seed), max_concurrent=sweep.max_concurrent_trials)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=sweep.max_concurrent_trials, random_state=sweep.seed)


def trial_resources(spec: JobSpec) -> dict[str, float]:
    """What one trial reserves: its loop's CPUs (and GPU) when it trains in the trial's process, nothing when Ray Train's workers reserve their own."""
    if spec.scaling.max_workers > 1:
        return {"CPU": 0.01}  # the trial only waits on its Ray Train run (Tune refuses an empty request)
    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker or 1
    return resources


def tune_storage(sweep_uri: str, endpoint_url: Optional[str]) -> tuple[str, Any]:
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


# ----------------------------------------------------------------------------------------------
# A trial: one run of the job, in the trial's process (0/1 worker) or as a Ray Train run


@dataclasses.dataclass
class TrialPlan:
    """What every trial needs from the driver (shipped once through the object store)."""

    job: dict[str, Any]
    sweep_name: str
    sweep_uri: str
    base_dir: str
    endpoint: Optional[str]
    ranges: dict[str, ParamSpec]
    pbt: bool
    verbose: bool
    job_file: str
    parent_run_id: Optional[str] = None  # the sweep's MLflow run: every trial's run is its child
    experiment: Optional[str] = None  # the sweep's MLflow experiment, where the children must be to nest under it
    data_fingerprint: Optional[dict[str, Any]] = None  # the base job's data, from the driver's preflight
    embedded_ray: bool = False  # the sweep started its own single-node Ray (no preemption to watch for)


class _TrialEnds:
    """Trials of this process that Tune has stopped and that are still recording their end; process exit waits for them.

    Tune stops a trial without waiting for its thread, and may end the process (or hand it to the next trial) meanwhile.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._ending: set[int] = set()
        self._hooked = False

    def begin(self) -> None:
        with self._cond:
            self._ending.add(threading.get_ident())
            if not self._hooked:
                atexit.register(self.wait)
                self._hooked = True

    def done(self) -> None:
        with self._cond:
            self._ending.discard(threading.get_ident())
            self._cond.notify_all()

    def wait(self, timeout: float = 60.0) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._ending, timeout)


_trial_ends = _TrialEnds()


def track_as_trial(spec: JobSpec, plan: TrialPlan, trial_id: str) -> None:
    """Point a trial's trackers at its sweep: MLflow runs in the sweep's experiment, a configured TensorBoard log_dir split per trial."""
    if spec.tracking.mlflow is not None and plan.experiment:
        spec.tracking.mlflow.experiment = plan.experiment
    if spec.tracking.tensorboard is not None and spec.tracking.tensorboard.log_dir:
        spec.tracking.tensorboard.log_dir = f"{spec.tracking.tensorboard.log_dir.rstrip('/')}/{trial_id}"


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """Tune's function trainable: train the job with this trial's settings in `<sweep>/<trial id>`, tracked as a child of the sweep's run."""
    from ray import tune

    from orchestrator.checkpoint import list_checkpoints
    from orchestrator.launch import read_run_record, summary_from_storage, write_run_record
    from orchestrator.tracking import TrackingSession, collect_provenance, create_tracker

    # A stopped trial records its end (MLflow calls among it) after Tune has moved on. Tune gives that 2 s before
    # it reuses this process for the next trial, and the sweep goes wrong (it stalls) when it takes longer.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    trial_id = tune.get_context().get_trial_id()
    spec = trial_spec(plan.job, config, f"{plan.sweep_name}-{trial_id}", plan.ranges)
    track_as_trial(spec, plan, trial_id)
    run_uri = f"{plan.sweep_uri}/{trial_id}"
    exploited_from = adopt_exploited_checkpoint(tune.get_checkpoint(), run_uri, spec, plan.endpoint) if plan.pbt else None
    previous = read_run_record(run_uri, plan.endpoint) or {}
    if previous.get("status") == "finished" and exploited_from is None:
        # It finished before the sweep was interrupted, and Tune had not yet recorded that: report where it ended.
        done = previous["summary"]
        tune.report({"step": done["steps"], "epoch": done["epochs"], **{k: v for k, v in done["metrics"].items() if not isinstance(v, list)}})
        return
    fs, root = storage.open_storage(run_uri, plan.endpoint)
    existing = list_checkpoints(fs, root, uri_prefix=run_uri)
    in_process = spec.scaling.max_workers <= 1
    fingerprint = plan.data_fingerprint
    if any(path.startswith("data.") for path in config):
        from orchestrator.data import check_data

        fingerprint = check_data(spec, plan.base_dir).fingerprint  # this trial reads other data than the base job
    prov = collect_provenance(spec, plan.base_dir, fingerprint, hosts=1 if in_process else None)
    session = TrackingSession.start(spec, run_uri, spec.name, prov, previous=previous.get("tracking"), parent_run_id=plan.parent_run_id)
    record = {
        "run": trial_id,
        "sweep": plan.sweep_name,
        "status": "running",
        "started": datetime.now(timezone.utc).isoformat(),
        "ended": None,
        "job_file": plan.job_file,
        "config": {k: _plain(v) for k, v in config.items()},
        "job": spec.to_dict(),
        "provenance": prov,
        "tracking": session.to_record(),
        "attempts": previous.get("attempts", 0) + 1,
        "resumed_from": existing[-1].uri if existing else None,
        "exploited_from": exploited_from,
    }
    write_run_record(run_uri, record, plan.endpoint)
    status = "failed"
    tracker = create_tracker(session.worker_config(), plan.endpoint) if in_process else None
    try:
        if in_process:
            _train_in_trial(spec, run_uri, plan, TrialReporter(run_uri, plan.endpoint, plan.pbt), tracker)
        else:
            placed = _train_with_ray_train(spec, run_uri, plan, trial_id, session.worker_config())
            if "placement_world_size" in placed:
                prov.update(world_size=placed["placement_world_size"], hosts=placed["placement_hosts"],
                            gpus=[g for g in str(placed.get("placement_gpus") or "").split(",") if g])
        status = "finished"
    except SystemExit:
        status = "stopped"  # the scheduler ended this trial at a report
        _trial_ends.begin()
        raise
    finally:
        try:
            summary = summary_from_storage(run_uri, plan.endpoint)
            record.update(status=status, ended=datetime.now(timezone.utc).isoformat(), summary=summary)
            write_run_record(run_uri, record, plan.endpoint)
            if tracker is not None:
                tracker.close()
            session.finish(spec, status, summary, [("", f"{run_uri}/run.json")])
        finally:
            _trial_ends.done()


def _silent(msg: str) -> None:
    """A trial's progress lines, unless --verbose: they would drown the sweep's live view."""


def _train_in_trial(spec: JobSpec, run_uri: str, plan: TrialPlan, reporter: "TrialReporter", track=None) -> None:
    """One worker: the loop in the trial's own process, reporting straight to Tune (no Ray Train actors to start)."""
    import torch

    from orchestrator.train import LoopContext, run_training

    device = torch.device("cuda", 0) if spec.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    ctx = LoopContext(run_uri=run_uri, device=device, report=reporter, base_dir=plan.base_dir, track=track, should_stop=reporter.stopped,
                      **({} if plan.verbose else {"log": _silent}))
    try:
        run_training(spec, ctx)
    except BaseException:
        reporter.close(flush=False)
        raise
    reporter.close()


def _train_with_ray_train(spec: JobSpec, run_uri: str, plan: TrialPlan, trial_id: str, tracking_config: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Several workers: a full Ray Train run whose reports reach Tune through TuneReportCallback; returns its last metrics."""
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.launch import build_trainer_kwargs, train_environment

    ray_storage = os.path.join(tempfile.gettempdir(), "orchestrator-ray")
    kwargs = build_trainer_kwargs(spec, run_uri, plan.base_dir, ray_storage, f"{plan.sweep_name}-{trial_id}-{int(time.time())}", tracking_config)
    kwargs["run_config"] = dataclasses.replace(kwargs["run_config"], callbacks=[TuneReportCallback()])
    with train_environment(embedded=plan.embedded_ray):
        result = TorchTrainer(**kwargs).fit()
    return dict(result.metrics or {})


class TrialReporter:
    """The loop's `report` inside a trial: metrics to Tune (under PBT with a pointer to the run's latest committed checkpoint).

    Tune's function API holds a reporting thread until its controller has taken the result, which can
    be tens of milliseconds or more on a busy machine; so the reports go to Tune from a thread of their
    own, in order, and the training step never waits. When Tune stops or pauses the trial at a report,
    `stopped` says so and the loop ends at its next step.
    """

    def __init__(self, run_uri: str, endpoint: Optional[str], pbt: bool):
        self.run_uri, self.endpoint, self.pbt = run_uri, endpoint, pbt
        self._pending: "queue.Queue[Optional[dict[str, Any]]]" = queue.Queue()
        self._stopped = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name="tune-report", daemon=True)
        self._thread.start()

    def __call__(self, metrics: dict[str, Any]) -> None:
        if not self._stopped.is_set():
            self._pending.put({k: v for k, v in metrics.items() if not isinstance(v, list)})  # a confusion matrix is no metric to rank by

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
        while (metrics := self._pending.get()) is not None:
            if self._stopped.is_set():
                continue
            try:
                self._report(metrics)
            except SystemExit:  # Tune's answer to a report: the trial is stopped
                self._stopped.set()
            except BaseException as exc:  # surfaced on the trial's thread by close()
                self._error = exc
                self._stopped.set()

    def _report(self, metrics: dict[str, Any]) -> None:
        from ray import tune

        if not self.pbt:
            tune.report(metrics)
            return
        from orchestrator.checkpoint import list_checkpoints

        fs, root = storage.open_storage(self.run_uri, self.endpoint)
        found = list_checkpoints(fs, root)
        if not found:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, POINTER).write_text(json.dumps({"run_uri": self.run_uri, "step": found[-1].step}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def adopt_exploited_checkpoint(tune_checkpoint, run_uri: str, spec: JobSpec, endpoint: Optional[str]) -> Optional[str]:
    """PBT exploit: replace this run's checkpoints by the donor's, with this trial's optimizer settings; the loop then restores it."""
    if tune_checkpoint is None:
        return None
    from orchestrator import checkpoint as ckpt

    with tune_checkpoint.as_directory() as d:
        pointer = json.loads(Path(d, POINTER).read_text())
    if pointer["run_uri"] == run_uri:
        return None  # its own checkpoint (a restarted trial): the loop restores it
    donor_fs, donor_root = storage.open_storage(pointer["run_uri"], endpoint)
    found = ckpt.list_checkpoints(donor_fs, donor_root, uri_prefix=pointer["run_uri"])
    if not found:
        raise RuntimeError(f"PBT: {pointer['run_uri']} has no committed checkpoint to copy")
    # The donor trains on while we copy and keeps only its newest checkpoints: take the pointed one if it is still there.
    info = next((c for c in found if c.step == pointer["step"]), found[-1])
    files = ckpt.read_verified(donor_fs, info)
    state = ckpt.deserialize_state(files["state.pt"])
    for i, group in enumerate(state["optimizer"]["param_groups"]):
        _apply_optim_settings(group, spec, decays=(i == 0))
    files["state.pt"] = ckpt.serialize_state(state)
    files["job.yaml"] = yaml.safe_dump(spec.to_dict(), sort_keys=False).encode()
    fs, root = storage.open_storage(run_uri, endpoint)
    for own in ckpt.list_checkpoints(fs, root):
        # Manifest first: a half-deleted checkpoint of the losing lineage is never visible as committed.
        storage.with_retries(lambda: fs.rm_file(storage.join(own.path, ckpt.MANIFEST)), f"remove {own.path}")
        storage.with_retries(lambda: fs.rm(own.path, recursive=True), f"remove {own.path}")
    ckpt.commit_checkpoint(fs, root, info.step, info.epoch, files, info.metrics)
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


# ----------------------------------------------------------------------------------------------
# The live view and the end of a sweep


def trial_status(tune_status: str, run_state: Optional[str]) -> str:
    """A trial in words: running, pending, paused, done (trained to its end), stopped (by the scheduler) or error."""
    if tune_status == "TERMINATED":
        # Tune marks both "done"; only the run itself knows whether it reached its end.
        return "done" if run_state == "finished" else "stopped"
    return {"RUNNING": "running", "PENDING": "pending", "PAUSED": "paused", "ERROR": "error"}.get(tune_status, tune_status.lower())


def run_status(run_uri: str, endpoint: Optional[str]) -> Optional[str]:
    """The status in a trial's run.json (finished, stopped, failed, running), or None."""
    from orchestrator.launch import read_run_record

    return (read_run_record(run_uri, endpoint) or {}).get("status")


def _is_better(value: Any, best: Any, mode: str) -> bool:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def _settings(config: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_short(v)}" for k, v in config.items())


def _short(value: Any) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def make_progress_callback(sweep_uri: str, endpoint: Optional[str], metric: str, mode: str, say: Callable[[str], None], every_s: float = 5.0):
    """A Tune callback printing one line when trials change state or the best improves (at most every `every_s` otherwise)."""
    from ray.tune import Callback

    class SweepProgress(Callback):
        def __init__(self):
            self.t0 = time.time()
            self.last_line, self.last_time = "", 0.0
            self.ended: dict[str, Optional[str]] = {}  # trial id -> its run's status, read once when it ends

        def _show(self, trials, force: bool = False) -> None:
            counts: dict[str, int] = {}
            best = None
            for t in trials:
                if t.status == "TERMINATED" and t.trial_id not in self.ended:
                    self.ended[t.trial_id] = run_status(f"{sweep_uri}/{t.trial_id}", endpoint)
                state = trial_status(t.status, self.ended.get(t.trial_id))
                counts[state] = counts.get(state, 0) + 1
                value = (t.last_result or {}).get(metric)
                if _is_better(value, best[0] if best else None, mode):
                    best = (value, t)
            order = ("running", "pending", "paused", "stopped", "done", "error")
            parts = ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))
            line = f"trials: {parts}"
            if best:
                line += f" | best {metric} {best[0]:.4f} ({best[1].trial_id}: {_settings(best[1].config)})"
            now = time.time()
            if line != self.last_line or force or now - self.last_time > every_s * 6:
                elapsed = int(now - self.t0)
                say(f"[{elapsed // 60}:{elapsed % 60:02d}] {line}")
                self.last_line, self.last_time = line, now

        def on_trial_start(self, iteration, trials, trial, **info):
            self._show(trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if time.time() - self.last_time >= every_s:
                self._show(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._show(trials, force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            error = trial.get_pickled_error()
            reason = str(error).strip().splitlines()[-1] if error is not None and str(error).strip() else "see its error file"
            say(f"trial {trial.trial_id} failed: {reason} ({trial.error_file})")
            self._show(trials, force=True)

    return SweepProgress()


def collect_trials(results, sweep: SweepJob) -> list[dict[str, Any]]:
    """One row per trial from Tune's results, ranked by the sweep's metric (last reported value), best first."""
    from orchestrator.launch import read_run_record

    metric, mode = sweep.sweep.metric, sweep.sweep.mode
    rows = []
    for result in results:
        trial_id = Path(result.path).name
        last = dict(result.metrics or {})
        run_uri = f"{sweep.uri}/{trial_id}"
        values = [e.get(metric) for e in read_history(run_uri, sweep.endpoint) if e.get("split") == "val"]
        values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
        record = read_run_record(run_uri, sweep.endpoint) or {}
        summary = record.get("summary") or {}
        status = "error" if result.error else trial_status("TERMINATED", record.get("status"))
        rows.append({
            "trial_id": trial_id,
            "status": status,
            "config": {k: _plain(v) for k, v in (result.config or {}).items()},
            "metric": last.get(metric),
            "best_metric": (max(values) if mode == "max" else min(values)) if values else None,
            "metrics": {k: v for k, v in last.items() if k.startswith("val_") or k in ("step", "epoch", "lr")},
            # The trial may have trained past its last report before it saw a stop (reports are asynchronous).
            "steps": max((v for v in (last.get("step"), summary.get("steps")) if isinstance(v, int)), default=None),
            "epochs": last.get("epoch"),
            "run_uri": run_uri,
            "checkpoint": summary.get("checkpoint"),
            "error": str(result.error).strip().splitlines()[-1] if result.error else None,
        })

    def rank(row: dict[str, Any]) -> tuple:
        value = row["metric"]
        if not isinstance(value, (int, float)) or math.isnan(value):
            return (1, 0.0)
        return (0, -value if mode == "max" else value)

    return sorted(rows, key=rank)


def read_history(run_uri: str, endpoint: Optional[str]) -> list[dict[str, Any]]:
    """A run's metrics.jsonl entries (empty when it has none)."""
    fs, root = storage.open_storage(run_uri, endpoint)
    try:
        text = storage.read_bytes(fs, storage.join(root, "metrics.jsonl")).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def format_trials(rows: list[dict[str, Any]], metric: str):
    """The end-of-sweep table: trials ranked by the metric, with their settings, steps and status."""
    from rich.table import Table

    params = list(dict.fromkeys(k for row in rows for k in row["config"]))
    table = Table("#", "trial", "status", *params, f"{metric} (last)", f"{metric} (best)", "steps", "epochs")
    for i, row in enumerate(rows, 1):
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
        table.add_row(str(i), row["trial_id"], row["status"], *(_short(row["config"].get(p)) for p in params), fmt(row["metric"]), fmt(row["best_metric"]), fmt(row["steps"]), fmt(row["epochs"]))
    return table


def best_job(sweep: SweepJob, best: dict[str, Any]) -> dict[str, Any]:
    """The best trial as a runnable job: the job file's sections with its settings, its own run name, paths made absolute."""
    ranges = {**sweep.sweep.parameters, **sweep.sweep.scheduler.mutations}
    spec = trial_spec(sweep.job, best["config"], f"{sweep.name}-best", ranges)  # validates, and clamps as the trial did
    job = apply_overrides({**sweep.job, "name": spec.name}, [_override_text(p, _dotted(spec, p)) for p in best["config"]])
    job.setdefault("checkpoint", {})["storage"] = storage.split_uri(spec.checkpoint.storage)[1] if storage.split_uri(spec.checkpoint.storage)[0] == "file" else spec.checkpoint.storage
    path = spec.data.path
    if path and "://" not in path and not os.path.isabs(path):
        job["data"]["path"] = str(Path(sweep.base_dir) / path)  # the file may be run from anywhere
    return job


def _dotted(spec: JobSpec, path: str) -> Any:
    node: Any = spec.to_dict()
    for part in path.split("."):
        node = node[part]
    return node


def write_best_job(sweep: SweepJob, best: dict[str, Any], out: Optional[str]) -> str:
    """Write the best trial's job file (to `out`, else `<sweep>/best.yaml`; a remote sweep also gets a local copy); return where."""
    job = best_job(sweep, best)
    value = best["metric"]
    header = (
        f"# The best trial of sweep {sweep.name} ({best['trial_id']}): {sweep.sweep.metric} {value:.4f}\n"
        f"# settings: {_settings(best['config'])}\n"
        f"# run it: orchestrator run <this file>\n"
    )
    text = header + yaml.safe_dump(job, sort_keys=False)
    fs, root = storage.open_storage(sweep.uri, sweep.endpoint)
    storage.write_bytes(fs, storage.join(root, BEST_JOB), text.encode())
    target = out
    if target is None and storage.split_uri(sweep.uri)[0] != "file":
        target = f"{sweep.name}.best.yaml"  # runnable here: `orchestrator run` reads local job files
    if target is None:
        return storage.join(root, BEST_JOB)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(text)
    return str(Path(target).resolve())


# ----------------------------------------------------------------------------------------------
# A sweep on a Ray cluster: submitted through the Jobs API like any job, running `orchestrator sweep` there


def is_dashboard_address(address: Optional[str]) -> bool:
    """Whether --address names a cluster's dashboard (submit through the Jobs API) rather than Ray itself (attach)."""
    return bool(address) and address.startswith(("http://", "https://"))


def build_sweep_submission(sweep: SweepJob, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The Jobs API request of a sweep: the job's package and runtime env, with `orchestrator sweep` as its entrypoint (pure)."""
    import shlex

    from orchestrator.cluster import METADATA_RUN, build_submission

    sweep_path = Path(sweep.job_file).resolve()
    if Path(sweep.base_dir).resolve() != sweep_path.parent:
        raise BadInput(f"{sweep.job_file}: job: the named job file must sit beside the sweep file to be shipped with it")
    submission = build_submission(sweep.spec, sweep_path, overrides)
    words = ["python", "-m", "orchestrator", "sweep", sweep_path.name, *overrides, "--address", "auto", "--json"]
    submission["entrypoint"] = " ".join(shlex.quote(w) for w in words)
    submission["metadata"][METADATA_RUN] = sweep.name
    return submission


def submit_sweep(sweep: SweepJob, overrides: list[str], address: str, out=None) -> dict[str, Any]:
    """Submit the sweep to the cluster, stream its output (the live view) to `out`, return its result; RunFailed if the job fails."""
    from orchestrator.cluster import RayJobsBackend, follow_to_end
    from orchestrator.errors import RunFailed

    backend = RayJobsBackend(address)
    submission = build_sweep_submission(sweep, overrides)
    backend.check()
    job_id = backend.submit(submission)
    print(f"submitted {job_id} to {backend.address}", file=sys.stderr, flush=True)
    final = follow_to_end(backend, job_id, out=out or sys.stderr)
    result = None
    for line in reversed(backend.logs(job_id).splitlines()):
        if line.startswith("{") and '"sweep"' in line:
            result = json.loads(line)
            break
    if final["status"] != "SUCCEEDED" or result is None:
        raise RunFailed(f"{job_id} {final['status']}" + (f": {final.get('message')}" if final.get("message") else ""))
    return {**result, "submission_id": job_id, "address": backend.address}


# ----------------------------------------------------------------------------------------------
# Act


def _read_record(sweep: SweepJob) -> Optional[dict[str, Any]]:
    return storage.read_json(sweep.uri, SWEEP_RECORD, sweep.endpoint)


def _write_record(sweep: SweepJob, record: dict[str, Any]) -> None:
    fs, root = storage.open_storage(sweep.uri, sweep.endpoint)
    storage.write_bytes(fs, storage.join(root, SWEEP_RECORD), json.dumps(record, indent=1, default=str).encode())


def sweep_tracking_spec(spec: JobSpec) -> JobSpec:
    """The job as the sweep's own run tracks it: in MLflow only (TensorBoard events are the trials', each under its run)."""
    out = spec.model_copy(deep=True)
    out.tracking.tensorboard = None
    return out


def end_unfinished_trials(sweep: SweepJob, results) -> None:
    """Record the end of trials whose process went away before they could: run.json still running, MLflow run still RUNNING."""
    from orchestrator.launch import RUN_RECORD, read_run_record, summary_from_storage, write_run_record
    from orchestrator.tracking import TrackingSession, mlflow_tracking_uri

    for result in results:
        run_uri = f"{sweep.uri}/{Path(result.path).name}"
        record = read_run_record(run_uri, sweep.endpoint)
        if not record:
            continue
        spec = JobSpec.model_validate(record["job"])
        tracked = record.get("tracking") or {}
        cut_off = record.get("status") == "running"
        if cut_off:
            record.update(status="failed" if result.error else "stopped", ended=datetime.now(timezone.utc).isoformat(),
                          summary=summary_from_storage(run_uri, sweep.endpoint))
            write_run_record(run_uri, record, sweep.endpoint)
        # TensorBoard's hyper-parameters only when the trial surely did not write them (it writes them after run.json).
        session = TrackingSession(run_uri=run_uri, endpoint_url=sweep.endpoint,
                                  tensorboard_dir=(tracked.get("tensorboard") or {}).get("log_dir") if cut_off else None)
        mlflow = tracked.get("mlflow")
        if mlflow and _mlflow_run_is_running(mlflow_tracking_uri(spec), mlflow["run_id"]):
            session.mlflow_uri, session.mlflow_run_id = mlflow_tracking_uri(spec), mlflow["run_id"]  # run.json has it without credentials
        if session.mlflow_run_id or session.tensorboard_dir:
            session.finish(spec, record["status"], record.get("summary") or {}, [("", f"{run_uri}/{RUN_RECORD}")])


def _mlflow_run_is_running(tracking_uri: str, run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(run_id).info.status == "RUNNING"
    except Exception as exc:  # the run cannot be read (server gone, run deleted): nothing to end
        log.warning("mlflow: cannot read run %s (%s)", run_id, type(exc).__name__)
        return False


def run_sweep(sweep: SweepJob, address: Optional[str] = None, best_out: Optional[str] = None, quiet: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Validate, then run (or continue) the sweep with Ray Tune; return the result (also in sweep.json).

    With a `tracking` section the sweep is an MLflow run of its own, and each trial's run is its child.
    """
    from orchestrator.launch import preflight, provenance, read_run_record, resolve_address, start_ray
    from orchestrator.tracking import TrackingSession

    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if quiet else (lambda msg: print(msg, flush=True))
    t0 = time.time()
    address = resolve_address(address)
    data_info = preflight(sweep.spec, sweep.base_dir, address)
    record = _read_record(sweep)
    if record and record.get("fingerprint") != sweep.fingerprint():
        raise BadInput(f"sweep.name: {sweep.uri} holds a sweep with other settings; use --fresh or another sweep.name")
    if record and record.get("status") == "finished":
        say(f"{sweep.uri}: already finished; nothing to do (use --fresh for a new sweep)")
        return {**record["result"], "already_finished": True, "wall_s": round(time.time() - t0, 3)}
    prov = provenance(sweep.spec, sweep.base_dir, data_info, address)
    tracking_spec = sweep_tracking_spec(sweep.spec)
    session = None
    if sweep.spec.tracking.mlflow is not None:
        session = TrackingSession.start(tracking_spec, sweep.uri, sweep.name, prov, previous=(record or {}).get("tracking"))
    tracked = session.to_record() if session else {}

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables off: the live view below replaces them
    # A restored sweep's analysis looks for trial results before any exist, and warns about each: noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.logger.logger").setLevel(logging.ERROR)  # the same about a PBT-restored trial
    started_ray = start_ray(address, log_to_driver=verbose)
    try:
        from ray import tune

        storage_path, storage_fs = tune_storage(sweep.uri, sweep.endpoint)
        experiment = storage.join(storage_path, TUNE_DIR) if storage_fs is not None else os.path.join(storage_path, TUNE_DIR)
        plan = TrialPlan(
            job=sweep.job, sweep_name=sweep.name, sweep_uri=sweep.uri, base_dir=sweep.base_dir, endpoint=sweep.endpoint,
            ranges={**sweep.sweep.parameters, **sweep.sweep.scheduler.mutations}, pbt=sweep.sweep.scheduler.name == "pbt",
            verbose=verbose, job_file=sweep.job_file, parent_run_id=session.mlflow_run_id if session else None,
            experiment=session.experiment if session else None, data_fingerprint=getattr(data_info, "fingerprint", None),
            embedded_ray=started_ray and not address,
        )
        trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), trial_resources(sweep.spec))
        progress = make_progress_callback(sweep.uri, sweep.endpoint, sweep.sweep.metric, sweep.sweep.mode, say)
        resumed = bool(record) and tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs)
        if resumed:
            say(f"continuing sweep {sweep.name} from {sweep.uri} (finished trials are kept)")
            _write_record(sweep, {**record, "provenance": prov, "tracking": tracked})
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage_fs)
            # The restored run config carries the interrupted driver's live view (its clock, its stream): use this one.
            # Tune has no public setter for it; under Ray Client (no local tuner) the old one stays.
            local = getattr(tuner, "_local_tuner", None)
            if local is not None:
                local.get_run_config().callbacks = [progress]
        else:
            say(f"sweep {sweep.name}: {sweep.sweep.trial_count} trial(s), {sweep.sweep.search} search, {sweep.sweep.scheduler.name} scheduler, "
                f"{sweep.sweep.max_concurrent_trials} at once -> {sweep.uri}")
            _write_record(sweep, {"sweep": sweep.name, "status": "running", "started": datetime.now(timezone.utc).isoformat(),
                                  "fingerprint": sweep.fingerprint(), "job_file": sweep.job_file, "job": sweep.job,
                                  "spec": sweep.sweep.model_dump(mode="json"), "command": sys.argv, "provenance": prov, "tracking": tracked})
            tuner = tune.Tuner(
                trainable,
                param_space=build_param_space(sweep.sweep),
                tune_config=tune.TuneConfig(
                    metric=sweep.sweep.metric,
                    mode=sweep.sweep.mode,
                    num_samples=sweep.sweep.num_samples,
                    scheduler=build_scheduler(sweep.sweep, sweep.spec),
                    search_alg=build_search(sweep.sweep),
                    trial_name_creator=lambda t: t.trial_id,
                    trial_dirname_creator=lambda t: t.trial_id,
                    reuse_actors=True,  # a new trial in a warm process: no second torch import
                ),
                run_config=tune.RunConfig(
                    # Every Tune checkpoint is kept: PBT's are pointers of a few bytes, and a PBT exploit may
                    # restore from one that a smaller num_to_keep would already have deleted.
                    name=TUNE_DIR, storage_path=storage_path, storage_filesystem=storage_fs, verbose=0, callbacks=[progress],
                ),
            )
        results = tuner.fit()
    except Exception:
        if session is not None:
            session.finish(tracking_spec, "failed", {}, [])
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    end_unfinished_trials(sweep, results)
    rows = collect_trials(results, sweep)
    ranked = [r for r in rows if isinstance(r["metric"], (int, float))]
    best = ranked[0] if ranked else None
    best_file = write_best_job(sweep, best, best_out) if best else None
    status = "finished" if rows and all(r["status"] in ("done", "stopped") for r in rows) else "failed"
    result = {
        "sweep": sweep.name,
        "sweep_uri": sweep.uri,
        "status": status,
        "metric": sweep.sweep.metric,
        "mode": sweep.sweep.mode,
        "trials": rows,
        "best": {k: best[k] for k in ("trial_id", "config", "metric", "metrics", "checkpoint", "run_uri")} if best else None,
        "best_job_file": best_file,
        "total_steps": sum(r["steps"] or 0 for r in rows),
        "resumed": resumed,
        "tracking": tracked,
        "wall_s": round(time.time() - t0, 3),
    }
    record = _read_record(sweep) or {}
    record.update(status=status, ended=datetime.now(timezone.utc).isoformat(), result=result)
    _write_record(sweep, record)
    if session is not None:
        # The sweep's run closes with what its best trial's run closed with (test_* and best_* metrics).
        best_summary = ((read_run_record(best["run_uri"], sweep.endpoint) or {}).get("summary") or {}) if best else {}
        session.finish(tracking_spec, status, best_summary, [("", f"{sweep.uri}/{SWEEP_RECORD}"), ("", best_file)])
    return result


def format_result(result: dict[str, Any]) -> tuple[Any, str]:
    """The human end of a sweep: the ranked table (rich), then the best trial and its job file (text)."""
    best = result.get("best")
    lines = [f"{result['status']}: sweep {result['sweep']}  {len(result['trials'])} trials  {result['total_steps']} steps  wall {result['wall_s']:.1f}s"]
    if best:
        lines.append(f"  best {result['metric']} {best['metric']:.4f}: {best['trial_id']}  {_settings(best['config'])}")
        lines.append(f"  checkpoint: {best['checkpoint']}")
        lines.append(f"  best job file: {result['best_job_file']}")
        lines.append(f"  run it: orchestrator run {result['best_job_file']}")
    return format_trials(result["trials"], result["metric"]), "\n".join(lines)
