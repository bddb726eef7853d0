"""The manifests of a job: a ConfigMap holding the resolved job file and the RayJob that runs it (on its own
cluster or on a long-lived RayCluster), the RayCluster itself, and their YAML.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml

from orchestrator import storage
from orchestrator.errors import BadInput
from orchestrator.k8s.checks import (
    check_cluster_name,
    check_image,
    check_namespace,
    check_queue,
    check_service_account,
    check_storage,
    default_image,
    parse_memory_mi,
    storage_warnings,
)
from orchestrator.k8s.pods import (
    JOB_DIR,
    JOB_FILE,
    RAY_VERSION,
    cache_env,
    container_security_context,
    labels,
    ray_cluster_spec,
    ray_ingress_rules,
    ray_pod_template,
    submitter_pod_template,
)
from orchestrator.spec import JobSpec, load_spec

DEFAULT_NAMESPACE = "orchestrator"
# Kubernetes refuses a ConfigMap over 1 MiB (its whole object); leave room for the metadata.
MAX_CONFIGMAP_BYTES = 1024 * 1024 - 16 * 1024
# RAY_ADDRESS is set by Ray's job supervisor; `--ray-address auto` makes the driver attach to it.
ENTRYPOINT = f"python -m orchestrator run {JOB_FILE} --ray-address auto --json"
# The commands a RayJob can run on the job file: one run, or its k-fold cross-validation (`orchestrator cv`).
COMMANDS = ("run", "cv")
DEFAULT_TTL_SECONDS = 600
DEFAULT_DEADLINE_SECONDS = 7 * 24 * 3600
MAX_RAYJOB_NAME = 47  # KubeRay's limit: the cluster and service names it derives must stay <= 63
INT32_MAX = 2**31 - 1
# Kueue queues a RayJob that carries this label (the LocalQueue's name) and that is created suspended.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


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


def _check_render(
    spec: JobSpec,
    text: str,
    image: str | None,
    namespace: str,
    cluster: str | None,
    worker_memory: str | None,
    ttl_seconds: int,
    deadline_seconds: int,
    command: str,
    refit: bool,
    queue: str | None,
    service_account: str | None,
) -> str:
    """BadInput in one line for what cannot render; the checked image."""
    if command not in COMMANDS:
        raise ValueError(f"command: {command!r} is not one of {', '.join(COMMANDS)}")
    if command == "cv" and spec.data.folds is None:
        raise BadInput("data.folds: cv needs the number of folds, e.g. `data.folds=5`")
    if refit and command != "cv":
        raise BadInput("--refit: follows a cross-validation; add --cv")
    check_storage(spec)
    if queue is not None:
        check_queue(queue, cluster)
    if service_account is not None:
        check_service_account(service_account)
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
    return image


def _job_identity(
    spec: JobSpec,
    text: str,
    image: str,
    cluster: str | None,
    worker_memory: str | None,
    command: str,
    refit: bool,
    placement: str = "",
) -> tuple[str, str, str]:
    """(RayJob name, run name, entrypoint) of the job: the name a hash of everything that makes it this job."""
    # Same job, image and target: same names, so a second apply is a no-op rather than a second job.
    fingerprint = "\n".join([text, image, cluster or "", worker_memory or ""]) + placement
    run_name = spec.name
    entrypoint = ENTRYPOINT
    if command == "cv":
        # A run and a cv of the same job are different jobs: their own names (a run's stay as they were).
        fingerprint += f"\ncv{' --refit' if refit else ''}"
        run_name = f"{spec.name}-cv"  # where the cluster's `orchestrator cv` keeps it (cv.load_cv)
        entrypoint = f"python -m orchestrator cv {JOB_FILE} --ray-address auto --json" + (" --refit" if refit else "")
    return job_resource_name(spec, fingerprint, run_name), run_name, entrypoint


def _rayjob_spec(
    spec: JobSpec,
    *,
    name: str,
    configmap: str,
    entrypoint: str,
    image: str,
    cluster: str | None,
    worker_memory: str | None,
    ttl_seconds: int,
    deadline_seconds: int,
    command: str,
    service_account: str,
) -> dict[str, Any]:
    """The RayJob's spec: the submitter pod, retries and deadline, and its own cluster or a selector of `cluster`."""
    job_spec: dict[str, Any] = {
        "entrypoint": entrypoint,
        "runtimeEnvYAML": yaml.safe_dump({"working_dir": JOB_DIR}, sort_keys=False),
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_pod_template(
            instance=name, image=image, configmap=configmap, service_account=service_account
        ),
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
                service_account=service_account,
            ),
        )
    else:
        # A long-lived cluster outlives its jobs: KubeRay refuses a TTL or shutdown with a clusterSelector.
        job_spec["clusterSelector"] = {"ray.io/cluster": cluster}
    return job_spec


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
    queue: str | None = None,
    service_account: str | None = None,
) -> list[dict[str, Any]]:
    """Everything the job needs in a namespace, applied together: its ServiceAccount (unless `service_account` names an
    existing one), the NetworkPolicy in front of its pods, the ConfigMap holding the resolved job file, and the RayJob
    that runs it (on its own cluster, or on `cluster`).

    `command` cv runs the job's k-fold cross-validation (`orchestrator cv`, `--refit` with `refit`) instead of one run.
    `queue` hands the RayJob to Kueue's LocalQueue of that name: labelled, and created suspended until Kueue admits it.
    """
    text = job_yaml_text if job_yaml_text is not None else job_file_text(spec)
    image = _check_render(
        spec,
        text,
        image,
        namespace,
        cluster,
        worker_memory,
        ttl_seconds,
        deadline_seconds,
        command,
        refit,
        queue,
        service_account,
    )
    placement = f"\nqueue {queue}" if queue else ""
    placement += f"\nservice account {service_account}" if service_account else ""
    name, run_name, entrypoint = _job_identity(spec, text, image, cluster, worker_memory, command, refit, placement)
    configmap = f"{name}-job"
    annotations = {
        "orchestrator/run-name": run_name,
        "orchestrator/checkpoint-storage": storage.redact(spec.checkpoint.storage),
    }
    job_spec = _rayjob_spec(
        spec,
        name=name,
        configmap=configmap,
        entrypoint=entrypoint,
        image=image,
        cluster=cluster,
        worker_memory=worker_memory,
        ttl_seconds=ttl_seconds,
        deadline_seconds=deadline_seconds,
        command=command,
        service_account=service_account or name,
    )
    owned = [] if service_account else [_service_account(name, namespace)]
    return owned + [
        _network_policy(name, namespace),
        _configmap(name, namespace, configmap, text, annotations),
        _rayjob(name, namespace, job_spec, annotations, queue),
    ]


