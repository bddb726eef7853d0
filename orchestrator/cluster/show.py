"""How jobs read to a person: a job's status, the jobs of a cluster, a job's output followed to its end."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

from orchestrator.cluster.backend import TERMINAL, RayJobsBackend
from orchestrator.errors import BadInput, RunFailed

# A submitted command's result for the program that follows it (`--result-line`): one line, which the logs a person
# reads leave out, as they leave out a result printed as a bare JSON line (`--json`, older submissions).
RESULT_MARKER = "@orchestrator-result "


def result_line(result: dict[str, Any]) -> str:
    """The line that carries a command's result (a run summary, a sweep's or a cross-validation's result) in its logs."""
    return RESULT_MARKER + json.dumps(result, default=str)


def _result_of(line: str) -> dict[str, Any] | None:
    """The result a log line carries (a marker line, or a bare JSON line of a run, sweep or cv result), or None."""
    line = line.strip()
    if line.startswith(RESULT_MARKER.strip()):
        line = line[len(RESULT_MARKER.strip()) :].strip()
    elif not (line.startswith("{") and line.endswith("}")):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if isinstance(obj, dict) and (("run" in obj and "status" in obj) or "sweep" in obj or "cv" in obj):
        return obj
    return None


def last_result(logs: str, key: str) -> dict[str, Any] | None:
    """The last result in a job's logs that has `key` (run, sweep, cv)."""
    for line in reversed(logs.splitlines()):
        obj = _result_of(line)
        if obj is not None and key in obj:
            return obj
    return None


def without_results(text: str) -> str:
    """A job's logs as a person reads them: the result lines (kilobytes of JSON) left out."""
    return "".join(line for line in text.splitlines(keepends=True) if _result_of(line) is None)


class ResultFilter:
    """`without_results` for logs that arrive in chunks: a line that may be a result is held until it is whole."""

    def __init__(self) -> None:
        self.pending = ""

    def feed(self, chunk: str) -> str:
        *whole, self.pending = (self.pending + chunk).split("\n")
        shown = without_results("".join(line + "\n" for line in whole))
        start = self.pending.lstrip()
        if not (start.startswith(("{", RESULT_MARKER)) or RESULT_MARKER.startswith(start)):
            shown, self.pending = shown + self.pending, ""  # a partial line that cannot be a result: shown at once
        return shown

    def close(self) -> str:
        rest, self.pending = self.pending, ""
        return without_results(rest)


def follow_to_end(backend: RayJobsBackend, job_id: str, out=None) -> dict[str, Any]:
    """Stream a job's output to `out` (its result lines left out) until it ends; return its final status (polling if the
    stream drops)."""
    out = out or sys.stdout
    shown = ResultFilter()
    try:
        for chunk in backend.follow(job_id):
            out.write(shown.feed(chunk))
            out.flush()
    except (BadInput, RunFailed):
        raise
    except Exception as exc:  # the log stream is a convenience: fall back to polling the status
        print(f"log stream ended ({type(exc).__name__}); waiting for the job to finish", file=sys.stderr)
    out.write(shown.close())
    out.flush()
    return backend.wait(job_id)


def summary_from_logs(logs: str) -> dict[str, Any] | None:
    """The run summary the entrypoint printed (`orchestrator run --json`): the last result line of the logs."""
    obj = last_result(logs, "run")
    return obj if obj is not None and "status" in obj else None


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _duration(job: dict[str, Any]) -> str:
    start = job.get("start_time")
    if not start:
        return "-"
    seconds = int((job.get("end_time") or time.time()) - start)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def failure_reason(job: dict[str, Any], logs: str | None = None) -> str | None:
    """Why a job failed when it is not the run's own doing: the cluster's Python lacks a package (the line the
    entrypoint printed, orchestrator.environment); None when the logs do not say so."""
    from orchestrator.environment import find_missing_package

    return find_missing_package("\n".join([job.get("message") or "", logs or ""]))


def format_status(job: dict[str, Any], reason: str | None = None) -> str:
    """A job as a person reads it: what, how it stands, since when, why it ended (`reason`, when known), what to do next."""
    lines = [
        f"{job['submission_id']}  {job['status']}  ({'ran' if job.get('end_time') else 'running for'} {_duration(job)})"
    ]
    if job.get("run"):
        lines.append(f"  run:      {job['run']}" + (f" in {job['storage']}" if job.get("storage") else ""))
    lines.append(
        f"  started:  {_when(job.get('start_time'))}"
        + (f"   ended: {_when(job['end_time'])}" if job.get("end_time") else "")
    )
    if job.get("message"):
        message = job["message"].strip().splitlines()
        lines.append(f"  message:  {message[0]}" + (" ..." if len(message) > 1 else ""))
    if reason:
        lines.append(f"  why:      {reason}")
    lines.append(f"  command:  {job.get('entrypoint')}")
    if job["status"] == "FAILED" and reason:
        lines.append(
            "  next:     install what is missing in the cluster's Python (`orchestrator doctor --address URL` checks it); "
            "until then a resubmission fails the same way"
        )
    elif job["status"] == "FAILED" and job.get("run"):
        lines.append(
            f"  next:     `orchestrator logs {job['submission_id']}` shows why; submitting the job again resumes run {job['run']} from its last checkpoint"
        )
    elif job["status"] not in TERMINAL:
        lines.append(
            f"  next:     `orchestrator logs {job['submission_id']} --follow`, or `orchestrator stop {job['submission_id']}`"
        )
    return "\n".join(lines)


def format_jobs(jobs: list[dict[str, Any]]):
    """The jobs of a cluster as a rich table, newest first."""
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("id", no_wrap=True)
    for name in ("status", "run", "started", "duration"):
        table.add_column(name, no_wrap=True)
    table.add_column("message", overflow="ellipsis")
    for j in jobs:
        message = (j.get("message") or "").strip().splitlines()
        # Text, not markup: ids, run names and messages are shown as written, `[red]` and all.
        cells = (
            j["submission_id"],
            j["status"],
            j.get("run") or "-",
            _when(j.get("start_time")),
            _duration(j),
            (message[0][:60] if message else ""),
        )
        table.add_row(*(Text(str(c)) for c in cells))
    return table
