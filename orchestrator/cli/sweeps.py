"""Hyper-parameter sweeps with Ray Tune (orchestrator/sweep/) and k-fold cross-validation: sweep, cv."""

from __future__ import annotations

import sys

import click

from orchestrator.cli.common import (
    console,
    dashboard_address_option,
    epilog,
    friendly_errors,
    job_file_argument,
    main,
    overrides_argument,
    print_json,
    ray_address_option,
)
from orchestrator.errors import BadInput

# How a sweep or cv submitted to a cluster hands its result back: its human output, then one result line (hidden option:
# the submission's entrypoint passes it; `orchestrator logs` leaves the line out).
result_line_option = click.option("--result-line", "result_line", is_flag=True, hidden=True)


def print_result_line(result: dict) -> None:
    from orchestrator.cluster.show import result_line

    click.echo(result_line(result))


@main.command(
    epilog=epilog(
        "orchestrator sweep jobs/sweep_digits_asha.yaml",
        "orchestrator sweep jobs/sweep_digits_lr.yaml sweep.num_samples=4 --json",
        "orchestrator sweep jobs/sweep_digits_asha.yaml --address http://HOST:8265     # on a cluster, followed here",
        overrides=True,
    )
)
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@overrides_argument
@dashboard_address_option("the sweep")
@ray_address_option
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
    ray_address: str | None,
    fresh: bool,
    best_out: str | None,
    verbose: bool,
    as_json: bool,
    result_line: bool,
) -> None:
    """Sweep hyper-parameters of a job with Ray Tune (its `sweep` section); rerun to continue an interrupted sweep."""
    from orchestrator.runrecord import RunStatus
    from orchestrator.sweep import format_result, load_sweep, run_sweep, submit_sweep

    job = load_sweep(sweep_file, list(overrides), fresh=fresh)
    if address is not None:
        if best_out or verbose or ray_address:
            raise BadInput(
                "--best-out, --verbose and --ray-address apply to a sweep run from here; a submitted sweep writes "
                "<sweep>/best.yaml on its storage"
            )
        # A fresh name is decided here, once: the cluster must not pick another one.
        pinned = list(overrides) + ([f"sweep.name={job.name}"] if fresh else [])
        result = submit_sweep(job, pinned, address, out=sys.stderr if as_json else sys.stdout)
    else:
        from orchestrator.environment import require_packages

        require_packages()
        result = run_sweep(job, address=ray_address, best_out=best_out, quiet=as_json, verbose=verbose)
    if as_json:
        print_json(result)
    elif address is None:  # a submitted sweep's table came with its logs
        table, text = format_result(result)
        console().print(table)
        click.echo(text)
    if result_line:
        print_result_line(result)
    if result.get("status") != RunStatus.FINISHED:
        sys.exit(1)


@main.command(
    epilog=epilog(
        "orchestrator cv jobs/cv_digits.yaml",
        "orchestrator cv jobs/digits_mlp.yaml data.folds=5 --refit",
        "orchestrator cv jobs/cv_digits.yaml --address http://HOST:8265     # on a cluster, followed here",
        overrides=True,
    )
)
@job_file_argument
@overrides_argument
@dashboard_address_option("the cross-validation")
@ray_address_option
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
    ray_address: str | None,
    fresh: bool,
    refit: bool,
    verbose: bool,
    as_json: bool,
    result_line: bool,
) -> None:
    """K-fold cross-validation of a job (data.folds folds, in parallel): each fold's best, mean, std, 95% CI; rerun to continue."""
    from orchestrator.cv import format_cv, load_cv, run_cv
    from orchestrator.runrecord import RunStatus

    if address is not None:
        from orchestrator.cv import submit_cv

        if verbose or ray_address:
            raise BadInput(
                "--verbose and --ray-address apply to a cross-validation run from here; `orchestrator logs` shows a "
                "submitted one's"
            )
        result = submit_cv(
            job_file, list(overrides), address, fresh=fresh, refit=refit, out=sys.stderr if as_json else sys.stdout
        )
    else:
        from orchestrator.environment import require_packages

        require_packages()
        job = load_cv(job_file, list(overrides), fresh=fresh)
        result = run_cv(job, address=ray_address, quiet=as_json, verbose=verbose, refit=refit)
    if as_json:
        print_json(result)
    elif address is None:  # a submitted cross-validation's table came with its logs
        table, text = format_cv(result)
        console().print(table)
        click.echo(text)
    if result_line:
        print_result_line(result)
    refit_status = (result.get("refit") or {}).get("status", RunStatus.FINISHED)
    if result.get("status") != RunStatus.FINISHED or refit_status != RunStatus.FINISHED:
        sys.exit(1)
