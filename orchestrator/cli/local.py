"""Commands on this machine: validate, run, checkpoints, export."""

from __future__ import annotations

import os
import sys

import click

from orchestrator.cli import (
    console,
    friendly_errors,
    job_file_argument,
    main,
    overrides_argument,
    plain_cells,
    print_json,
)
from orchestrator.errors import BadInput


@main.command()
@job_file_argument
@overrides_argument
@click.option("--json", "as_json", is_flag=True, help="Print the resolved job as JSON.")
@friendly_errors
def validate(job_file: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check a job file (with overrides); exit 2 with one line per problem."""
    from orchestrator.spec import load_spec

    spec = load_spec(job_file, list(overrides))
    if as_json:
        print_json(spec.to_dict())
    else:
        click.echo(
            f"{job_file}: valid ({spec.name}: {spec.model.name} on {spec.data.name}, {spec.optim.name} lr={spec.optim.lr:g})"
        )


@main.command()
@job_file_argument
@overrides_argument
@click.option(
    "--address",
    envvar="ORCHESTRATOR_RAY_ADDRESS",
    default=None,
    help="Ray to run on: HOST:PORT or auto [default: a Ray already up on this machine, else a new embedded one; local: always a new one].",
)
@click.option("--fresh", is_flag=True, help="Start a new run under a new name instead of resuming this one.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON summary on the last line of stdout.")
@click.option(
    "--verbose", is_flag=True, help="Show Ray's and the workers' own output too (it is always in <run>/run.log)."
)
@click.option(
    "--wait", is_flag=True, help="If another run is using the run directory, wait for it to end instead of refusing."
)
@friendly_errors
def run(
    job_file: str,
    overrides: tuple[str, ...],
    address: str | None,
    fresh: bool,
    as_json: bool,
    verbose: bool,
    wait: bool,
) -> None:
    """Train a job on this machine (embedded Ray) or on the cluster at --address."""
    from orchestrator.console import RunConsole, prepare_ray_output
    from orchestrator.launch import run_job
    from orchestrator.runrecord import RunStatus
    from orchestrator.spec import load_spec

    spec = load_spec(job_file, list(overrides))
    prepare_ray_output()
    stream = sys.stderr if as_json else sys.stdout
    console = RunConsole(
        stream, live=stream.isatty() and os.environ.get("TERM") != "dumb" and not as_json, verbose=verbose
    )
    summary = run_job(
        spec, job_file=job_file, address=address, fresh=fresh, quiet=as_json, console=console, capture=True, wait=wait
    )
    if as_json:
        print_json(summary.to_dict())
    if summary.status == RunStatus.FAILED:
        sys.exit(1)


@main.command()
@click.argument("run_uri")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@friendly_errors
def checkpoints(run_uri: str, as_json: bool) -> None:
    """List the committed checkpoints of a run (step, metrics, size, URI)."""
    from orchestrator.checkpoint import list_checkpoints
    from orchestrator.storage import open_storage

    fs, root = open_storage(run_uri)
    found = list_checkpoints(fs, root, uri_prefix=run_uri)
    if as_json:
        print_json([c.to_dict() for c in found])
        return
    if not found:
        raise BadInput(f"{run_uri}: no committed checkpoint here")
    from rich.table import Table

    table = Table("step", "epoch", "metrics", "size", "uri")
    for c in found:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in c.metrics.items() if isinstance(v, (int, float)))
        table.add_row(*plain_cells(c.step, c.epoch, shown, f"{c.size / 1e6:.2f} MB", c.uri))
    console().print(table)


@main.command()
@click.argument("uri")
@click.option(
    "--out", required=True, metavar="FILE", help="The local file to write (safetensors); never one inside a run."
)
@click.option(
    "--checkpoint",
    "choice",
    default=None,
    metavar="best|latest|STEP",
    help="Which checkpoint of the run at URI [default: best, the one the run's summary names and its test split "
    "was evaluated on].",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists [default: refuse].")
@click.option("--json", "as_json", is_flag=True, help="Print what was written (file, step, header) as JSON.")
@friendly_errors
def export(uri: str, out: str, choice: str | None, force: bool, as_json: bool) -> None:
    """Write the weights of a run's best checkpoint (or another, or the checkpoint at URI) to one safetensors file."""
    from orchestrator.export import export_checkpoint, parse_choice

    done = export_checkpoint(uri, out, parse_choice(choice), force=force)
    if as_json:
        print_json(done)
        return
    best = done["best"]
    why = done["chosen"]
    if best and best.get("metric") and isinstance(best.get("value"), (int, float)):
        why += f", {best['metric']} {best['value']:.4g}"
    click.echo(
        f"wrote {done['out']}: step {done['step']} ({why}) of {done['checkpoint']}, {done['bytes'] / 1e6:.2f} MB"
    )
