"""The pods of a Ray cluster on Kubernetes: hardened, sized from the job, with Ray's probes and volumes; and the
RayClusterSpec that holds them. Pure functions returning plain dicts.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.k8s.checks import parse_memory_mi
from orchestrator.spec import JobSpec

# The Ray of the job image (the Dockerfile's base); tests check that it is the Ray this package runs with.
RAY_VERSION = "2.60.0"
SERVICE_ACCOUNT = "orchestrator"
# Storage credentials: a Secret the user creates (an AWS shared-credentials file under the key
# `credentials`), mounted as a file; an IAM role on the ServiceAccount works when it is absent.
S3_SECRET = "orchestrator-s3-credentials"
S3_SECRET_DIR = "/etc/orchestrator/s3"
# An S3-compatible endpoint (MinIO, Ceph) comes from this ConfigMap's `endpoint_url` when it exists.
S3_ENDPOINT_CONFIGMAP = "orchestrator-s3-endpoint"
# The job file is mounted in the submitter pod and uploaded as the Ray job's working_dir, so the
# driver finds it in its working directory on a per-job cluster and on a long-lived one alike.
JOB_DIR = "/etc/orchestrator/job"
JOB_FILE = "job.yaml"
# The `ray` user of Ray's images (uid 1000, group users).
RAY_UID, RAY_GID = 1000, 100
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, AGENT_PORT = 6379, 8265, 10001, 52365
HEALTH_PATH = "/api/healthz"
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


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
    service_account: str = SERVICE_ACCOUNT,
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
        "serviceAccountName": service_account,
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


def submitter_pod_template(
    *, instance: str, image: str, configmap: str, service_account: str = SERVICE_ACCOUNT
) -> dict[str, Any]:
    """The pod that runs `ray job submit` (KubeRay fills in the command): it mounts the job file to upload it."""
    return {
        "metadata": {"labels": labels(instance, "ray-job-submitter")},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": service_account,
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
    spec: JobSpec,
    *,
    instance: str,
    image: str,
    worker_memory: str | None,
    side_by_side: int = 1,
    service_account: str = SERVICE_ACCOUNT,
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
                service_account=service_account,
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
                    service_account=service_account,
                ),
            }
        ]
    return cluster


# Who may reach Ray's pods (the same rules as k8s/base/networkpolicy.yaml, for the pods `selector` picks): pods of the
# orchestrator any port (raylets, object transfer and torch.distributed use ports chosen at run time), every pod of the
# namespace the GCS, dashboard and client ports, the KubeRay operator the dashboard. Egress stays open (object stores).
KUBERAY_NAMESPACE = "kuberay-system"


def ray_ingress_rules() -> list[dict[str, Any]]:
    """The ingress rules of the NetworkPolicy in front of Ray pods."""
    return [
        {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "orchestrator"}}}]},
        {
            "from": [{"podSelector": {}}],
            "ports": [{"protocol": "TCP", "port": port} for port in (GCS_PORT, DASHBOARD_PORT, CLIENT_PORT)],
        },
        {
            "from": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": KUBERAY_NAMESPACE}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
                }
            ],
            "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}],
        },
    ]
