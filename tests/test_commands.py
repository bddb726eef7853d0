"""The tests' command runner: a hung command fails its test with where it hung, and leaves nothing running."""

from __future__ import annotations

import os
import sys
import time

import pytest
from commands import cmdline, run_command

CHILD = "import time\ndef child_waits_here():\n    time.sleep(120)\nchild_waits_here()"
PARENT = (
    "import subprocess, sys, time\n"
    f"subprocess.Popen([sys.executable, '-c', {CHILD!r}])\n"
    "print('started', flush=True)\n"
    "def parent_waits_here():\n    time.sleep(120)\n"
    "parent_waits_here()"
)


def test_a_hung_command_fails_with_the_stacks_of_its_processes_and_is_killed_with_them(tmp_path):
    with pytest.raises(AssertionError) as failed:
        run_command([sys.executable, "-c", PARENT], cwd=tmp_path, timeout=3)
    text = str(failed.value)
    assert "did not end within 3 s" in text and "started" in text
    assert "parent_waits_here" in text and "child_waits_here" in text  # both processes' Python stacks
    time.sleep(0.5)
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and "child_waits_here" in cmdline(int(pid))]
    assert not left, left


def test_a_command_that_ends_is_returned_as_subprocess_run_returns_it(tmp_path):
    done = run_command(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], cwd=tmp_path
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
