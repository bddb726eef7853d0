"""The Jobs API of one Ray cluster: its address, its auth token, and the thin client that answers the verbs.

Ray >= 2.52 protects the dashboard with a bearer token (RAY_AUTH_MODE=token); the token is read
from the environment or Ray's token file, sent only as a header, and never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import BadInput, RunFailed

DEFAULT_DASHBOARD_PORT = 8265
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
METADATA_RUN = "orchestrator_run"
METADATA_JOB_FILE = "orchestrator_job_file"
METADATA_STORAGE = "orchestrator_storage"
# Ray's ids (raysubmit_...), ours (run name + suffix) or a user's: never empty, no spaces, no slashes (a slash
# would address another endpoint of the Jobs API).
SUBMISSION_ID_RE = re.compile(r"^[^\s/?#]{1,200}\Z")


# ----------------------------------------------------------------------------------------------
# Address and token


class NoSuchJob(BadInput):
    """The cluster has no job by that id (exit 2, like any input that names nothing)."""


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
                raise NoSuchJob(
                    f"{what}: no such job on {self.address}; `orchestrator list --address {self.address}` shows the jobs"
                ) from None
            if "already exists" in text:
                raise BadInput(f"{what}: {self.address} already has a job with this id; choose another") from None
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

    def total_resources(self) -> dict[str, float]:
        """CPU, GPU, memory, ... summed over the cluster's alive nodes; empty when the state API does not say."""
        r = self._get("/api/v0/nodes?limit=10000&detail=true")
        try:
            nodes = r.json()["data"]["result"]["result"]
        except (ValueError, KeyError, TypeError):
            return {}
        total: dict[str, float] = {}
        for node in nodes:
            if node.get("state") == "ALIVE":
                for name, amount in (node.get("resources_total") or {}).items():
                    total[name] = total.get(name, 0) + amount
        return total

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

    def find(self, job_or_run: str) -> dict[str, Any]:
        """The job with this submission id, else the newest job of the run of this name; NoSuchJob if neither."""
        try:
            return self.status(job_or_run)
        except NoSuchJob:
            pass
        of_run = [j for j in self.list() if j.get("run") == job_or_run]  # newest first
        if not of_run:
            raise NoSuchJob(
                f"{job_or_run}: no job with this id or run name on {self.address}; "
                f"`orchestrator list --address {self.address}` shows the jobs"
            )
        return of_run[0]

    def exists(self, job_id: str) -> bool:
        """Whether the cluster has a job with this submission id."""
        try:
            self.status(job_id)
        except NoSuchJob:
            return False
        return True

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
