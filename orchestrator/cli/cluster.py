"""Ray clusters through the Jobs API (orchestrator/cluster/): submit, status, logs, stop, list."""

from __future__ import annotations

import sys
from typing import Any

import click

from orchestrator.cli.common import (
    console,
    epilog,
    friendly_errors,
    job_file_argument,
    main,
    overrides_argument,
    print_json,
    retired_option,
)
from orchestrator.errors import RunFailed
from orchestrator.storage import redact

address_option = click.option(
    "--address",
    default=None,
    metavar="URL",
    help="The cluster's dashboard, e.g. http://HOST:8265 [default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS]. "
    "The auth token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
)
JOB_ARGUMENT_HELP = "JOB is a job id (as `submit` printed it) or a run name: then the newest job of that run."


def submit_and_follow(
    job_file: str,
    overrides: tuple[str, ...],
    address: str | None,
    *,
    fresh: bool = False,
    as_json: bool = False,
    follow: bool = True,
    includes: tuple[str, ...] = (),
    job_id: str | None = None,
    summary_only: bool = False,
) -> None:
    """Submit a job (checked first: nothing is sent for bad input); with `follow`, print its output to its end and
    exit 1 unless it succeeded. `summary_only`: the JSON line is the run's own summary, as `run --json` prints it."""
    from orchestrator.cluster import (
        RayJobsBackend,
        failure_reason,
        follow_to_end,
        format_status,
        prepare_submission,
        summary_from_logs,
    )

    backend = RayJobsBackend(address)
    submission = prepare_submission(
        job_file, list(overrides), backend, fresh=fresh, includes=includes, submission_id=job_id
    )
    for line in submission["warnings"]:
        click.echo(f"warning: {line}", err=True)
    job_id = backend.submit(submission)
    package = submission["package"]
    click.echo(
        f"submitted {job_id} to {redact(backend.address)} ({package['files']} files, {package['bytes'] / 1e6:.2f} MB from {package['dir']})",
        err=True,
    )
    if not follow:
        if as_json:
            print_json(
                {
                    "submission_id": job_id,
                    "address": redact(backend.address),
                    "run": submission["metadata"]["orchestrator_run"],
                }
            )
        else:
            click.echo(job_id)
            click.echo(f"follow it: orchestrator logs {job_id} --follow --address {redact(backend.address)}", err=True)
        return
    final = follow_to_end(backend, job_id, out=sys.stderr if as_json else sys.stdout)
    logs = backend.logs(job_id)
    reason = failure_reason(final, logs) if final["status"] != "SUCCEEDED" else None
    summary = summary_from_logs(logs)
    if as_json:
        print_json(
            summary if summary_only and summary else {**final, "address": redact(backend.address), "summary": summary}
        )
    else:
        click.echo(format_status(final, reason))
    if final["status"] != "SUCCEEDED":
        why = reason or (summary or {}).get("error") or f"`orchestrator logs {job_id}` shows why"
        raise RunFailed(f"{job_id} {final['status']}: {why}")


@main.command(
    epilog=epilog(
        "orchestrator submit jobs/digits_mlp.yaml --address http://HOST:8265",
        "orchestrator submit jobs/digits_mlp.yaml train.epochs=5 --job-id digits-5ep --follow",
        overrides=True,
    )
)
@job_file_argument
@overrides_argument
@address_option
@click.option(
    "--follow", is_flag=True, help="Print the job's output as it comes, to its end; exit 1 unless it succeeds."
)
@retired_option("--wait", lambda _: "renamed --follow (print the job's output to its end)", True)
@click.option(
    "--job-id",
    default=None,
    metavar="ID",
    help="The job's id on the cluster [default: the run name and a random suffix, e.g. digits-mlp-0c2317].",
)
@click.option("--fresh", is_flag=True, help="Start a new run under a new name instead of resuming this one.")
@click.option(
    "--include",
    "includes",
    multiple=True,
    metavar="PATTERN",
    help="Ship secret-looking files matching this .gitignore-style pattern anyway [default: .env, *.pem, .aws/, ... "
    "are left out].",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="End with one JSON object on stdout (with --follow: the final status and run summary).",
)
@friendly_errors
def submit(
    job_file: str,
    overrides: tuple[str, ...],
    address: str | None,
    follow: bool,
    job_id: str | None,
    fresh: bool,
    includes: tuple[str, ...],
    as_json: bool,
) -> None:
    """Submit a job to a Ray cluster (Jobs API) with the code in its directory; print the job id."""
    submit_and_follow(
        job_file, overrides, address, fresh=fresh, as_json=as_json, follow=follow, includes=includes, job_id=job_id
    )


