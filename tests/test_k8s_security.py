"""Static security scan: checkov's Kubernetes checks pass on every overlay and rendered job, and its
Dockerfile checks on the job image, except the checks k8s/security-exceptions.yaml lists with a reason.

checkov pins packages the project's venv cannot share, so it lives in .venv-scan, which
tests/k8s_scan_setup.sh creates (from PyPI) on first use.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from k8s_samples import K8S, OVERLAYS, ROOT
from k8s_validation import as_scannable, kustomize

from orchestrator import k8s
from orchestrator.spec import build_spec, load_spec

# One xdist worker for the module: its tests share the scanner's one install check.
pytestmark = pytest.mark.xdist_group("k8s_security")

SCAN_VENV = ROOT / ".venv-scan"
EXCEPTIONS = K8S / "security-exceptions.yaml"


@pytest.fixture(scope="session")
def checkov() -> Path:
    exe = SCAN_VENV / "bin" / "checkov"
    done = subprocess.run(
        ["bash", str(ROOT / "tests" / "k8s_scan_setup.sh")], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0 and exe.exists(), (
        f"could not install checkov: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    )
    return exe


def run_checkov(checkov: Path, args: list[str]) -> list[dict]:
    """checkov's reports (JSON), offline: no guideline download, no telemetry."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false", "LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [str(checkov), *args, "-o", "json", "--compact", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode in (0, 1), f"checkov failed to run: {done.stderr[-3000:]}"
    reports = json.loads(done.stdout)
    return reports if isinstance(reports, list) else [reports]


def exceptions() -> list[dict]:
    entries = yaml.safe_load(EXCEPTIONS.read_text())
    for e in entries:
        assert set(e) == {"check", "name", "resources", "reason"} and len(e["reason"]) > 80, e
    return entries


def excused(finding: dict, entries: list[dict]) -> dict | None:
    return next(
        (
            e
            for e in entries
            if e["check"] == finding["check_id"]
            and any(fnmatch.fnmatch(finding["resource"], p) for p in e["resources"])
        ),
        None,
    )


def job_spec(path: Path):
    """An example job as it goes to Kubernetes: checkpoints to S3 (a local path is refused there)."""
    return load_spec(path, [] if "s3://" in path.read_text() else ["checkpoint.storage=s3://runs/prefix"])


def scanned_sets() -> dict[str, list[dict]]:
    """Every overlay, and renders of every job file on its own cluster, on the long-lived one and through Kueue, GPU
    included."""
    out = {f"overlay-{o}": kustomize(K8S / "overlays" / o) for o in OVERLAYS}
    for path in sorted(ROOT.glob("jobs/*.yaml")):
        spec = job_spec(path)
        out[f"render-{path.stem}"] = k8s.render_manifests(spec)
        out[f"render-{path.stem}-on-cluster"] = k8s.render_manifests(spec, cluster="orchestrator")
    gpu = build_spec(yaml.safe_load((K8S / "overlays" / "gpu" / "job.yaml").read_text()), ["scaling.num_workers=0"])
    out["render-gpu-driver-only"] = k8s.render_manifests(gpu)
    out["render-gpu-queued"] = k8s.render_manifests(gpu, queue="team-a")
    return out


@pytest.mark.slow  # checkov's scan: tens of seconds
def test_kubernetes_scan_passes_with_only_the_listed_exceptions(checkov, tmp_path):
    sets = scanned_sets()
    workloads = set()
    for name, objects in sets.items():
        scannable = as_scannable(objects)
        workloads |= {
            f"{o['kind']}.{o['metadata']['namespace']}.{o['metadata']['name']}"
            for o in scannable
            if o["kind"] in ("Pod", "Job")
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(scannable, sort_keys=False))
    reports = run_checkov(checkov, ["-d", str(tmp_path), "--framework", "kubernetes"])
    results = [r for r in reports if r.get("check_type") == "kubernetes"]
    assert results, reports
    passed = [c for r in results for c in r["results"]["passed_checks"]]
    failed = [c for r in results for c in r["results"]["failed_checks"]]
    # The pods inside the custom resources were scanned, not just the core objects.
    assert workloads and workloads <= {c["resource"] for c in passed + failed}
    assert {c["resource"].split(".")[0] for c in passed} >= {"Pod", "Job", "Role", "ServiceAccount"}
    entries = exceptions()
    unexcused = sorted(
        {
            f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
            for c in failed
            if not excused(c, entries)
        }
    )
    assert unexcused == []
    unused = [e["check"] for e in entries if not any(excused(c, [e]) for c in failed)]
    assert unused == [], "exceptions no finding needs any more: remove them from k8s/security-exceptions.yaml"


