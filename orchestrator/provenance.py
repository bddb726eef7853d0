"""What produced a run: versions, devices, placement, seed, job hash, user-code commit and data fingerprint.

Recorded in run.json (`provenance`), tagged on the MLflow run and shown in the report.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from orchestrator import __version__
from orchestrator.spec import JobSpec


def job_hash(job: dict[str, Any]) -> str:
    """A stable hash of a resolved job (key order does not matter)."""
    canonical = json.dumps(job, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def git_state(directory: str | None) -> dict[str, Any] | None:
    """Commit and dirtiness (tracked files) of the git checkout holding `directory`; None when it is not one."""
    if not directory or not shutil.which("git"):
        return None

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=20)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0:
            return None
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {
        "commit": commit.stdout.strip() if commit.returncode == 0 else None,  # None: a repository without commits
        "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
        "root": top.stdout.strip(),
    }


def device_facts() -> dict[str, Any]:
    """The CUDA version torch was built with and the names of the GPUs this process sees."""
    try:
        import torch
    except ImportError:
        return {"cuda": None, "gpus": []}
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cuda": torch.version.cuda, "gpus": gpus}


def add_placement(provenance: dict[str, Any], placed: dict[str, Any] | None) -> None:
    """Where a run really ran, as rank 0 reported it with its metrics (elastic groups change it)."""
    if placed and "placement_world_size" in placed:
        provenance.update(
            world_size=placed["placement_world_size"],
            hosts=placed["placement_hosts"],
            gpus=[g for g in str(placed.get("placement_gpus") or "").split(",") if g],
        )


def collect_provenance(
    spec: JobSpec,
    base_dir: str | None = None,
    data_fingerprint: dict | None = None,
    world_size: int | None = None,
    hosts: int | None = None,
) -> dict[str, Any]:
    """Versions, devices, placement, seed, job hash, user-code commit and data fingerprint of a run."""
    out: dict[str, Any] = {
        "orchestrator": __version__,
        "python": platform.python_version(),
        "host": socket.gethostname(),
    }
    for name in ("torch", "ray"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out.update(device_facts())
    out.update(
        world_size=world_size if world_size is not None else max(1, spec.scaling.max_workers),
        hosts=hosts,
        seed=spec.train.seed,
        job_hash=job_hash(spec.to_dict()),
        git=git_state(base_dir),
        data=data_fingerprint,
    )
    return out
