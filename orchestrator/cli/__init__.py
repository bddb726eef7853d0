"""The command line: parse, call the library, print. Heavy modules (torch, ray) are imported lazily.

`main` is the click group and `command` the entry point; the commands live in modules by group (`local`,
`k8s`, `cluster`, `sweeps`, `results`) and register on `main` as they are imported, at the end of this one.
"""

from __future__ import annotations

import functools
import json
import os
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
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


@click.group(cls=OneLineErrors, context_settings=CONTEXT)
@click.version_option(package_name="orchestrator")
def main() -> None:
    """Train PyTorch models from one job file: locally, on a Ray cluster, or on Kubernetes."""


def command() -> None:
    """The `orchestrator` command (and `python -m orchestrator`): `main`, then an exit without the interpreter's teardown.

    Tearing down an interpreter that imported torch and its compiler frontend (which the first optimizer step
    imports) takes seconds of a CPU after the command's work is done (measured: `import torch._dynamo`, then
    a normal exit, 2.1 s more than the same with `os._exit`), on every command that trained. What the normal
    exit does that matters still happens: the atexit handlers run (log handlers flushed, Ray disconnected,
    temporary directories removed, child processes reaped) and the standard streams are flushed. Where a
    non-daemon thread still runs, the interpreter's own exit waits for it, as it always has.
    """
    import atexit
    import threading

    try:
        returned = main()  # click's non-standalone main returns an exit code (--help, --version) or a command's value
        code = returned if type(returned) is int else 0
    except SystemExit as exc:
        if exc.code is not None and type(exc.code) is not int:
            raise  # a message: the interpreter prints it and exits 1
        code = exc.code or 0
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: nothing left to say on it
            pass
    os._exit(code)


# The command modules import `main` and the helpers above from here, so they come last.
from orchestrator.cli import cluster, k8s, local, results, sweeps  # noqa: E402, F401