def _found(backend: Any, job_or_run: str) -> dict[str, Any]:
    """The job a user named by id or run name; when found by run name, say which job that is (on stderr)."""
    job = backend.find(job_or_run)
    if job["submission_id"] != job_or_run:
        click.echo(f"{job_or_run}: the run's newest job is {job['submission_id']}", err=True)
    return job


@main.command(
    epilog=epilog("orchestrator status digits-mlp-0c2317", "orchestrator status digits-mlp --json")
    + f"\n\n{JOB_ARGUMENT_HELP}"
)
@click.argument("job")
@address_option
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@friendly_errors
def status(job: str, address: str | None, as_json: bool) -> None:
    """Show a submitted job: its state, run, times, why it ended and what to do next."""
    from orchestrator.cluster import RayJobsBackend, failure_reason, format_status

    backend = RayJobsBackend(address)
    found = _found(backend, job)
    if as_json:
        print_json(found)
        return
    reason = failure_reason(found, backend.logs(found["submission_id"])) if found["status"] == "FAILED" else None
    click.echo(format_status(found, reason))


@main.command(
    epilog=epilog("orchestrator logs digits-mlp-0c2317", "orchestrator logs digits-mlp --follow")
    + f"\n\n{JOB_ARGUMENT_HELP}"
)
@click.argument("job")
@address_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing as the job prints, until it ends.")
@friendly_errors
def logs(job: str, address: str | None, follow: bool) -> None:
    """Print what a submitted job's driver printed (all of it, or as it comes with --follow), less its result line."""
    from orchestrator.cluster import RayJobsBackend, ResultFilter, without_results

    backend = RayJobsBackend(address)
    job_id = _found(backend, job)["submission_id"]
    if not follow:
        click.echo(without_results(backend.logs(job_id)), nl=False)
        return
    shown = ResultFilter()
    for chunk in backend.follow(job_id):
        click.echo(shown.feed(chunk), nl=False)
    click.echo(shown.close(), nl=False)


@main.command(
    epilog=epilog("orchestrator stop digits-mlp-0c2317", "orchestrator stop digits-mlp --wait")
    + f"\n\n{JOB_ARGUMENT_HELP}"
)
@click.argument("job")
@address_option
@click.option("--wait", is_flag=True, help="Return once the job has stopped [default: return at once].")
@friendly_errors
def stop(job: str, address: str | None, wait: bool) -> None:
    """Stop a submitted job (its checkpoints stay; submitting it again resumes)."""
    from orchestrator.cluster import RayJobsBackend

    backend = RayJobsBackend(address)
    job_id = _found(backend, job)["submission_id"]
    if not backend.stop(job_id):
        click.echo(f"{job_id} had already ended ({backend.status(job_id)['status']})")
        return
    if wait:
        click.echo(f"{job_id} {backend.wait(job_id, timeout=120)['status']}")
    else:
        click.echo(f"stopping {job_id}")


@main.command("list", epilog=epilog("orchestrator list --address http://HOST:8265", "orchestrator list --json"))
@address_option
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
@friendly_errors
def list_jobs(address: str | None, as_json: bool) -> None:
    """List the jobs submitted to a cluster, newest first."""
    from orchestrator.cluster import RayJobsBackend, format_jobs

    jobs = RayJobsBackend(address).list()
    if as_json:
        print_json(jobs)
        return
    if not jobs:
        click.echo("no submitted jobs")
        return
    console().print(format_jobs(jobs))
