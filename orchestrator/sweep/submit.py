"""A sweep on a Ray cluster: submitted through the Jobs API like any job, running `orchestrator sweep` there."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from orchestrator.cluster import METADATA_RUN, RayJobsBackend, build_submission, follow_to_end, last_result
from orchestrator.errors import BadInput, RunFailed
from orchestrator.sweep.load import SweepJob


def build_sweep_submission(
    sweep: SweepJob, overrides: list[str] | tuple[str, ...] = (), command: str = "sweep", flags: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The Jobs API request of a sweep: the job's package and runtime env, with `orchestrator sweep` as its entrypoint (pure).

    A cross-validation (a sweep too) runs `orchestrator cv` there instead: `command` cv, `flags` such as --refit.
    """
    sweep_path = Path(sweep.job_file).resolve()
    if Path(sweep.base_dir).resolve() != sweep_path.parent:
        raise BadInput(
            f"{sweep.job_file}: job: the named job file must sit beside the sweep file to be shipped with it"
        )
    submission = build_submission(sweep.spec, sweep_path, overrides)
    words = [
        "python",
        "-m",
        "orchestrator",
        command,
        sweep_path.name,
        *overrides,
        *flags,
        "--ray-address",
        "auto",
        # Its table in the logs for a person, its result on one line for this process (which `logs` leaves out).
        "--result-line",
    ]
    submission["entrypoint"] = " ".join(shlex.quote(w) for w in words)
    submission["metadata"][METADATA_RUN] = sweep.name
    return submission


def submit_sweep(
    sweep: SweepJob, overrides: list[str], address: str, out=None, command: str = "sweep", flags: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Submit the sweep to the cluster, stream its output (the live view, the table) to `out`, return its result; RunFailed
    if the job fails.

    The result is the last result line the entrypoint printed with a `sweep` key (a cross-validation's: `cv`).
    """
    backend = RayJobsBackend(address)
    submission = build_sweep_submission(sweep, overrides, command, flags)
    backend.check()
    job_id = backend.submit(submission)
    print(f"submitted {job_id} to {backend.address}", file=sys.stderr, flush=True)
    final = follow_to_end(backend, job_id, out=out or sys.stderr)
    result = last_result(backend.logs(job_id), command)
    if final["status"] != "SUCCEEDED" or result is None:
        raise RunFailed(f"{job_id} {final['status']}" + (f": {final.get('message')}" if final.get("message") else ""))
    return {**result, "submission_id": job_id, "address": backend.address}
