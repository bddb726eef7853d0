"""Multi-node runs on a real two-node Ray cluster on this machine: DDP across nodes, a lost node, a lost driver."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import run_command
from ray_cluster import RayCluster
from run_output import assert_ends_in_order

ROOT = Path(__file__).resolve().parents[1]
# One xdist worker for the module: its tests share one two-node cluster.
pytestmark = [pytest.mark.slow, pytest.mark.multinode, pytest.mark.xdist_group("multinode")]

# A user model that sleeps in every training step, so that a test can act while training runs.
SLOW_MODEL = """
import math
import time

from torch import nn


class SlowMLP(nn.Module):
    def __init__(self, n_in, hidden, n_out, delay):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
        self.delay = delay

    def forward(self, x):
        if self.training and self.delay:
            time.sleep(self.delay)
        return self.net(x)


def build(info, hidden=32, delay=0.0):
    return SlowMLP(math.prod(info.input_shape), hidden, int(info.num_classes), delay)
"""


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node, 1 CPU each, token auth on; node deaths noticed within seconds."""
    # Ray's defaults take ~30 s to declare a silent node dead, and Ray Train waits 60 s for a worker
    # group that cannot start before it tries a smaller one; a test need not wait that long.
    fast = {
        "RAY_health_check_initial_delay_ms": "1000",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
    }
    c = RayCluster(head_cpus=1, env=fast)
    try:
        c.start()
        c.add_node(num_cpus=1)
        c.wait_for_nodes(2)
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A job directory (job file and user model) and a storage path both nodes see."""
    root = tmp_path_factory.mktemp("mn-proj")
    (root / "slow_mlp_multinode.py").write_text(SLOW_MODEL)
    storage = tmp_path_factory.mktemp("mn-store")
    (root / "job.yaml").write_text(
        "name: mn\n"
        "model:\n  name: slow_mlp_multinode:build\n  options:\n    hidden: 32\n    delay: 0.0\n"
        "data:\n  name: digits\n"
        "train:\n  epochs: 3\n  batch_size: 64\n  seed: 0\n  log_every_n_steps: 5\n"
        "scaling:\n  num_workers: 2\n  cpus_per_worker: 1\n"
        "failure:\n  max_failures: 3\n"
        f"checkpoint:\n  storage: {storage}\n  every_n_epochs: 1\n  async: false\n"
    )
    return root, storage


def cli(cluster, *args, timeout=400):
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = run_command(
        [sys.executable, "-m", "orchestrator", *args], env={**base, **cluster.client_env()}, cwd=ROOT, timeout=timeout
    )
    assert cluster.token not in out.stdout + out.stderr
    return out


def submit(cluster, project, *overrides, wait=False):
    root, _ = project
    out = cli(cluster, "submit", str(root / "job.yaml"), *overrides, *(["--follow", "--json"] if wait else ["--json"]))
    assert out.returncode in (0, 1), out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1]), out


def status(cluster, job_id):
    return json.loads(cli(cluster, "status", job_id, "--json").stdout)


def wait_for(predicate, timeout=240, every=0.5, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not met in {timeout}s")


def committed(storage: Path, run: str) -> list[Path]:
    return sorted((storage / run).glob("checkpoint_*/manifest.json"))


def wait_end(cluster, job_id, timeout=400):
    """Until the job has ended, then what `orchestrator status` says of it.

    The waiting asks the Jobs API itself: a CLI call is a Python start, a second of a CPU every poll,
    taken from the cluster under test on a two-core machine.
    """
    wait_for(
        lambda: cluster.api(f"/api/jobs/{job_id}")["status"] in ("SUCCEEDED", "FAILED", "STOPPED"),
        timeout=timeout,
        every=1,
        what=f"{job_id} to end",
    )
    return status(cluster, job_id)


def run_log(storage: Path, run: str) -> str:
    """What the run's driver, Ray and the workers printed: its console (the job's logs) keeps Ray's own lines out."""
    return (storage / run / "run.log").read_text()


def worker_ips(logs: str) -> set[str]:
    """The node addresses Ray Train placed the ranks on, from the controller's 'world_rank' lines."""
    return {line.split("ip=")[1].split(",")[0] for line in logs.splitlines() if "world_rank=" in line and "ip=" in line}


