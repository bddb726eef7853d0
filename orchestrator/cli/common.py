"""What every command group of the command line shares: the group `main`, the one-line errors, JSON and tables,
the options that mean the same on every command, the help's examples and its sections.

A leaf of the cli package: the command modules import it, and the package imports them, without a circle.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from orchestrator.errors import BadInput, RunFailed
from orchestrator.storage import redact

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
                click.echo(f"error: {redact(line)}", err=True)
            sys.exit(exc.exit_code)
        except RunFailed as exc:
            click.echo(f"failed: {redact(str(exc))}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def plain_cells(*values: Any) -> list[Any]:
    """Table cells shown as written: run names, URIs and metric names are data, not rich markup (`[red]x`)."""
    from rich.text import Text

    return [Text(str(v)) for v in values]


def console():
    """A rich console; piped output is not wrapped at 80 columns, so URIs stay whole for grep and scripts."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


job_file_argument = click.argument("job_file", type=click.Path(dir_okay=False))
overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")

OVERRIDES_HELP = (
    "KEY=VALUE sets a field of the job file by its dotted path, over what the file says: optim.lr=3e-4 "
    "train.epochs=5 scaling.num_workers=2 (values are YAML: null, [1, 2], {shift: 2}; the job-file reference "
    "lists every field)."
)


def epilog(*examples: str, overrides: bool = False) -> str:
    """A command's help epilog: its examples, each on its own line as written, and what KEY=VALUE means."""
    # "\b" keeps click from rewrapping the paragraph that follows it.
    text = "\b\nExamples:\n" + "\n".join(f"  {line}" for line in examples)
    return text + (f"\n\n{OVERRIDES_HELP}" if overrides else "")


def retired_option(name: str, hint: Callable[[Any], str], is_flag: bool = False) -> Callable:
    """An option that was renamed: still parsed (hidden) for one release, and refused with one line saying what to use."""

    def refuse(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or value is False:
            return value
        shown = name if is_flag else f"{name} {value}"
        raise click.UsageError(f"{shown}: {hint(value)}", ctx=ctx)

    return click.option(name, hidden=True, is_flag=is_flag, expose_value=False, callback=refuse)


endpoint_option = click.option(
    "--endpoint-url",
    default=None,
    metavar="URL",
    help="S3-compatible endpoint of an s3:// URI, e.g. http://minio:9000 [default: $AWS_ENDPOINT_URL, else AWS].",
)


def check_ray_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--ray-address: auto, local, HOST:PORT or ray://HOST:PORT; a dashboard's URL is refused with what to use."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith(("http://", "https://")):
        raise click.UsageError(
            f"--ray-address {value}: that is a dashboard's URL; to run the job on that cluster use --address {value}",
            ctx=ctx,
        )
    bare = value.removeprefix("ray://")
    host, _, port = bare.rpartition(":")
    if value not in ("auto", "local") and not (host and port.isdigit() and "/" not in bare):
        raise click.UsageError(
            f"--ray-address {value}: give HOST:PORT of a running Ray (its GCS, e.g. 10.0.0.5:6379), auto or local",
            ctx=ctx,
        )
    return value


def old_address_hint(value: str) -> str:
    """What `--address` of `run`, `sweep` and `cv` meant before it named a dashboard, and what to use now."""
    return (
        "--address now names a cluster's dashboard (http://HOST:8265), as for `submit`; "
        f"what it meant here before is --ray-address {value}"
    )


def dashboard_address_option(what: str) -> Callable:
    """--address of run, sweep and cv: a cluster's dashboard URL, where the command is submitted and followed."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        # For one release, a bare HOST:PORT, auto or local is refused: it used to mean Ray's own address here.
        if value is not None and not value.strip().startswith(("http://", "https://")):
            raise click.UsageError(f"--address {value}: {old_address_hint(value)}", ctx=ctx)
        return value

    return click.option(
        "--address",
        default=None,
        metavar="URL",
        callback=check,
        help=f"A cluster's dashboard, e.g. http://HOST:8265: submit {what} there through the Jobs API and follow it "
        "to its end, as `submit --follow` does [default: train from this process; see --ray-address].",
    )


ray_address_option = click.option(
    "--ray-address",
    envvar="ORCHESTRATOR_RAY_ADDRESS",
    default=None,
    metavar="HOST:PORT|auto|local",
    callback=check_ray_address,
    help="The Ray this process trains on: HOST:PORT of a running Ray, auto (the one `ray start` left on this "
    "machine) or local (a new embedded Ray even when another is up) "
    "[default: $ORCHESTRATOR_RAY_ADDRESS, else a Ray already up on this machine, else a new embedded one].",
)


# The top-level help lists the commands by where they act, in this order; a command missing here is listed last.
SECTIONS = (
    ("On this machine", ("validate", "run", "sweep", "cv", "doctor")),
    (
        "On a Ray cluster, through its dashboard (--address http://HOST:8265)",
        ("submit", "status", "logs", "stop", "list"),
    ),
    ("On Kubernetes (KubeRay)", ("k8s",)),
    ("Results, in a local directory or s3://", ("runs", "checkpoints", "report", "export")),
)


class OneLineErrors(click.Group):
    """The top-level group: a usage error (bad option, missing argument, a directory for a file) is one line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
            message = redact(" ".join(exc.format_message().split()))
            click.echo(f"error: {message}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort as exc:
            click.echo("aborted", err=True)
            # Ctrl-C before a run began (click turns KeyboardInterrupt into Abort): the shell's convention, 128 + SIGINT.
            sys.exit(130 if isinstance(exc.__context__, KeyboardInterrupt) else 1)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands by section (SECTIONS), each with its whole first sentence: nothing cut off with `...`."""
        commands = {name: self.get_command(ctx, name) for name in self.list_commands(ctx)}
        listed = {name for _, names in SECTIONS for name in names}
        sections = [*SECTIONS, ("Other", tuple(sorted(set(commands) - listed)))]
        width = max(len(name) for name in commands)  # one column for all sections
        for title, names in sections:
            rows = [
                (n.ljust(width), _first_sentence(commands[n]))
                for n in names
                if n in commands and not commands[n].hidden
            ]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _first_sentence(cmd: click.Command) -> str:
    text = " ".join((cmd.short_help or cmd.help or "").split("\n\n")[0].split())
    head, dot, _ = text.partition(". ")
    return head + "." if dot else text


@click.group(cls=OneLineErrors, context_settings=CONTEXT)
@click.version_option(package_name="orchestrator")
def main() -> None:
    """Train PyTorch models from one job file: locally, on a Ray cluster, or on Kubernetes.

    \b
    Start with:
      orchestrator run jobs/digits_mlp.yaml        train the example job here
      orchestrator COMMAND --help                  each command's options and examples
    """
