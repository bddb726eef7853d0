"""A run from this machine: preflight, the run record, Ray (attached or embedded), the fit, the summary, the report.

`run_job` is what `orchestrator run` does; a submitted job runs the same on the cluster's head.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.console import RunConsole
from orchestrator.lease import RunLease
from orchestrator.preflight import preflight
from orchestrator.provenance import add_placement, collect_provenance
from orchestrator.ray_runtime import has_one_node, resolve_address, start_ray
from orchestrator.report import write_report_safely
from orchestrator.rundir import LOG_FILE, REPORT, RUN_RECORD, RunDir, run_uri_for
from orchestrator.runrecord import RunRecord, RunStatus, RunSummary, summary_from_checkpoints
from orchestrator.spec import JobSpec
from orchestrator.tracking import TrackingSession
from orchestrator.trainer import fit, runs_in_one_task

log = logging.getLogger(__name__)


def fresh_name(spec: JobSpec) -> str:
    """A new run name for `--fresh`: the job name and the start time."""
    return f"{spec.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


@dataclass
class RunPlan:
    """Where a run goes and what preflight found, decided before anything starts."""

    spec: JobSpec
    run: RunDir
    job_file: str | None
    base_dir: str
    address: str | None  # None: an embedded Ray (or none at all, in local mode)
    previous: RunRecord | None  # the record of an earlier attempt
    data_info: Any
    t0: float

    @property
    def local_mode(self) -> bool:
        """`scaling.num_workers: 0` on this machine: the loop runs in this process, with no Ray at all."""
        return self.spec.scaling.num_workers == 0 and not self.address


def run_job(
    spec: JobSpec,
    job_file: str | None = None,
    address: str | None = None,
    fresh: bool = False,
    quiet: bool = False,
    console: RunConsole | None = None,
    capture: bool = False,
    wait: bool = False,
) -> RunSummary:
    """Validate, then train a job through Ray Train; return the summary (also recorded in run.json).

    `console` shows the run (plain lines on stdout, or stderr when `quiet`, by default). With `capture`
    everything this process and its workers print goes to `<run>/run.log`, and only what the console
    lets through reaches the terminal (the command line does this; library callers keep their streams).

    The run holds its directory's lease (see `lease`) from before it reads the directory to the very
    end; another run there at the same time is refused (LeaseHeld, exit 2), or waited for with `wait`.
    """
    console = console or RunConsole(stream=sys.stderr if quiet else sys.stdout)
    base_dir = str(Path(job_file).resolve().parent) if job_file else os.getcwd()
    t0 = time.time()
    if spec.scaling.num_workers != 0 or address:
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
        return _leased(spec, run, job_file, base_dir, address, fresh, data_info, t0, console, capture)
    finally:
        lease.release()


def _waiting_line(uri: str, holder) -> str:
    who = holder.describe() if holder else "another run"
    return f"{storage.redact(uri)}: in use by another run ({who}); waiting for it to end"


def _leased(
    spec: JobSpec,
    run: RunDir,
    job_file: str | None,
    base_dir: str,
    address: str | None,
    fresh: bool,
    data_info: Any,
    t0: float,
    console: RunConsole,
    capture: bool,
) -> RunSummary:
    """The rest of `run_job`, with the run's lease held."""
    previous = RunRecord.load(run)
    if previous and previous.finished and not fresh:
        done = previous.summary or RunSummary(run=run.name, run_uri=run.uri, status=RunStatus.FINISHED)
        console.message(f"{run.uri}: already finished at step {done.steps}; nothing to do (use --fresh for a new run)")
        done.run, done.run_uri, done.already_finished, done.wall_s = run.name, run.uri, True, round(time.time() - t0, 3)
        return done
    plan = RunPlan(spec, run, job_file, base_dir, address, previous, data_info, t0)
    if not capture:
        return _run(plan, console, worker_events=False)
    local_log, uploaded_log = _log_file(run)
    try:
        with console.capture(local_log):
            return _run(plan, console, worker_events=True)
    finally:
        if uploaded_log:
            _upload_log(local_log, run)


