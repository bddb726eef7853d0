"""Kubernetes through KubeRay: render a job as a `RayJob` (its own cluster, torn down after) or as one
that runs on a long-lived `RayCluster`, then hand the manifests to kubectl.

Render, then act: `render_manifests` and `render_raycluster` are pure functions returning plain dicts;
`apply_manifests` is the only step with side effects. This module imports neither torch nor ray.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import subprocess
from typing import Any

import yaml

from orchestrator import __version__, storage
from orchestrator.errors import BadInput, RunFailed
from orchestrator.spec import JobSpec, load_spec

# The Ray of the job image (the Dockerfile's base); tests check that it is the Ray this package runs with.
RAY_VERSION = "2.60.0"
DEFAULT_NAMESPACE = "orchestrator"
SERVICE_ACCOUNT = "orchestrator"
# Storage credentials: a Secret the user creates (an AWS shared-credentials file under the key
# `credentials`), mounted as a file; an IAM role on the ServiceAccount works when it is absent.
S3_SECRET = "orchestrator-s3-credentials"
S3_SECRET_DIR = "/etc/orchestrator/s3"
# An S3-compatible endpoint (MinIO, Ceph) comes from this ConfigMap's `endpoint_url` when it exists.
S3_ENDPOINT_CONFIGMAP = "orchestrator-s3-endpoint"
# Kubernetes refuses a ConfigMap over 1 MiB (its whole object); leave room for the metadata.
MAX_CONFIGMAP_BYTES = 1024 * 1024 - 16 * 1024
# The job file is mounted in the submitter pod and uploaded as the Ray job's working_dir, so the
# driver finds it in its working directory on a per-job cluster and on a long-lived one alike.
JOB_DIR = "/etc/orchestrator/job"
JOB_FILE = "job.yaml"
# RAY_ADDRESS is set by Ray's job supervisor; `--address auto` makes the driver attach to it.
ENTRYPOINT = f"python -m orchestrator run {JOB_FILE} --address auto --json"
# The commands a RayJob can run on the job file: one run, or its k-fold cross-validation (`orchestrator cv`).
COMMANDS = ("run", "cv")
# The `ray` user of Ray's images (uid 1000, group users).
RAY_UID, RAY_GID = 1000, 100
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, AGENT_PORT = 6379, 8265, 10001, 52365
HEALTH_PATH = "/api/healthz"
DEFAULT_TTL_SECONDS = 600
DEFAULT_DEADLINE_SECONDS = 7 * 24 * 3600
MAX_RAYJOB_NAME = 47  # KubeRay's limit: the cluster and service names it derives must stay <= 63
INT32_MAX = 2**31 - 1
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_NAME = re.compile(rf"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$")
IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
IMAGE_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")


# ----------------------------------------------------------------------------------------------
# Checks of what the user typed: each raises BadInput with one line


def default_image(spec: JobSpec | None = None) -> str:
    """The image `docker build` makes from this checkout: `orchestrator:<version>` (`-gpu` for GPU jobs)."""
    gpu = spec is not None and spec.scaling.use_gpu
    return f"orchestrator:{__version__}{'-gpu' if gpu else ''}"


def check_image(image: str) -> str:
    """An image reference pinned to a version tag or a digest; `latest` and untagged images are refused."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = None
    if ":" in last:
        name, _, tag = name.rpartition(":")
    if not IMAGE_NAME.match(name):
        raise BadInput(f"--image {image}: not an image reference (registry/name:tag)")
    if digest and not IMAGE_DIGEST.match(digest):
        raise BadInput(f"--image {image}: a digest looks like @sha256:<64 hex digits>")
    if tag is not None and not IMAGE_TAG.match(tag):
        raise BadInput(f"--image {image}: {tag!r} is not a valid tag")
    if tag is None and not digest:
        raise BadInput(
            f"--image {image}: pin a version tag (e.g. {name}:{__version__}) or a digest; an untagged image means latest"
        )
    if tag is not None and tag.lower() == "latest":
        raise BadInput(f"--image {image}: 'latest' is not a version; pin a tag (e.g. {name}:{__version__}) or a digest")
    return image


