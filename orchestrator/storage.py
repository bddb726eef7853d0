"""Storage behind strings: a URI (local path, file://, s3://, any fsspec URI) becomes a filesystem.

Credentials come from the environment (AWS_* variables, profiles, instance roles), never from a
job file. Errors name the URI and never a secret.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from orchestrator.errors import BadInput

log = logging.getLogger(__name__)
T = TypeVar("T")
# user:password@ (up to the last @ of the authority, so a password holding '@' goes too).
_USERINFO_RE = re.compile(r"(?<=://)[^/?#\s]*@")
# Secret-looking query parameters only (after ? or &): X-Amz-Signature, X-Amz-Credential, token, password...
_SECRET_QUERY_RE = re.compile(
    r"(?i)([?&][^=&#\s]*(?:token|key|secret|passw|pwd|sig|credential|auth)[^=&#\s]*=)[^&#\s'\"<>]+"
)


def endpoint_from_env() -> str | None:
    """The S3 endpoint from the standard variables (service-specific first)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def redact(uri: str) -> str:
    """A URI (or a line of text holding URIs) as it may be shown: no user:password@, no secret-looking query values.

    The one redaction of the project: whatever stores, renders, logs or prints a URI passes it here.
    """
    return _SECRET_QUERY_RE.sub(r"\1***", _USERINFO_RE.sub("", uri))


def split_uri(uri: str) -> tuple[str, str]:
    """(protocol, path) of a URI; local paths become absolute with protocol 'file'."""
    if "://" in uri:
        protocol, _, path = uri.partition("://")
        if protocol == "file":
            return "file", os.path.abspath(path or "/")
        return protocol, path.rstrip("/")
    return "file", os.path.abspath(os.path.expanduser(uri))


def open_storage(uri: str, endpoint_url: str | None = None):
    """Return (filesystem, root path) for a storage URI."""
    if redact(uri) != uri:
        # Nothing here reads credentials from a URI: they would only end up in paths, logs and records.
        raise BadInput(f"{redact(uri)}: credentials do not belong in a storage URI; they come from the environment")
    protocol, path = split_uri(uri)
    if protocol == "file":
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(auto_mkdir=True), path
    if protocol in ("s3", "s3a"):
        import s3fs

        endpoint = endpoint_url or endpoint_from_env()
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            client_kwargs["region_name"] = region
        # No listing cache and no shared instance: checkpoints appear and vanish under us, and a
        # stale listing would hide a committed checkpoint or show a deleted one.
        fs = s3fs.S3FileSystem(
            client_kwargs=client_kwargs,
            use_listings_cache=False,
            skip_instance_cache=True,
            config_kwargs={"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}},
        )
        return fs, path
    import fsspec

    try:
        fs = fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        raise BadInput(f"{uri}: unsupported storage protocol {protocol!r} ({exc})") from None
    return fs, path


def to_uri(fs, path: str) -> str:
    """The URI of a path on a filesystem, as a user would write it."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{'s3' if protocol in ('s3', 's3a') else protocol}://{path}"


def join(*parts: str) -> str:
    """Join storage path parts with '/' (every fsspec filesystem uses it)."""
    return posixpath.join(*parts)


def describe_error(uri: str, exc: BaseException) -> str:
    """One line on why storage at `uri` failed, naming the URI and never a credential."""
    text = f"{type(exc).__name__}: {exc}"
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    low = (code + " " + text).lower()
    if "nosuchbucket" in low or ("bucket" in low and "not exist" in low):
        return f"{uri}: the bucket does not exist"
    if any(
        k in low
        for k in (
            "invalidaccesskeyid",
            "signaturedoesnotmatch",
            "accessdenied",
            "forbidden",
            "403",
            "credentials",
            "expiredtoken",
        )
    ):
        return f"{uri}: access denied (check the AWS credentials in the environment)"
    if any(
        k in low
        for k in (
            "could not connect",
            "connect timeout",
            "connection refused",
            "endpointconnectionerror",
            "cannot connect",
            "name or service not known",
        )
    ):
        return f"{uri}: cannot reach the storage endpoint"
    if isinstance(exc, FileNotFoundError):
        return f"{uri}: not found"
    if isinstance(exc, PermissionError):
        protocol = split_uri(uri)[0]
        return f"{uri}: access denied" + (
            " (check the AWS credentials in the environment)" if protocol in ("s3", "s3a") else ""
        )
    return f"{uri}: storage error ({type(exc).__name__})"


def preflight(uri: str, endpoint_url: str | None = None) -> None:
    """Prove the storage is reachable and writable: write a probe object and remove it (BadInput if not)."""
    fs, root = open_storage(uri, endpoint_url)
    probe = join(root, f".orchestrator-probe-{uuid.uuid4().hex}")
    try:
        if split_uri(uri)[0] == "file":
            fs.makedirs(root, exist_ok=True)  # on object stores this would create buckets: never
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)
    except BadInput:
        raise
    except Exception as exc:  # every failure here is the user's storage, reported in one line
        raise BadInput(describe_error(uri, exc)) from None


def with_retries(
    fn: Callable[[], T], what: str, attempts: int | None = None, first_delay: float = 0.5, max_delay: float = 15.0
) -> T:
    """Call fn, retrying transient storage failures with exponential back-off; the last error propagates.

    ORCHESTRATOR_STORAGE_ATTEMPTS sets the attempts (default 8: about a minute of outage survived).
    """
    attempts = attempts or int(os.environ.get("ORCHESTRATOR_STORAGE_ATTEMPTS", "8"))
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise
        except Exception as exc:
            if attempt == attempts:
                raise
            log.warning("%s failed (%s), retry %d/%d in %.1fs", what, type(exc).__name__, attempt, attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


def read_bytes(fs, path: str) -> bytes:
    """Read a whole object, retrying transient failures."""
    return with_retries(lambda: fs.cat_file(path), f"read {path}")


def write_bytes(fs, path: str, data: bytes) -> None:
    """Write a whole object, retrying transient failures."""
    with_retries(lambda: fs.pipe_file(path, data), f"write {path}")


def exists(fs, path: str) -> bool:
    """Whether a path exists, retrying transient failures."""
    return with_retries(lambda: fs.exists(path), f"stat {path}")
