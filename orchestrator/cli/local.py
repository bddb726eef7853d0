"""Commands on this machine: validate, run, checkpoints, export."""

from __future__ import annotations

import os
import sys

import click

from orchestrator.cli.common import (
    console,
    dashboard_address_option,
    endpoint_option,
    epilog,
    friendly_errors,
    job_file_argument,
    main,
    overrides_argument,
    plain_cells,
    print_json,
    ray_address_option,
    retired_option,
)
from orchestrator.errors import BadInput


def describe_job(spec) -> str:
    """A job in a few words: the built-in model and data it trains, or the user's loop it runs."""
    if spec.entrypoint:
        workers = spec.scaling.num_workers
        return f"{spec.name}: your loop {spec.entrypoint} on {workers} worker{'s' if workers != 1 else ''}"
    return f"{spec.name}: {spec.model.name} on {spec.data.name}, {spec.optim.name} lr={spec.optim.lr:g}"


def _is_sweep_file(job_file: str) -> bool:
    """Whether a file is a sweep's: it names a job (`job: x.yaml`) or has a `sweep` section. A file that cannot be
    read is not decided here: loading it says what is wrong."""
    from orchestrator.spec import SpecError, read_job_file

    try:
        raw = read_job_file(job_file)
    except (SpecError, BadInput, OSError):
        return False
    return isinstance(raw, dict) and ("job" in raw or bool(raw.get("sweep")))


