"""Local runs: validate everything, start (or attach to) Ray, build the TorchTrainer from a JobSpec, fit.

Render, then act: `build_trainer_kwargs` is a pure function of the spec; `run_job` does the I/O.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from orchestrator import storage
from orchestrator.console import LOG_FILE, RunConsole, marker_progress
from orchestrator.errors import BadInput
from orchestrator.hooks import import_hook
from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)
RUN_RECORD = "run.json"
REPORT = "report.html"


# ----------------------------------------------------------------------------------------------
# Preflight: everything that can be wrong with the input is found before Ray starts


def preflight(spec: JobSpec, base_dir: Optional[str], address: Optional[str]):
    """Check resources, storage, user code, data, model and trackers; raise BadInput with one line on the first problem.

    Returns the data's DataInfo (None for a bring-your-own loop).
    """
    from orchestrator import tracking

    if address is None:
        cpus = os.cpu_count() or 1
        need = max(1, spec.scaling.max_workers) * spec.scaling.cpus_per_worker
        if need > cpus:
            raise BadInput(f"scaling.num_workers: {spec.scaling.max_workers} worker(s) x {spec.scaling.cpus_per_worker:g} CPU need {need:g} CPUs; this machine has {cpus}")
        if spec.scaling.use_gpu:
            import torch

            if not torch.cuda.is_available():
                raise BadInput("scaling.use_gpu: no CUDA GPU on this machine")
            if spec.scaling.max_workers > torch.cuda.device_count():
                raise BadInput(f"scaling.num_workers: {spec.scaling.max_workers} GPU workers but this machine has {torch.cuda.device_count()} GPU(s)")
    storage.preflight(spec.checkpoint.storage, spec.checkpoint.endpoint_url)
    if spec.entrypoint:
        import_hook(spec.entrypoint, base_dir, "entrypoint")
        tracking.preflight(spec)
        return None
    from orchestrator.data import check_data
    from orchestrator.models import build_model

    info = check_data(spec, base_dir)
    try:
        build_model(spec, info, base_dir=base_dir)
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"model: cannot build {spec.model.name!r} for this data ({type(exc).__name__}: {exc})") from None
    if spec.model.init_from:
        from orchestrator.checkpoint import load_weights

        load_weights(spec.model.init_from, spec.checkpoint.endpoint_url)
    tracking.preflight(spec)  # last: a tracking server that does not answer costs seconds
    return info


# ----------------------------------------------------------------------------------------------
# The run record


def run_uri_for(spec: JobSpec, name: Optional[str] = None) -> str:
    """The URI of a run's directory: `<checkpoint.storage>/<name>`."""
    base = spec.checkpoint.storage
    protocol, path = storage.split_uri(base)
    root = path if protocol == "file" else f"{protocol}://{path}"
    return f"{root.rstrip('/')}/{name or spec.name}"


def read_run_record(uri: str, endpoint_url: Optional[str] = None) -> Optional[dict[str, Any]]:
    """A run's run.json, or None when the run has none."""
    return storage.read_json(uri, RUN_RECORD, endpoint_url)


def write_run_record(uri: str, record: dict[str, Any], endpoint_url: Optional[str] = None) -> None:
    fs, root = storage.open_storage(uri, endpoint_url)
    storage.write_bytes(fs, storage.join(root, RUN_RECORD), json.dumps(record, indent=1, default=str).encode())


def provenance(spec: JobSpec, base_dir: Optional[str] = None, data_info: Any = None, address: Optional[str] = None) -> dict[str, Any]:
    """What produced a run: versions, devices, placement, seed, job hash, user-code commit, data fingerprint."""
    from orchestrator.tracking import collect_provenance

    # Hosts are known here for a run on this machine; on a cluster rank 0 reports them (see train_worker).
    return collect_provenance(spec, base_dir, getattr(data_info, "fingerprint", None), hosts=1 if address is None else None)


def fresh_name(spec: JobSpec) -> str:
    """A new run name for `--fresh`: the job name and the start time."""
    return f"{spec.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------------------------