def test_ddp_across_two_nodes_matches_one_node(cluster, project, tmp_path):
    # The same job on one node: an embedded single-node Ray on this machine, started alongside.
    root, storage = project
    local = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "run",
            str(root / "job.yaml"),
            "name=mn-ddp",
            f"checkpoint.storage={tmp_path}",
            "--json",
        ],
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    final, out = submit(cluster, project, "name=mn-ddp", wait=True)
    local_out, local_err = local.communicate(timeout=400)
    assert final["status"] == "SUCCEEDED", out.stderr[-3000:]
    assert local.returncode == 0, local_err[-3000:]
    assert worker_ips(run_log(storage, "mn-ddp")) == {"127.0.0.2", "127.0.0.3"}
    two_nodes, one_node = final["summary"], json.loads(local_out.splitlines()[-1])
    assert two_nodes["steps"] == one_node["steps"] > 0
    # Rank 0's events crossed to the driver's node through the mailbox actor: every one, in order, before the summary.
    assert_ends_in_order(run_log(storage, "mn-ddp"), two_nodes["steps"])
    for name in ("val_loss", "val_accuracy"):
        assert two_nodes["metrics"][name] == pytest.approx(one_node["metrics"][name], rel=1e-5, abs=1e-6), name


def test_elastic_run_survives_a_killed_node_on_fewer_workers(cluster, project):
    _, storage = project
    final, _ = submit(
        cluster, project, "name=mn-elastic", "scaling.num_workers=[1,2]", "train.epochs=5", "model.options.delay=0.1"
    )
    job_id = final["submission_id"]
    wait_for(lambda: committed(storage, "mn-elastic"), what="a first committed checkpoint")
    node = cluster.workers[0]
    assert node.kill(signal.SIGKILL) > 0
    try:
        end = wait_end(cluster, job_id)
        logs, full = cli(cluster, "logs", job_id).stdout, run_log(storage, "mn-elastic")
        assert end["status"] == "SUCCEEDED", logs[-4000:]
        # Two workers, then one on the surviving node, which restores the last checkpoint.
        assert 0 <= full.find("worker group of size 2") < full.rfind("worker group of size 1")
        assert "resumed from" in full.split("worker group of size 1")[-1]
        summary = json.loads((storage / "mn-elastic" / "run.json").read_text())["summary"]  # `logs` shows no JSON
        assert summary["status"] == "finished" and summary["epochs"] == 5
    finally:
        node.start()
        cluster.wait_for_nodes(2)


def test_fixed_size_run_waits_for_the_node_to_return(cluster, project):
    _, storage = project
    final, _ = submit(cluster, project, "name=mn-fixed", "train.epochs=5", "model.options.delay=0.1")
    job_id = final["submission_id"]
    wait_for(lambda: committed(storage, "mn-fixed"), what="a first committed checkpoint")
    node = cluster.workers[0]
    assert node.kill(signal.SIGKILL) > 0
    try:
        cluster.wait_for_nodes(1)
        # Two workers of 1 CPU cannot fit on the head alone: the run waits, it does not shrink or fail.
        time.sleep(3)
        assert status(cluster, job_id)["status"] == "RUNNING"
    finally:
        node.start()
        cluster.wait_for_nodes(2)
    end = wait_end(cluster, job_id)
    logs = cli(cluster, "logs", job_id).stdout
    assert end["status"] == "SUCCEEDED", logs[-4000:]
    assert "resumed from" in logs
    summary = json.loads((storage / "mn-fixed" / "run.json").read_text())["summary"]  # `logs` shows no JSON
    assert summary["status"] == "finished" and summary["epochs"] == 5
    # The mailbox on the driver's node outlived the worker node: the new group's events came through it, to the end.
    assert_ends_in_order(logs, summary["steps"])


def test_killed_driver_fails_the_job_and_a_resubmission_resumes(cluster, project):
    _, storage = project
    first, _ = submit(cluster, project, "name=mn-driver", "train.epochs=5", "model.options.delay=0.1")
    job_id = first["submission_id"]
    wait_for(lambda: committed(storage, "mn-driver"), what="a first committed checkpoint")
    pid = status(cluster, job_id)["driver_pid"]
    os.kill(pid, signal.SIGKILL)
    end = wait_end(cluster, job_id, timeout=120)
    assert end["status"] == "FAILED"
    shown = cli(cluster, "status", job_id).stdout
    assert f"{job_id}  FAILED" in shown and "submitting the job again resumes run mn-driver" in shown

    second, out = submit(cluster, project, "name=mn-driver", "train.epochs=5", "model.options.delay=0.1", wait=True)
    assert second["status"] == "SUCCEEDED", out.stderr[-3000:]
    summary = second["summary"]
    assert summary["resumed_from"] and summary["resumed_from"].startswith(str(storage / "mn-driver" / "checkpoint_"))
    assert summary["epochs"] == 5