def check_namespace(namespace: str) -> str:
    """A Kubernetes namespace name (DNS-1123 label)."""
    if not DNS1123_LABEL.match(namespace):
        raise BadInput(
            f"--namespace {namespace}: must be lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit"
        )
    return namespace


def check_cluster_name(cluster: str) -> str:
    """A RayCluster name (DNS-1035 label, as KubeRay requires)."""
    if not DNS1035_LABEL.match(cluster):
        raise BadInput(
            f"--cluster {cluster}: a RayCluster name is lowercase letters, digits and '-', starting with a letter, at most 63"
        )
    return cluster


def parse_memory_mi(quantity: str, what: str = "--worker-memory") -> int:
    """A Kubernetes memory quantity (`8Gi`, `512Mi`, `4G`) in MiB."""
    m = QUANTITY.match(quantity.strip())
    if not m:
        raise BadInput(f"{what} {quantity}: a memory size looks like 8Gi or 512Mi")
    factor = {
        None: 1 / 2**20,
        "Ki": 1 / 1024,
        "Mi": 1,
        "Gi": 1024,
        "Ti": 1024**2,
        "k": 1e3 / 2**20,
        "M": 1e6 / 2**20,
        "G": 1e9 / 2**20,
        "T": 1e12 / 2**20,
    }[m.group(2)]
    mib = int(float(m.group(1)) * factor)
    if mib < 512:
        raise BadInput(f"{what} {quantity}: Ray needs at least 512Mi per pod")
    return mib


def storage_warnings(spec: JobSpec) -> list[str]:
    """What in the job will not survive or not exist on Kubernetes, one line each (the render still goes on)."""
    out = []
    if "://" not in spec.checkpoint.storage or spec.checkpoint.storage.startswith("file://"):
        out.append(
            f"checkpoint.storage: {spec.checkpoint.storage} is a path inside the pods: checkpoints die with the cluster and workers "
            "on other pods cannot share them; use s3://bucket/prefix (or another shared store) on Kubernetes"
        )
    if spec.data.path and "://" not in spec.data.path:
        out.append(f"data.path: {spec.data.path} must exist inside the image (or use s3://...)")
    if spec.model.init_from and "://" not in spec.model.init_from:
        out.append(f"model.init_from: {spec.model.init_from} must exist inside the image (or use s3://...)")
    return out


# ----------------------------------------------------------------------------------------------
# Small pure helpers


def job_file_text(spec: JobSpec) -> str:
    """The resolved job (overrides applied, defaults filled in) as the YAML the cluster runs."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


def job_resource_name(spec: JobSpec, fingerprint: str, name: str | None = None) -> str:
    """A RayJob name: the job name (or `name`) as a DNS-1035 label plus a content hash, at most 47 characters."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", (name or spec.name).lower())).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"job-{slug}".rstrip("-")
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:8]
    return f"{slug[: MAX_RAYJOB_NAME - len(digest) - 1].rstrip('-')}-{digest}"


def cpu_quantity(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(round(cpus * 1000))}m"


def memory_quantity(mib: int) -> str:
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def labels(instance: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "orchestrator",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "orchestrator",
        "app.kubernetes.io/managed-by": "orchestrator",
    }