def _configmap(name: str, namespace: str, configmap: str, text: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {
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
    }


def _rayjob(
    name: str, namespace: str, job_spec: dict[str, Any], annotations: dict[str, str], queue: str | None
) -> dict[str, Any]:
    rayjob_labels = labels(name, "ray-job")
    if queue:
        # Kueue's requirements of a RayJob (kueue.sigs.k8s.io, "Run a RayJob"): the label, a cluster of its own that is
        # deleted when the job finishes, no in-tree autoscaling (it reserves the cluster's whole size); suspended, so
        # that no pod starts before Kueue admits it. A preempted job is suspended again: its cluster goes, and on
        # readmission a new one resumes the run from its last checkpoint.
        rayjob_labels[KUEUE_QUEUE_LABEL] = queue
        job_spec = {**job_spec, "suspend": True}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": rayjob_labels, "annotations": dict(annotations)},
        "spec": job_spec,
    }


def _service_account(name: str, namespace: str) -> dict[str, Any]:
    """The job's own identity: its pods get no API token (they need none); deleted with the job's other objects."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name, "service-account")},
        "automountServiceAccountToken": False,
    }


def _network_policy(name: str, namespace: str) -> dict[str, Any]:
    """Ingress to the job's pods: the rules of k8s/base/networkpolicy.yaml, so that a namespace without it is covered."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(name, "network-policy")},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/instance": name}},
            "policyTypes": ["Ingress"],
            "ingress": ray_ingress_rules(),
        },
    }


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
