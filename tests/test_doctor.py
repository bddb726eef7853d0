"""`orchestrator doctor` on this machine, and against a real `ray start --head` whose `python` lacks torch: the
doctor names what is missing there, and so do `submit --follow` and `status` when a job dies of it."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from commands import run_command
from python_envs import python_without
from ray_cluster import RayCluster

ROOT = Path(__file__).resolve().parents[1]
LOOP = "import ray.train\n\n\ndef train(config):\n    ray.train.report({'step': 0})\n"


def doctor(*args, env=None, timeout=300):
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return run_command(
        [sys.executable, "-m", "orchestrator", "doctor", *args], cwd=ROOT, env={**base, **(env or {})}, timeout=timeout
    )


def checks_of(out) -> dict[str, tuple[str, str]]:
    found = [re.match(r"^(\S+) +(.+?)  +(.*)$", line) for line in out.stdout.splitlines()]
    return {m[2]: (m[1], m[3]) for m in found}


def test_doctor_checks_this_machine_one_line_each(tmp_path):
    out = doctor("--json", env={"HOME": str(tmp_path)})  # a home without Ray's token file
    assert out.returncode == 0, out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert checks["python"] == {
        "name": "python",
        "status": "ok",
        "detail": f"{sys.version.split()[0]} at {sys.executable}",
    }
    assert checks["packages"]["detail"] == "the 20 packages orchestrator needs are installed"
    assert checks["torch"]["status"] == checks["ray"]["status"] == "ok"
    assert checks["GPUs"]["status"] in ("ok", "note") and checks["Ray token"]["status"] == "note"
    plain = doctor(env={"RAY_AUTH_TOKEN": "t0ken", "HOME": str(tmp_path)})
    assert checks_of(plain)["Ray token"] == ("ok", "token from RAY_AUTH_TOKEN") and "t0ken" not in plain.stdout
    assert all(re.match(r"^(ok|note|FAIL) +\S.*?  +\S", line) for line in plain.stdout.splitlines()), plain.stdout


def test_doctor_with_a_job_checks_its_storage_and_its_gpus_and_fails_on_either(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text((ROOT / "jobs" / "digits_mlp.yaml").read_text())
    good = doctor(str(job), f"checkpoint.storage={tmp_path / 'runs'}")
    assert good.returncode == 0 and checks_of(good)["storage"] == (
        "ok",
        f"{tmp_path / 'runs'} is writable from this machine",
    )
    bad = doctor(str(job), "checkpoint.storage=/proc/no-runs-here")
    assert bad.returncode == 1
    status, detail = checks_of(bad)["storage"]
    assert status == "FAIL" and detail.startswith("checkpoint.storage: /proc/no-runs-here")
    gpus = doctor(str(job), f"checkpoint.storage={tmp_path / 'runs'}", "scaling.use_gpu=true")
    if checks_of(gpus)["GPUs"][0] == "note":  # a machine without GPUs (this one; a GPU machine has them)
        assert gpus.returncode == 1
        assert checks_of(gpus)["job GPUs"] == ("FAIL", "scaling.use_gpu: the job needs 1 GPU, here has 0")
    bad_input = doctor(str(job), "train.epochs=0")
    assert bad_input.returncode == 2 and bad_input.stderr.startswith("error: train.epochs:")


@pytest.fixture(scope="module")
def torchless(tmp_path_factory):
    """A head node whose `python` (the one a job's entrypoint runs) has every package but torch."""
    bin_dir = python_without(tmp_path_factory.mktemp("venv-notorch"), "torch", "functorch", "torchgen")
    cluster = RayCluster(head_cpus=2, python_bin=str(bin_dir))
    try:
        cluster.start()
        yield cluster, bin_dir
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_a_cluster_whose_python_lacks_torch_is_named_by_doctor_submit_and_status(torchless, tmp_path):
    cluster, bin_dir = torchless
    env = cluster.client_env()
    (tmp_path / "doctor_loop.py").write_text(LOOP)
    (tmp_path / "loop.yaml").write_text(
        f"name: notorch\nentrypoint: doctor_loop:train\nscaling: {{num_workers: 1}}\n"
        f"checkpoint: {{storage: {tmp_path / 'runs'}}}\n"
    )
    checked = doctor("--address", cluster.dashboard_url, env=env)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    checks = checks_of(checked)
    assert checks["cluster packages"] == (
        "FAIL",
        f"missing torch; pip install 'torch>=2.3' into {bin_dir / 'python'}",
    )
    assert checks["cluster python"][0] == "ok" and checks["packages"][0] == "ok"  # here all is there

    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    submitted = run_command(
        [sys.executable, "-m", "orchestrator", "submit", str(tmp_path / "loop.yaml"), "--follow"],
        cwd=ROOT,
        env={**base, **env},
        timeout=300,
    )
    missing = (
        f"{bin_dir / 'python'} (Python {sys.version.split()[0]}) cannot import torch, which orchestrator needs; "
        "install orchestrator's requirements into it (pip install torch)"
    )
    assert submitted.returncode == 1
    last = submitted.stderr.strip().splitlines()[-1]
    assert last.startswith("failed: notorch-") and last.endswith(f"FAILED: on the cluster, {missing}"), last
    assert "Traceback" not in submitted.stdout + submitted.stderr  # one line from the job, not 40
    status = run_command(
        [sys.executable, "-m", "orchestrator", "status", "notorch"], cwd=ROOT, env={**base, **env}, timeout=120
    )
    assert f"  why:      on the cluster, {missing}" in status.stdout, status.stdout
    assert "until then a resubmission fails the same way" in status.stdout
    assert "submitting the job again resumes" not in status.stdout
