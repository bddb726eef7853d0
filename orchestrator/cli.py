"""The command line: parse, call the library, print. Heavy modules (torch, ray) are imported lazily."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from orchestrator.errors import BadInput, RunFailed

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def print_json(obj: Any) -> None:
    """The machine-readable result: one JSON object on the last line of stdout."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def friendly_errors(fn: Callable) -> Callable:
    """Turn BadInput into one line per problem on stderr and exit 2; RunFailed into exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BadInput as exc:
            for line in exc.lines:
                click.echo(f"error: {line}", err=True)
            sys.exit(exc.exit_code)
        except RunFailed as exc:
            click.echo(f"failed: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


job_file_argument = click.argument("job_file", type=click.Path(dir_okay=False))
overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="orchestrator")
def main() -> None:
    """Train PyTorch models from one job file: locally, on a Ray cluster, or on Kubernetes."""


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
        click.echo(f"{job_file}: valid ({spec.name}: {spec.model.name} on {spec.data.name}, {spec.optim.name} lr={spec.optim.lr:g})")


@main.command()
@job_file_argument
@overrides_argument
@click.option("--address", envvar="ORCHESTRATOR_RAY_ADDRESS", default=None, help="Attach to this Ray cluster instead of starting an embedded one.")
@click.option("--fresh", is_flag=True, help="Start a new run under a new name instead of resuming this one.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON summary on the last line of stdout.")
@friendly_errors
def run(job_file: str, overrides: tuple[str, ...], address: str | None, fresh: bool, as_json: bool) -> None:
    """Train a job on this machine (embedded Ray) or on the cluster at --address."""
    from orchestrator.launch import run_job
    from orchestrator.spec import load_spec

    spec = load_spec(job_file, list(overrides))
    summary = run_job(spec, job_file=job_file, address=address, fresh=fresh, quiet=as_json)
    if as_json:
        print_json(summary)
    if summary.get("status") == "failed":
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
    from rich.console import Console
    from rich.table import Table

    table = Table("step", "epoch", "metrics", "size", "uri")
    for c in found:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in c.metrics.items() if isinstance(v, (int, float)))
        table.add_row(str(c.step), str(c.epoch), shown, f"{c.size / 1e6:.2f} MB", c.uri)
    Console().print(table)


@main.command()
@click.argument("checkpoint_uri")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the weights (safetensors).")
@friendly_errors
def export(checkpoint_uri: str, out: str) -> None:
    """Copy a checkpoint's weights out as one safetensors file."""
    from orchestrator.checkpoint import export_weights

    size = export_weights(checkpoint_uri, out)
    click.echo(f"wrote {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
