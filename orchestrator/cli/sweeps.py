"""Hyper-parameter sweeps with Ray Tune (orchestrator/sweep/) and k-fold cross-validation: sweep, cv."""

from __future__ import annotations

import sys

import click

from orchestrator.cli import console, friendly_errors, job_file_argument, main, overrides_argument, print_json
from orchestrator.errors import BadInput

# How a sweep or cv submitted to a cluster hands its result back: its human output, then one result line (hidden option:
# the submission's entrypoint passes it; `orchestrator logs` leaves the line out).
result_line_option = click.option("--result-line", "result_line", is_flag=True, hidden=True)


def print_result_line(result: dict) -> None:
    from orchestrator.cluster.show import result_line

    click.echo(result_line(result))


@main.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@overrides_argument
@click.option(
    "--address",
    envvar="ORCHESTRATOR_RAY_ADDRESS",
    default=None,
    help="A cluster's dashboard (http://HOST:8265): submit the sweep there through the Jobs API and follow it; "
    "or Ray itself (auto, HOST:PORT): run the trials there from this process.",
)
@click.option("--fresh", is_flag=True, help="Start a new sweep under a new name instead of continuing this one.")
@click.option(
    "--best-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the best trial's job file [default: <sweep>/best.yaml on storage].",
)
@click.option("--verbose", is_flag=True, help="Show every trial's training progress, not only the live view.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="End with one JSON object (trials, best, best_job_file) on the last line of stdout.",
)
@result_line_option
@friendly_errors
def sweep(
    sweep_file: str,
    overrides: tuple[str, ...],
    address: str | None,
    fresh: bool,
    best_out: str | None,
    verbose: bool,
    as_json: bool,
    result_line: bool,
) -> None:
    """Sweep hyper-parameters of a job with Ray Tune (its `sweep` section); rerun to continue an interrupted sweep."""
    from orchestrator.runrecord import RunStatus
    from orchestrator.sweep import format_result, is_dashboard_address, load_sweep, run_sweep, submit_sweep

    job = load_sweep(sweep_file, list(overrides), fresh=fresh)
    if is_dashboard_address(address):
        if best_out or verbose:
            raise BadInput(
                "--best-out and --verbose apply to a sweep run from here; a submitted sweep writes <sweep>/best.yaml on its storage"
            )
        # A fresh name is decided here, once: the cluster must not pick another one.
        pinned = list(overrides) + ([f"sweep.name={job.name}"] if fresh else [])
        result = submit_sweep(job, pinned, address, out=sys.stderr if as_json else sys.stdout)
    else:
        result = run_sweep(job, address=address, best_out=best_out, quiet=as_json, verbose=verbose)
    if as_json:
        print_json(result)
    elif not is_dashboard_address(address):  # a submitted sweep's table came with its logs
        table, text = format_result(result)
        console().print(table)
        click.echo(text)
    if result_line:
        print_result_line(result)
    if result.get("status") != RunStatus.FINISHED:
        sys.exit(1)


@main.command()
@job_file_argument
@overrides_argument
@click.option(
    "--address",
    envvar="ORCHESTRATOR_RAY_ADDRESS",
    default=None,
    help="A cluster's dashboard (http://HOST:8265): submit the cross-validation there through the Jobs API and follow it; "
    "or Ray itself (auto, HOST:PORT): run the folds there from this process [default: a Ray already up on this machine, else a new embedded one].",
)
@click.option(
    "--fresh", is_flag=True, help="Start a new cross-validation under a new name instead of continuing this one."
)
@click.option(
    "--refit",
    is_flag=True,
    help="Then train once on all non-test data for the folds' mean best epoch count, test it, and name that checkpoint.",
)
@click.option("--verbose", is_flag=True, help="Show every fold's training progress, not only the live view.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="End with one JSON object (cv.json: folds, metrics) on the last line of stdout.",
)
@result_line_option
@friendly_errors
def cv(
    job_file: str,
    overrides: tuple[str, ...],
    address: str | None,
    fresh: bool,
    refit: bool,
    verbose: bool,
    as_json: bool,
    result_line: bool,
) -> None:
    """K-fold cross-validation of a job (data.folds folds, in parallel): each fold's best, mean, std, 95% CI; rerun to continue."""
    from orchestrator.cv import format_cv, load_cv, run_cv
    from orchestrator.runrecord import RunStatus
    from orchestrator.sweep import is_dashboard_address

    if is_dashboard_address(address):
        from orchestrator.cv import submit_cv

        if verbose:
            raise BadInput(
                "--verbose applies to a cross-validation run from here; `orchestrator logs` shows a submitted one's"
            )
        result = submit_cv(
            job_file, list(overrides), address, fresh=fresh, refit=refit, out=sys.stderr if as_json else sys.stdout
        )
    else:
        job = load_cv(job_file, list(overrides), fresh=fresh)
        result = run_cv(job, address=address, quiet=as_json, verbose=verbose, refit=refit)
    if as_json:
        print_json(result)
    elif not is_dashboard_address(address):  # a submitted cross-validation's table came with its logs
        table, text = format_cv(result)
        console().print(table)
        click.echo(text)
    if result_line:
        print_result_line(result)
    refit_status = (result.get("refit") or {}).get("status", RunStatus.FINISHED)
    if result.get("status") != RunStatus.FINISHED or refit_status != RunStatus.FINISHED:
        sys.exit(1)
