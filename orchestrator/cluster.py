"""Ray clusters through the Jobs API: package a job, submit it, then follow, list and stop it.

Render, then act: `build_submission` turns a JobSpec and its directory into the Jobs API request
(entrypoint, runtime environment, metadata); `RayJobsBackend` is the thin client that sends it.
The entrypoint re-runs the original job file with the same overrides (`python -m orchestrator run
FILE k=v ... --address auto`) from the job file's directory, so user code and relative data paths
resolve on the cluster exactly as they do on the laptop.

Ray >= 2.52 protects the dashboard with a bearer token (RAY_AUTH_MODE=token); the token is read
from the environment or Ray's token file, sent only as a header, and never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.errors import BadInput, RunFailed
from orchestrator.hooks import import_hook
from orchestrator.spec import HOOK_RE, JobSpec, load_spec

DEFAULT_DASHBOARD_PORT = 8265
# Never worth shipping: version control, environments, caches, run outputs and weights.
DEFAULT_EXCLUDES = (
    ".git/",
    ".hg/",
    ".svn/",
    ".venv/",
    "venv/",
    "node_modules/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".ipynb_checkpoints/",
    ".DS_Store",
    "runs/",
    "mlruns/",
    "ray_results/",
    "wandb/",
    "*.safetensors",
    "*.pt",
    "*.pth",
    "*.ckpt",
)
# Never shipped to a cluster unless `--include` names them: credentials and keys that sit in a project
# directory (gitignored, but Ray's zip would still take an untracked file that no ignore file names).
SECRET_PATTERNS = (
    ".env",
    ".env.*",
    ".envrc",
    ".aws/",
    ".ssh/",
    ".gnupg/",
    ".kube/",
    ".docker/",
    ".azure/",
    ".config/gcloud/",
    ".netrc",
    "_netrc",
    ".pgpass",
    ".git-credentials",
    ".npmrc",
    ".pypirc",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "credentials",
    "credentials.json",
    "*.kubeconfig",
    "kubeconfig",
    "auth_token",
)
MAX_PACKAGE_BYTES = 100 * 1000 * 1000
# A bigger single file is left out of the package (Ray warns at 10 MiB): data belongs on storage the cluster reads.
MAX_FILE_BYTES = 10 * 1024 * 1024
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
METADATA_RUN = "orchestrator_run"
METADATA_JOB_FILE = "orchestrator_job_file"
METADATA_STORAGE = "orchestrator_storage"
# Ray's ids (raysubmit_...), ours (run name + suffix) or a user's: never empty, no spaces, no slashes (a slash
# would address another endpoint of the Jobs API).
SUBMISSION_ID_RE = re.compile(r"^[^\s/?#]{1,200}$")


# ----------------------------------------------------------------------------------------------
# Address and token


def resolve_address(address: str | None, env: dict[str, str] | None = None) -> str:
    """The dashboard URL: --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, with http:// and the port filled in."""
    env = os.environ if env is None else env
    address = address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS")
    if not address:
        raise BadInput("--address: no cluster given; pass --address http://HOST:8265 or set RAY_ADDRESS")
    address = address.strip().rstrip("/")
    if address.startswith("ray://") or address == "auto":
        raise BadInput(
            f"--address {address}: give the dashboard's HTTP address, e.g. http://HOST:{DEFAULT_DASHBOARD_PORT}"
        )
    if "://" not in address:
        address = f"http://{address}"
    scheme, _, rest = address.partition("://")
    if scheme not in ("http", "https"):
        raise BadInput(f"--address {address}: the Jobs API speaks http or https, not {scheme}")
    host = rest.split("/", 1)[0]
    if ":" not in host.rsplit("]", 1)[-1]:
        address = f"{scheme}://{host}:{DEFAULT_DASHBOARD_PORT}" + rest[len(host) :]
    return address