def container_security_context() -> dict[str, Any]:
    """Non-root, no privilege escalation, no capabilities, read-only root (Ray writes only to its volumes)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "fsGroup": RAY_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def cache_env() -> list[dict[str, Any]]:
    # The root filesystem is read-only: caches that default to $HOME go under the /tmp volume.
    return [
        {"name": "HOME", "value": "/tmp/home"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
    ]


def storage_env() -> list[dict[str, Any]]:
    """Where the storage client finds credentials and endpoint: a mounted file and an optional ConfigMap, never a value."""
    return [
        {"name": "AWS_SHARED_CREDENTIALS_FILE", "value": f"{S3_SECRET_DIR}/credentials"},
        {
            "name": "AWS_ENDPOINT_URL",
            "valueFrom": {"configMapKeyRef": {"name": S3_ENDPOINT_CONFIGMAP, "key": "endpoint_url", "optional": True}},
        },
    ]


def ray_probe(path: str, port: int, *, liveness: bool) -> dict[str, Any]:
    """Ray's own health endpoints (public under token auth); liveness is patient so a busy node is not killed."""
    probe: dict[str, Any] = {"httpGet": {"path": path, "port": port}, "timeoutSeconds": 5}
    if liveness:
        probe.update(initialDelaySeconds=30, periodSeconds=10, failureThreshold=30)
    else:
        probe.update(initialDelaySeconds=10, periodSeconds=5, failureThreshold=10)
    return probe


def ray_volumes(shm_mib: int) -> list[dict[str, Any]]:
    return [
        {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
        # Ray's object store and NCCL use /dev/shm; the runtime's default 64Mi is far too small.
        {"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": memory_quantity(shm_mib)}},
        {"name": "s3-credentials", "secret": {"secretName": S3_SECRET, "optional": True, "defaultMode": 0o440}},
    ]


def ray_volume_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shared-mem", "mountPath": "/dev/shm"},
        {"name": "s3-credentials", "mountPath": S3_SECRET_DIR, "readOnly": True},
    ]


def resources(cpus: float, memory_mib: int, gpus: int = 0) -> dict[str, Any]:
    # Requests equal limits: Ray sizes itself from the limits, and a Guaranteed pod is evicted last.
    amount = {"cpu": cpu_quantity(cpus), "memory": memory_quantity(memory_mib)}
    if gpus:
        amount["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amount), "limits": dict(amount)}


def ray_pod_template(
    *,
    instance: str,
    component: str,
    image: str,
    cpus: float,
    memory_mib: int,
    gpus: int,
    head: bool,
    service_account_token: bool = False,
) -> dict[str, Any]:
    """The pod of a Ray head or worker: hardened, sized, with Ray's probes and writable volumes."""
    container: dict[str, Any] = {
        "name": "ray-head" if head else "ray-worker",
        "image": image,
        "imagePullPolicy": "Always",
        "env": cache_env() + storage_env(),
        "resources": resources(cpus, memory_mib, gpus),
        "securityContext": container_security_context(),
        "volumeMounts": ray_volume_mounts(),
    }
    if head:
        container["ports"] = [
            {"name": "gcs-server", "containerPort": GCS_PORT},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "client", "containerPort": CLIENT_PORT},
        ]
    # The dashboard agent's unified check: the raylet, and on the head the GCS too (what KubeRay probes for Ray >= 2.53).
    container["readinessProbe"] = ray_probe(HEALTH_PATH, AGENT_PORT, liveness=False)
    container["livenessProbe"] = ray_probe(HEALTH_PATH, AGENT_PORT, liveness=True)
    spec: dict[str, Any] = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": service_account_token,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": ray_volumes(max(512, memory_mib // 4) if not gpus else max(2048, memory_mib // 2)),
    }
    if gpus:
        spec["nodeSelector"] = dict(GPU_NODE_SELECTOR)
        spec["tolerations"] = [dict(t) for t in GPU_TOLERATIONS]
    return {"metadata": {"labels": labels(instance, component)}, "spec": spec}


def submitter_pod_template(*, instance: str, image: str, configmap: str) -> dict[str, Any]:
    """The pod that runs `ray job submit` (KubeRay fills in the command): it mounts the job file to upload it."""
    return {
        "metadata": {"labels": labels(instance, "ray-job-submitter")},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": SERVICE_ACCOUNT,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": pod_security_context(),
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": image,
                    "imagePullPolicy": "Always",
                    "env": cache_env(),
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "512Mi"},
                        "limits": {"cpu": "1", "memory": "1Gi"},
                    },
                    "securityContext": container_security_context(),
                    "volumeMounts": [
                        {"name": "job-file", "mountPath": JOB_DIR, "readOnly": True},
                        {"name": "tmp", "mountPath": "/tmp"},
                    ],
                }
            ],
            "volumes": [
                {"name": "job-file", "configMap": {"name": configmap, "defaultMode": 0o444}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            ],
        },
    }


