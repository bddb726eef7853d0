"""Checks of rendered Kubernetes manifests without a cluster (there is no API server here).

Core objects are validated against the Kubernetes OpenAPI schemas that kubernetes-validate ships;
RayJob and RayCluster against the openAPIV3Schema of the KubeRay CRDs in ../shared/kuberay-crds/,
read at test time, made strict (an unknown field is an error, as a typo would be silently pruned by
the API server). The pod templates inside them are also validated as core PodTemplateSpecs.
The rules KubeRay's operator enforces when it reconciles (names, auth, TTL) are mirrored here.
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
KUBERNETES_VERSION = "1.32"  # the kubectl on these machines
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SECRET_LIKE = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE", re.I)


def kustomize(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of a directory, as objects."""
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path} failed: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _strict(schema: Any) -> Any:
    """Forbid unknown fields wherever the CRD lists the known ones and does not keep unknown ones."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict openAPIV3Schema, from every CRD file in ../shared/kuberay-crds/."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return out


def _schema_errors(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in validator.iter_errors(obj)]


def _core_errors(obj: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path) or '(root)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, pod template) of a RayJob or RayCluster: head, each worker group, the RayJob's submitter."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]
        spec = spec.get("rayClusterSpec") or {}
    if obj.get("kind") in ("RayJob", "RayCluster") and spec.get("headGroupSpec"):
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs") or []:
            yield f"worker-{group['groupName']}", group["template"]


def validate_object(obj: dict[str, Any]) -> list[str]:
    """Schema errors of one object: core schemas, or the KubeRay CRD schema plus core PodTemplateSpecs inside."""
    where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in crd_schemas():
        errors = _schema_errors(obj, crd_schemas()[key])
        meta = obj.get("metadata") or {}
        if not DNS1123.match(meta.get("name", "")) or ("namespace" in meta and not DNS1123.match(meta["namespace"])):
            errors.append(f"metadata: bad name or namespace {meta}")
        for role, template in pod_templates(obj):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            errors += [f"{role} pod template: {e}" for e in _core_errors(wrapped)]
    else:
        errors = _core_errors(obj)
    return [f"{where}: {e}" for e in errors]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def kuberay_errors(obj: dict[str, Any]) -> list[str]:
    """What KubeRay's validation (ray-operator/controllers/ray/utils/validation.go) would refuse."""
    errors: list[str] = []
    kind, name, spec = obj.get("kind"), obj["metadata"]["name"], obj.get("spec") or {}
    if kind not in ("RayJob", "RayCluster"):
        return errors
    limit = 47 if kind == "RayJob" else 63
    if len(name) > limit or not DNS1035.match(name):
        errors.append(f"{kind}/{name}: name must be a DNS-1035 label of at most {limit} characters")
    cluster = spec.get("rayClusterSpec") if kind == "RayJob" else spec
    if kind == "RayJob":
        selector = spec.get("clusterSelector") or {}
        if bool(selector) == bool(cluster):
            errors.append(f"RayJob/{name}: exactly one of rayClusterSpec and clusterSelector")
        if selector and not selector.get("ray.io/cluster"):
            errors.append(f"RayJob/{name}: clusterSelector needs ray.io/cluster")
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
            errors.append(f"RayJob/{name}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if selector and spec.get("shutdownAfterJobFinishes"):
            errors.append(f"RayJob/{name}: a RayJob on an existing cluster must not shut it down")
        if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
            errors.append(f"RayJob/{name}: activeDeadlineSeconds must be positive")
        if spec.get("backoffLimit") is not None and spec["backoffLimit"] < 0:
            errors.append(f"RayJob/{name}: backoffLimit must be >= 0")
        if spec.get("submissionMode") == "SidecarMode" and (selector or spec.get("submitterPodTemplate")):
            errors.append(f"RayJob/{name}: SidecarMode takes neither a clusterSelector nor a submitterPodTemplate")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append(f"RayJob/{name}: a RayJob with shutdownAfterJobFinishes false cannot be suspended")
        if spec.get("suspend") and selector:
            errors.append(f"RayJob/{name}: a RayJob on an existing cluster (clusterSelector) cannot be suspended")
        errors += _kueue_errors(obj)
        yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    if cluster:
        if (cluster.get("authOptions") or {}).get("mode") == "token":
            if not cluster.get("rayVersion") or _version_tuple(cluster["rayVersion"]) < (2, 52, 0):
                errors.append(f"{kind}/{name}: token authentication needs rayVersion >= 2.52.0")
        groups = [("head", cluster["headGroupSpec"])] + [
            (g["groupName"], g) for g in cluster.get("workerGroupSpecs") or []
        ]
        for group, g in groups:
            params = g.get("rayStartParams") or {}
            if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
                errors.append(f"{kind}/{name} {group}: resources in both rayStartParams and resources")
            if "labels" in params:
                errors.append(f"{kind}/{name} {group}: rayStartParams labels is not supported")
            if not g["template"]["spec"].get("containers"):
                errors.append(f"{kind}/{name} {group}: no container")
        for g in cluster.get("workerGroupSpecs") or []:
            if not (g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 2**31 - 1)):
                errors.append(f"{kind}/{name} {g['groupName']}: replicas outside [minReplicas, maxReplicas]")
    return errors


KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"


def _kueue_errors(obj: dict[str, Any]) -> list[str]:
    """What Kueue requires of a RayJob it queues (kueue.sigs.k8s.io/docs/tasks/run/rayjobs, "Limitations")."""
    queue = (obj["metadata"].get("labels") or {}).get(KUEUE_QUEUE)
    if queue is None:
        return []
    name, spec = obj["metadata"]["name"], obj["spec"]
    cluster = spec.get("rayClusterSpec") or {}
    errors = []
    if spec.get("clusterSelector") or not cluster:
        errors.append(f"RayJob/{name}: Kueue cannot queue a RayJob on an existing RayCluster")
    if not spec.get("shutdownAfterJobFinishes"):
        errors.append(f"RayJob/{name}: Kueue needs shutdownAfterJobFinishes: true")
    if cluster.get("enableInTreeAutoscaling"):
        errors.append(f"RayJob/{name}: Kueue reserves the whole cluster: enableInTreeAutoscaling must be false")
    if len(cluster.get("workerGroupSpecs") or []) > 7:
        errors.append(f"RayJob/{name}: Kueue takes at most 8 pod sets (7 worker groups)")
    if spec.get("suspend") is not True:
        errors.append(f"RayJob/{name}: a queued RayJob is created suspended, to start only once Kueue admits it")
    for role, template in pod_templates(obj):
        for container in template["spec"]["containers"]:
            if not (container.get("resources") or {}).get("requests"):
                errors.append(f"RayJob/{name} {role}: Kueue counts requests; {container['name']} has none")
    return errors


def all_pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template in a set of objects, custom resources included."""
    for obj in objects:
        for role, template in pod_templates(obj):
            yield f"{obj['kind']}/{obj['metadata']['name']} {role}", template


def as_scannable(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects plus each RayJob/RayCluster pod template as what KubeRay makes of it: a Pod
    (head, workers) or a batch Job (the submitter), so scanners that skip custom resources see them."""
    out = [copy.deepcopy(o) for o in objects]
    for obj in objects:
        meta = obj["metadata"]
        for role, template in pod_templates(obj):
            name = f"{meta['name']}-{role}"[:63].rstrip("-")
            tmeta = {
                "name": name,
                "namespace": meta.get("namespace", "default"),
                "labels": dict((template.get("metadata") or {}).get("labels") or {}),
            }
            if role == "submitter":
                out.append(
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "metadata": tmeta,
                        "spec": {"template": copy.deepcopy(template)},
                    }
                )
            else:
                out.append(
                    {"apiVersion": "v1", "kind": "Pod", "metadata": tmeta, "spec": copy.deepcopy(template["spec"])}
                )
    return out
