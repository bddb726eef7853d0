"""Render: the Jobs API request of a job (entrypoint, runtime environment, metadata), and the checks that a
submission can run on the cluster before anything is sent.
"""

from __future__ import annotations

import os
import secrets
import shlex
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.cluster.backend import (
    METADATA_JOB_FILE,
    METADATA_RUN,
    METADATA_STORAGE,
    SUBMISSION_ID_RE,
    RayJobsBackend,
)
from orchestrator.cluster.package import (
    DEFAULT_EXCLUDES,
    MAX_FILE_BYTES,
    MAX_PACKAGE_BYTES,
    PackagePlan,
    _mb,
    literal_pattern,
    plan_package,
)
from orchestrator.errors import BadInput
from orchestrator.hooks import import_hook
from orchestrator.spec import HOOK_RE, JobSpec, load_spec


def new_submission_id(run_name: str) -> str:
    """A submission id a person can read: the run name and a short random suffix."""
    return f"{run_name}-{secrets.token_hex(3)}"


def _inside(path: str, root: Path) -> str | None:
    """`path` relative to `root` when it lies under it, else None."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def _package_patterns(spec: JobSpec, job_dir: Path, excludes: tuple[str, ...] | list[str]) -> list[str]:
    """The exclude patterns of the package; BadInput for a relative local checkpoint.storage (it could not resume)."""
    protocol, _ = storage.split_uri(spec.checkpoint.storage)
    raw_storage = spec.checkpoint.storage
    if protocol == "file" and not (raw_storage.startswith("file://") or os.path.isabs(os.path.expanduser(raw_storage))):
        raise BadInput(
            f"checkpoint.storage: {raw_storage!r} is relative, so on the cluster it would land in the job's temporary working "
            "directory and a resubmission could not resume; use an absolute path every node sees, or s3://bucket/prefix "
            "(e.g. checkpoint.storage=/shared/runs)"
        )
    patterns = list(excludes)
    if protocol == "file":
        rel_storage = _inside(storage.split_uri(raw_storage)[1], job_dir)
        if rel_storage:  # runs already written under the job directory are outputs, not code
            patterns.append(f"/{rel_storage}/")
    return patterns


def _check_package(
    spec: JobSpec, job_path: Path, plan: PackagePlan, max_package_bytes: int, max_file_bytes: int
) -> None:
    """BadInput when the package is too big or leaves out what the job needs: its file, its code, its data."""
    job_dir = job_path.parent
    if plan.bytes > max_package_bytes:
        raise BadInput(
            f"{job_dir}: {_mb(plan.bytes)} in {plan.files} files to ship as the job's working directory, over the "
            f"{_mb(max_package_bytes)} limit; add a .rayignore or move data to storage the cluster reads (s3://...)"
        )
    if not plan.ships(job_path.name):
        raise BadInput(f"{job_path}: the job file itself is excluded from the package (.gitignore/.rayignore)")
    for field_name, hook in (
        ("entrypoint", spec.entrypoint),
        ("model.name", spec.model.name),
        ("data.name", spec.data.name),
    ):
        if hook and HOOK_RE.match(hook):
            module = hook.partition(":")[0].split(".")[0]
            for candidate in (module, f"{module}.py"):
                if (job_dir / candidate).exists() and not plan.ships(candidate):
                    raise BadInput(
                        f"{field_name}: {candidate} is excluded from the package, so {hook} cannot be imported on the cluster"
                    )
    if spec.data.path and "://" not in spec.data.path and not os.path.isabs(spec.data.path):
        rel = Path(spec.data.path).as_posix()
        left = dict(plan.left_out)
        if rel in left:
            raise BadInput(
                f"data.path: {rel} is {_mb(left[rel])}, too large to ship with the job (limit {_mb(max_file_bytes)} a file); "
                "put it on storage the cluster reads (s3://...) or an absolute path every node sees"
            )
        if not plan.ships(rel):
            raise BadInput(f"data.path: {rel} is excluded from the package, so the cluster would not see it")


def _package_warnings(plan: PackagePlan, max_file_bytes: int) -> list[str]:
    """One line for each path that does not ship though nothing excluded it: big files, secrets, links."""
    warnings = [
        f"not shipped: {rel} ({_mb(size)}, over {_mb(max_file_bytes)}); put big files on storage the cluster reads"
        for rel, size in plan.left_out
    ]
    warnings += [
        f"not shipped: {rel} ({reason})" + (f"; --include '{rel}' ships it" if rel in plan.secrets else "")
        for rel, reason in plan.withheld
    ]
    return warnings


def _runtime_env(job_dir: Path, patterns: list[str], plan: PackagePlan, ship_orchestrator: bool) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {
        "working_dir": str(job_dir),
        # Ray zips by its own walk: whatever this plan left out must be named to it, links and secrets too.
        "excludes": patterns + [literal_pattern(rel) for rel, _ in plan.left_out + plan.withheld],
        # Unbuffered output: `logs --follow` shows progress as it happens.
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    if ship_orchestrator:
        package_dir = Path(__file__).resolve().parents[1]  # orchestrator/, the package above this one
        if _inside(str(package_dir), job_dir) is None:
            # The cluster runs the same orchestrator code that validated the job here.
            runtime_env["py_modules"] = [str(package_dir)]
    return runtime_env


def build_submission(
    spec: JobSpec,
    job_file: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    submission_id: str | None = None,
    excludes: tuple[str, ...] | list[str] = DEFAULT_EXCLUDES,
    max_package_bytes: int = MAX_PACKAGE_BYTES,
    max_file_bytes: int = MAX_FILE_BYTES,
    ship_orchestrator: bool = True,
    fresh: bool = False,
    includes: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """The Jobs API request of a job (entrypoint, runtime_env, metadata) and what its package holds; BadInput if it cannot run there."""
    job_path = Path(job_file).resolve()
    job_dir = job_path.parent
    patterns = _package_patterns(spec, job_dir, excludes)
    plan = plan_package(job_dir, patterns, max_file_bytes, includes)
    _check_package(spec, job_path, plan, max_package_bytes, max_file_bytes)
    words = ["python", "-m", "orchestrator", "run", job_path.name, *overrides, "--ray-address", "auto", "--json"] + (
        ["--fresh"] if fresh else []
    )
    return {
        "submission_id": submission_id or new_submission_id(spec.name),
        "entrypoint": " ".join(shlex.quote(w) for w in words),
        "runtime_env": _runtime_env(job_dir, patterns, plan, ship_orchestrator),
        "metadata": {
            METADATA_RUN: spec.name,
            METADATA_JOB_FILE: job_path.name,
            METADATA_STORAGE: spec.checkpoint.storage,
        },
        "package": {
            "dir": str(job_dir),
            "files": plan.files,
            "bytes": plan.bytes,
            "left_out": [rel for rel, _ in plan.left_out],
            "withheld": [rel for rel, _ in plan.withheld],
        },
        "warnings": _package_warnings(plan, max_file_bytes),
    }


def check_user_code(spec: JobSpec, job_dir: str | Path) -> None:
    """Import every `module:function` the job names from its directory, as the cluster will; BadInput naming the field."""

    for field_name, hook in (
        ("entrypoint", spec.entrypoint),
        ("model.name", spec.model.name),
        ("data.name", spec.data.name),
    ):
        if hook and HOOK_RE.match(hook):
            import_hook(hook, str(job_dir), field_name)


def prepare_submission(job_file: str, overrides: list[str], backend: RayJobsBackend, **options: Any) -> dict[str, Any]:
    """Validate everything a submission needs (file, package, user code, cluster, token) and render it; submits nothing."""
    spec = load_spec(job_file, overrides)
    job_id = options.get("submission_id")
    if job_id is not None and not SUBMISSION_ID_RE.match(job_id):
        raise BadInput(f"--job-id {job_id!r}: a job id is 1 to 200 characters without spaces, '/', '?' or '#'")
    submission = build_submission(spec, job_file, overrides, **options)
    check_user_code(spec, Path(job_file).resolve().parent)
    backend.check()
    if job_id is not None and backend.exists(job_id):
        raise BadInput(f"--job-id {job_id}: {backend.address} already has a job with this id; choose another")
    if storage.split_uri(spec.checkpoint.storage)[0] == "file":
        nodes = backend.alive_nodes()
        if nodes and nodes > 1:
            submission["warnings"].append(
                f"checkpoint.storage: {spec.checkpoint.storage} is a local path on a {nodes}-node cluster; every node must see "
                "it (a shared filesystem), or a worker that moves loses its checkpoints; s3://... is safe"
            )
    return submission