@dataclass(frozen=True)
class Token:
    """A Ray auth token and where it came from; the value stays out of repr and str."""

    value: str = field(repr=False)
    source: str

    def __str__(self) -> str:
        return f"token from {self.source}"

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def default_token_path(home: Path | None = None) -> Path:
    """Ray's own token file, written by `ray get-auth-token --generate` and by a local ray.init."""
    return (home or Path.home()) / ".ray" / "auth_token"


def find_token(env: dict[str, str] | None = None, home: Path | None = None) -> Token | None:
    """The token Ray itself would use: RAY_AUTH_TOKEN, then the file at RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    env = os.environ if env is None else env
    value = (env.get("RAY_AUTH_TOKEN") or "").strip()
    if value:
        return Token(value, "RAY_AUTH_TOKEN")
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        # Ray treats an unreadable RAY_AUTH_TOKEN_PATH as fatal rather than falling back; so do we.
        try:
            value = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise BadInput(f"RAY_AUTH_TOKEN_PATH: cannot read {path} ({exc.strerror or type(exc).__name__})") from None
        if not value:
            raise BadInput(f"RAY_AUTH_TOKEN_PATH: {path} is empty")
        return Token(value, f"RAY_AUTH_TOKEN_PATH ({path})")
    default = default_token_path(home)
    try:
        value = default.read_text().strip()
    except OSError:
        return None
    return Token(value, str(default)) if value else None


def redact(text: str, token: Token | None) -> str:
    """Text from Ray or a server with the token blanked out, in case anything echoed it."""
    return text.replace(token.value, "***") if token and token.value else text


# ----------------------------------------------------------------------------------------------
# The package: what of the job's directory goes to the cluster


def _spec(lines: list[str]):
    """A .gitignore-style matcher with git's own rules (negation, `**`, anchoring), by pathspec."""
    from pathspec import GitIgnoreSpec  # only `submit` packages a directory

    return GitIgnoreSpec.from_lines(lines)


def _ignore_file_spec(directory: Path):
    """The patterns of a directory's .gitignore and .rayignore (Ray honours both), relative to it; None if none."""
    lines: list[str] = []
    for name in (".gitignore", ".rayignore"):
        path = directory / name
        if path.is_file():
            lines += path.read_text(errors="replace").splitlines()
    return _spec(lines) if any(line.strip() and not line.startswith("#") for line in lines) else None


def literal_pattern(rel: str) -> str:
    """A gitignore pattern matching exactly this path under the root (special characters escaped)."""
    escaped = re.sub(r"([\\*?\[\]!#])", r"\\\1", rel)
    return "/" + escaped.replace(" ", "\\ ") if escaped.endswith(" ") else "/" + escaped


@dataclass
class PackagePlan:
    """What `working_dir` will ship: file count and bytes, the big files left out, and what was withheld and why."""

    root: str
    files: int = 0
    bytes: int = 0
    left_out: list[tuple[str, int]] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)
    # Paths never shipped though nothing excluded them: secret-looking files and links out of the directory.
    withheld: list[tuple[str, str]] = field(default_factory=list)

    def ships(self, rel: str) -> bool:
        """Whether a path relative to the root is in the package."""
        rel = rel.strip("/")
        return not any(rel == e or rel.startswith(e + "/") for e in self.excluded)


