"""Checks of what the user typed for Kubernetes (image, namespace, cluster name, memory), each BadInput in one
line, and the warnings of what in a job will not survive on Kubernetes.
"""

from __future__ import annotations

import re

from orchestrator import __version__
from orchestrator.errors import BadInput
from orchestrator.spec import JobSpec

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_NAME = re.compile(rf"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*\Z")
IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
IMAGE_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}\Z")
QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?\Z")


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


def check_queue(queue: str, cluster: str | None) -> str:
    """A Kueue LocalQueue name for `--queue`: a label value, and a job with a Ray cluster of its own (Kueue admits that)."""
    if not DNS1123_LABEL.match(queue):
        raise BadInput(
            f"--queue {queue}: a LocalQueue name is lowercase letters, digits and '-', at most 63, starting and ending "
            "with a letter or digit"
        )
    if cluster is not None:
        raise BadInput(
            f"--queue {queue}: Kueue admits a RayJob with a Ray cluster of its own, not one on the RayCluster "
            f"{cluster}; leave out --cluster"
        )
    return queue


def check_service_account(name: str) -> str:
    """An existing ServiceAccount for `--service-account` (a DNS-1123 subdomain)."""
    if not DNS1123_SUBDOMAIN.match(name):
        raise BadInput(f"--service-account {name}: not a ServiceAccount name (lowercase letters, digits, '-' and '.')")
    return name


def check_storage(spec: JobSpec) -> None:
    """Checkpoints on Kubernetes go to a store that outlives the pods: a local path (inside a pod) is refused."""
    where = spec.checkpoint.storage
    if "://" not in where or where.startswith("file://"):
        raise BadInput(
            f"checkpoint.storage: {where} is a path inside the pods, so the checkpoints would die with them and a "
            "restarted job could not resume; use s3://bucket/prefix (or another store every pod reaches) on Kubernetes"
        )


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
    """What in the job may not exist on Kubernetes, one line each (the render still goes on; `check_storage` refuses
    what cannot survive there)."""
    out = []
    if spec.data.path and "://" not in spec.data.path:
        out.append(f"data.path: {spec.data.path} must exist inside the image (or use s3://...)")
    if spec.model.init_from and "://" not in spec.model.init_from:
        out.append(f"model.init_from: {spec.model.init_from} must exist inside the image (or use s3://...)")
    return out
