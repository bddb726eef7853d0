"""The run's console: Ray's lines told apart, worker events decoded, output captured into the run's log."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest

from orchestrator.console import MARKER, RunConsole, format_event, is_ray_line, parse_marker, write_marker

RAY_LINES = [
    "\x1b[36m(RayTrainWorker pid=4868)\x1b[0m Reporting training result 11: TrainingReport(checkpoint=None, metrics={'step': 473})",
    "(pid=123, ip=10.0.0.2) something a task printed",
    "(TrainController pid=77) [State Transition] INITIALIZING -> SCHEDULING.",
    "2026-12-01 04:36:07,611\tINFO worker.py:1821 -- Started a local Ray instance.",
    "2026-12-01 04:36:07,611 WARNING auth.py:12 -- Token authentication is enabled",
    "[2026-12-01 04:40:12,123 E 4868 4901] core_worker.cc:512: PreemptionWatcher constructor arguments",
    "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task",
    "[repeated 3x across cluster]",
]
OWN_LINES = [
    "step 20/645  epoch 1/15  loss 0.1234",
    "UserWarning: something a user's code warned about",
    "  validation: loss 0.1",
]


@pytest.mark.parametrize("line", RAY_LINES)
def test_ray_lines_are_recognised(line):
    assert is_ray_line(line)


@pytest.mark.parametrize("line", OWN_LINES)
def test_other_lines_are_not_rays(line):
    assert not is_ray_line(line)


def test_a_marker_round_trips_but_a_workers_forwarded_line_is_no_event():
    out = io.StringIO()
    event = {"kind": "val", "step": 43, "metrics": {"val_loss": 0.25, "val_accuracy": 0.9}}
    write_marker(out, event)
    line = out.getvalue().rstrip("\n")
    assert parse_marker(line) == event
    # Events come on their own channel (events.py): what a worker prints, even a marker, is only its output.
    assert parse_marker("\x1b[36m(RayTrainWorker pid=1)\x1b[0m " + line) is None
    assert parse_marker("no marker here") is None and parse_marker(MARKER + "{not json") is None


def test_plain_lines_of_each_event():
    train = {
        "kind": "train",
        "step": 20,
        "total_steps": 645,
        "epoch_shown": 1,
        "epochs": 15,
        "loss": 0.5,
        "lr": 1e-3,
        "samples_per_s": 12345.6,
        "eta_s": 75,
    }
    assert format_event(train) == "step 20/645  epoch 1/15  loss 0.5000  lr 1.00e-03  12,346 samples/s  eta 1:15"
    assert (
        format_event({"kind": "val", "step": 3, "metrics": {"val_loss": 0.1, "val_accuracy": 0.5}})
        == "  validation: loss 0.1000  accuracy 0.5000"
    )
    assert (
        format_event({"kind": "test", "step": 7, "metrics": {"test_accuracy": 0.75}})
        == "  test (step 7): accuracy 0.7500"
    )
    assert format_event({"kind": "message", "text": "resumed"}) == "resumed"


def test_a_piped_console_prints_plain_lines():
    out = io.StringIO()
    console = RunConsole(out)
    console.status("starting Ray")
    console.event({"kind": "start", "step": 0, "total_steps": 10, "epochs": 1, "text": "training x"})
    console.event({"kind": "val", "step": 5, "metrics": {"val_loss": 0.5}})
    assert out.getvalue().splitlines() == ["starting Ray", "training x", "  validation: loss 0.5000"]


CAPTURED = """
import os, sys
from orchestrator.console import RunConsole
console = RunConsole(sys.stdout, verbose={verbose})
with console.capture({log!r}):
    print("2026-12-01 04:36:07,611\\tINFO worker.py:1821 -- Started a local Ray instance.", flush=True)
    os.write(2, b"[2026-12-01 04:40:12,123 E 1 2] core_worker.cc:1: a C++ line\\n")
    print("(RayTrainWorker pid=9) Reporting training result 1: TrainingReport(checkpoint=None)", flush=True)
    console.event({{"kind": "val", "step": 1, "metrics": {{"val_loss": 0.5}}}})
    console.log_only("Traceback of an attempt that ended")
    print("a warning of the user's own code", file=sys.stderr, flush=True)
    console.message("finished: x")
print("after the capture")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_capture_keeps_everything_in_the_log_and_shows_only_the_runs_lines(tmp_path, verbose):
    log = tmp_path / "run" / "run.log"
    res = subprocess.run(
        [sys.executable, "-c", CAPTURED.format(verbose=verbose, log=str(log))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    shown = res.stdout.splitlines()
    assert (
        shown[-4:]
        == ["  validation: loss 0.5000", "a warning of the user's own code", "finished: x", "after the capture"]
        or verbose
    )
    ray_lines = ["Started a local Ray instance", "core_worker.cc:1: a C++ line", "TrainingReport("]
    for fragment in ray_lines:
        assert any(fragment in line for line in shown) == verbose, (fragment, shown)
    assert not any(MARKER in line for line in shown)
    logged = log.read_text()
    for fragment in [*ray_lines, "  validation: loss 0.5000", "a warning of the user's own code", "finished: x"]:
        assert fragment in logged
    assert MARKER not in logged and "after the capture" not in logged
    # Text for the log only keeps its place after the events before it; the terminal never shows it.
    assert (
        logged.index("  validation: loss 0.5000") < logged.index("Traceback of an attempt") < logged.index("finished")
    )
    assert "Traceback" not in res.stdout
    assert res.stderr == ""


def test_capture_appends_to_an_earlier_attempts_log(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("the first attempt\n")
    script = textwrap.dedent(f"""
        import sys
        from orchestrator.console import RunConsole
        console = RunConsole(sys.stdout)
        with console.capture({str(log)!r}):
            console.message("the second attempt")
    """)
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60).returncode == 0
    lines = log.read_text().splitlines()
    assert lines[0] == "the first attempt" and lines[-1] == "the second attempt" and lines[1].startswith("--- ")
