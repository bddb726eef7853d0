"""What a person sees of a run: one live progress display in a terminal, plain lines otherwise, the full log in a file.

The loop on rank 0 describes its progress as events (`start`, `train`, `val`, `test`, `message`).
They reach the driver's `RunConsole` on a channel of their own, in order (see events.py), never
through Ray's log forwarding. Everything else the process and its workers print (Ray's own lines
among it) goes to the run's log file, and to the terminal only with --verbose.

This module imports neither torch nor ray.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from orchestrator.storage import redact

Event = dict[str, Any]
# While the console captures this process's output, its own events go through the same pipe as everything
# printed (so that they keep their place among those lines): MARKER and the event as JSON, one line.
MARKER = "@orchestrator-event "

# Lines that Ray itself prints: a forwarded worker line `(Name pid=1, ip=...) ...`, Python logging of
# Ray's processes (`2026-01-01 10:00:00,123\tINFO worker.py:1 -- ...`), and the C++ core's glog lines.
_ANSI = r"(?:\x1b\[[0-9;]*m)*"
_RAY_LINE = re.compile(
    rf"^{_ANSI}\s*(?:"
    r"\((?:[^()]*\s)?pid=[^)]*\)"
    r"|\(raylet[^)]*\)"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b"
    r"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\]"
    r"|\[(?:repeated|state-dump)\b"
    r"|\*\*\* SIG"
    r")"
)
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def is_ray_line(line: str) -> bool:
    """Whether a line of output was printed by Ray (its processes, its logging, a forwarded worker line)."""
    return bool(_RAY_LINE.match(line))


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    seconds = int(max(0, seconds))
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _metrics_text(metrics: dict[str, Any], prefix: str) -> str:
    return "  ".join(f"{k.removeprefix(prefix)} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def format_event(event: Event) -> str | None:
    """The plain line of a progress event (what a log file or a pipe shows)."""
    kind = event.get("kind")
    if kind == "train":
        return (
            f"step {event['step']}/{event['total_steps']}  epoch {event['epoch_shown']}/{event['epochs']}  loss {event['loss']:.4f}  "
            f"lr {event['lr']:.2e}  {event['samples_per_s']:,.0f} samples/s  eta {clock(event['eta_s'])}"
        )
    if kind == "val":
        return "  validation: " + _metrics_text(event["metrics"], "val_")
    if kind == "test":
        return f"  test (step {event['step']}): " + _metrics_text(event["metrics"], "test_")
    return event.get("text")


def text_progress(log: Callable[[str], None]) -> Callable[[Event], None]:
    """A progress sink that writes each event as its plain line through `log`."""

    def emit(event: Event) -> None:
        text = format_event(event)
        if text is not None:
            log(text)

    return emit


def write_marker(stream: IO[str], event: Event) -> None:
    """An event as one marker line on `stream` (the capture's pipe)."""
    stream.write(MARKER + json.dumps(event, default=float) + "\n")
    stream.flush()


def parse_marker(line: str) -> Event | None:
    """The event a marker line carries, or None. Only a whole line of this process's own: a worker's line that
    Ray forwarded (with its process prefix) is that worker's output, whatever it says."""
    if not line.startswith(MARKER):
        return None
    try:
        event = json.loads(line[len(MARKER) :])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class RunConsole:
    """The driver's view of a run: a rich progress bar in a terminal, plain lines when piped, and the run's log file.

    `live` draws the progress bar (a terminal, no --json); `verbose` shows Ray's and the workers'
    own output too. Thread-safe: events arrive from the capture thread and from the loop.
    """

    def __init__(self, stream: IO[str] | None = None, live: bool = False, verbose: bool = False):
        self.stream = stream or sys.stdout
        self.live = live
        self.verbose = verbose
        self._lock = threading.RLock()
        self._pipe_lock = threading.Lock()
        self._log: IO[str] | None = None
        self._progress = None  # rich Progress while live
        self._task = None
        self._captured_out: IO[str] | None = None
        self._pipe: IO[str] | None = None  # while capturing: our own events join the captured output, in order
        self._pump_thread: threading.Thread | None = None

    # -- what the driver and the loop say

    def message(self, text: str) -> None:
        """A line for the person at the terminal (and the log)."""
        self.event({"kind": "message", "text": text})

    def log_only(self, text: str) -> None:
        """Text for the run's log file only (a traceback): the terminal gets the one-line reason instead."""
        self.event({"kind": "log", "text": text})  # in its place among the events and lines before it

    def status(self, text: str) -> None:
        """What the run is doing before its first step (starting Ray, the workers, loading data)."""
        self.event({"kind": "status", "text": text})

    def event(self, event: Event) -> None:
        """A progress event of the loop, in this process or sent by a worker (see events.py); thread-safe."""
        pipe = self._pipe
        if pipe is not None and threading.current_thread() is not self._pump_thread:
            # Through the pipe, so that it lands after whatever this process printed before it.
            with self._pipe_lock:  # not self._lock: the pump takes that one to drain this pipe
                write_marker(pipe, event)
            return
        self._handle(event)

    def _handle(self, event: Event) -> None:
        with self._lock:
            if event.get("kind") == "log":
                self._write_log(event.get("text", ""))
                return
            text = format_event(event)
            if text is not None:
                self._write_log(text)
            kind = event.get("kind")
            if kind == "status":
                if self._progress is not None:
                    self._progress.update(self._task, description=text)
                elif not self.live:
                    self._show(text)
                return
            if self._progress is None:
                if text is not None:
                    self._show(text)
                return
            if kind == "start":
                self._progress.update(
                    self._task, total=event["total_steps"], completed=event.get("step", 0), description="training"
                )
                self._progress.console.print(event.get("text", ""), markup=False, highlight=False)
            elif kind == "train":
                fields = (
                    f"epoch {event['epoch_shown']}/{event['epochs']}  loss {event['loss']:.4f}  "
                    f"{event['samples_per_s']:,.0f} samples/s  eta {clock(event['eta_s'])}"
                )
                self._progress.update(
                    self._task,
                    total=event["total_steps"],
                    completed=event["step"],
                    description="training",
                    fields=fields,
                )
            elif text is not None:
                self._progress.console.print(text, markup=False, highlight=False)

    def progress_sink(self) -> Callable[[Event], None]:
        return self.event

    # -- the display

    def _show(self, text: str) -> None:
        if self._progress is not None:
            from rich.text import Text

            self._progress.console.print(Text.from_ansi(text))
            return
        out = self._captured_out or self.stream
        out.write(text + "\n")
        out.flush()

    def _write_log(self, text: str) -> None:
        if self._log is not None:
            self._log.write(_ANSI_RE.sub("", text) + "\n")
            self._log.flush()

    def _start_live(self, out: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(file=out, force_terminal=True)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[fields]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=8,
            # Not rich's own redirection of sys.stdout/stderr: they feed the capture, which decides what is shown.
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._progress.add_task("starting", total=None, fields="")
        self._progress.start()

    def _stop_live(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- everything else the process prints

    @contextmanager
    def capture(self, log_path: str | None) -> Iterator[None]:
        """Send this process's stdout/stderr (its prints, Ray's forwarded worker lines, C++ logs) through the console.

        Every line goes to `log_path` (appended); what Ray prints reaches the terminal only with `verbose`.
        On exit the file descriptors are restored.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        target_fd = self.stream.fileno()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        self._captured_out = os.fdopen(os.dup(saved[target_fd]), "w", buffering=1, errors="replace")
        if log_path:
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
            self._log = open(log_path, "a", buffering=1, errors="replace")
            self._write_log(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {redact(' '.join(sys.argv))}")
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        self._pipe = os.fdopen(write_fd, "w", buffering=1, errors="replace")
        pump = self._pump_thread = threading.Thread(
            target=self._pump, args=(read_fd,), name="console-capture", daemon=True
        )
        pump.start()
        if self.live:
            self._start_live(self._captured_out)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            pipe, self._pipe = self._pipe, None
            pipe.close()
            for fd, copy in saved.items():
                os.dup2(copy, fd)  # the pipe's last writer in this process closes here: the pump sees its end
                os.close(copy)
            pump.join(timeout=5)
            self._pump_thread = None
            with self._lock:
                self._stop_live()
                out, self._captured_out = self._captured_out, None
                out.close()
                if self._log is not None:
                    self._log.close()
                    self._log = None

    def _pump(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "r", errors="replace") as pipe:
            for raw in pipe:
                line = raw.rstrip("\n")
                event = parse_marker(line)
                if event is not None:
                    self._handle(event)
                    continue
                with self._lock:
                    self._write_log(line)
                    if self.verbose or not is_ray_line(line):
                        self._show(line)