def plan_package(
    root: str | Path,
    excludes: list[str],
    max_file_bytes: int = MAX_FILE_BYTES,
    includes: list[str] | tuple[str, ...] = (),
) -> PackagePlan:
    """Walk the directory as Ray will zip it (excludes, .gitignore, .rayignore) and add up what ships.

    Secret-looking paths (SECRET_PATTERNS) are withheld unless an `includes` pattern names them; a link
    out of the directory, to a directory, or to nothing is withheld always (Ray's zip would follow it).
    """
    root = Path(root)
    real_root = root.resolve()
    plan = PackagePlan(root=str(root))
    excluded_spec, secret_spec, include_spec = (
        _spec(list(excludes)),
        _spec(list(SECRET_PATTERNS)),
        _spec(list(includes)),
    )
    # (directory, its path under the root, the ignore files in force: (their directory's path, matcher), outermost first)
    stack: list[tuple[Path, str, list[tuple[str, Any]]]] = [(root, "", [])]
    while stack:
        directory, rel_dir, ignores = stack.pop()
        own = _ignore_file_spec(directory)
        if own is not None:
            ignores = ignores + [(rel_dir, own)]
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            probe = rel + "/" if is_dir else rel
            if excluded_spec.match_file(probe) or _ignored(probe, ignores):
                plan.excluded.add(rel)
                continue
            if secret_spec.match_file(probe) and not include_spec.match_file(probe):
                plan.withheld.append((rel, "looks like a secret"))
                plan.excluded.add(rel)
                continue
            if entry.is_symlink():
                reason = _link_problem(Path(entry.path), real_root)
                if reason:
                    plan.withheld.append((rel, reason))
                    plan.excluded.add(rel)
                    continue
            if is_dir:
                stack.append((Path(entry.path), rel, ignores))
                continue
            try:
                size = entry.stat().st_size
            except OSError:
                continue
            if size > max_file_bytes:
                plan.left_out.append((rel, size))
                plan.excluded.add(rel)
                continue
            plan.files += 1
            plan.bytes += size
    plan.left_out.sort()
    plan.withheld.sort()
    return plan


def _ignored(probe: str, ignores: list[tuple[str, Any]]) -> bool:
    # git: the deepest ignore file with a matching pattern decides, and its last matching pattern (a `!` re-includes).
    for base, spec in reversed(ignores):
        result = spec.check_file(probe[len(base) + 1 :] if base else probe)
        if result.include is not None:
            return bool(result.include)
    return False


def _link_problem(link: Path, real_root: Path) -> str | None:
    """Why a symbolic link must not ship (Ray's zip follows links), or None for a link to a file inside the root."""
    target = Path(os.path.realpath(link))
    try:
        target.relative_to(real_root)
    except ValueError:
        return f"a link out of the directory, to {target}"
    if not target.exists():
        return "a broken link"
    if target.is_dir():
        return "a link to a directory (it could loop)"
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ----------------------------------------------------------------------------------------------
# Render: the Jobs API request of a job


def new_submission_id(run_name: str) -> str:
    """A submission id a person can read: the run name and a short random suffix."""
    return f"{run_name}-{secrets.token_hex(3)}"


