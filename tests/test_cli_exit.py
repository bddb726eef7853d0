"""The command's fast exit (`cli.command`): the interpreter's teardown is skipped, nothing a normal exit does that matters."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(tmp_path: Path, before: str, *argv: str) -> subprocess.CompletedProcess:
    """`orchestrator ARGV` through `cli.command`, in a process that first runs `before` (Python)."""
    script = textwrap.dedent(before) + f"\nimport sys\nsys.argv = ['orchestrator', *{list(argv)!r}]\n"
    script += "from orchestrator.cli import command\ncommand()\nprint('not reached')\n"
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_exit_codes_and_output_are_the_commands(tmp_path):
    ok = command(tmp_path, "", "--version")
    assert ok.returncode == 0 and ok.stdout.startswith("orchestrator, version") and "not reached" not in ok.stdout
    bad = command(tmp_path, "", "validate", str(ROOT / "jobs" / "digits_mlp.yaml"), "optim.lr=-1")
    assert bad.returncode == 2 and "error: optim.lr" in bad.stderr
    unknown = command(tmp_path, "", "bogus")
    assert unknown.returncode == 2 and "No such command 'bogus'" in unknown.stderr


def test_atexit_handlers_run_and_buffered_output_is_written(tmp_path):
    # A log handler's buffered file (as a run's log is) and an atexit handler of a library (as Ray's shutdown is).
    before = """
        import atexit, logging
        handler = logging.FileHandler('log.txt', delay=False)
        handler.stream.reconfigure(write_through=False)
        logging.getLogger('x').addHandler(handler)
        logging.getLogger('x').warning('the last line')
        atexit.register(lambda: open('atexit.txt', 'w').write('ran'))
    """
    out = command(tmp_path, before, "--version")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "log.txt").read_text() == "the last line\n"


def test_a_thread_still_working_is_waited_for(tmp_path):
    before = """
        import threading, time
        def late():
            time.sleep(1)
            open('late.txt', 'w').write('done')
        threading.Thread(target=late).start()
    """
    out = command(tmp_path, before, "--version")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "late.txt").read_text() == "done"