def worker_size(spec: JobSpec, worker_memory: str | None) -> tuple[int, int, int]:
    """(CPUs, GPUs, MiB) of one worker pod, which hosts one Ray Train worker."""
    cpus = max(1, math.ceil(spec.scaling.cpus_per_worker))
    gpus = math.ceil(spec.scaling.gpus_per_worker or 1) if spec.scaling.use_gpu else 0
    # The job file has no memory field: 4Gi per CPU (8Gi more per GPU) unless --worker-memory says otherwise.
    mib = parse_memory_mi(worker_memory) if worker_memory else 4096 * cpus + 8192 * gpus
    return cpus, gpus, mib


def ray_cluster_spec(
    spec: JobSpec, *, instance: str, image: str, worker_memory: str | None, side_by_side: int = 1
) -> dict[str, Any]:
    """A RayClusterSpec sized from `scaling`: one worker pod per Ray Train worker, the head runs only the driver.

    `side_by_side` runs of the job at once (a cross-validation's folds) get that many times the worker pods.
    """
    cpus, gpus, mib = worker_size(spec, worker_memory)
    workers = spec.scaling.max_workers
    head_params = {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    head_cpus, head_mib, head_gpus = 1, 4096, 0
    if side_by_side > 1:
        # Each fold is a Tune trial: with workers <= 1 it trains in the trial's own process, which reserves a worker
        # pod's CPUs like a Ray Train worker would; with more, the trial only waits on its Ray Train run (0.01 CPU),
        # and it waits on the head: on a worker pod it would take the sliver a Ray Train worker needs whole.
        if workers > 1:
            head_params["num-cpus"] = "1"
        workers = max(1, workers) * side_by_side
    elif workers == 0:
        # num_workers=0 trains in the driver, on the head: it gets the worker's share.
        head_params["num-cpus"] = str(cpus)
        head_cpus, head_mib, head_gpus = 1 + cpus, 4096 + mib, gpus
        if gpus:
            head_params["num-gpus"] = str(gpus)
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": False,
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            "rayStartParams": head_params,
            "template": ray_pod_template(
                instance=instance,
                component="ray-head",
                image=image,
                cpus=head_cpus,
                memory_mib=head_mib,
                gpus=head_gpus,
                head=True,
            ),
        },
    }
    if workers:
        params = {"num-cpus": str(cpus)}
        if gpus:
            params["num-gpus"] = str(gpus)
        cluster["workerGroupSpecs"] = [
            {
                "groupName": "workers",
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": params,
                "template": ray_pod_template(
                    instance=instance,
                    component="ray-worker",
                    image=image,
                    cpus=cpus,
                    memory_mib=mib,
                    gpus=gpus,
                    head=False,
                ),
            }
        ]
    return cluster


# ----------------------------------------------------------------------------------------------
# The manifests


