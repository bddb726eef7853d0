"""The command line: parse, call the library, print. Heavy modules (torch, ray) are imported lazily.

`main` (common.py) is the click group and `command` the entry point; the commands live in modules by group (`local`,
`k8s`, `cluster`, `sweeps`, `results`, `doctor`) and register on `main` as they are imported, at the end of this one.
"""

from __future__ import annotations

import os
import sys

import click

from orchestrator.cli.common import main

__all__ = ["command", "main"]


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
    except ModuleNotFoundError as exc:  # a package a command imports when it runs (torch, ray) is not installed
        from orchestrator.environment import missing_package_line

        line = missing_package_line(exc)
        if line is None:
            raise
        click.echo(f"error: {line}", err=True)
        code = 1
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: nothing left to say on it
            pass
    os._exit(code)


# Each command module registers its commands on `main` as it is imported.
from orchestrator.cli import cluster, doctor, k8s, local, results, sweeps  # noqa: E402, F401
