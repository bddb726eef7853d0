"""submit, status, logs, stop and list against a real `ray start --head` with token authentication on."""

import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from commands import cmdline, run_command
from ray_cluster import RayCluster
from run_output import assert_ends_in_order

ROOT = Path(__file__).resolve().parents[1]
# One xdist worker for the module: its tests share one head node.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cluster_jobs")]

# A bring-your-own Ray Train loop: it reports `steps` times, sleeping between.
LOOP = """
import time

import ray.train


def train(config):
    for step in range(config["steps"]):
        time.sleep(config.get("sleep", 0))
        ray.train.report({"step": step})
"""


@pytest.fixture(scope="module")
def head():
    """One head node for the module: 2 CPUs, its own ports and temp dir, token auth on."""
    cluster = RayCluster(head_cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """A job directory with the loop (a module name no other test imports) and its job file."""
    root = tmp_path_factory.mktemp("jobs-proj")
    (root / "jobs_cluster_loop.py").write_text(LOOP)
    storage = tmp_path_factory.mktemp("jobs-store")
    (root / "loop.yaml").write_text(
        "name: loop\nentrypoint: jobs_cluster_loop:train\nconfig:\n  steps: 2\nscaling:\n  num_workers: 1\n"
        f"failure:\n  max_failures: 0\ncheckpoint:\n  storage: {storage}\n"
    )
    return root


def cli(head, *args, env=None, timeout=300):
    """`python -m orchestrator ...` as a user of this cluster runs it; the token must never appear in what it prints."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    full = {**base, **head.client_env(), **(env or {})}
    out = run_command([sys.executable, "-m", "orchestrator", *args], env=full, cwd=ROOT, timeout=timeout)
    assert head.token not in out.stdout + out.stderr
    return out


def job_ids(head):
    out = cli(head, "list", "--json")
    assert out.returncode == 0, out.stderr
    return {j["submission_id"] for j in json.loads(out.stdout.splitlines()[-1])}


def wait_for(predicate, timeout=120, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def test_submit_wait_runs_the_job_and_the_verbs_show_it(head, job_dir):
    out = cli(head, "submit", str(job_dir / "loop.yaml"), "name=loop-ok", "config.steps=3", "--follow", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads(out.stdout.splitlines()[-1])
    job_id = final["submission_id"]
    assert job_id.startswith("loop-ok-") and final["status"] == "SUCCEEDED" and final["run"] == "loop-ok"
    # The run's own summary (the entrypoint's `orchestrator run --json`) comes back through the logs.
    assert final["summary"]["status"] == "finished" and final["summary"]["run"] == "loop-ok", final["summary"]
    assert "Running entrypoint" in out.stderr  # with --json the job's output streams to stderr

    status = cli(head, "status", job_id)
    assert status.returncode == 0 and status.stdout.splitlines()[0].startswith(f"{job_id}  SUCCEEDED  (ran ")
    assert "config.steps=3" in status.stdout and f"run:      loop-ok in {final['storage']}" in status.stdout
    logs = cli(head, "logs", job_id)
    # The run's end as a person reads it; the JSON summary the submitting process read is left out.
    assert logs.returncode == 0 and "finished: loop-ok  steps 3" in logs.stdout
    assert not [line for line in logs.stdout.splitlines() if line.startswith("{")], logs.stdout[-2000:]
    listed = cli(head, "list")
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    assert "had already ended (SUCCEEDED)" in cli(head, "stop", job_id).stdout


def test_submit_prints_the_id_and_stop_stops_it(head, job_dir):
    out = cli(head, "submit", str(job_dir / "loop.yaml"), "name=loop-stop", "config.steps=600", "config.sleep=0.5")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert job_id.startswith("loop-stop-") and f"orchestrator logs {job_id} --follow" in out.stderr
    # Stop it as soon as the driver runs: what stop does (end the driver and all it started) is the same later.
    # Polled through the Jobs API itself: a CLI call every second would take a CPU from the cluster under test.
    wait_for(lambda: "run loop-stop ->" in head.api(f"/api/jobs/{job_id}/logs")["logs"], timeout=180, every=1)
    driver = json.loads(cli(head, "status", job_id, "--json").stdout)["driver_pid"]
    assert driver and Path(f"/proc/{driver}").exists()
    stopped = cli(head, "stop", job_id, "--wait")
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{job_id} STOPPED"
    shown = json.loads(cli(head, "status", job_id, "--json").stdout)
    assert shown["status"] == "STOPPED"
    wait_for(lambda: not Path(f"/proc/{driver}").exists(), timeout=30)  # the driver (on this machine) is gone
    # The driver had the Jobs API's SIGTERM to record it: the run says it was stopped, not `running` for ever.
    record = json.loads((Path(shown["storage"]) / "loop-stop" / "run.json").read_text())
    assert record["status"] == "stopped" and "orchestrator stop" in record["summary"]["error"], record


def test_submit_wait_exits_1_when_the_job_fails_and_follow_streams_to_the_end(head, job_dir):
    # Storage the cluster cannot write: this machine does not probe it, the run on the cluster fails its preflight.
    out = cli(
        head,
        "submit",
        str(job_dir / "loop.yaml"),
        "name=loop-fail",
        "checkpoint.storage=/proc/no-runs-here",
        "--follow",
    )
    assert out.returncode == 1
    assert "error: " in out.stdout and "/proc/no-runs-here" in out.stdout  # the job's own output, followed
    assert out.stderr.strip().splitlines()[-1].startswith("failed: loop-") and "FAILED" in out.stderr
    job_id = out.stderr.strip().splitlines()[-1].split()[1]
    status = cli(head, "status", job_id)
    assert f"{job_id}  FAILED" in status.stdout and "submitting the job again resumes run loop-fail" in status.stdout
    followed = cli(head, "logs", job_id, "--follow", timeout=60)  # an ended job: the whole log, then exit
    assert followed.returncode == 0 and "/proc/no-runs-here" in followed.stdout


def test_wrong_or_missing_token_exits_2_and_submits_nothing(head, job_dir, tmp_path):
    before = job_ids(head)
    wrong = cli(head, "submit", str(job_dir / "loop.yaml"), env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 2
    assert (
        wrong.stderr.strip()
        == f"error: {head.dashboard_url}: the cluster rejected the token from RAY_AUTH_TOKEN: it is not this cluster's token (compare with `ray get-auth-token` on the head node)"
    )
    # No token anywhere: not in the environment, not in this (empty) home's ~/.ray/auth_token.
    missing = run_command(
        [sys.executable, "-m", "orchestrator", "status", "whatever"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            "HOME": str(tmp_path),
            "RAY_ADDRESS": head.dashboard_url,
        },
        cwd=ROOT,
        timeout=60,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith(
        f"error: {head.dashboard_url}: the cluster requires a Ray auth token and none was found; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
    )
    unreadable = cli(head, "list", env={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")})
    assert unreadable.returncode == 2 and "RAY_AUTH_TOKEN_PATH: cannot read" in unreadable.stderr
    assert job_ids(head) == before


def test_bad_jobs_exit_2_and_submit_nothing(head, job_dir, tmp_path):
    before = job_ids(head)
    invalid = cli(head, "submit", str(job_dir / "loop.yaml"), "scaling.num_workers=-1")
    assert invalid.returncode == 2 and invalid.stderr.strip() == "error: scaling.num_workers: must be >= 0"
    missing = cli(head, "submit", str(job_dir / "loop.yaml"), "entrypoint=jobs_cluster_nowhere:train")
    assert missing.returncode == 2 and missing.stderr.startswith(
        "error: entrypoint: cannot import 'jobs_cluster_nowhere"
    )
    relative = cli(head, "submit", str(job_dir / "loop.yaml"), "checkpoint.storage=runs")
    assert relative.returncode == 2 and "checkpoint.storage: 'runs' is relative" in relative.stderr
    # Too much to ship: sparse files, so the size is real to the check and costs no disk.
    big = tmp_path / "big"
    big.mkdir()
    (big / "loop.yaml").write_text((job_dir / "loop.yaml").read_text())
    (big / "jobs_cluster_loop.py").write_text(LOOP)
    for i in range(11):
        with open(big / f"shard{i}.bin", "wb") as f:
            f.truncate(10 * 1000 * 1000)
    too_big = cli(head, "submit", str(big / "loop.yaml"))
    assert (
        too_big.returncode == 2
        and too_big.stderr.strip()
        == f"error: {big}: 110.0 MB in 13 files to ship as the job's working directory, over the 100.0 MB limit; add a .rayignore or move data to storage the cluster reads (s3://...)"
    )
    assert job_ids(head) == before


def test_address_option_wins_over_ray_address(head, job_dir):
    """Ray's client would follow RAY_ADDRESS over its argument; --address must be what is used."""
    out = cli(head, "list", "--json", "--address", head.dashboard_url, env={"RAY_ADDRESS": "http://127.0.0.1:1"})
    assert out.returncode == 0, out.stderr


def test_a_run_attaches_to_the_ray_already_up_on_this_machine(head, tmp_path):
    """`ray start --head` leaves its address where `ray.init(address="auto")` looks (RAY_TMPDIR/ray): a run without
    --address joins that Ray (token auth on) instead of starting its own, and trains there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = run_command(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "run",
            "jobs/digits_mlp.yaml",
            "name=attached",
            "train.epochs=1",
            "train.max_steps=3",
            "scaling.num_workers=1",
            f"checkpoint.storage={tmp_path}",
            "--json",
        ],
        env={**env, **head.attach_env()},
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "connecting to Ray at auto" in out.stderr and head.token not in out.stdout + out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["steps"] == 3
    # The head ran it: its driver is one of the cluster's jobs.
    drivers = [j for j in head.api("/api/jobs/") if j.get("type") == "DRIVER"]
    assert any("orchestrator" in (j.get("entrypoint") or "") and "attached" in j["entrypoint"] for j in drivers), (
        drivers
    )


def test_a_submitted_cv_shows_its_table_once_and_neither_it_nor_its_logs_a_json_blob(head, tmp_path):
    env = {"RAY_AUTH_TOKEN_PATH": str(head.token_path)}  # no RAY_AUTH_MODE: where Ray announces token authentication
    args = ["cv", "jobs/cv_digits.yaml", f"checkpoint.storage={tmp_path}", "data.folds=2", "train.epochs=1"]
    out = cli(head, *args, "--address", head.dashboard_url, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = re.search(r"submitted (\S+) to", out.stderr).group(1)
    for shown in (out.stdout, cli(head, "logs", job_id).stdout):
        assert not [line for line in shown.splitlines() if line.lstrip().startswith(("{", "@orchestrator"))], shown
        assert shown.count("each fold's best validation value @ its step") == 1, shown  # the table's note, once
        assert f"record: {tmp_path}/cv-digits-cv/cv.json" in shown and "Token authentication is enabled" not in shown
    assert "Token authentication is enabled" not in out.stderr
    assert json.loads((tmp_path / "cv-digits-cv" / "cv.json").read_text())["status"] == "finished"


def checks_of(out) -> dict[str, tuple[str, str]]:
    """`orchestrator doctor`'s lines: check name -> (status, detail)."""
    found = [re.match(r"^(\S+) +(.+?)  +(.*)$", line) for line in out.stdout.splitlines()]
    return {m[2]: (m[1], m[3]) for m in found}


def test_doctor_checks_the_cluster_by_a_probe_job_its_python_runs(head, job_dir):
    out = cli(head, "doctor", str(job_dir / "loop.yaml"), "--address", head.dashboard_url)
    assert out.returncode == 0, out.stdout + out.stderr
    checks = checks_of(out)
    for name in ("python", "packages", "torch", "ray", "cluster", "cluster ray", "cluster python", "cluster packages"):
        assert checks[name][0] == "ok", (name, out.stdout)
    assert checks["cluster"][1].startswith(f"{head.dashboard_url} answers, token from RAY_AUTH_TOKEN_PATH")
    assert checks["cluster python"][1] == f"{sys.version.split()[0]} at {sys.executable}, as here"
    assert checks["cluster GPUs"] == ("note", "0 in the cluster")
    assert checks["cluster orchestrator"] == (
        "ok",
        "submit ships this copy (0.1.0) with each job; the cluster has 0.1.0 installed",
    )
    assert checks["storage"][0] == "ok"  # the job's storage, a local path: writable here, and there (one machine)
    # The probe is a job like any: listed, with its own id, succeeded.
    probes = [
        j
        for j in json.loads(cli(head, "list", "--json").stdout)
        if j["submission_id"].startswith("orchestrator-doctor-")
    ]
    assert probes and all(p["status"] == "SUCCEEDED" for p in probes)

    wrong = cli(head, "doctor", "--address", head.dashboard_url, env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 1
    assert checks_of(wrong)["cluster"] == (
        "FAIL",
        f"{head.dashboard_url}: the cluster rejected the token from RAY_AUTH_TOKEN: it is not this cluster's token (compare with `ray get-auth-token` on the head node)",
    )


def test_a_job_id_can_be_chosen_and_jobs_are_found_by_their_run_name(head, job_dir):
    out = cli(
        head, "submit", str(job_dir / "loop.yaml"), "name=named-run", "--job-id", "my-named-job", "--follow", "--json"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1])["submission_id"] == "my-named-job"
    again = cli(head, "submit", str(job_dir / "loop.yaml"), "name=named-run", "--job-id", "my-named-job")
    assert again.returncode == 2 and again.stderr.strip() == (
        f"error: --job-id my-named-job: {head.dashboard_url} already has a job with this id; choose another"
    )
    status = cli(head, "status", "named-run")  # the run's name, not the job's id
    assert status.returncode == 0 and status.stdout.startswith("my-named-job  SUCCEEDED"), status.stderr
    assert status.stderr.strip() == "named-run: the run's newest job is my-named-job"
    logs = cli(head, "logs", "named-run")
    assert logs.returncode == 0 and "run named-run -> " in logs.stdout
    assert cli(head, "stop", "named-run").stdout.strip() == "my-named-job had already ended (SUCCEEDED)"
    missing = cli(head, "status", "no-such-run")
    assert missing.returncode == 2 and missing.stderr.strip().startswith(
        f"error: no-such-run: no job with this id or run name on {head.dashboard_url}"
    )


def test_run_at_an_address_submits_follows_and_ends_with_the_runs_summary(head, job_dir):
    out = cli(head, "run", str(job_dir / "loop.yaml"), "name=loop-run-at", "--address", head.dashboard_url, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.splitlines()[-1])
    assert summary["run"] == "loop-run-at" and summary["status"] == "finished", summary
    assert out.stderr.startswith("submitted loop-run-at-") and "Running entrypoint" in out.stderr


@contextlib.contextmanager
def log_forwarding_paused(head):
    """The head's log monitor stopped (SIGSTOP), then continued: meanwhile no worker's output reaches a driver.

    Ray forwards what workers print when its log monitor gets to it, or not at all if the driver has gone by
    then; a run's progress must not depend on it.
    """
    monitors = [pid for pid in head.head.pids() if "log_monitor.py" in cmdline(pid)]
    assert monitors, "no log monitor among the head's processes"
    for pid in monitors:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in monitors:
            os.kill(pid, signal.SIGCONT)


def test_an_attached_two_worker_run_ends_with_its_last_step_validation_and_test_in_order(head, tmp_path):
    """Rank 0 on a cluster's Ray: its events reach this driver in order, the last ones too, before the summary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with log_forwarding_paused(head):
        out = run_command(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "run",
                "jobs/digits_mlp.yaml",
                "name=attached-two",
                "train.epochs=2",
                "scaling.num_workers=2",
                f"checkpoint.storage={tmp_path}",
            ],
            env={**env, **head.attach_env()},
            cwd=ROOT,
            timeout=300,
        )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 workers, 44 steps" in out.stdout
    assert_ends_in_order(out.stdout, 44)
    assert_ends_in_order((tmp_path / "attached-two" / "run.log").read_text(), 44)


def test_logs_of_a_submitted_run_end_with_its_last_step_validation_and_test_in_order(head, tmp_path):
    """The driver on the head prints its run's events as they come from the worker: `logs` shows them all, in order."""
    with log_forwarding_paused(head):
        out = cli(
            head,
            "submit",
            "jobs/digits_mlp.yaml",
            "name=submitted",
            "train.epochs=2",
            f"checkpoint.storage={tmp_path}",
            "--follow",
            "--json",
        )
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = json.loads(out.stdout.splitlines()[-1])["submission_id"]
    logs = cli(head, "logs", job_id)
    assert logs.returncode == 0, logs.stderr
    assert_ends_in_order(logs.stdout, 86)
    assert_ends_in_order((tmp_path / "submitted" / "run.log").read_text(), 86)