@main.command(
    epilog=epilog(
        "orchestrator validate jobs/digits_mlp.yaml",
        "orchestrator validate jobs/digits_mlp.yaml optim.lr=0.1 train.epochs=5 --json",
        "orchestrator validate jobs/sweep_digits_asha.yaml        # a sweep file: its job and its search",
        overrides=True,
    )
)
@job_file_argument
@overrides_argument
@click.option("--json", "as_json", is_flag=True, help="Print the resolved job as JSON.")
@friendly_errors
def validate(job_file: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check a job file or a sweep file (with overrides) without running it; exit 2 with one line per problem."""
    from orchestrator.spec import load_spec

    if _is_sweep_file(job_file):
        from orchestrator.sweep import load_sweep

        sweep = load_sweep(job_file, list(overrides))
        if as_json:
            print_json(sweep.spec.to_dict())
            return
        searched = ", ".join(sweep.sweep.parameters)
        click.echo(
            f"{job_file}: valid ({describe_job(sweep.spec)}; sweep {sweep.name}: {sweep.sweep.num_samples} trials "
            f"over {searched}, {sweep.sweep.scheduler.name})"
        )
        return
    spec = load_spec(job_file, list(overrides))
    if as_json:
        print_json(spec.to_dict())
    else:
        click.echo(f"{job_file}: valid ({describe_job(spec)})")


@main.command(
    epilog=epilog(
        "orchestrator run jobs/digits_mlp.yaml",
        "orchestrator run jobs/digits_mlp.yaml optim.lr=3e-4 train.epochs=5 --json",
        "orchestrator run jobs/digits_mlp.yaml --ray-address 10.0.0.5:6379      # on a Ray cluster, from here",
        "orchestrator run jobs/digits_mlp.yaml --address http://HOST:8265       # submitted there, followed here",
        overrides=True,
    )
)
@job_file_argument
@overrides_argument
@ray_address_option
@dashboard_address_option("the run")
@click.option("--fresh", is_flag=True, help="Start a new run under a new name instead of resuming this one.")
@click.option(
    "--extend",
    is_flag=True,
    help="Train a run on for a longer horizon (more train.epochs or train.max_steps), from its last checkpoint.",
)
@click.option("--json", "as_json", is_flag=True, help="End with one JSON summary on the last line of stdout.")
@click.option(
    "--verbose", is_flag=True, help="Show Ray's and the workers' own output too (it is always in <run>/run.log)."
)
@click.option(
    "--wait-for-lease",
    "wait_for_lease",
    is_flag=True,
    help="When another run is using the run directory, wait until it has ended, then train [default: refuse at once].",
)
@retired_option("--wait", lambda _: "renamed --wait-for-lease (wait until another run of the job has ended)", True)
@friendly_errors
def run(
    job_file: str,
    overrides: tuple[str, ...],
    ray_address: str | None,
    address: str | None,
    fresh: bool,
    extend: bool,
    as_json: bool,
    verbose: bool,
    wait_for_lease: bool,
) -> None:
    """Train a job: in this process (an embedded Ray, or the Ray at --ray-address), or submitted to --address.

    A rerun of the same job resumes it (or says it is done); one with settings that change the result is refused.
    Exit codes: 0 finished, 1 failed, 2 bad input, 130 Ctrl-C and 143 SIGTERM (recorded as interrupted).
    """
    if address is not None:
        from orchestrator.cli.cluster import submit_and_follow

        if ray_address or verbose or wait_for_lease:
            raise BadInput(
                "--ray-address, --verbose and --wait-for-lease apply to a run from this process, not to one at --address"
            )
        if extend:
            raise BadInput("--extend applies to a run from this process, not to one at --address")
        submit_and_follow(job_file, overrides, address, fresh=fresh, as_json=as_json, summary_only=True)
        return
    from orchestrator.environment import require_packages

    require_packages()
    from orchestrator.console import RunConsole
    from orchestrator.launch import run_job
    from orchestrator.session import exit_code_of
    from orchestrator.spec import load_spec

    if fresh and extend:
        raise BadInput("--extend continues this run; --fresh starts a new one: use one of them")

    spec = load_spec(job_file, list(overrides))
    stream = sys.stderr if as_json else sys.stdout
    console = RunConsole(
        stream, live=stream.isatty() and os.environ.get("TERM") != "dumb" and not as_json, verbose=verbose
    )
    summary = run_job(
        spec,
        job_file=job_file,
        address=ray_address,
        fresh=fresh,
        quiet=as_json,
        console=console,
        capture=True,
        wait=wait_for_lease,
        extend=extend,
    )
    if as_json:
        print_json(summary.to_dict())
    code = exit_code_of(summary)
    if code:
        sys.exit(code)


@main.command(
    epilog=epilog(
        "orchestrator checkpoints runs/digits-mlp",
        "orchestrator checkpoints s3://bucket/runs/digits-mlp --endpoint-url http://minio:9000 --json",
    )
)
@click.argument("run_uri")
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@friendly_errors
def checkpoints(run_uri: str, endpoint_url: str | None, as_json: bool) -> None:
    """List the committed checkpoints of a run (step, metrics, size, URI), oldest first."""
    from orchestrator.checkpoint import list_checkpoints
    from orchestrator.storage import open_storage, use_interactive_deadline

    use_interactive_deadline()
    fs, root = open_storage(run_uri, endpoint_url)
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


@main.command(
    epilog=epilog(
        "orchestrator export runs/digits-mlp --out model.safetensors                  # the best checkpoint",
        "orchestrator export runs/digits-mlp --checkpoint latest --out model.safetensors",
        "orchestrator export runs/digits-mlp/checkpoint_00000473 --out model.safetensors --force",
    )
)
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
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print what was written (file, step, header) as JSON.")
@friendly_errors
def export(uri: str, out: str, choice: str | None, force: bool, endpoint_url: str | None, as_json: bool) -> None:
    """Write the weights of a run's best checkpoint (or another, or the checkpoint at URI) to one safetensors file.

    The file's header says where the weights came from: job, step, epoch, model and the fingerprint of the run's
    settings.
    """
    from orchestrator.export import export_checkpoint, parse_choice
    from orchestrator.storage import use_interactive_deadline

    use_interactive_deadline()

    done = export_checkpoint(uri, out, parse_choice(choice), force=force, endpoint_url=endpoint_url)
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