def _run(plan: RunPlan, console: RunConsole, worker_events: bool) -> RunSummary:
    """The run itself, once its input is known good: record, Ray, fit, summary first, then report and trackers."""
    spec, run = plan.spec, plan.run
    # Hosts are known here for a run on this machine; on a cluster rank 0 reports them (see trainer.train_worker).
    prov = collect_provenance(
        spec, plan.base_dir, getattr(plan.data_info, "fingerprint", None), hosts=1 if plan.address is None else None
    )
    session = TrackingSession.start(
        spec, run.uri, run.name, prov, previous=plan.previous.tracking if plan.previous else None
    )
    record = RunRecord.begin(
        run.name, spec.to_dict(), plan.previous, job_file=plan.job_file, provenance=prov, tracking=session.to_record()
    )
    record.save(run)

    existing = ckpt.list_checkpoints(run.fs, run.root, uri_prefix=run.uri)
    # A bring-your-own loop resumes too: Ray hands it the newest checkpoint, which orchestrator.byo committed.
    resumed_from = existing[-1].uri if existing else None
    console.message(f"run {run.name} -> {run.uri}" + (f" (resuming from {resumed_from})" if resumed_from else ""))
    if not plan.local_mode:
        console.status("starting Ray" if not plan.address else f"connecting to Ray at {plan.address}")
    # Ray Train's actors all carry a runtime environment (see train_environment): none would take a prestarted
    # worker; a run in one task (see trainer.runs_in_one_task) starts on one.
    prestart = runs_in_one_task(spec, one_node=plan.address is None)
    connected = start_ray(plan.address, prestart=prestart) if not plan.local_mode else False
    try:
        summary, placed = _fit_and_summarize(
            plan,
            session.worker_config(),
            console,
            embedded=connected and not plan.address,
            worker_events=worker_events,
            one_node=not plan.local_mode and (plan.address is None or has_one_node()),
        )
        summary.resumed_from = resumed_from
        add_placement(prov, placed)
        record.end(summary.status, summary)
        record.save(run)
        # The result first: an embedded Ray's shutdown, the report and the trackers' artifacts follow.
        console.message(format_summary(summary))
    finally:
        if connected:
            from orchestrator.ray_runtime import stop_ray  # Ray is loaded by start_ray already; never in local mode

            stop_ray()
    summary.report = write_report_safely(run)
    if summary.report is None:
        record.save(run)
    weights = f"{summary.checkpoint}/model.safetensors" if summary.checkpoint and not spec.entrypoint else None
    session.finish(
        spec, summary.status, summary, [("", summary.report), ("", run.uri_of(RUN_RECORD)), ("model", weights)]
    )
    return summary


def _fit_and_summarize(
    plan: RunPlan,
    tracking_config: dict[str, Any] | None,
    console: RunConsole,
    embedded: bool,
    worker_events: bool,
    one_node: bool,
) -> tuple[RunSummary, dict[str, Any]]:
    """Ray Train's fit, then what the run's checkpoints say of it; with what rank 0 reported of where it ran."""
    spec, run = plan.spec, plan.run
    run_name = f"{run.name}-{int(plan.t0)}" if not spec.entrypoint else run.name
    status, error, result = fit(
        spec,
        run.uri,
        plan.base_dir,
        run_name,
        tracking_config,
        console,
        embedded,
        worker_events,
        plan.local_mode,
        one_node=one_node,
    )
    if spec.entrypoint:
        # A bring-your-own loop's reports were recorded as its steps, metrics and checkpoints (orchestrator.byo).
        from orchestrator.byo import summary_of_reports

        summary = summary_of_reports(run, RunStatus(status))
    else:
        summary = summary_from_checkpoints(run, RunStatus(status))
    summary.report, summary.error, summary.wall_s = run.uri_of(REPORT), error, round(time.time() - plan.t0, 3)
    return summary, dict(result.metrics or {}) if result is not None else {}


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