# Ray Train


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: rebuild the spec, then run the loop with Ray's context."""
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    from orchestrator.tracking import create_tracker, device_facts
    from orchestrator.train import LoopContext, all_gather, run_training

    spec = JobSpec.model_validate(config["job"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Where the run really ran (elastic groups change it): rank 0 passes it to the driver with every report.
    placed = all_gather((socket.gethostname(), device_facts()["gpus"]), world_size)
    placement = {"placement_world_size": world_size, "placement_hosts": len({host for host, _ in placed}),
                 "placement_gpus": ",".join(name for _, names in placed for name in names)}
    tracker = create_tracker(config.get("tracking"), spec.checkpoint.endpoint_url) if rank == 0 else None

    def report(metrics: dict[str, Any]) -> None:
        # ASYNC: the result waits for the controller's poll on Ray's upload thread, not on this one (no checkpoint rides along).
        ray.train.report({**metrics, **placement}, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    ctx = LoopContext(
        run_uri=config["run_uri"],
        rank=rank,
        world_size=world_size,
        device=ray.train.torch.get_device(),
        report=report,
        base_dir=config.get("base_dir"),
        track=tracker,
        progress=marker_progress() if config.get("events") else None,
    )
    try:
        run_training(spec, ctx)
    finally:
        if tracker is not None:
            tracker.close()


def user_loop_worker(config: dict[str, Any]) -> None:
    """Bring-your-own loop: import the user's train_loop_per_worker on the worker and call it."""
    fn = import_hook(config["entrypoint"], config.get("base_dir"), "entrypoint")
    fn(config["user_config"])


def build_trainer_kwargs(spec: JobSpec, run_uri: str, base_dir: Optional[str], ray_storage: str, run_name: str,
                         tracking_config: Optional[dict[str, Any]] = None, worker_events: bool = False) -> dict[str, Any]:
    """TorchTrainer arguments for a job (pure: no Ray calls).

    `tracking_config` lets rank 0 reach the run's trackers; with `worker_events` rank 0 describes its
    progress as marker lines for the driver's console instead of plain lines.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = spec.scaling.gpus_per_worker or 1
    num_workers = spec.scaling.num_workers
    scaling = ScalingConfig(
        num_workers=tuple(num_workers) if isinstance(num_workers, (list, tuple)) else num_workers,
        use_gpu=spec.scaling.use_gpu,
        resources_per_worker=resources if num_workers != 0 else None,
    )
    if spec.entrypoint:
        loop, loop_config = user_loop_worker, {"entrypoint": spec.entrypoint, "base_dir": base_dir, "user_config": dict(spec.config)}
        storage_path = spec.checkpoint.storage  # a user loop checkpoints through Ray's own storage
    else:
        loop, loop_config = train_worker, {"job": spec.to_dict(), "run_uri": run_uri, "base_dir": base_dir}
        if tracking_config:
            loop_config["tracking"] = tracking_config
        if worker_events:
            loop_config["events"] = True
        storage_path = ray_storage
    run_config = RunConfig(name=run_name, storage_path=storage_path, failure_config=FailureConfig(max_failures=spec.failure.max_failures))
    return {"train_loop_per_worker": loop, "train_loop_config": loop_config, "scaling_config": scaling, "run_config": run_config}


# Ray Train's controller takes one report per worker per poll, and a worker's next report waits for that
# slot: at Ray's default of 2 s, validations every epoch of a small job queue up behind it.
TRAIN_POLL_INTERVAL_S = "0.1"


def _train_settings(embedded: bool) -> dict[str, str]:
    """Ray Train settings for the runs we start, where the user has not set them.

    An embedded single-node Ray has no dashboard (its state API is what Ray Train's state actor
    reconciles against) and never drains a node (the preemption watcher is an actor of its own).
    """
    wanted = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_POLL_INTERVAL_S}
    if embedded:
        wanted.update(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION="0")
    return {key: value for key, value in wanted.items() if key not in os.environ}


@contextlib.contextmanager
def _environment(settings: dict[str, str]):
    os.environ.update(settings)
    try:
        yield
    finally:
        for key in settings:
            os.environ.pop(key, None)


@contextlib.contextmanager
def train_environment(embedded: bool):
    """Ray Train's settings for a fit() on a Ray this process did not start: Ray Train hands them to its actors.

    An embedded Ray got them at its start (`start_ray`): every Ray process inherits them, and Ray
    Train, not seeing them set here, adds no runtime environment to its workers (a runtime
    environment means a fresh worker process through Ray's runtime-env agent, not a prestarted one).
    """
    with _environment({} if embedded else _train_settings(embedded=False)):
        yield


def running_local_ray() -> Optional[str]:
    """The address of a Ray already up on this machine (`ray start --head`), or None.

    Ray records its newest local cluster in its temp dir; a cluster that has since stopped leaves the
    file behind, so the GCS port must also answer.
    """
    temp_dir = os.environ.get("RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "ray")
    try:
        with open(os.path.join(temp_dir, "ray_current_cluster")) as fh:
            address = fh.read().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return address
    except OSError:
        return None


def resolve_address(address: Optional[str]) -> Optional[str]:
    """Where a run's Ray is: the given address, else a Ray already up on this machine, else None (start an embedded one).

    `local` asks for a new embedded Ray even when another one is up.
    """
    if address == "local":
        return None
    # "auto" rather than the address itself: Ray then reads the local cluster's session, token authentication included.
    return address or ("auto" if running_local_ray() else None)


def start_ray(address: Optional[str], log_to_driver: bool = True, prestart: bool = True) -> bool:
    """Attach to Ray at `address`, or start an embedded Ray of this machine's CPUs; True if this call connected (shut it down after).

    An embedded Ray has no dashboard: it serves the Jobs API and the state API, which runs and sweeps
    do not use (Ray Train's state actor reconciliation, which would, is off there), and its processes
    compete with the run's for two cores. `prestart` leaves Ray's idle workers to start with it:
    only tasks and actors without a runtime environment (Tune's trials) can use them.
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    settings: dict[str, str] = {}
    if address:
        kwargs["address"] = address
    else:
        # "local": a new embedded Ray even when a `ray start` cluster runs on this machine.
        kwargs.update(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
        settings = _train_settings(embedded=True)
        if not prestart and "RAY_prestart_worker_first_driver" not in os.environ:
            settings["RAY_prestart_worker_first_driver"] = "0"
    try:
        with _environment(settings):
            ray.init(**kwargs)
    except ConnectionError as exc:
        raise BadInput(f"--address {address}: cannot connect to Ray ({exc})") from None
    return True


def summary_from_storage(run_uri: str, endpoint_url: Optional[str] = None) -> dict[str, Any]:
    """What the latest committed checkpoint says of a run: steps, epochs, metrics, best (and its checkpoint), checkpoint URI.

    Reads the counters (state.pt) of the newest checkpoint that verifies, not its weights.
    """
    from orchestrator import checkpoint as ckpt

    fs, root = storage.open_storage(run_uri, endpoint_url)
    found = ckpt.list_checkpoints(fs, root, uri_prefix=run_uri)
    for info in reversed(found):
        try:
            train = ckpt.deserialize_state(ckpt.read_verified(fs, info, ["state.pt"])["state.pt"])["train"]
            break
        except (ValueError, FileNotFoundError) as exc:
            log.warning("skipping checkpoint %s: %s", info.uri, exc)
    else:
        return {"steps": 0, "epochs": 0, "metrics": {}, "best": None, "checkpoint": None}
    best_checkpoint = next((c.uri for c in found if c.step == train["best_step"]), None)
    return {
        "steps": train["step"],
        "epochs": train["epoch"],
        "metrics": train["last_val"],
        "best": {"metric": train.get("best_metric"), "value": train["best_value"], "step": train["best_step"], "metrics": train["best_metrics"],
                 "checkpoint": best_checkpoint},
        "checkpoint": info.uri,
        "stopped_early": train["stopped_early"],
        "first_step_at": train.get("first_step_at"),
        "last_step_at": train.get("last_step_at"),
        "report_blocked_s": train.get("report_blocked_s"),
        "report_blocked_max_s": train.get("report_blocked_max_s"),
        "test": _test_summary(run_uri, endpoint_url),
    }


def _test_summary(run_uri: str, endpoint_url: Optional[str]) -> Optional[dict[str, Any]]:
    from orchestrator.tracking import TEST_RECORD, read_test_record

    test = read_test_record(run_uri, endpoint_url)
    if test is None:
        return None
    return {"uri": f"{run_uri.rstrip('/')}/{TEST_RECORD}", "checkpoint": test.get("checkpoint"), "step": test.get("step"), "metrics": test.get("metrics", {})}


def run_job(spec: JobSpec, job_file: Optional[str] = None, address: Optional[str] = None, fresh: bool = False, quiet: bool = False,
            console: Optional[RunConsole] = None, capture: bool = False) -> dict[str, Any]:
    """Validate, then train a job through Ray Train; return the summary (also recorded in run.json).

    `console` shows the run (plain lines on stdout, or stderr when `quiet`, by default). With `capture`
    everything this process and its workers print goes to `<run>/run.log`, and only what the console
    lets through reaches the terminal (the command line does this; library callers keep their streams).
    """
    console = console or RunConsole(stream=sys.stderr if quiet else sys.stdout)
    base_dir = str(Path(job_file).resolve().parent) if job_file else os.getcwd()
    t0 = time.time()
    if spec.scaling.num_workers != 0 or address:
        address = resolve_address(address)
    data_info = preflight(spec, base_dir, address)

    name = fresh_name(spec) if fresh else spec.name
    run_uri = run_uri_for(spec, name)
    endpoint = spec.checkpoint.endpoint_url
    record = read_run_record(run_uri, endpoint)
    if record and record.get("status") == "finished" and not fresh:
        console.message(f"{run_uri}: already finished at step {record.get('summary', {}).get('steps')}; nothing to do (use --fresh for a new run)")
        return {**record.get("summary", {}), "run": name, "run_uri": run_uri, "status": "finished", "already_finished": True, "wall_s": round(time.time() - t0, 3)}
    if not capture:
        return _run(spec, RunPlan(name, run_uri, job_file, base_dir, address, record, data_info, t0), console, worker_events=False)
    local_log, uploaded_log = _log_file(run_uri)
    try:
        with console.capture(local_log):
            return _run(spec, RunPlan(name, run_uri, job_file, base_dir, address, record, data_info, t0), console, worker_events=True)
    finally:
        if uploaded_log:
            _upload_log(local_log, uploaded_log, endpoint)


@dataclass
class RunPlan:
    """Where a run goes and what preflight found, decided before anything starts."""

    name: str
    run_uri: str
    job_file: Optional[str]
    base_dir: str
    address: Optional[str]
    previous: Optional[dict[str, Any]]  # run.json of an earlier attempt
    data_info: Any
    t0: float


def _run(spec: JobSpec, plan: RunPlan, console: RunConsole, worker_events: bool) -> dict[str, Any]:
    from orchestrator.tracking import TrackingSession

    run_uri, endpoint = plan.run_uri, spec.checkpoint.endpoint_url
    started = datetime.now(timezone.utc).isoformat()
    prov = provenance(spec, plan.base_dir, plan.data_info, plan.address)
    session = TrackingSession.start(spec, run_uri, plan.name, prov, previous=(plan.previous or {}).get("tracking"))
    record = {
        "run": plan.name,
        "status": "running",
        "started": started,
        "ended": None,
        "command": sys.argv,
        "job_file": plan.job_file,
        "job": spec.to_dict(),
        "provenance": prov,
        "tracking": session.to_record(),
        "attempts": (plan.previous or {}).get("attempts", 0) + 1,
    }
    write_run_record(run_uri, record, endpoint)

    from orchestrator.checkpoint import list_checkpoints

    fs, root = storage.open_storage(run_uri, endpoint)
    existing = list_checkpoints(fs, root, uri_prefix=run_uri)
    resumed_from = existing[-1].uri if existing and not spec.entrypoint else None
    console.message(f"run {plan.name} -> {run_uri}" + (f" (resuming from {resumed_from})" if resumed_from else ""))
    local_mode = spec.scaling.num_workers == 0 and not plan.address
    if not local_mode:
        console.status("starting Ray" if not plan.address else f"connecting to Ray at {plan.address}")
    # Local mode (num_workers=0) runs the loop in this process: no Ray runtime to start.
    # Ray Train's actors all carry a runtime environment, so none of them would take a prestarted worker.
    started_ray = start_ray(plan.address, prestart=False) if not local_mode else False
    try:
        embedded = started_ray and not plan.address
        status, error, result = _fit(spec, plan, session.worker_config(), console, embedded, worker_events, local_mode)
        if spec.entrypoint:
            summary = {"steps": None, "epochs": None, "metrics": dict(result.metrics or {}) if result else {}, "best": None,
                       "checkpoint": (result.checkpoint.path if result and result.checkpoint else None)}
        else:
            summary = summary_from_storage(run_uri, endpoint)
        summary = {"run": plan.name, "run_uri": run_uri, "status": status, **summary, "resumed_from": resumed_from,
                   "report": f"{run_uri.rstrip('/')}/{REPORT}", "wall_s": round(time.time() - plan.t0, 3)}
        if error:
            summary["error"] = error
        placed = dict(result.metrics or {}) if result is not None else {}
        if "placement_world_size" in placed:
            prov.update(world_size=placed["placement_world_size"], hosts=placed["placement_hosts"],
                        gpus=[g for g in str(placed.get("placement_gpus") or "").split(",") if g])
        record.update(status=status, ended=datetime.now(timezone.utc).isoformat(), summary=summary)
        write_run_record(run_uri, record, endpoint)
        # The result first: an embedded Ray's shutdown, the report and the trackers' artifacts follow.
        console.message(format_summary(summary))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    summary["report"] = write_report_safely(run_uri, endpoint)
    if summary["report"] is None:
        record["summary"] = summary
        write_run_record(run_uri, record, endpoint)
    weights = f"{summary['checkpoint'].rstrip('/')}/model.safetensors" if summary.get("checkpoint") and not spec.entrypoint else None
    session.finish(spec, status, summary, [("", summary["report"]), ("", f"{run_uri.rstrip('/')}/{RUN_RECORD}"), ("model", weights)])
    return summary


def _fit(spec: JobSpec, plan: RunPlan, tracking_config: Optional[dict[str, Any]], console: RunConsole, embedded: bool,
         worker_events: bool, local_mode: bool) -> tuple[str, Optional[str], Any]:
    """Ray Train's fit of the job: (status, one-line error, Ray's result); a failure after Ray's retries is a failed run, not an exception."""
    try:
        from ray.train.torch import TorchTrainer

        ray_storage = os.path.join(tempfile.gettempdir(), "orchestrator-ray")
        run_name = f"{plan.name}-{int(plan.t0)}" if not spec.entrypoint else plan.name
        kwargs = build_trainer_kwargs(spec, plan.run_uri, plan.base_dir, ray_storage, run_name, tracking_config, worker_events=worker_events)
        if not local_mode:
            console.status(f"starting {spec.scaling.max_workers} worker(s)")
        with train_environment(embedded=embedded):
            return "finished", None, TorchTrainer(**kwargs).fit()
    except Exception as exc:  # the run failed after retries: record it, report it, keep what was committed
        return "failed", f"{type(exc).__name__}: {exc}".splitlines()[0], None


def _log_file(run_uri: str) -> tuple[str, Optional[str]]:
    """(local file the run's output is appended to, object to upload it to at the end, or None when local)."""
    protocol, path = storage.split_uri(run_uri)
    if protocol == "file":
        return os.path.join(path, LOG_FILE), None
    fd, tmp = tempfile.mkstemp(prefix="orchestrator-", suffix=".log")
    os.close(fd)
    return tmp, f"{run_uri.rstrip('/')}/{LOG_FILE}"


def _upload_log(local: str, uri: str, endpoint_url: Optional[str]) -> None:
    """Append this attempt's log to the run's log on an object store (which cannot append: read, then rewrite)."""
    try:
        with open(local, "rb") as fh:
            ours = fh.read()
        fs, path = storage.open_storage(uri, endpoint_url)
        try:
            earlier = storage.read_bytes(fs, path)
        except FileNotFoundError:
            earlier = b""
        storage.write_bytes(fs, path, earlier + ours)
    except Exception as exc:  # the log is a convenience; the run's outcome is in run.json
        log.warning("could not upload the run's log to %s (%s)", uri, type(exc).__name__)
    finally:
        with contextlib.suppress(OSError):
            os.remove(local)


def write_report_safely(run_uri: str, endpoint_url: Optional[str]) -> Optional[str]:
    """Write `<run>/report.html`; a report that cannot be made is a warning, not a failed run."""
    from orchestrator.report import write_report

    try:
        return write_report(run_uri, endpoint_url=endpoint_url)
    except Exception as exc:
        log.warning("report: could not write %s/report.html (%s: %s)", run_uri.rstrip("/"), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable end of a run."""
    lines = [f"{summary['status']}: {summary['run']}  steps {summary.get('steps')}  epochs {summary.get('epochs')}  wall {summary['wall_s']:.1f}s"]
    metrics = summary.get("metrics") or {}
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    if shown:
        lines.append(f"  last validation: {shown}")
    best = summary.get("best") or {}
    if best.get("value") is not None:
        kept = f" ({best['checkpoint']})" if best.get("checkpoint") else " (checkpoint not kept)"
        lines.append(f"  best {best.get('metric') or ''} {best['value']:.4f} at step {best.get('step')}{kept}")
    test = summary.get("test") or {}
    shown = "  ".join(f"{k[5:]} {v:.4f}" for k, v in (test.get("metrics") or {}).items() if isinstance(v, float))
    if shown:
        lines.append(f"  test (step {test.get('step')}): {shown}")
    if summary.get("checkpoint"):
        lines.append(f"  checkpoint: {summary['checkpoint']}")
    if summary.get("report"):
        lines.append(f"  report: {summary['report']}")
    if summary.get("error"):
        lines.append(f"  error: {summary['error']}")
    return "\n".join(lines)