def render_manifests(
    spec: JobSpec,
    job_yaml_text: str | None = None,
    *,
    image: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    cluster: str | None = None,
    worker_memory: str | None = None,
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
    deadline_seconds: int = DEFAULT_DEADLINE_SECONDS,
    command: str = "run",
    refit: bool = False,
) -> list[dict[str, Any]]:
    """The ConfigMap holding the resolved job file and the RayJob that runs it (on its own cluster, or on `cluster`).

    `command` cv runs the job's k-fold cross-validation (`orchestrator cv`, `--refit` with `refit`) instead of one run.
    """
    text = job_yaml_text if job_yaml_text is not None else job_file_text(spec)
    if command not in COMMANDS:
        raise ValueError(f"command: {command!r} is not one of {', '.join(COMMANDS)}")
    if command == "cv" and spec.data.folds is None:
        raise BadInput("data.folds: cv needs the number of folds, e.g. `data.folds=5`")
    if refit and command != "cv":
        raise BadInput("--refit: follows a cross-validation; add --cv")
    size = len(text.encode())
    if size > MAX_CONFIGMAP_BYTES:
        raise BadInput(
            f"{spec.name}: the resolved job file is {size} bytes, over the {MAX_CONFIGMAP_BYTES} a Kubernetes ConfigMap holds; "
            "keep big values (config:, options:) in a file on storage the job reads"
        )
    image = check_image(image or default_image(spec))
    check_namespace(namespace)
    if cluster is not None:
        check_cluster_name(cluster)
    if ttl_seconds < 0:
        raise BadInput(f"--ttl {ttl_seconds}: must be >= 0 seconds")
    if deadline_seconds <= 0:
        raise BadInput(f"--deadline {deadline_seconds}: must be > 0 seconds")
    if worker_memory:
        parse_memory_mi(worker_memory)
    # Same job, image and target: same names, so a second apply is a no-op rather than a second job.
    fingerprint = "\n".join([text, image, cluster or "", worker_memory or ""])
    run_name = spec.name
    entrypoint = ENTRYPOINT
    if command == "cv":
        # A run and a cv of the same job are different jobs: their own names (a run's stay as they were).
        fingerprint += f"\ncv{' --refit' if refit else ''}"
        run_name = f"{spec.name}-cv"  # where the cluster's `orchestrator cv` keeps it (cv.load_cv)
        entrypoint = f"python -m orchestrator cv {JOB_FILE} --address auto --json" + (" --refit" if refit else "")
    name = job_resource_name(spec, fingerprint, run_name)
    configmap = f"{name}-job"
    annotations = {
        "orchestrator/run-name": run_name,
        "orchestrator/checkpoint-storage": storage.redact(spec.checkpoint.storage),
    }

    job_spec: dict[str, Any] = {
        "entrypoint": entrypoint,
        "runtimeEnvYAML": yaml.safe_dump({"working_dir": JOB_DIR}, sort_keys=False),
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_pod_template(instance=name, image=image, configmap=configmap),
        # A retry is a new Ray job (a new cluster unless --cluster); the run resumes from its last checkpoint.
        "backoffLimit": spec.failure.max_failures if spec.failure.max_failures >= 0 else INT32_MAX,
        "activeDeadlineSeconds": deadline_seconds,
    }
    if cluster is None:
        job_spec.update(
            shutdownAfterJobFinishes=True,
            ttlSecondsAfterFinished=ttl_seconds,
            rayClusterSpec=ray_cluster_spec(
                spec,
                instance=name,
                image=image,
                worker_memory=worker_memory,
                side_by_side=(spec.data.folds or 1) if command == "cv" else 1,
            ),
        )
    else:
        # A long-lived cluster outlives its jobs: KubeRay refuses a TTL or shutdown with a clusterSelector.
        job_spec["clusterSelector"] = {"ray.io/cluster": cluster}

    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": configmap,
                "namespace": namespace,
                "labels": labels(name, "job-file"),
                "annotations": dict(annotations),
            },
            # Immutable: a changed job gets a new name, so a running job never sees its file change.
            "immutable": True,
            "data": {JOB_FILE: text},
        },
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels(name, "ray-job"),
                "annotations": dict(annotations),
            },
            "spec": job_spec,
        },
    ]


