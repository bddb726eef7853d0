"""`orchestrator doctor`: is this machine, or a cluster, ready to run jobs? One line per check.

Here: Python, orchestrator, its required packages, torch (and its GPUs), Ray, the Ray token, a Ray already up,
and, given a job file, its storage (written to and cleaned up, with the job's credentials) and its GPUs. With
--address, the cluster too: its dashboard and the token, its Ray, and what its `python` has, read by a probe job
submitted through the Jobs API as any job is (no files shipped), run by the same `python` a job's driver gets:
its version, the packages orchestrator needs, torch and GPUs, and whether a local checkpoint.storage is
writable there. A check is ok, a note (worth knowing, not in the way), or FAIL (a job would fail): any FAIL
exits 1.
"""

from __future__ import annotations

import json
import platform
import secrets
import shlex
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from orchestrator import __version__, storage
from orchestrator.environment import REQUIRED_MODULES
from orchestrator.errors import BadInput

OK, NOTE, FAIL = "ok", "note", "FAIL"
PROBE_PREFIX = "ORCHESTRATOR_DOCTOR "
PROBE_TIMEOUT_S = 120.0


@dataclass
class Check:
    """One line of the doctor's answer: what was checked, how it stands, and what was found."""

    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<5} {self.name:<21} {self.detail}"  # at least two spaces after a name


def requirements() -> dict[str, str]:
    """Distribution -> version specifier of what orchestrator needs (its installed metadata, else the names alone)."""
    try:
        listed = metadata.requires("orchestrator") or []
    except metadata.PackageNotFoundError:
        return {dist: "" for dist in REQUIRED_MODULES.values()}
    from packaging.requirements import Requirement  # Ray's dependency: there wherever orchestrator is installed

    out = {}
    for text in listed:
        req = Requirement(text)
        if req.marker is None:  # extras (mlflow, test) are not what a job needs
            out[req.name] = str(req.specifier)
    return out


# Run by the cluster's `python` with the standard library alone: the packages it looks for may be missing.
PROBE = """
import json, os, platform, sys
from importlib import metadata
asked = json.loads(sys.argv[1])
out = {"python": platform.python_version(), "executable": sys.executable, "versions": {}, "paths": {}}
for dist in asked["distributions"]:
    try:
        out["versions"][dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        out["versions"][dist] = None
try:
    import torch
    out["gpus"] = torch.cuda.device_count()
except Exception as exc:
    out["torch_error"] = type(exc).__name__
for path in asked["paths"]:
    here = path
    while here and not os.path.exists(here):
        here = os.path.dirname(here.rstrip("/"))
    out["paths"][path] = bool(here) and os.access(here, os.W_OK)
print("ORCHESTRATOR_DOCTOR " + json.dumps(out), flush=True)
"""


def _unmet(versions: dict[str, str | None], wanted: dict[str, str]) -> tuple[list[str], list[str]]:
    """(missing, too old or too new) distributions of `wanted`, given the versions installed."""
    from packaging.specifiers import SpecifierSet

    missing = [d for d in wanted if versions.get(d) is None]
    unfit = [
        f"{d} {versions[d]} (wants {spec})"
        for d, spec in wanted.items()
        if versions.get(d) is not None and spec and not SpecifierSet(spec).contains(versions[d], prereleases=True)
    ]
    return missing, unfit


def packages_check(name: str, versions: dict[str, str | None], wanted: dict[str, str], where: str) -> Check:
    """Every package orchestrator needs is installed, at a version it accepts."""
    missing, unfit = _unmet(versions, wanted)
    if not missing and not unfit:
        return Check(name, OK, f"the {len(wanted)} packages orchestrator needs are installed")
    fix = " ".join(shlex.quote(f"{d}{wanted[d]}") for d in missing)
    parts = [f"missing {', '.join(missing)}"] if missing else []
    parts += [f"unfit {', '.join(unfit)}"] if unfit else []
    return Check(name, FAIL, "; ".join(parts) + (f"; pip install {fix} into {where}" if fix else ""))


