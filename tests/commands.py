"""Commands the tests run (`python -m orchestrator ...`), and what a test learns when one hangs.

A command that runs past its timeout fails its test with the end of what it printed and the Python stacks of
every process below it (py-spy, which the venv has): an embedded Ray's workers, Tune's trials and Ray Train's
actors are all children of the command, so a CI log shows where a hang waits, not only that it did; with the end
of the logs of the Ray it started (Ray Train's controller, the workers' stderr). Then the whole process group is killed, Ray's processes with it, so that nothing of a hung command outlives its test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"
STACKS_BUDGET_S = 60  # all the dumps of one hung command together


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc), parents before their children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def python_stacks(pids: list[int]) -> str:
    """py-spy's dump of the Python threads of each of `pids` that runs Python."""
    deadline = time.monotonic() + STACKS_BUDGET_S
    parts = []
    for p in pids:
        line = cmdline(p)
        program = line.split(" ", 1)[0]
        if not (os.path.basename(program).startswith("python") or program.startswith("ray::")):
            continue  # Ray's own binaries (gcs_server, raylet) have no Python stack
        left = deadline - time.monotonic()
        if left <= 1:
            parts.append(f"--- pid {p}: no time left for its stack ({line[:120]})")
            continue
        try:
            dump = subprocess.run(
                [str(PY_SPY), "dump", "--pid", str(p)], capture_output=True, text=True, timeout=min(15, left)
            )
            text = (dump.stdout or dump.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"py-spy: {exc}"
        parts.append(f"--- pid {p}: {line[:200]}\n{text}")
    return "\n".join(parts)


def ray_logs(pids: list[int], per_file: int = 12, budget: int = 12000) -> str:
    """The end of the logs of any Ray among `pids` (its raylet): Ray Train's controller decisions and each worker's stderr."""
    sessions = {m.group(1) for p in pids if (m := re.search(r"(/\S+?/session_[^/\s]+)/sockets/raylet", cmdline(p)))}
    parts = []
    for session in sorted(sessions):
        logs = Path(session, "logs")
        for path in sorted(logs.glob("train/ray-train-sys-controller-*.log")):
            lines = []
            for raw in path.read_text(errors="replace").splitlines()[-per_file:]:
                try:
                    entry = json.loads(raw)
                    lines.append(f"{entry.get('asctime')} {entry.get('levelname')} {entry.get('message', '')[:300]}")
                except ValueError:
                    lines.append(raw[:300])
            parts.append(f"--- {path}\n" + "\n".join(lines))
        for path in sorted(logs.glob("worker-*.err")):
            lines = [line[:300] for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if len(lines) > 1:  # more than Ray's ':job_id:' header
                parts.append(f"--- {path.name}\n" + "\n".join(lines[-per_file:]))
    text = "\n".join(parts)
    return text if len(text) <= budget else "...\n" + text[-budget:]


def run_command(
    args: list[str], *, cwd: Path | str | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """subprocess.run(args, capture_output=True, text=True), failing the test with the hung processes' stacks on timeout."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a hung command is killed with all it started
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        below = descendants(proc.pid)
        stacks, logs = python_stacks([proc.pid, *below]), ray_logs(below)
        below = descendants(proc.pid)  # again: the dumps take seconds, in which Ray may have started more
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in below:  # Ray may start some of its processes in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{' '.join(map(str, args[:6]))} ... did not end within {timeout} s\n"
            f"--- stdout (end)\n{stdout[-3000:]}\n--- stderr (end)\n{stderr[-6000:]}\n"
            f"--- Python stacks of the command and every process below it\n{stacks}\n"
            f"--- the end of its Ray's logs\n{logs}"
        ) from None
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