def render_raycluster(
    name: str = "orchestrator",
    *,
    image: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    max_workers: int = 4,
    worker_cpus: int = 2,
    worker_memory: str = "8Gi",
) -> dict[str, Any]:
    """A long-lived, autoscaling RayCluster (0..max_workers workers) that `render --cluster NAME` jobs run on."""
    image = check_image(image or default_image())
    check_namespace(namespace)
    check_cluster_name(name)
    mib = parse_memory_mi(worker_memory)
    # The head's autoscaler sidecar talks to the Kubernetes API: only this pod gets a token (see k8s/base/rbac.yaml).
    head = ray_pod_template(
        instance=name,
        component="ray-head",
        image=image,
        cpus=1,
        memory_mib=4096,
        gpus=0,
        head=True,
        service_account_token=True,
    )
    worker = ray_pod_template(
        instance=name, component="ray-worker", image=image, cpus=worker_cpus, memory_mib=mib, gpus=0, head=False
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name, "ray-cluster")},
        "spec": {
            "rayVersion": RAY_VERSION,
            "enableInTreeAutoscaling": True,
            "authOptions": {"mode": "token"},
            "autoscalerOptions": {
                "upscalingMode": "Default",
                "idleTimeoutSeconds": 300,
                "imagePullPolicy": "Always",
                "env": cache_env(),
                "resources": {
                    "requests": {"cpu": "500m", "memory": "512Mi"},
                    "limits": {"cpu": "500m", "memory": "512Mi"},
                },
                "securityContext": container_security_context(),
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            },
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"}, "template": head},
            "workerGroupSpecs": [
                {
                    "groupName": "workers",
                    "replicas": 0,
                    "minReplicas": 0,
                    "maxReplicas": max_workers,
                    "rayStartParams": {"num-cpus": str(worker_cpus)},
                    "template": worker,
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so the job file in the ConfigMap reads as YAML."""


def _str_representer(dumper: yaml.SafeDumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_manifests(manifests: list[dict[str, Any]], header: str = "") -> str:
    """Multi-document YAML, in the order given (a ConfigMap before the RayJob that mounts it)."""
    body = yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, explicit_start=True)
    return (header + body) if header else body


def render_job_file(
    job_file: str, overrides: list[str], cv: bool = False, **options: Any
) -> tuple[list[dict[str, Any]], list[str]]:
    """Load and validate a job file with overrides (as `orchestrator cv` does with `cv`), then render it; (manifests, warnings)."""
    if cv:
        from orchestrator.cv import load_cv

        spec = load_cv(job_file, overrides).spec
        options["command"] = "cv"
    else:
        if options.get("refit"):
            raise BadInput("--refit: follows a cross-validation; add --cv")
        spec = load_spec(job_file, overrides)
    return render_manifests(spec, job_file_text(spec), **options), storage_warnings(spec)


# ----------------------------------------------------------------------------------------------
# Acting: the only side effect


def kubectl_context(kubectl: str = "kubectl") -> str:
    """The current kubectl context, or BadInput saying why there is none."""
    if shutil.which(kubectl) is None:
        raise BadInput(
            f"{kubectl}: not found on PATH; install kubectl, or run `orchestrator k8s render ... > job.yaml` and apply it elsewhere"
        )
    done = subprocess.run([kubectl, "config", "current-context"], capture_output=True, text=True, timeout=30)
    context = done.stdout.strip()
    if done.returncode != 0 or not context:
        raise BadInput(
            f"{kubectl}: no current context (set one with `kubectl config use-context NAME` or KUBECONFIG); nothing was applied"
        )
    return context


def apply_manifests(manifests: list[dict[str, Any]], kubectl: str = "kubectl", timeout: int = 120) -> str:
    """`kubectl apply -f -` of the manifests in the current context; returns kubectl's output."""
    context = kubectl_context(kubectl)
    try:
        done = subprocess.run(
            [kubectl, "apply", "-f", "-"],
            input=dump_manifests(manifests),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RunFailed(f"kubectl apply (context {context}): no answer within {timeout}s") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RunFailed(f"kubectl apply (context {context}): {reason}")
    return done.stdout


def job_names(manifests: list[dict[str, Any]]) -> dict[str, str]:
    """kind -> name of the rendered objects, for the follow-up commands a user types."""
    return {m["kind"]: m["metadata"]["name"] for m in manifests}
