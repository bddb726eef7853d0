"""What Kubernetes would run is what this test runs: the rendered RayJob, submitted the way KubeRay's
submitter pod submits it, to a real Ray head with token authentication on, trains the job.

Only the Kubernetes parts are stood in for (there is no cluster here): the ConfigMap is laid out on
disk the way the kubelet mounts it, and the mount path in the runtime env is the one thing rewritten.
The entrypoint, the runtime env and the `ray job submit` invocation are the rendered ones, as-is.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from k8s_samples import K8S, ROOT
from ports import free_port

JOB = K8S / "overlays" / "cpu" / "job.yaml"
VENV_BIN = Path(sys.executable).parent


def mount_configmap(data: dict[str, str], mount: Path) -> None:
    """Lay out a ConfigMap volume as the kubelet does: files behind a `..data` symlink to a timestamped directory."""
    stamp = mount / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, text in data.items():
        (stamp / key).write_text(text)
    (mount / "..data").symlink_to(stamp.name)
    for key in data:
        (mount / key).symlink_to(f"..data/{key}")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the Ray head exited"
        try:
            with urllib.request.urlopen(f"{url}/api/gcs_healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {url} not healthy after {timeout}s")


def wait_probe(url: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    """Poll a probe URL as the kubelet would until it answers 200 (without a token: the endpoint is public)."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        assert proc.poll() is None, "the Ray head exited"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except OSError as exc:
            last = exc
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer 200 in {timeout}s: {last}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the head this test started (its own process group): SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rendered_rayjob_trains_when_submitted_as_kuberay_submits_it(tmp_path, s3_server, bucket):
    # Checkpoints to S3 (a real S3 server here), as on Kubernetes, where a local path is refused.
    runs = f"s3://{bucket}/runs"
    render = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "k8s",
            "render",
            str(JOB),
            "train.max_steps=5",
            f"checkpoint.storage={runs}",
            "scaling.num_workers=1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert render.returncode == 0, render.stderr
    rendered = {o["kind"]: o for o in yaml.safe_load_all(render.stdout)}
    configmap, rayjob = rendered["ConfigMap"], rendered["RayJob"]
    spec = rayjob["spec"]

    # Where the submitter pod sees the job file, and where the runtime env uploads it from.
    submitter = spec["submitterPodTemplate"]["spec"]
    volume = next(
        v for v in submitter["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"]
    )
    mount_path = next(m["mountPath"] for m in submitter["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == mount_path
    mount = tmp_path / "mount"
    mount_configmap(configmap["data"], mount)
    runtime_env["working_dir"] = str(mount)

    # A Ray head as KubeRay starts it with authOptions.mode=token: every process has the token.
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    # Free ports for everything Ray would otherwise take at a fixed number: other tests may run a Ray too.
    gcs, dashboard, client, agent = (free_port() for _ in range(4))
    temp_dir = tempfile.mkdtemp(prefix="rk8s", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_healthy(url, head)
        # The path the pods' liveness and readiness probes ask the dashboard agent (on its port here).
        probe = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]
        assert probe["port"] == 52365
        health = wait_probe(f"http://127.0.0.1:{agent}{probe['path']}", head)
        assert "raylet: success" in health and "gcs: success" in health, health
        # KubeRay's submitter runs this line with `bash -ce`, the entrypoint spliced in unquoted
        # (ray-operator/controllers/ray/common/job.go, BuildJobSubmitCommand).
        line = f"ray job submit --address {url} --runtime-env-json {shlex.quote(json.dumps(runtime_env))} -- {spec['entrypoint']}"
        submit = subprocess.run(
            ["bash", "-ce", "--", line], capture_output=True, text=True, timeout=480, env=env, cwd=tmp_path
        )
    finally:
        stop(head)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    summaries = [json.loads(line) for line in submit.stdout.splitlines() if line.startswith("{") and '"status"' in line]
    assert summaries, submit.stdout[-4000:]
    summary = summaries[-1]
    assert summary["status"] == "finished"
    assert summary["steps"] == 5
    assert summary["run_uri"] == f"{runs}/digits-mlp-k8s"
    s3_server.client().head_object(Bucket=bucket, Key="runs/digits-mlp-k8s/run.json")  # raises if it is not there
