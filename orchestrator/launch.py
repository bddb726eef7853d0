"""`orchestrator run` from this machine: preflight, the lease, the rerun rule, the plan, Ray, the run session, the
console's summary and the report.

`run_job` is what `orchestrator run` does; a submitted job runs the same on the cluster's head. The run's life
itself (record, trackers, the executor, how it ended) is the run session's (orchestrator.session).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from orchestrator import storage
from orchestrator.console import RunConsole
from orchestrator.executor import DriverHooks, Executor, GroupHooks, choose_executor
from orchestrator.lease import RunLease
from orchestrator.preflight import preflight
from orchestrator.ray_runtime import resolve_address, start_ray
from orchestrator.report import write_report_safely
from orchestrator.rundir import LOG_FILE, REPORT, RUN_RECORD, RunDir, run_uri_for
from orchestrator.runrecord import RunRecord, RunStatus, RunSummary
from orchestrator.session import Rerun, RunPlan, RunSession, RunSignals, check_rerun, extension_line, resume_line
from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)


def fresh_name(spec: JobSpec) -> str:
    """A new run name for `--fresh`: the job name and the start time."""
    return f"{spec.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def run_job(
    spec: JobSpec,
    job_file: str | None = None,
    address: str | None = None,
    fresh: bool = False,
    quiet: bool = False,
    console: RunConsole | None = None,
    capture: bool = False,
    wait: bool = False,
    extend: bool = False,
) -> RunSummary:
    """Validate, then train a job; return the summary (also recorded in run.json).

    `console` shows the run (plain lines on stdout, or stderr when `quiet`, by default). With `capture`
    everything this process and its workers print goes to `<run>/run.log`, and only what the console
    lets through reaches the terminal (the command line does this; library callers keep their streams).

    The run holds its directory's lease (see `lease`) from before it reads the directory to the very
    end; another run there at the same time is refused (LeaseHeld, exit 2), or waited for with `wait`.
    A rerun with other settings is refused before anything starts (session.check_rerun); `extend`
    continues a run for a longer horizon.
    """
    console = console or RunConsole(stream=sys.stderr if quiet else sys.stdout)
    base_dir = str(Path(job_file).resolve().parent) if job_file else os.getcwd()
    t0 = time.time()
    executor = choose_executor(spec)
    if executor != Executor.DRIVER or address:
        address = resolve_address(address)
    data_info = preflight(spec, base_dir, address)
    run = RunDir.open(
        run_uri_for(spec, fresh_name(spec) if fresh else None),
        spec.checkpoint.endpoint_url,
        spec.checkpoint.upload_timeout_s,
    )
    lease = RunLease.for_run(run, spec.checkpoint.lease_ttl_s)
    lease.acquire(wait, on_wait=lambda holder: console.message(_waiting_line(run.uri, holder)))
    try:
        rerun = check_rerun(RunRecord.load(run), spec, run.uri, extend=extend)
        if rerun.done:
            return _already_finished(rerun, run, t0, console)
        plan = RunPlan(
            spec,
            run,
            executor,
            base_dir,
            job_file=job_file,
            address=address,
            previous=rerun.previous,
            data_fingerprint=getattr(data_info, "fingerprint", None),
            t0=t0,
            lease=lease.token_ref(),
            extension=rerun.extension,
        )
        with RunSignals() as signals:
            lease.on_lost = signals.lost_lease
            if not capture:
                return _run(plan, console, signals, worker_events=False)
            local_log, uploaded_log = _log_file(run)
            try:
                with console.capture(local_log):
                    return _run(plan, console, signals, worker_events=True)
            finally:
                if uploaded_log and not lease.lost:
                    _upload_log(local_log, run)
    finally:
        lease.on_lost = None
        lease.release()


def _waiting_line(uri: str, holder) -> str:
    who = holder.describe() if holder else "another run"
    return f"{storage.redact(uri)}: in use by another run ({who}); waiting for it to end"


def _already_finished(rerun: Rerun, run: RunDir, t0: float, console: RunConsole) -> RunSummary:
    previous = rerun.previous
    done = (previous.summary if previous else None) or RunSummary(
        run=run.name, run_uri=run.uri, status=RunStatus.FINISHED
    )
    console.message(f"{run.uri}: already finished at step {done.steps}; nothing to do (use --fresh for a new run)")
    done.run, done.run_uri, done.already_finished, done.wall_s = run.name, run.uri, True, round(time.time() - t0, 3)
    return done


def _run(plan: RunPlan, console: RunConsole, signals: RunSignals, worker_events: bool) -> RunSummary:
    """The run itself, once its input is known good: the session's begin, Ray, the executor, end; then report, trackers."""
    spec, run = plan.spec, plan.run
    events = console.event if worker_events else None  # rank 0's progress events, on their own channel (events.py)
    session = RunSession(plan, say=console.message, log_only=console.log_only, signals=signals, events=events)
    session.begin()
    connected = False

    def work():  # from just after run.json says running: a signal anywhere in here is recorded
        nonlocal connected
        resumed = f" (resuming from {session.resumed_from})" if session.resumed_from else ""
        console.message(f"run {run.name} -> {run.uri}{resumed}")
        if plan.extension:
            console.message(extension_line(plan))
        config = session.loop_config()
        if plan.executor != Executor.DRIVER:
            console.status("starting Ray" if not plan.address else f"connecting to Ray at {plan.address}")
            # Ray Train's actors all carry a runtime environment (ray_runtime.train_environment): none would take a
            # prestarted worker; the task executor's task starts on one.
            connected = start_ray(plan.address, prestart=plan.executor == Executor.TASK)
            signals.claim()  # ray.init's own SIGTERM handler would end the process without a word
            n = spec.scaling.max_workers
            console.status(f"starting {n} worker{'' if n == 1 else 's'}")
        ray_name = f"{run.name}-{int(plan.t0)}" if not spec.entrypoint else run.name
        hooks = GroupHooks(embedded=connected and not plan.address, run_name=ray_name)
        return session.execute(config, driver=DriverHooks(run_name=ray_name), group=hooks)

    try:
        summary = session.end(session.host(work), report=run.uri_of(REPORT))
        # The result first: an embedded Ray's shutdown, the report and the trackers' artifacts follow.
        console.message(format_summary(summary))
        if summary.status in (RunStatus.INTERRUPTED, RunStatus.STOPPED) and summary.signal:
            console.message(resume_line(summary))
    finally:
        if connected:
            from orchestrator.ray_runtime import stop_ray  # Ray is loaded by start_ray already; never in local mode

            stop_ray()
    if session.lost:  # the run directory, and its MLflow run, are another run's now: nothing more of ours there
        summary.report = None
        return summary
    summary.report = write_report_safely(run)
    if summary.report is None:
        session.save_record()
    # A sharded checkpoint has no one weights file to log (`orchestrator export` writes one).
    whole = summary.checkpoint and not spec.entrypoint and spec.scaling.strategy != "fsdp"
    weights = f"{summary.checkpoint}/model.safetensors" if whole else None
    session.finish(summary, [("", summary.report), ("", run.uri_of(RUN_RECORD)), ("model", weights)])
    return summary


