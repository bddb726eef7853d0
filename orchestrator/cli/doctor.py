"""`orchestrator doctor`: whether this machine, or a cluster, can run jobs (orchestrator/doctor.py)."""

from __future__ import annotations

import sys

import click

from orchestrator.cli.common import epilog, friendly_errors, main, overrides_argument, print_json


@main.command(
    epilog=epilog(
        "orchestrator doctor                                        # this machine",
        "orchestrator doctor jobs/digits_mlp.yaml                   # and the job's storage and GPUs",
        "orchestrator doctor jobs/digits_mlp.yaml --address http://HOST:8265    # and the cluster",
        overrides=True,
    )
)
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@overrides_argument
@click.option(
    "--address",
    default=None,
    metavar="URL",
    help="A cluster's dashboard, e.g. http://HOST:8265: check that cluster too, by a probe job its `python` runs "
    "[default: this machine only].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@friendly_errors
def doctor(job_file: str | None, overrides: tuple[str, ...], address: str | None, as_json: bool) -> None:
    """Check this machine (or the cluster at --address): versions, packages, GPUs, the Ray token, a job's storage.

    One line per check: ok, note, or FAIL (a job would fail); exit 1 on any FAIL.
    """
    from orchestrator.doctor import FAIL, as_dicts, diagnose
    from orchestrator.spec import load_spec

    spec = load_spec(job_file, list(overrides)) if job_file else None
    checks = diagnose(spec, address)
    if as_json:
        print_json(as_dicts(checks))
    else:
        for check in checks:
            click.echo(check.line())
    if any(c.status == FAIL for c in checks):
        sys.exit(1)
