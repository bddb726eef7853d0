"""Ray clusters through the Jobs API (orchestrator/cluster.py): submit, status, logs, stop, list."""

from __future__ import annotations

import sys

import click

from orchestrator.cli import console, friendly_errors, job_file_argument, main, overrides_argument, print_json
from orchestrator.errors import RunFailed
from orchestrator.storage import redact

address_option = click.option(
    "--address",
    default=None,
    metavar="URL",
    help="The cluster's dashboard, e.g. http://HOST:8265 [default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS]. "
    "The auth token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
)


@main.command()
@job_file_argument
@overrides_argument
@address_option
@click.option("--wait", is_flag=True, help="Follow the job's output to its end; exit 1 unless it succeeds.")
@click.option("--fresh", is_flag=True, help="Start a new run under a new name instead of resuming this one.")
@click.option(
    "--include",
    "includes",
    multiple=True,
    metavar="PATTERN",
    help="Ship secret-looking files matching this .gitignore-style pattern anyway (.env, *.pem, .aws/, ... are left out by default).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="End with one JSON object on stdout (with --wait: the final status and run summary).",
)
@friendly_errors
def submit(
    job_file: str,
    overrides: tuple[str, ...],
    address: str | None,
    wait: bool,
    fresh: bool,
    includes: tuple[str, ...],
    as_json: bool,
) -> None:
    """Submit a job to a Ray cluster (Jobs API) with the code in its directory; print the job id."""
    from orchestrator.cluster import RayJobsBackend, follow_to_end, format_status, prepare_submission, summary_from_logs

    backend = RayJobsBackend(address)
    submission = prepare_submission(job_file, list(overrides), backend, fresh=fresh, includes=includes)
    for line in submission["warnings"]:
        click.echo(f"warning: {line}", err=True)
    job_id = backend.submit(submission)
    package = submission["package"]
    click.echo(
        f"submitted {job_id} to {redact(backend.address)} ({package['files']} files, {package['bytes'] / 1e6:.2f} MB from {package['dir']})",
        err=True,
    )
    if not wait:
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
    if as_json:
        print_json({**final, "address": redact(backend.address), "summary": summary_from_logs(backend.logs(job_id))})
    else:
        click.echo(format_status(final))
    if final["status"] != "SUCCEEDED":
        reason = (final.get("message") or "").strip().splitlines()
        raise RunFailed(f"{job_id} {final['status']}" + (f": {reason[0]}" if reason else ""))


@main.command()
@click.argument("job_id")
@address_option
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@friendly_errors
def status(job_id: str, address: str | None, as_json: bool) -> None:
    """Show a submitted job: its state, run, times and why it ended."""
    from orchestrator.cluster import RayJobsBackend, format_status

    job = RayJobsBackend(address).status(job_id)
    if as_json:
        print_json(job)
    else:
        click.echo(format_status(job))


@main.command()
@click.argument("job_id")
@address_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@friendly_errors
def logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print what a submitted job's driver printed (all of it, or as it comes with --follow), less its result line."""
    from orchestrator.cluster import RayJobsBackend, ResultFilter, without_results

    backend = RayJobsBackend(address)
    if not follow:
        click.echo(without_results(backend.logs(job_id)), nl=False)
        return
    shown = ResultFilter()
    for chunk in backend.follow(job_id):
        click.echo(shown.feed(chunk), nl=False)
    click.echo(shown.close(), nl=False)


@main.command()
@click.argument("job_id")
@address_option
@click.option("--wait", is_flag=True, help="Return once the job has stopped.")
@friendly_errors
def stop(job_id: str, address: str | None, wait: bool) -> None:
    """Stop a submitted job (its checkpoints stay; submitting it again resumes)."""
    from orchestrator.cluster import RayJobsBackend

    backend = RayJobsBackend(address)
    if not backend.stop(job_id):
        click.echo(f"{job_id} had already ended ({backend.status(job_id)['status']})")
        return
    if wait:
        click.echo(f"{job_id} {backend.wait(job_id, timeout=120)['status']}")
    else:
        click.echo(f"stopping {job_id}")


@main.command("list")
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
