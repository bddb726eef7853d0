"""One run per run directory: the lease, raced by real processes, on a local directory and on a real S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import run_command

from orchestrator import storage
from orchestrator.lease import LEASE_FILE, LeaseHeld, RunLease

ROOT = Path(__file__).resolve().parents[1]
TINY = ["scaling.num_workers=0", "train.max_steps=2", "validation.every_n_steps=2"]

# A process that takes the lease on argv[1] (object stores: ttl argv[2]), says so on stdout, holds it
# until its stdin closes, then releases it. With argv[3] == "race" it first waits for the file argv[4]
# to appear, so that two of them ask at the same moment, and reports "refused" instead of holding.
HOLDER = r"""
import json, os, sys, time
from orchestrator import storage
from orchestrator.lease import LeaseHeld, RunLease
uri, ttl = sys.argv[1], float(sys.argv[2])
if len(sys.argv) > 3:
    while not os.path.exists(sys.argv[4]):
        time.sleep(0.005)
fs, root = storage.open_storage(uri)
lease = RunLease(fs, root, uri, ttl)
try:
    lease.acquire()
except LeaseHeld as exc:
    print(json.dumps({"refused": exc.lines[0]}), flush=True)
    sys.exit(2)
print(json.dumps({"held": os.getpid()}), flush=True)
sys.stdin.read()
lease.release()
"""


def holder(uri: str, ttl: float = 60.0, *race: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, uri, str(ttl), *race],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def held(proc: subprocess.Popen) -> int:
    """Wait until the holder has the lease; its pid."""
    line = proc.stdout.readline()
    assert line, f"the holder exited ({proc.wait()}) without the lease"
    return json.loads(line)["held"]


def end(proc: subprocess.Popen) -> int:
    proc.stdin.close()
    return proc.wait(timeout=30)


def lease_on(uri: str, ttl: float = 60.0) -> RunLease:
    fs, root = storage.open_storage(uri)
    return RunLease(fs, root, uri, ttl)


def orchestrator(*args: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, timeout=300)


# ----------------------------------------------------------------------------------------------
# Local directories: an OS lock


def race(uri: str, tmp_path: Path, ttl: float = 60.0) -> None:
    """Two processes ask for one lease at the same moment: exactly one holds it, the other is told who."""
    go = tmp_path / "go"
    procs = [holder(uri, ttl, "race", str(go)) for _ in range(2)]
    time.sleep(1.0)  # both interpreters up and polling for the go file
    go.touch()
    first = [json.loads(p.stdout.readline()) for p in procs]
    winners = [(p, f) for p, f in zip(procs, first, strict=True) if "held" in f]
    losers = [(p, f) for p, f in zip(procs, first, strict=True) if "refused" in f]
    assert len(winners) == 1 and len(losers) == 1, first
    assert losers[0][0].wait(timeout=30) == 2
    assert f"pid {winners[0][1]['held']}" in losers[0][1]["refused"]
    assert end(winners[0][0]) == 0


def test_two_processes_race_for_a_local_run_dir(tmp_path):
    race(str(tmp_path / "run"), tmp_path)


def test_run_refuses_a_run_dir_in_use_with_one_line_naming_the_holder(tmp_path):
    run_dir = tmp_path / "runs" / "digits-mlp"
    proc = holder(str(run_dir))
    try:
        pid = held(proc)
        res = orchestrator("run", "jobs/digits_mlp.yaml", f"checkpoint.storage={tmp_path}/runs", *TINY)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: {run_dir}: already in use by another run (host "), lines
        assert f"pid {pid}, since 20" in lines[0]
        assert "Traceback" not in res.stdout + res.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [LEASE_FILE]  # nothing written, no Ray started
    finally:
        assert end(proc) == 0


def test_sweep_refuses_a_sweep_dir_in_use(tmp_path):
    # One lease for the whole sweep, on its directory: its trials' run directories live under it.
    sweep_dir = tmp_path / "digits-lr"
    proc = holder(str(sweep_dir))
    try:
        pid = held(proc)
        res = orchestrator("sweep", "jobs/sweep_digits_lr.yaml", f"checkpoint.storage={tmp_path}")
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {sweep_dir}: already in use"), lines
        assert f"pid {pid}" in lines[0]
        assert sorted(p.name for p in sweep_dir.iterdir()) == [LEASE_FILE]
    finally:
        assert end(proc) == 0


def test_run_with_wait_waits_for_the_holder_then_runs(tmp_path):
    run_dir = tmp_path / "runs" / "digits-mlp"
    proc = holder(str(run_dir))
    pid = held(proc)
    run = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", "jobs/digits_mlp.yaml", f"checkpoint.storage={tmp_path}/runs"]
        + TINY
        + ["--wait-for-lease", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    # The waiting run says whom it waits for, and has not touched the directory while it waits.
    line = ""
    for line in iter(run.stderr.readline, ""):  # noqa: B007 - the first line that says it waits
        if "in use by another run" in line:
            break
    assert "in use by another run" in line and f"pid {pid}" in line and "waiting" in line, line
    assert run.poll() is None
    assert sorted(p.name for p in run_dir.iterdir()) == [LEASE_FILE]
    assert end(proc) == 0
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["steps"] == 2
    # Once it ended, the directory is free again.
    lease_on(str(run_dir)).acquire().release()


def test_a_killed_local_holder_never_blocks_a_rerun(tmp_path):
    uri = str(tmp_path / "run")
    proc = holder(uri)
    held(proc)
    with pytest.raises(LeaseHeld):
        lease_on(uri).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    lease = lease_on(uri).acquire()  # at once: the kernel dropped the dead process's lock
    assert json.loads((tmp_path / "run" / LEASE_FILE).read_text())["pid"] == os.getpid()
    lease.release()


def test_a_killed_local_holder_is_known_gone_and_a_live_one_is_not(tmp_path):
    uri = str(tmp_path / "run")
    proc = holder(uri)
    pid = held(proc)
    assert lease_on(uri).gone() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert lease_on(uri).gone() == f"its driver (pid {pid}) is gone"
    assert lease_on(f"{uri}/elsewhere").gone() is None  # no lease: cannot tell


# ----------------------------------------------------------------------------------------------
# Object stores: a lease object written with conditional PUTs, on a real S3 server


def lease_object(s3_server, bucket: str) -> dict:
    return json.loads(s3_server.client().get_object(Bucket=bucket, Key=f"runs/r/{LEASE_FILE}")["Body"].read())


def test_two_processes_race_for_an_s3_run_dir(bucket, tmp_path):
    race(f"s3://{bucket}/runs/r", tmp_path)


def test_s3_second_holder_is_refused_and_release_frees_it(s3_server, bucket):
    uri = f"s3://{bucket}/runs/r"
    first = lease_on(uri).acquire()
    with pytest.raises(LeaseHeld) as refused:
        lease_on(uri).acquire()
    assert f"pid {os.getpid()}" in refused.value.lines[0] and refused.value.lines[0].startswith(f"{uri}: ")
    assert lease_object(s3_server, bucket)["token"] == first.holder.token
    first.release()
    second = lease_on(uri).acquire()  # at once: released, not expired
    second.release()


def test_s3_renewal_keeps_the_lease_past_its_ttl(bucket):
    uri = f"s3://{bucket}/runs/r"
    first = lease_on(uri, ttl=4).acquire()
    time.sleep(6)  # one and a half ttl: only the renewals keep it alive
    with pytest.raises(LeaseHeld):
        lease_on(uri, ttl=4).acquire()
    assert not first.lost
    first.release()


def test_s3_killed_holder_is_taken_over_only_after_expiry(s3_server, bucket):
    uri = f"s3://{bucket}/runs/r"
    # A ttl well above the 1 s resolution of Last-Modified and a loaded machine's delays: the first
    # refusal below must come before expiry.
    proc = holder(uri, 5)
    pid = held(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed = time.monotonic()
    with pytest.raises(LeaseHeld) as refused:  # not yet: it was renewed within the last ttl
        lease_on(uri, ttl=5).acquire()
    assert f"pid {pid}" in refused.value.lines[0]
    waited: list[str] = []
    lease = lease_on(uri, ttl=5).acquire(wait=True, on_wait=lambda h: waited.append(h.describe()))
    assert waited and f"pid {pid}" in waited[0]
    assert 2.0 < time.monotonic() - killed < 20  # expiry: up to ttl after the last renewal
    assert lease_object(s3_server, bucket)["pid"] == os.getpid()
    lease.release()


def test_a_killed_s3_holder_is_known_gone_once_its_lease_expires(bucket):
    uri = f"s3://{bucket}/runs/r"
    proc = holder(uri, 2)
    held(proc)
    assert lease_on(uri, ttl=2).gone() is None  # renewed every ttl/3
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while (gone := lease_on(uri, ttl=2).gone()) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert gone and gone.startswith("its driver stopped renewing its lease ")


def test_run_refuses_an_s3_run_dir_in_use(s3_server, bucket):
    uri = f"s3://{bucket}/runs/digits-mlp"
    proc = holder(uri, 30)
    try:
        pid = held(proc)
        res = orchestrator("run", "jobs/digits_mlp.yaml", f"checkpoint.storage=s3://{bucket}/runs", *TINY)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {uri}: already in use by another run (host "), lines
        assert f"pid {pid}, since 20" in lines[0] and "testing" not in res.stdout + res.stderr
        listed = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
        assert [o["Key"] for o in listed] == [f"runs/digits-mlp/{LEASE_FILE}"]  # nothing written
    finally:
        assert end(proc) == 0
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # released: the object is gone


def test_s3_an_expired_holder_never_deletes_the_lease_taken_over_from_it(s3_server, bucket):
    uri = f"s3://{bucket}/runs/r"
    old = lease_on(uri, ttl=2).acquire()
    old._stop.set()  # a driver cut off from the store: its renewals stop
    old._renewer.join()
    time.sleep(3.5)  # past the ttl (Last-Modified has one-second resolution)
    new = lease_on(uri, ttl=2).acquire()  # taken over at once: expired
    old._stop.clear()
    old.release()  # its conditional delete names the ETag it last wrote: the new lease stays
    assert lease_object(s3_server, bucket)["token"] == new.holder.token
    with pytest.raises(LeaseHeld):
        lease_on(uri, ttl=2).acquire()
    new.release()