def _installed(dists) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def here_facts() -> dict[str, Any]:
    """This machine's Python, package versions and GPUs (torch imported: the GPU count needs it)."""
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "versions": _installed(requirements()),
    }
    try:
        import torch

        facts["gpus"] = torch.cuda.device_count()
        facts["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(facts["gpus"])]
        facts["cuda"] = torch.version.cuda
    except Exception as exc:  # reported by the packages check
        facts["torch_error"] = type(exc).__name__
    return facts


def local_checks(spec=None, facts: dict[str, Any] | None = None) -> list[Check]:
    """The checks of this machine (and, given a job, of its storage and GPUs from here)."""
    from orchestrator.cluster import find_token
    from orchestrator.ray_runtime import running_local_ray

    facts = facts or here_facts()
    versions = facts["versions"]
    checks = [
        Check("python", OK, f"{facts['python']} at {facts['executable']}"),
        Check("orchestrator", OK, f"{__version__} at {_package_dir()}"),
        packages_check("packages", versions, requirements(), facts["executable"]),
    ]
    if versions.get("torch"):
        build = f"CUDA {facts['cuda']}" if facts.get("cuda") else "CPU-only build"
        checks.append(Check("torch", OK, f"{versions['torch']} ({build})"))
    if versions.get("ray"):
        checks.append(Check("ray", OK, versions["ray"]))
    gpus = facts.get("gpus") or 0
    if gpus:
        checks.append(Check("GPUs", OK, f"{gpus}: {', '.join(facts.get('gpu_names') or [])}"))
    else:
        checks.append(Check("GPUs", NOTE, "none here: runs on this machine train on CPU"))
    try:
        token = find_token()
    except BadInput as exc:
        checks.append(Check("Ray token", FAIL, exc.lines[0]))
    else:
        checks.append(
            Check("Ray token", OK, str(token))
            if token
            else Check("Ray token", NOTE, "none found; a cluster with token authentication needs $RAY_AUTH_TOKEN")
        )
    local_ray = running_local_ray()
    if local_ray:
        checks.append(Check("local Ray", NOTE, f"up at {local_ray}: `run` trains on it (--ray-address local: not)"))
    if spec is not None:
        checks.extend(job_checks(spec, gpus))
    return checks


def _package_dir() -> str:
    import orchestrator

    return orchestrator.__path__[0]


def job_checks(spec, gpus: int | None, where: str = "here") -> list[Check]:
    """A job's storage (from this machine, with its credentials) and whether its GPUs exist `where`."""
    checks = []
    uri = spec.checkpoint.storage
    try:
        storage.preflight(uri, spec.checkpoint.endpoint_url, spec.checkpoint.upload_timeout_s)
    except BadInput as exc:
        checks.append(Check("storage", FAIL, f"checkpoint.storage: {exc.lines[0]}"))
    else:
        checks.append(Check("storage", OK, f"{storage.redact(uri)} is writable from this machine"))
    if spec.scaling.use_gpu:
        need = max(1, spec.scaling.max_workers) * (spec.scaling.gpus_per_worker or 1)
        said = f"the job needs {need:g} GPU{'' if need == 1 else 's'}, {where} has {gpus}"
        if gpus is None or gpus >= need:
            checks.append(Check("job GPUs", OK, said))
        elif where == "here":
            checks.append(Check("job GPUs", FAIL, f"scaling.use_gpu: {said}"))
        else:  # an autoscaling cluster starts GPU nodes when a job asks for them
            checks.append(Check("job GPUs", NOTE, f"scaling.use_gpu: {said} now (unless it adds GPU nodes on demand)"))
    return checks


def cluster_checks(address: str | None, spec=None, here: dict[str, Any] | None = None) -> list[Check]:
    """The checks of the cluster at `address` (its dashboard URL): dashboard and token, Ray, its `python`, GPUs."""
    from orchestrator.cluster import RayJobsBackend

    here = here or here_facts()
    try:
        backend = RayJobsBackend(address)
        info = backend.check()
    except BadInput as exc:
        return [Check("cluster", FAIL, exc.lines[0])]
    checks = [
        Check("cluster", OK, f"{backend.address} answers" + (f", {backend.token} accepted" if backend.token else ""))
    ]
    their_ray, our_ray = info.get("ray_version"), here["versions"].get("ray")
    checks.append(_same("cluster ray", their_ray, our_ray, FAIL, "attaching (--ray-address) needs the same Ray"))
    try:
        probe = run_probe(backend, spec)
    except (BadInput, RuntimeError) as exc:
        return [*checks, Check("cluster python", FAIL, str(exc).splitlines()[0])]
    checks.append(
        _same(
            "cluster python",
            _minor(probe["python"]),
            _minor(here["python"]),
            FAIL,
            "attaching from here (--ray-address) needs the same Python minor version",
            f"{probe['python']} at {probe['executable']}",
        )
    )
    checks.append(packages_check("cluster packages", probe["versions"], requirements(), probe["executable"]))
    installed = probe["versions"].get("orchestrator")
    checks.append(
        Check(
            "cluster orchestrator",
            OK if installed == __version__ else NOTE,
            f"submit ships this copy ({__version__}) with each job; the cluster has "
            + (f"{installed} installed" if installed else "none installed"),
        )
    )
    if probe["versions"].get("torch"):
        checks.append(_same("cluster torch", probe["versions"]["torch"], here["versions"].get("torch"), NOTE, ""))
    resources = backend.total_resources()
    gpus = int(resources.get("GPU", 0)) if resources else None  # no GPU entry: none in the cluster
    checks.append(
        Check("cluster GPUs", OK if gpus else NOTE, f"{gpus if gpus is not None else 'unknown'} in the cluster")
    )
    if spec is not None:
        for check in job_checks(spec, gpus, "the cluster"):
            checks.append(check)
        for path, writable in probe["paths"].items():
            if not writable:
                checks.append(Check("cluster storage", FAIL, f"checkpoint.storage: {path} is not writable there"))
    return checks


def _minor(version: str | None) -> str | None:
    return ".".join(version.split(".")[:2]) if version else None


def _same(name: str, theirs: str | None, ours: str | None, otherwise: str, why: str, shown: str | None = None) -> Check:
    """Whether a version there matches the one here; `otherwise` is the status when they differ."""
    shown = shown or str(theirs)
    if theirs == ours:
        return Check(name, OK, f"{shown}, as here")
    return Check(name, otherwise, f"{shown} there, {ours} here" + (f": {why}" if why else ""))


def run_probe(backend, spec=None, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Run the probe as a job on the cluster (its `python`, as a job's driver gets it); return what it found.

    The probe job stays in the cluster's list (`orchestrator-doctor-...`): deleting a job as it ends races Ray's
    own monitor of it, which then records it again as failed.
    """
    from orchestrator.cluster import TERMINAL

    paths = []
    if spec is not None and storage.split_uri(spec.checkpoint.storage)[0] == "file":
        paths.append(storage.split_uri(spec.checkpoint.storage)[1])
    asked = json.dumps({"distributions": [*requirements(), "orchestrator"], "paths": paths})
    job_id = f"orchestrator-doctor-{secrets.token_hex(3)}"
    backend.submit(
        {
            "entrypoint": f"python -c {shlex.quote(PROBE)} {shlex.quote(asked)}",
            "runtime_env": None,
            "metadata": {"orchestrator_doctor": "1"},
            "submission_id": job_id,
        }
    )
    final = backend.wait(job_id, timeout=timeout, poll=0.5)
    if final["status"] not in TERMINAL:
        backend.stop(job_id)
    logs = backend.logs(job_id)
    for line in reversed(logs.splitlines()):
        if line.startswith(PROBE_PREFIX):
            return json.loads(line[len(PROBE_PREFIX) :])
    tail = " ".join(logs.strip().splitlines()[-2:]) or final.get("message") or final["status"]
    raise RuntimeError(f"the probe job {final['status']} without an answer: {tail}")


def diagnose(spec=None, address: str | None = None) -> list[Check]:
    """Every check of this machine, and of the cluster at `address` when one is given (the job's checks there)."""
    here = here_facts()
    checks = local_checks(None if address else spec, here)
    if address is not None:
        checks += cluster_checks(address, spec, here)
    return checks


def as_dicts(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