def _inside(path: str, root: Path) -> str | None:
    """`path` relative to `root` when it lies under it, else None."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


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
    plan = plan_package(job_dir, patterns, max_file_bytes, includes)
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
    warnings = [
        f"not shipped: {rel} ({_mb(size)}, over {_mb(max_file_bytes)}); put big files on storage the cluster reads"
        for rel, size in plan.left_out
    ]
    warnings += [
        f"not shipped: {rel} ({reason})" + (f"; --include '{rel}' ships it" if reason == "looks like a secret" else "")
        for rel, reason in plan.withheld
    ]

    runtime_env: dict[str, Any] = {
        "working_dir": str(job_dir),
        # Ray zips by its own walk: whatever this plan left out must be named to it, links and secrets too.
        "excludes": patterns + [literal_pattern(rel) for rel, _ in plan.left_out + plan.withheld],
        # Unbuffered output: `logs --follow` shows progress as it happens.
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    if ship_orchestrator:
        package_dir = Path(__file__).resolve().parent
        if _inside(str(package_dir), job_dir) is None:
            # The cluster runs the same orchestrator code that validated the job here.
            runtime_env["py_modules"] = [str(package_dir)]
    words = ["python", "-m", "orchestrator", "run", job_path.name, *overrides, "--address", "auto", "--json"] + (
        ["--fresh"] if fresh else []
    )
    return {
        "submission_id": submission_id or new_submission_id(spec.name),
        "entrypoint": " ".join(shlex.quote(w) for w in words),
        "runtime_env": runtime_env,
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
        "warnings": warnings,
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


# ----------------------------------------------------------------------------------------------
# Act: the Jobs API of one cluster


@contextlib.contextmanager
def _only_address(address: str):
    """Ray's client lets RAY_API_SERVER_ADDRESS/RAY_ADDRESS override its address argument; pin it to ours."""
    saved = {k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RayJobsBackend:
    """The Jobs API of one Ray cluster, answering submit, status, logs, stop and list."""

    def __init__(
        self, address: str | None = None, token: Token | None = None, *, find: bool = True, timeout: float = 10.0
    ):
        self.address = resolve_address(address)
        self.token = token if token is not None or not find else find_token()
        self.timeout = timeout
        self._client = None
        self._checked: dict[str, Any] | None = None

    # -- connection ---------------------------------------------------------------------------

    def _get(self, path: str):
        import requests

        try:
            return requests.get(
                self.address + path, headers=self.token.header() if self.token else {}, timeout=self.timeout
            )
        except requests.exceptions.RequestException as exc:
            reason = type(exc).__name__
            raise BadInput(
                f"--address {self.address}: no Ray dashboard answers there ({reason}); is the cluster up, and is this the dashboard port (default {DEFAULT_DASHBOARD_PORT})?"
            ) from None

    def _auth_problem(self, status_code: int) -> str | None:
        if status_code == 401:
            if self.token is None:
                return (
                    f"{self.address}: the cluster requires a Ray auth token and none was found; set RAY_AUTH_TOKEN or "
                    f"RAY_AUTH_TOKEN_PATH, or put it in {default_token_path()} (`ray get-auth-token` on the head node prints it)"
                )
            return f"{self.address}: the cluster did not accept the {self.token}"
        if status_code == 403:
            who = self.token or "token"
            return f"{self.address}: the cluster rejected the {who}: it is not this cluster's token (compare with `ray get-auth-token` on the head node)"
        return None

    def check(self) -> dict[str, Any]:
        """Prove the address answers and the token is accepted (an authenticated read); BadInput in one line if not."""
        if self._checked is not None:
            return self._checked
        r = self._get("/api/version")
        problem = self._auth_problem(r.status_code)
        if problem:
            raise BadInput(problem)
        if r.status_code != 200:
            raise BadInput(
                f"--address {self.address}: answered HTTP {r.status_code} to /api/version; is this a Ray dashboard?"
            )
        try:
            info = r.json()
        except ValueError:
            raise BadInput(f"--address {self.address}: answered something that is not a Ray dashboard") from None
        # /api/version may be open on some servers: prove the token on an endpoint that needs it.
        problem = self._auth_problem(self._get("/api/jobs/").status_code)
        if problem:
            raise BadInput(problem)
        self._checked = info
        return info

    @property
    def client(self):
        """Ray's JobSubmissionClient for this address, with the token as its Authorization header."""
        if self._client is None:
            self.check()
            from ray.job_submission import JobSubmissionClient  # ray only where a command talks to a cluster

            # Ray's client narrates every upload and websocket at INFO; a person wants the job's output.
            for name in (
                "ray.dashboard.modules.dashboard_sdk",
                "ray.dashboard.modules.job.sdk",
                "ray._private.runtime_env.packaging",
            ):
                logging.getLogger(name).setLevel(logging.WARNING)

            with _only_address(self.address):
                try:
                    self._client = JobSubmissionClient(
                        self.address, headers=self.token.header() if self.token else None
                    )
                except Exception as exc:
                    raise BadInput(
                        f"--address {self.address}: {redact(str(exc), self.token).splitlines()[0]}"
                    ) from None
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one client call, turning Ray's errors into one line (a missing job is BadInput, exit 2)."""
        try:
            return fn(*args, **kwargs)
        except BadInput:
            raise
        except Exception as exc:
            text = redact(str(exc), self.token)
            if "status code 404" in text or "does not exist" in text:
                raise BadInput(
                    f"{what}: no such job on {self.address}; `orchestrator list --address {self.address}` shows the jobs"
                ) from None
            if type(exc).__name__ == "AuthenticationError":
                raise BadInput(f"{self.address}: {text.splitlines()[0]}") from None
            raise RunFailed(f"{what}: {text.strip().splitlines()[0] if text.strip() else type(exc).__name__}") from None

    def alive_nodes(self) -> int | None:
        """How many nodes of the cluster are alive, or None when the state API does not say."""
        r = self._get("/api/v0/nodes?limit=10000&detail=false")
        try:
            nodes = r.json()["data"]["result"]["result"]
        except (ValueError, KeyError, TypeError):
            return None
        return sum(1 for n in nodes if n.get("state") == "ALIVE")

    # -- the verbs ----------------------------------------------------------------------------

    def submit(self, submission: dict[str, Any]) -> str:
        """Send a rendered submission; return its submission id."""
        return self._call(
            "submit",
            self.client.submit_job,
            entrypoint=submission["entrypoint"],
            runtime_env=submission["runtime_env"],
            metadata=submission["metadata"],
            submission_id=submission["submission_id"],
        )

    def _job_id(self, job_id: str) -> str:
        # An empty id reads the job list's URL (a list where a job was expected): refuse it before any call.
        if not SUBMISSION_ID_RE.match(job_id):
            shown = repr(job_id) if job_id else "an empty job id"
            raise BadInput(
                f"{shown}: not a job id; `orchestrator list --address {self.address}` shows the jobs on the cluster"
            )
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        """One job as plain data: id, status, message, times, entrypoint, run name."""
        self._job_id(job_id)
        return job_to_dict(self._call(job_id, self.client.get_job_info, job_id))

    def logs(self, job_id: str) -> str:
        """Everything the job's driver has printed so far."""
        self._job_id(job_id)
        return redact(self._call(job_id, self.client.get_job_logs, job_id), self.token)

    def follow(self, job_id: str) -> Iterator[str]:
        """Yield the driver's output as it comes, from the start, until the job ends."""
        self.status(job_id)  # a missing job is one clear line, not a websocket error
        stream = self.client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    chunk = loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
                yield redact(chunk, self.token)
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(stream.aclose())
            loop.close()

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it had already ended."""
        self._job_id(job_id)
        return bool(self._call(job_id, self.client.stop_job, job_id))

    def list(self) -> list[dict[str, Any]]:
        """Jobs submitted through the Jobs API, newest first."""
        jobs = [job_to_dict(j) for j in self._call("list", self.client.list_jobs) if j.submission_id]
        return sorted(jobs, key=lambda j: j.get("start_time") or 0, reverse=True)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> dict[str, Any]:
        """Poll until the job ends (or `timeout` seconds pass); return its last status."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            info = self.status(job_id)
            if info["status"] in TERMINAL or (deadline is not None and time.time() > deadline):
                return info
            time.sleep(poll)


def job_to_dict(job: Any) -> dict[str, Any]:
    """A JobDetails/JobInfo as plain data (times in seconds since the epoch)."""
    metadata = dict(getattr(job, "metadata", None) or {})
    start = getattr(job, "start_time", None)
    end = getattr(job, "end_time", None)
    driver = getattr(job, "driver_info", None)
    return {
        "submission_id": getattr(job, "submission_id", None),
        "status": str(getattr(job, "status", "")),
        "message": getattr(job, "message", None),
        "start_time": start / 1000 if start else None,
        "end_time": end / 1000 if end else None,
        "entrypoint": getattr(job, "entrypoint", None),
        "run": metadata.get(METADATA_RUN),
        "job_file": metadata.get(METADATA_JOB_FILE),
        "storage": metadata.get(METADATA_STORAGE),
        "driver_pid": int(driver.pid) if driver is not None and getattr(driver, "pid", None) else None,
        "driver_exit_code": getattr(job, "driver_exit_code", None),
    }


# ----------------------------------------------------------------------------------------------
# The submit flow and how jobs read to a person


def prepare_submission(job_file: str, overrides: list[str], backend: RayJobsBackend, **options: Any) -> dict[str, Any]:
    """Validate everything a submission needs (file, package, user code, cluster, token) and render it; submits nothing."""
    spec = load_spec(job_file, overrides)
    submission = build_submission(spec, job_file, overrides, **options)
    check_user_code(spec, Path(job_file).resolve().parent)
    backend.check()
    if storage.split_uri(spec.checkpoint.storage)[0] == "file":
        nodes = backend.alive_nodes()
        if nodes and nodes > 1:
            submission["warnings"].append(
                f"checkpoint.storage: {spec.checkpoint.storage} is a local path on a {nodes}-node cluster; every node must see "
                "it (a shared filesystem), or a worker that moves loses its checkpoints; s3://... is safe"
            )
    return submission


def follow_to_end(backend: RayJobsBackend, job_id: str, out=None) -> dict[str, Any]:
    """Stream a job's output to `out` until it ends; return its final status (polling if the stream drops)."""
    out = out or sys.stdout
    try:
        for chunk in backend.follow(job_id):
            out.write(chunk)
            out.flush()
    except (BadInput, RunFailed):
        raise
    except Exception as exc:  # the log stream is a convenience: fall back to polling the status
        print(f"log stream ended ({type(exc).__name__}); waiting for the job to finish", file=sys.stderr)
    return backend.wait(job_id)


def summary_from_logs(logs: str) -> dict[str, Any] | None:
    """The run summary the entrypoint printed (`orchestrator run --json`): the last JSON object line of the logs."""
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "run" in obj and "status" in obj:
                return obj
    return None


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _duration(job: dict[str, Any]) -> str:
    start = job.get("start_time")
    if not start:
        return "-"
    seconds = int((job.get("end_time") or time.time()) - start)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_status(job: dict[str, Any]) -> str:
    """A job as a person reads it: what, how it stands, since when, why it ended, what to do next."""
    lines = [
        f"{job['submission_id']}  {job['status']}  ({'ran' if job.get('end_time') else 'running for'} {_duration(job)})"
    ]
    if job.get("run"):
        lines.append(f"  run:      {job['run']}" + (f" in {job['storage']}" if job.get("storage") else ""))
    lines.append(
        f"  started:  {_when(job.get('start_time'))}"
        + (f"   ended: {_when(job['end_time'])}" if job.get("end_time") else "")
    )
    if job.get("message"):
        message = job["message"].strip().splitlines()
        lines.append(f"  message:  {message[0]}" + (" ..." if len(message) > 1 else ""))
    lines.append(f"  command:  {job.get('entrypoint')}")
    if job["status"] == "FAILED" and job.get("run"):
        lines.append(
            f"  next:     `orchestrator logs {job['submission_id']}` shows why; submitting the job again resumes run {job['run']} from its last checkpoint"
        )
    elif job["status"] not in TERMINAL:
        lines.append(
            f"  next:     `orchestrator logs {job['submission_id']} --follow`, or `orchestrator stop {job['submission_id']}`"
        )
    return "\n".join(lines)


def format_jobs(jobs: list[dict[str, Any]]):
    """The jobs of a cluster as a rich table, newest first."""
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("id", no_wrap=True)
    for name in ("status", "run", "started", "duration"):
        table.add_column(name, no_wrap=True)
    table.add_column("message", overflow="ellipsis")
    for j in jobs:
        message = (j.get("message") or "").strip().splitlines()
        # Text, not markup: ids, run names and messages are shown as written, `[red]` and all.
        cells = (
            j["submission_id"],
            j["status"],
            j.get("run") or "-",
            _when(j.get("start_time")),
            _duration(j),
            (message[0][:60] if message else ""),
        )
        table.add_row(*(Text(str(c)) for c in cells))
    return table
