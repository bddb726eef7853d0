"""Local runs: validate everything, start (or attach to) Ray, build the TorchTrainer from a JobSpec, fit.

Render, then act: `build_trainer_kwargs` is a pure function of the spec; `run_job` does the I/O.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from orchestrator import storage
from orchestrator.data import import_hook
from orchestrator.errors import BadInput
from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)
RUN_RECORD = "run.json"


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
    ctx = LoopContext(
        run_uri=config["run_uri"],
        rank=rank,
        world_size=world_size,
        device=ray.train.torch.get_device(),
        report=lambda metrics: ray.train.report({**metrics, **placement}),
        base_dir=config.get("base_dir"),
        track=tracker,
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
                         tracking_config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """TorchTrainer arguments for a job (pure: no Ray calls); `tracking_config` lets rank 0 reach the run's trackers."""
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
        storage_path = ray_storage
    run_config = RunConfig(name=run_name, storage_path=storage_path, failure_config=FailureConfig(max_failures=spec.failure.max_failures))
    return {"train_loop_per_worker": loop, "train_loop_config": loop_config, "scaling_config": scaling, "run_config": run_config}


def start_ray(address: Optional[str], with_dashboard: bool = True, log_to_driver: bool = True) -> bool:
    """Attach to Ray at `address`, or start an embedded Ray of this machine's CPUs; True if this call started it.

    The dashboard serves the state API that Ray Train's controller polls: leave it on where Ray Train
    runs worker actors (a sweep of in-process trials can do without).
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    if address:
        kwargs["address"] = address
    else:
        # "local": a new embedded Ray even when a `ray start` cluster runs on this machine.
        kwargs.update(address="local", num_cpus=os.cpu_count(), include_dashboard=with_dashboard)
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise BadInput(f"--address {address}: cannot connect to Ray ({exc})") from None
    return True


def summary_from_storage(run_uri: str, endpoint_url: Optional[str] = None) -> dict[str, Any]:
    """What the latest committed checkpoint says of a run: steps, epochs, metrics, best, checkpoint URI."""
    from orchestrator import checkpoint as ckpt

    fs, root = storage.open_storage(run_uri, endpoint_url)
    restored = ckpt.restore_latest(fs, root)
    if restored is None:
        return {"steps": 0, "epochs": 0, "metrics": {}, "best": None, "checkpoint": None}
    info, files = restored
    train = ckpt.deserialize_state(files["state.pt"])["train"]
    return {
        "steps": train["step"],
        "epochs": train["epoch"],
        "metrics": train["last_val"],
        "best": {"metric": train.get("best_metric"), "value": train["best_value"], "step": train["best_step"], "metrics": train["best_metrics"]},
        "checkpoint": ckpt.CheckpointInfo(uri=f"{run_uri.rstrip('/')}/{info.path.rstrip('/').rsplit('/', 1)[-1]}", path=info.path, manifest=info.manifest).uri,
        "stopped_early": train["stopped_early"],
        "first_step_at": train.get("first_step_at"),
        "last_step_at": train.get("last_step_at"),
        "test": _test_summary(run_uri, endpoint_url),
    }


def _test_summary(run_uri: str, endpoint_url: Optional[str]) -> Optional[dict[str, Any]]:
    from orchestrator.tracking import TEST_RECORD, read_test_record

    test = read_test_record(run_uri, endpoint_url)
    if test is None:
        return None
    return {"uri": f"{run_uri.rstrip('/')}/{TEST_RECORD}", "checkpoint": test.get("checkpoint"), "step": test.get("step"), "metrics": test.get("metrics", {})}


def run_job(spec: JobSpec, job_file: Optional[str] = None, address: Optional[str] = None, fresh: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Validate, then train a job through Ray Train; return the summary (also recorded in run.json)."""
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if quiet else (lambda msg: print(msg, flush=True))
    base_dir = str(Path(job_file).resolve().parent) if job_file else os.getcwd()
    t0 = time.time()
    data_info = preflight(spec, base_dir, address)

    name = fresh_name(spec) if fresh else spec.name
    run_uri = run_uri_for(spec, name)
    endpoint = spec.checkpoint.endpoint_url
    record = read_run_record(run_uri, endpoint)
    if record and record.get("status") == "finished" and not fresh:
        say(f"{run_uri}: already finished at step {record.get('summary', {}).get('steps')}; nothing to do (use --fresh for a new run)")
        return {**record.get("summary", {}), "run": name, "run_uri": run_uri, "status": "finished", "already_finished": True, "wall_s": round(time.time() - t0, 3)}
    from orchestrator.tracking import TrackingSession

    started = datetime.now(timezone.utc).isoformat()
    prov = provenance(spec, base_dir, data_info, address)
    session = TrackingSession.start(spec, run_uri, name, prov, previous=(record or {}).get("tracking"))
    record = {
        "run": name,
        "status": "running",
        "started": started,
        "ended": None,
        "command": sys.argv,
        "job_file": job_file,
        "job": spec.to_dict(),
        "provenance": prov,
        "tracking": session.to_record(),
        "attempts": (record or {}).get("attempts", 0) + 1,
    }
    write_run_record(run_uri, record, endpoint)

    # Local mode (num_workers=0) runs the loop in this process: no Ray runtime to start.
    started_ray = start_ray(address) if (spec.scaling.num_workers != 0 or address) else False
    from ray.train.torch import TorchTrainer

    ray_storage = os.path.join(tempfile.gettempdir(), "orchestrator-ray")
    kwargs = build_trainer_kwargs(spec, run_uri, base_dir, ray_storage, f"{name}-{int(t0)}" if not spec.entrypoint else name, session.worker_config())
    from orchestrator.checkpoint import list_checkpoints

    fs, root = storage.open_storage(run_uri, endpoint)
    existing = list_checkpoints(fs, root, uri_prefix=run_uri)
    resumed_from = existing[-1].uri if existing and not spec.entrypoint else None
    say(f"run {name} -> {run_uri}" + (f" (resuming from {resumed_from})" if resumed_from else ""))
    status, error, result = "finished", None, None
    try:
        result = TorchTrainer(**kwargs).fit()
    except Exception as exc:  # the run failed after retries: record it, report it, keep what was committed
        status, error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    if spec.entrypoint:
        summary = {"steps": None, "epochs": None, "metrics": dict(result.metrics or {}) if result else {}, "best": None,
                   "checkpoint": (result.checkpoint.path if result and result.checkpoint else None)}
    else:
        summary = summary_from_storage(run_uri, endpoint)
    summary = {"run": name, "run_uri": run_uri, "status": status, **summary, "resumed_from": resumed_from, "wall_s": round(time.time() - t0, 3)}
    if error:
        summary["error"] = error
    placed = dict(result.metrics or {}) if result is not None else {}
    if "placement_world_size" in placed:
        prov.update(world_size=placed["placement_world_size"], hosts=placed["placement_hosts"],
                    gpus=[g for g in str(placed.get("placement_gpus") or "").split(",") if g])
    record.update(status=status, ended=datetime.now(timezone.utc).isoformat(), summary=summary)
    write_run_record(run_uri, record, endpoint)
    summary["report"] = write_report_safely(run_uri, endpoint)
    weights = f"{summary['checkpoint'].rstrip('/')}/model.safetensors" if summary.get("checkpoint") and not spec.entrypoint else None
    session.finish(spec, status, summary, [("", summary["report"]), ("", f"{run_uri.rstrip('/')}/{RUN_RECORD}"), ("model", weights)])
    write_run_record(run_uri, record, endpoint)
    say(format_summary(summary))
    return summary


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
        lines.append(f"  best {best.get('metric') or ''} {best['value']:.4f} at step {best.get('step')}")
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
