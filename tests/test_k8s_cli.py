"""`orchestrator k8s render` and `orchestrator k8s apply`, run as a user runs them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from commands import run_command
from k8s_samples import K8S, ROOT

from orchestrator import k8s
from orchestrator.spec import load_spec

JOB = K8S / "overlays" / "cpu" / "job.yaml"


def cli(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return run_command(
        [sys.executable, "-m", "orchestrator", "k8s", *args], timeout=120, env={**os.environ, **(env or {})}, cwd=cwd
    )


def test_render_prints_what_render_manifests_returns():
    done = cli(
        "render",
        str(JOB),
        "optim.lr=0.01",
        "--namespace",
        "team-a",
        "--image",
        "ghcr.io/acme/orchestrator:1.2.3",
        "--ttl",
        "60",
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    spec = load_spec(JOB, ["optim.lr=0.01"])
    expected = k8s.render_manifests(
        spec, k8s.job_file_text(spec), namespace="team-a", image="ghcr.io/acme/orchestrator:1.2.3", ttl_seconds=60
    )
    assert list(yaml.safe_load_all(done.stdout)) == expected


def test_render_with_cluster_and_a_queue():
    done = cli("render", str(JOB), "--cluster", "orchestrator")
    assert done.returncode == 0, done.stderr
    rayjob = list(yaml.safe_load_all(done.stdout))[-1]
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": "orchestrator"}
    done = cli("render", str(JOB), "--queue", "team-a", "--service-account", "ml-team")
    assert done.returncode == 0, done.stderr
    spec = load_spec(JOB)
    assert list(yaml.safe_load_all(done.stdout)) == k8s.render_manifests(
        spec, k8s.job_file_text(spec), queue="team-a", service_account="ml-team"
    )


def test_a_local_checkpoint_storage_is_refused_before_kubectl_as_submit_refuses_it(tmp_path):
    for command in ("render", "apply"):
        done = cli(command, str(ROOT / "jobs" / "digits_mlp.yaml"), env={"PATH": str(tmp_path)})  # no kubectl
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.splitlines() == [
            "error: checkpoint.storage: runs is a path inside the pods, so the checkpoints would die with them and a "
            "restarted job could not resume; use s3://bucket/prefix (or another store every pod reaches) on Kubernetes"
        ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.lrr=0.1"], "error: optim.lrr: unknown field (did you mean 'lr'?)"),
        (["--image", "orchestrator:latest"], "error: --image orchestrator:latest: 'latest' is not a version"),
        (["--image", "orchestrator"], "error: --image orchestrator: pin a version tag"),
        (["--namespace", "Team_A"], "error: --namespace Team_A: must be lowercase"),
        (["--cluster", "9lives"], "error: --cluster 9lives: a RayCluster name"),
        (["--queue", "team-a", "--cluster", "orchestrator"], "error: --queue team-a: Kueue admits a RayJob"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    for command in ("render", "apply"):
        done = cli(command, str(JOB), *args)
        assert done.returncode == 2, done
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr


def test_missing_job_file_is_exit_2(tmp_path):
    done = cli("render", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2 and "no such job file" in done.stderr


def fake_kubectl(bin_dir: Path, *, apply_rc: int = 0) -> Path:
    """A stand-in for kubectl (there is no Kubernetes API server here): it has a context and records what it is asked to apply."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "kubectl"
    script.write_text(f"""#!/bin/sh
echo "$@" >> "{bin_dir}/calls"
case "$1 $2" in
  "config current-context") echo test-context ;;
  "apply -f") cat > "{bin_dir}/applied.yaml"
      if [ {apply_rc} -ne 0 ]; then echo 'error: resource mapping not found for kind "RayJob"' >&2; exit {apply_rc}; fi
      echo "configmap/x created"; echo "rayjob.ray.io/x created" ;;
  *) exit 3 ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_apply_pipes_the_rendered_manifests_to_kubectl_apply(tmp_path):
    bin_dir = fake_kubectl(tmp_path / "bin")
    done = cli(
        "apply", str(JOB), "--namespace", "orchestrator", env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    )
    assert done.returncode == 0, done.stderr
    assert "rayjob.ray.io/x created" in done.stdout
    assert (bin_dir / "calls").read_text().splitlines() == ["config current-context", "apply -f -"]
    spec = load_spec(JOB)
    assert list(yaml.safe_load_all((bin_dir / "applied.yaml").read_text())) == k8s.render_manifests(
        spec, k8s.job_file_text(spec)
    )
    name = k8s.render_manifests(spec)[1]["metadata"]["name"]
    assert f"kubectl -n orchestrator get rayjob {name}" in done.stderr


def test_apply_reports_kubectl_failure_as_exit_1(tmp_path):
    bin_dir = fake_kubectl(tmp_path / "bin", apply_rc=1)
    done = cli("apply", str(JOB), env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == 'failed: kubectl apply (context test-context): error: resource mapping not found for kind "RayJob"'
    )


def test_apply_without_kubectl_says_so(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    done = cli("apply", str(JOB), env={"PATH": str(empty)})
    assert done.returncode == 2
    assert done.stderr.startswith("error: kubectl: not found on PATH")


def test_apply_without_a_context_says_so_and_applies_nothing(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    done = cli("apply", str(JOB), env={"KUBECONFIG": str(kubeconfig)})
    assert done.returncode == 2, done
    assert done.stderr.startswith("error: kubectl: no current context")


def test_help_lists_both_commands():
    done = cli("--help")
    assert done.returncode == 0 and "render" in done.stdout and "apply" in done.stdout


def test_render_cv_renders_the_cross_validation_of_the_job_as_orchestrator_cv_reads_it():
    done = cli("render", str(ROOT / "jobs" / "cv_digits.yaml"), "checkpoint.storage=s3://b/runs", "--cv", "--refit")
    assert done.returncode == 0, done.stderr
    from orchestrator.cv import load_cv

    spec = load_cv(str(ROOT / "jobs" / "cv_digits.yaml"), ["checkpoint.storage=s3://b/runs"]).spec
    assert list(yaml.safe_load_all(done.stdout)) == k8s.render_manifests(
        spec, k8s.job_file_text(spec), command="cv", refit=True
    )
    for args, message in (
        (["--refit"], "error: --refit: follows a cross-validation; add --cv"),
        (["--cv", "data.folds=null"], "error: data.folds: cv needs the number of folds"),
    ):
        done = cli("render", str(ROOT / "jobs" / "cv_digits.yaml"), *args)
        assert done.returncode == 2 and done.stdout == "" and done.stderr.startswith(message), done.stderr
        assert len(done.stderr.splitlines()) == 1
