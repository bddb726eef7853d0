"""A run you can trust, through the real command line: its identity on a rerun, --extend, signals, a job's own exit,
and a lost lease with two real processes against the S3 server."""

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

ROOT = Path(__file__).resolve().parents[1]
JOB = "jobs/digits_mlp.yaml"
TINY = ["scaling.num_workers=0", "train.max_steps=4", "validation.every_n_steps=2"]
# Long enough to be stopped part-way (645 steps), a checkpoint every 5 of them.
LONG = ["checkpoint.every_n_steps=5", "checkpoint.every_n_epochs=null", "early_stopping=null"]


def orchestrator(*args: str, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "orchestrator", *args], cwd=cwd, timeout=timeout)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def summary(res: subprocess.CompletedProcess) -> dict:
    return json.loads(res.stdout.strip().splitlines()[-1])


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def wait_for(found, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not found():
        if proc.poll() is not None:
            raise AssertionError(f"ended ({proc.returncode}) before {what}:\n{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------
# A run's identity: a rerun with other settings is refused, naming each; --extend is a named choice


def test_a_changed_rerun_of_a_finished_run_is_refused_and_a_harmless_one_says_it_is_done(tmp_path):
    args = ["run", JOB, f"checkpoint.storage={tmp_path}", *TINY, "--json"]
    first = orchestrator(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (tmp_path / "digits-mlp" / "run.json").read_text()
    changed = orchestrator(*args, "optim.lr=0.1", "model.hidden=64")
    assert changed.returncode == 2 and changed.stdout == ""
    assert changed.stderr.strip() == (
        f"error: {tmp_path}/digits-mlp: holds a finished run with other settings: model.hidden 128 -> 64, "
        "optim.lr 0.003 -> 0.1; use --fresh for a new run, or another name"
    )
    assert (tmp_path / "digits-mlp" / "run.json").read_text() == before  # nothing started, nothing written
    # Trackers, cadence of logs and checkpoints, workers: the same run, already done.
    same = orchestrator(*args, "train.log_every_n_steps=1", "checkpoint.keep_last=5", "tracking.tensorboard.log_dir=tb")
    assert same.returncode == 0 and summary(same)["already_finished"] and "already finished at step 4" in same.stderr
    assert record(tmp_path / "digits-mlp")["attempts"] == 1


def test_extend_trains_a_finished_run_on_from_its_last_step(tmp_path):
    args = ["run", JOB, f"checkpoint.storage={tmp_path}", *TINY, "--json"]
    assert orchestrator(*args).returncode == 0
    longer = orchestrator(*args, "train.max_steps=8")  # a longer horizon is a choice, not a side effect
    assert longer.returncode == 2 and longer.stderr.strip().endswith(
        "train.max_steps 4 -> 8; use --fresh for a new run, or another name, or --extend to train on from step 4"
    )
    extended = orchestrator(*args, "train.max_steps=8", "--extend")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "extending digits-mlp (train.max_steps 4 -> 8) from step 4; the warmup_cosine schedule is re-planned" in (
        extended.stderr
    )
    out = summary(extended)
    assert out["status"] == "finished" and out["steps"] == 8 and out["resumed_from"].endswith("checkpoint_00000004")
    rec = record(tmp_path / "digits-mlp")
    assert rec["attempts"] == 2 and rec["job"]["train"]["max_steps"] == 8
    assert [(e["from_step"], e["changes"]) for e in rec["extended"]] == [(4, {"train.max_steps": [4, 8]})]
    again = orchestrator(*args, "train.max_steps=8", "optim.lr=0.1", "--extend")  # more than the horizon: refused
    assert again.returncode == 2 and "optim.lr 0.003 -> 0.1" in again.stderr and "--extend" not in again.stderr


def test_ctrl_c_records_the_run_interrupted_and_a_changed_resume_is_refused(tmp_path):
    proc = start("run", JOB, f"checkpoint.storage={tmp_path}", "scaling.num_workers=0", *LONG, "--json")
    run_dir = tmp_path / "digits-mlp"
    wait_for(lambda: list(run_dir.glob("checkpoint_*/manifest.json")), proc, "a checkpoint")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    rec = record(run_dir)
    assert rec["status"] == "interrupted" and rec["summary"]["signal"] == "SIGINT" and rec["ended"]
    step = rec["summary"]["steps"]
    assert 0 < step < 645 and json.loads(out.strip().splitlines()[-1])["status"] == "interrupted"
    assert f"interrupted by SIGINT: rerun the same command to resume from step {step} (" in err
    listed = orchestrator("runs", str(tmp_path))
    assert "interrupted (rerun resumes)" in listed.stdout
    changed = orchestrator("run", JOB, f"checkpoint.storage={tmp_path}", "scaling.num_workers=0", *LONG, "optim.lr=0.1")
    assert changed.returncode == 2 and changed.stderr.startswith(
        f"error: {run_dir}: holds an unfinished run with other settings: optim.lr 0.003 -> 0.1;"
    )


@pytest.mark.slow  # an embedded Ray and its task
def test_sigterm_records_the_run_interrupted_and_exits_143(tmp_path):
    proc = start("run", JOB, f"checkpoint.storage={tmp_path}", *LONG)  # the task executor: the loop in a Ray task
    run_dir = tmp_path / "digits-mlp"
    wait_for(lambda: list(run_dir.glob("checkpoint_*/manifest.json")), proc, "a checkpoint")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    rec = record(run_dir)
    assert rec["status"] == "interrupted" and rec["summary"]["signal"] == "SIGTERM"
    assert rec["executor"]["kind"] == "task"
    assert "interrupted by SIGTERM: rerun the same command to resume from step" in out


def test_a_sigkilled_run_is_listed_as_died_and_a_rerun_resumes_it(tmp_path):
    proc = start("run", JOB, f"checkpoint.storage={tmp_path}", "scaling.num_workers=0", *LONG)
    run_dir = tmp_path / "digits-mlp"
    wait_for(lambda: list(run_dir.glob("checkpoint_*/manifest.json")), proc, "a checkpoint")
    proc.send_signal(signal.SIGKILL)  # nothing can be recorded: the record keeps saying running
    proc.communicate(timeout=60)
    assert record(run_dir)["status"] == "running"
    listed = orchestrator("runs", str(tmp_path), "--json")
    row = json.loads(listed.stdout)[0]
    assert row["status"] == "died" and row["hint"] == f"its driver (pid {proc.pid}) is gone; rerun resumes"
    assert "died" in orchestrator("runs", str(tmp_path)).stdout
    again = orchestrator("run", JOB, f"checkpoint.storage={tmp_path}", "scaling.num_workers=0", *LONG, "--json")
    assert again.returncode == 0 and "(resuming from " in again.stderr, again.stderr[-3000:]
    assert record(run_dir)["status"] == "finished" and record(run_dir)["attempts"] == 2


# ----------------------------------------------------------------------------------------------
# The job's own exit, in the driver (a bring-your-own loop of num_workers 0)

EXITS = """
import os, sys

def by_sys_exit(config):
    sys.exit(3)

def by_os_exit(config):
    os._exit(4)
"""


@pytest.mark.parametrize("loop, how, code", [("by_sys_exit", "sys.exit", 3), ("by_os_exit", "os._exit", 4)])
def test_a_jobs_own_exit_fails_the_run_with_its_code(tmp_path, loop, how, code):
    (tmp_path / "exits.py").write_text(EXITS)
    (tmp_path / "job.yaml").write_text(f"name: exits\nentrypoint: exits:{loop}\nscaling: {{num_workers: 0}}\n")
    res = orchestrator("run", str(tmp_path / "job.yaml"), f"checkpoint.storage={tmp_path / 'runs'}", "--json")
    assert res.returncode == 1, res.stderr[-3000:]
    assert summary(res)["status"] == "failed" and f"error: the job's code called {how}({code})" in res.stderr
    rec = record(tmp_path / "runs" / "exits")
    assert rec["status"] == "failed" and rec["summary"]["exit_code"] == code
    assert rec["summary"]["error"] == f"the job's code called {how}({code})"


# ----------------------------------------------------------------------------------------------
# A lost lease: a run paused past its lease's ttl, taken over, then continued, stops and writes nothing more


def manifests(s3_server, bucket: str) -> dict[str, str]:
    """Every committed checkpoint's manifest under the bucket, with its ETag (a rewrite changes it)."""
    listed = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listed if o["Key"].endswith("/manifest.json")}


@pytest.mark.slow  # two runs, one paused past its lease's ttl
def test_a_run_that_lost_its_lease_stops_within_a_lease_period_and_commits_nothing(s3_server, bucket):
    ttl = 4
    storage = f"s3://{bucket}/runs"
    common = ["run", JOB, f"checkpoint.storage={storage}", "scaling.num_workers=0", "early_stopping=null"]
    first = start(
        *common, f"checkpoint.lease_ttl_s={ttl}", "checkpoint.every_n_steps=5", "checkpoint.every_n_epochs=null"
    )
    wait_for(lambda: manifests(s3_server, bucket), first, "a checkpoint on S3")
    first.send_signal(signal.SIGSTOP)  # a driver cut off: its renewals stop
    try:
        time.sleep(ttl + 2.5)  # past the ttl (Last-Modified has one-second resolution)
        # The same run again (checkpoint cadence is not part of its identity): it takes the expired lease over and
        # resumes; checkpointing only at its end, it commits nothing while the first is tested.
        second = start(
            *common,
            f"checkpoint.lease_ttl_s={ttl}",
            "checkpoint.every_n_steps=null",
            "checkpoint.every_n_epochs=null",
            "--json",
        )
        lease = "runs/digits-mlp/.lease"
        wait_for(
            lambda: (
                json.loads(s3_server.client().get_object(Bucket=bucket, Key=lease)["Body"].read())["pid"] == second.pid
            ),
            second,
            "the second run's lease",
        )
        committed = manifests(s3_server, bucket)
    finally:
        first.send_signal(signal.SIGCONT)
    continued = time.monotonic()
    out, err = first.communicate(timeout=120)
    stopped_after = time.monotonic() - continued
    assert stopped_after < ttl, f"the first run stopped {stopped_after:.1f} s after it went on"
    assert first.returncode == 1, out[-3000:] + err[-3000:]
    assert second.poll() is None, "the second run ended before the first was tested: make it longer"
    assert manifests(s3_server, bucket) == committed  # nothing committed (nor rewritten) after it lost the lease
    lost = [line for line in out.splitlines() if "lost the lease" in line]
    assert len(lost) == 1 and lost[0].startswith("  error: lost the lease on ") and f"pid {second.pid}" in lost[0], out
    assert "report:" not in out  # nothing of the first's written after it lost the lease
    out2, err2 = second.communicate(timeout=300)
    assert second.returncode == 0, err2[-3000:]
    done = json.loads(out2.strip().splitlines()[-1])
    assert done["status"] == "finished" and done["steps"] == 645 and done["resumed_from"]
    run_json = json.loads(s3_server.client().get_object(Bucket=bucket, Key="runs/digits-mlp/run.json")["Body"].read())
    assert run_json["status"] == "finished" and run_json["attempts"] == 2  # the second's record, never the first's