@pytest.mark.slow  # checkov's scan: tens of seconds
def test_scan_catches_an_insecure_pod(checkov, tmp_path):
    spec = load_spec(K8S / "overlays" / "cpu" / "job.yaml")
    objects = k8s.render_manifests(spec)
    rayjob = next(o for o in objects if o["kind"] == "RayJob")
    container = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["securityContext"].update(allowPrivilegeEscalation=True, privileged=True, readOnlyRootFilesystem=False)
    del container["resources"]["limits"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump_all(as_scannable(objects)))
    reports = run_checkov(checkov, ["-d", str(tmp_path), "--framework", "kubernetes"])
    failed = {
        c["check_id"]
        for r in reports
        for c in r["results"]["failed_checks"]
        if c["resource"].startswith("Pod.") and "worker" in c["resource"]
    }
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_11", "CKV_K8S_13"} <= failed


@pytest.mark.slow  # checkov's scan: tens of seconds
def test_dockerfile_scan_passes(checkov):
    reports = run_checkov(checkov, ["-f", str(ROOT / "Dockerfile"), "--framework", "dockerfile"])
    (report,) = [r for r in reports if r.get("check_type") == "dockerfile"]
    assert report["summary"]["passed"] > 0
    assert report["summary"]["failed"] == 0, report["results"].get("failed_checks")


# ----------------------------------------------------------------------------------------------
# RBAC: each service account gets only the verbs its pods use

# What Ray 2.60's KubeRay autoscaler (in the long-lived head) asks of the API server: its head pod
# (get) and worker pods by label (list), and its own RayCluster (get, and JSON patches of replicas,
# workersToDelete and finalizers). test_the_autoscaler_patches_only_its_raycluster keeps this honest.
AUTOSCALER_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {
        "apiGroups": ["ray.io"],
        "resources": ["rayclusters"],
        "resourceNames": ["orchestrator"],
        "verbs": ["get", "patch"],
    },
]


def token_pods(objs: list[dict]) -> list[tuple[str, str]]:
    """(object/pod template, service account) of every pod that mounts an API token."""
    out = []
    accounts = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceAccount"}

    def visit(node, where):
        if isinstance(node, dict):
            if "containers" in node and "serviceAccountName" in node:
                account = node["serviceAccountName"]
                default = accounts.get(account, {}).get("automountServiceAccountToken", True)
                if node.get("automountServiceAccountToken", default):
                    out.append((where, account))
            for key, value in node.items():
                visit(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                visit(value, f"{where}/{i}")

    for o in objs:
        visit(o, f"{o['kind']}/{o['metadata']['name']}")
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_rbac_grants_only_what_the_autoscaler_uses(overlay):
    objs = kustomize(K8S / "overlays" / overlay)
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "nothing here needs cluster-wide rights"
    roles = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Role"}
    bindings = [o for o in objs if o["kind"] == "RoleBinding"]
    assert [b["roleRef"]["name"] for b in bindings] == ["orchestrator-autoscaler"]
    assert bindings[0]["subjects"] == [{"kind": "ServiceAccount", "name": "orchestrator", "namespace": "orchestrator"}]
    assert list(roles) == ["orchestrator-autoscaler"]
    assert roles["orchestrator-autoscaler"]["rules"] == AUTOSCALER_RULES
    # Only the long-lived head (the autoscaler's pod) holds a token; the RayJob's pods and all workers do not.
    assert [where for where, _ in token_pods(objs)] == ["RayCluster/orchestrator/spec/headGroupSpec/template/spec"]


def test_rendered_jobs_carry_no_rbac_and_mount_no_token():
    for path in sorted(ROOT.glob("jobs/*.yaml")):
        for cluster in (None, "orchestrator"):
            objs = k8s.render_manifests(job_spec(path), cluster=cluster)
            assert not [o for o in objs if "Role" in o["kind"]]
            assert token_pods(objs) == [], (path.name, cluster)


def test_the_autoscaler_patches_only_its_raycluster():
    """The verbs above come from Ray's KubeRay provider: it patches rayclusters and nothing else, and never watches."""
    import ray.autoscaler.v2.instance_manager.cloud_providers.kuberay.cloud_provider as provider

    source = Path(provider.__file__).read_text()
    # Every API path it builds: its RayCluster by name, pods by label (list) and its head pod by name (get).
    paths = set(re.findall(r'f?"([a-z]+)([/?])', source)) - {("application", "/")}  # a content type
    assert paths == {("rayclusters", "/"), ("pods", "?"), ("pods", "/")}, paths
    # What it patches: a RayCluster literal, or `path`, which is only ever assigned a RayCluster's path
    # (`remote_path` is _patch's own parameter, handed to the client).
    targets = set(re.findall(r"(?:self\._patch|_k8s_api_client\.patch)\(\s*([^,\s]+)", source)) - {"remote_path"}
    assert targets == {'f"rayclusters/{self._cluster_name}"', "path"}, targets
    assigned = set(re.findall(r"\bpath = (f?\"[^\"]*\")", source))
    assert assigned == {'f"rayclusters/{self._cluster_name}"'}, assigned
    assert "watch" not in source.lower()