def _log_file(run: RunDir) -> tuple[str, bool]:
    """(the local file this attempt's output is appended to, whether it is uploaded to the run's log at the end)."""
    if run.is_local:
        return run.path(LOG_FILE), False
    fd, tmp = tempfile.mkstemp(prefix="orchestrator-", suffix=".log")
    os.close(fd)
    return tmp, True


def _upload_log(local: str, run: RunDir) -> None:
    """Append this attempt's log to the run's log on an object store (which cannot append: read, then rewrite)."""
    try:
        with open(local, "rb") as fh:
            ours = fh.read()
        try:
            earlier = storage.read_bytes(run.fs, run.path(LOG_FILE))
        except FileNotFoundError:
            earlier = b""
        storage.write_bytes(run.fs, run.path(LOG_FILE), earlier + ours)
    except Exception as exc:  # the log is a convenience; the run's outcome is in run.json
        log.warning("could not upload the run's log to %s (%s)", run.uri_of(LOG_FILE), type(exc).__name__)
    finally:
        with contextlib.suppress(OSError):
            os.remove(local)


def format_summary(summary: RunSummary) -> str:
    """The human-readable end of a run."""
    counts = "".join(
        f"  {name} {n}" for name, n in (("steps", summary.steps), ("epochs", summary.epochs)) if n is not None
    )
    lines = [f"{summary.status}: {summary.run}{counts}  wall {summary.wall_s:.1f}s"]
    shown = "  ".join(f"{k} {v:.4f}" for k, v in (summary.metrics or {}).items() if isinstance(v, float))
    if shown:  # a bring-your-own loop's are what it reported, whatever they are
        validated = all(k.startswith("val_") for k in summary.metrics)
        lines.append(f"  last {'validation' if validated else 'reported'}: {shown}")
    best = summary.best
    if best is not None and best.value is not None:
        kept = f" ({best.checkpoint})" if best.checkpoint else " (checkpoint not kept)"
        lines.append(f"  best {best.metric or ''} {best.value:.4f} at step {best.step}{kept}")
    test = summary.test
    shown = "  ".join(
        f"{k[5:]} {v:.4f}" for k, v in ((test.metrics if test else None) or {}).items() if isinstance(v, float)
    )
    if shown:
        lines.append(f"  test (step {test.step}): {shown}")
    if summary.checkpoint:
        lines.append(f"  checkpoint: {summary.checkpoint}")
    if summary.report:
        lines.append(f"  report: {summary.report}")
    if summary.error:
        lines.append(f"  error: {summary.error}")
    return "\n".join(lines)
