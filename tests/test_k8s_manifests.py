"""Every kustomize overlay and every `orchestrator k8s render` output is valid, hardened and self-consistent.

There is no Kubernetes API server here: objects are validated against the Kubernetes OpenAPI schemas
(kubernetes-validate) and the KubeRay CRDs' schemas in ../shared/kuberay-crds (see k8s_validation.py).
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import re
from pathlib import Path

import pytest
import yaml
from k8s_samples import K8S, OVERLAYS, ROOT, expected_samples
from k8s_validation import CRD_DIR, SECRET_LIKE, all_pod_specs, kuberay_errors, kustomize, validate_object

from orchestrator import k8s
from orchestrator.spec import build_spec, load_spec

# One xdist worker for the module: its tests share the rendered overlays.
pytestmark = pytest.mark.xdist_group("k8s_manifests")

JOB_FILES = sorted(ROOT.glob("jobs/*.yaml")) + sorted(K8S.glob("overlays/*/job.yaml"))
RENDER_VARIANTS = {
    "own-cluster": {},
    "on-cluster": {"cluster": "orchestrator"},
}
EXTRA_RENDERS = {
    "gpu": (["scaling.use_gpu=true", "scaling.num_workers=2"], {}),
    "driver-only": (["scaling.num_workers=0"], {}),
    "elastic": (["scaling.num_workers=[1, 3]"], {"worker_memory": "3Gi", "namespace": "ml-team"}),
    # `orchestrator k8s render --cv`: the folds side by side, on a cluster of their own or on a long-lived one.
    "cv": (["data.folds=3", "scaling.num_workers=2"], {"command": "cv", "refit": True}),
    "cv-on-cluster": (["data.folds=3"], {"command": "cv", "cluster": "orchestrator"}),
    # Through Kueue: labelled and suspended; and the pods as an existing ServiceAccount (none rendered).
    "queued": (["scaling.num_workers=2"], {"queue": "team-a"}),
    "cv-queued": (["data.folds=3"], {"command": "cv", "queue": "team-a"}),
    "service-account": ([], {"service_account": "orchestrator"}),
}


@pytest.fixture(scope="module")
def base_objects():
    return kustomize(K8S / "base")


SET_NAMES = (
    [f"overlay-{o}" for o in OVERLAYS]
    + [f"render-{path.parent.name}-{path.stem}-{variant}" for path in JOB_FILES for variant in RENDER_VARIANTS]
    + [f"render-{variant}" for variant in EXTRA_RENDERS]
)


@functools.cache
def manifest_set(name: str) -> tuple:
    """The objects of one overlay (kubectl kustomize) or one render, by its name in SET_NAMES."""
    if name.startswith("overlay-"):
        return tuple(kustomize(K8S / "overlays" / name.removeprefix("overlay-")))
    if name.removeprefix("render-") in EXTRA_RENDERS:
        overrides, options = EXTRA_RENDERS[name.removeprefix("render-")]
        spec = build_spec(yaml.safe_load((K8S / "overlays" / "cpu" / "job.yaml").read_text()), overrides)
        return tuple(k8s.render_manifests(spec, k8s.job_file_text(spec), **options))
    for path in JOB_FILES:
        for variant, options in RENDER_VARIANTS.items():
            if name == f"render-{path.parent.name}-{path.stem}-{variant}":
                # On Kubernetes checkpoints go to a store that outlives the pods (a local path is refused).
                spec = load_spec(path, [] if "s3://" in path.read_text() else ["checkpoint.storage=s3://runs/prefix"])
                return tuple(k8s.render_manifests(spec, k8s.job_file_text(spec), **options))
    raise KeyError(name)


def objects_of(name: str) -> list:
    import copy

    return copy.deepcopy(list(manifest_set(name)))


def test_the_crds_are_read_from_shared():
    assert sorted(p.name for p in CRD_DIR.glob("*.yaml")) == ["ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"]


@pytest.mark.parametrize("name", SET_NAMES)
def test_every_object_validates_against_its_schema(name):
    objects = objects_of(name)
    assert objects
    errors = [e for obj in objects for e in validate_object(obj) + kuberay_errors(obj)]
    assert errors == []


def test_the_validators_reject_what_an_api_server_would():
    rayjob = next(o for o in objects_of("overlay-cpu") if o["kind"] == "RayJob")
    typo = copy.deepcopy(rayjob)
    typo["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in validate_object(typo))
    wrong = copy.deepcopy(rayjob)
    wrong["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContext"][
        "runAsNonRoot"
    ] = "yes"
    assert validate_object(wrong)
    old = copy.deepcopy(rayjob)
    old["spec"]["rayClusterSpec"]["rayVersion"] = "2.40.0"
    assert any("2.52.0" in e for e in kuberay_errors(old))
    both = copy.deepcopy(rayjob)
    both["spec"]["clusterSelector"] = {"ray.io/cluster": "x"}
    assert any("exactly one" in e for e in kuberay_errors(both))
    # Kueue's requirements of a queued RayJob, each one: a cluster of its own, shut down, fixed size, suspended.
    queued = next(o for o in objects_of("render-queued") if o["kind"] == "RayJob")
    assert kuberay_errors(queued) == []
    for change, error in (
        (lambda s: s.pop("suspend"), "created suspended"),
        (lambda s: s.update(shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0), "shutdownAfterJobFinishes"),
        (lambda s: s["rayClusterSpec"].update(enableInTreeAutoscaling=True), "enableInTreeAutoscaling"),
        (lambda s: s.update(clusterSelector={"ray.io/cluster": "x"}), "existing"),
    ):
        wrong = copy.deepcopy(queued)
        change(wrong["spec"])
        assert any(error in e for e in kuberay_errors(wrong)), error
    netpol = next(o for o in objects_of("overlay-cpu") if o["kind"] == "NetworkPolicy")
    netpol["spec"]["ingress"][0]["from"][0]["podselector"] = {}
    assert validate_object(netpol)


@pytest.mark.parametrize("name", SET_NAMES)
def test_every_pod_is_hardened(name):
    objects = objects_of(name)
    pods = list(all_pod_specs(objects))
    assert pods
    for where, template in pods:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {
            "type": "RuntimeDefault"
        }, where
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert all("hostPath" not in v for v in pod.get("volumes", [])), where
        accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
        assert pod["serviceAccountName"] in accounts or name == "render-service-account", where
        long_lived_head = where.startswith("RayCluster/") and where.endswith(" head")
        assert pod["automountServiceAccountToken"] is long_lived_head, where
        tmp = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in pod["containers"]:
            k8s.check_image(c["image"])
            assert c["imagePullPolicy"] == "Always", where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (where, kind)
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            # Ray writes its sessions, logs and spilled objects under /tmp: a volume, since the root is read-only.
            assert any(m["mountPath"] == "/tmp" and m["name"] in tmp for m in c["volumeMounts"]), where
            if "submitter" not in where:
                for probe in ("livenessProbe", "readinessProbe"):
                    assert c[probe]["httpGet"] == {"path": "/api/healthz", "port": k8s.AGENT_PORT}, where
                assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"]), where
            for env in c.get("env", []):
                if SECRET_LIKE.search(env["name"]) and "FILE" not in env["name"]:
                    assert "value" not in env, (where, env["name"])


@pytest.mark.parametrize("name", SET_NAMES)
def test_references_resolve_and_a_network_policy_covers_every_pod(name, base_objects):
    objects = objects_of(name)
    # A rendered job brings what its pods need (its ServiceAccount, NetworkPolicy, ConfigMap): applied alone into an
    # existing namespace, nothing it names is missing. Only an account it was told to use (--service-account) is not
    # its own: the base's here.
    universe = objects + (
        [o for o in base_objects if o["kind"] == "ServiceAccount"] if name == "render-service-account" else []
    )
    present = {(o["kind"], o["metadata"]["name"]) for o in universe}
    policies = [o for o in universe if o["kind"] == "NetworkPolicy"]
    for where, template in all_pod_specs(objects):
        pod = template["spec"]
        assert ("ServiceAccount", pod["serviceAccountName"]) in present, where
        for v in pod["volumes"]:
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in present, where
            if "secret" in v:
                assert v["secret"].get("optional") is True, f"{where}: a Secret the user creates must not block the pod"
        for c in pod["containers"]:
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    assert ref.get("optional") or ("ConfigMap", ref["name"]) in present, where
        labels = template["metadata"]["labels"]
        assert any(p["spec"]["podSelector"]["matchLabels"].items() <= labels.items() for p in policies), (
            f"{where} escapes the NetworkPolicy"
        )
    if name.startswith("overlay"):
        namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
        assert namespaces == {"orchestrator"} and ("Namespace", "orchestrator") in present
        role = next(o for o in objects if o["kind"] == "Role")
        clusters = {o["metadata"]["name"] for o in objects if o["kind"] == "RayCluster"}
        raycluster_rule = next(r for r in role["rules"] if "rayclusters" in r["resources"])
        assert set(raycluster_rule["resourceNames"]) == clusters
        assert not any("*" in r["verbs"] or "*" in r["resources"] for r in role["rules"])
        binding = next(o for o in objects if o["kind"] == "RoleBinding")
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert all(("ServiceAccount", s["name"]) in present for s in binding["subjects"])
        assert not any(o["kind"] == "Secret" for o in objects)


def test_network_policy_lets_only_the_namespace_reach_gcs_dashboard_and_client(base_objects):
    (policy,) = [o for o in base_objects if o["kind"] == "NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ray_ports = {k8s.GCS_PORT, k8s.DASHBOARD_PORT, k8s.CLIENT_PORT}
    opened: dict[int, list] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            if "namespaceSelector" in peer:
                # Another namespace only by its name, and only the KubeRay operator's pods in it.
                assert set(peer["namespaceSelector"]["matchLabels"]) == {"kubernetes.io/metadata.name"}
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
                assert [p["port"] for p in rule["ports"]] == [k8s.DASHBOARD_PORT]
        for port in [p["port"] for p in rule.get("ports", [])] or ["any"]:
            opened.setdefault(port, []).extend(rule["from"])
    assert ray_ports <= set(opened)
    for port in ray_ports:
        assert {"podSelector": {}} in opened[port]


def test_samples_under_k8s_are_what_the_code_renders():
    for path, expected in expected_samples().items():
        actual = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert [o["kind"] for o in actual] == [o["kind"] for o in expected], path
        if expected[-1]["kind"] == "RayJob":
            # Names carry a hash of the full job file, which grows when JobSpec gains a field:
            # compare the job semantically and everything else with the name abstracted.
            got_name, want_name = actual[-1]["metadata"]["name"], expected[-1]["metadata"]["name"]
            job_files = [next(o for o in objects if o["kind"] == "ConfigMap")["data"] for objects in (actual, expected)]
            assert build_spec(yaml.safe_load(job_files[0][k8s.JOB_FILE])) == build_spec(
                yaml.safe_load(job_files[1][k8s.JOB_FILE])
            ), path
            for o in actual + expected:
                o.get("data", {}).pop(k8s.JOB_FILE, None)
            actual = yaml.safe_load(yaml.safe_dump(actual).replace(got_name, "NAME"))
            expected = yaml.safe_load(yaml.safe_dump(expected).replace(want_name, "NAME"))
        assert actual == expected, f"{path.relative_to(ROOT)} is stale: run python tests/k8s_samples.py"


def test_overlays_patch_what_they_promise():
    cpu, gpu = objects_of("overlay-cpu"), objects_of("overlay-gpu")
    cpu_cluster = next(o for o in cpu if o["kind"] == "RayCluster")
    workers = cpu_cluster["spec"]["workerGroupSpecs"][0]
    assert workers["maxReplicas"] == 2 and workers["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "1",
        "memory": "2Gi",
    }
    for obj in (o for o in gpu if o["kind"] in ("RayCluster", "RayJob")):
        spec = obj["spec"].get("rayClusterSpec", obj["spec"])
        pod = spec["workerGroupSpecs"][0]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["tolerations"] == k8s.GPU_TOLERATIONS and pod["nodeSelector"] == k8s.GPU_NODE_SELECTOR
        shm = next(v for v in pod["volumes"] if v["name"] == "shared-mem")["emptyDir"]
        assert shm["medium"] == "Memory" and k8s.parse_memory_mi(shm["sizeLimit"]) >= 8192
        assert all(c["image"].endswith("-gpu") for c in pod["containers"])
    s3 = objects_of("overlay-s3")
    endpoint = next(o for o in s3 if o["kind"] == "ConfigMap" and o["metadata"]["name"] == k8s.S3_ENDPOINT_CONFIGMAP)
    assert endpoint["data"]["endpoint_url"].startswith("http")
    rayjob = next(o for o in s3 if o["kind"] == "RayJob")
    env = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": "AWS_ENDPOINT_URL",
        "valueFrom": {"configMapKeyRef": {"name": k8s.S3_ENDPOINT_CONFIGMAP, "key": "endpoint_url", "optional": True}},
    } in env


def test_one_ray_version_everywhere():
    installed = importlib.metadata.version("ray")
    assert k8s.RAY_VERSION == installed
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1) == installed
    for objects in map(objects_of, SET_NAMES):
        for o in objects:
            spec = o.get("spec", {}) if o["kind"] == "RayCluster" else (o.get("spec", {}).get("rayClusterSpec") or {})
            if spec:
                assert spec["rayVersion"] == installed


def test_dockerfile_builds_on_rays_image_and_runs_as_non_root():
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${DEVICE}"]
    assert "latest" not in " ".join(lines).lower()
    user = [line.split()[1] for line in lines if line.startswith("USER ")][-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) == k8s.RAY_UID and int(gid) == k8s.RAY_GID
    install = next(line for line in lines if "pip install" in line)
    assert '"ray[train,tune]==${RAY_VERSION}"' in install and " . " in install + " "
    assert re.search(r"^ARG DEVICE=cpu$", "\n".join(lines), re.M)


def test_readme_covers_the_workflow():
    text = (K8S / "README.md").read_text()
    for needle in (
        "helm install kuberay-operator",
        "docker build",
        "docker push",
        "orchestrator k8s render",
        "orchestrator k8s apply",
        "kubectl kustomize",
        "logs -f",
        "checkpoint",
        "backoffLimit",
        "orchestrator-s3-credentials",
    ):
        assert needle in text, needle
    assert Path(K8S / "security-exceptions.yaml").is_file()
