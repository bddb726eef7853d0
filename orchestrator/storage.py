"""Storage behind strings: a URI (local path, file://, s3://, any fsspec URI) becomes a filesystem.

Credentials come from the environment (AWS_* variables, profiles, instance roles), never from a
job file. Errors name the URI and never a secret.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
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


DEFAULT_TIMEOUT_S = 300.0
# A command a person waits on (checkpoints, runs, report, export) gives up sooner, in one line: a healthy
# storage answers in well under a second, and minutes of retries there only look like a hang.
INTERACTIVE_TIMEOUT_S = 10.0
# What an operation without a deadline of its own gets, and whether each retry says so (a run's log wants
# every retry; an interactive command only its one line at the end): see `use_interactive_deadline`.
_default_timeout_s = DEFAULT_TIMEOUT_S
_interactive = False


def use_interactive_deadline(timeout_s: float = INTERACTIVE_TIMEOUT_S) -> None:
    """For the rest of this process: storage operations without a deadline of their own give up after `timeout_s`
    with one line, and retry without a line each."""
    global _default_timeout_s, _interactive
    _default_timeout_s, _interactive = float(timeout_s), True


# One request may not wait longer than this for a first byte even under a long deadline: a healthy
# S3 answers in well under a second, so a silent socket is a dead one and the next attempt may heal.
MAX_READ_TIMEOUT_S = 60.0
MAX_CONNECT_TIMEOUT_S = 10.0


def open_storage(uri: str, endpoint_url: str | None = None, timeout_s: float | None = None):
    """Return (filesystem, root path) for a storage URI; its operations retry transient failures within `timeout_s`."""
    if redact(uri) != uri:
        # Nothing here reads credentials from a URI: they would only end up in paths, logs and records.
        raise BadInput(f"{redact(uri)}: credentials do not belong in a storage URI; they come from the environment")
    deadline = float(timeout_s or _default_timeout_s)
    protocol, path = split_uri(uri)
    if protocol == "file":
        from fsspec.implementations.local import LocalFileSystem

        # Not the shared cached instance: the deadline rides on this one.
        fs = LocalFileSystem(auto_mkdir=True, skip_instance_cache=True)
    elif protocol in ("s3", "s3a"):
        import s3fs

        endpoint = endpoint_url or endpoint_from_env()
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            client_kwargs["region_name"] = region
        # One retry layer, ours (`with_retries`, which knows what can heal and when to give up):
        # botocore makes one attempt per call and s3fs's own loop one pass, so the
        # layers do not multiply. The socket timeouts come from the deadline so that an endpoint
        # that accepts and never answers fails an attempt within it.
        # No listing cache and no shared instance: checkpoints appear and vanish under us, and a
        # stale listing would hide a committed checkpoint or show a deleted one.
        fs = s3fs.S3FileSystem(
            client_kwargs=client_kwargs,
            use_listings_cache=False,
            skip_instance_cache=True,
            config_kwargs={
                "connect_timeout": min(MAX_CONNECT_TIMEOUT_S, deadline),
                "read_timeout": min(MAX_READ_TIMEOUT_S, deadline),
                "retries": {"mode": "standard", "total_max_attempts": 1},
                "max_pool_connections": MAX_CONNECTIONS,
            },
        )
        fs.retries = 1  # s3fs's loop (a class attribute, not a parameter): one pass
    else:
        import fsspec

        try:
            fs = fsspec.filesystem(protocol, skip_instance_cache=True)
        except (ImportError, ValueError) as exc:
            raise BadInput(f"{redact(uri)}: unsupported storage protocol {protocol!r} ({exc})") from None
    fs.orchestrator_timeout_s = deadline
    return fs, path


def timeout_of(fs) -> float:
    """The deadline of one operation on a filesystem from `open_storage` (the default for any other)."""
    return float(getattr(fs, "orchestrator_timeout_s", _default_timeout_s))


def to_uri(fs, path: str) -> str:
    """The URI of a path on a filesystem, as a user would write it."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{'s3' if protocol in ('s3', 's3a') else protocol}://{path}"


def join(*parts: str) -> str:
    """Join storage path parts with '/' (every fsspec filesystem uses it)."""
    return posixpath.join(*parts)


# Error codes that say "later" rather than "no": throttling and the server's own trouble.
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "XAmzContentSHA256Mismatch",
}
_CODE_REASONS = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied (check the AWS credentials in the environment)",
    "AllAccessDisabled": "access denied (check the AWS credentials in the environment)",
    "InvalidAccessKeyId": "the access key is not known to the storage (InvalidAccessKeyId: check AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "the secret key does not match the access key (SignatureDoesNotMatch: check AWS_SECRET_ACCESS_KEY)",
    "ExpiredToken": "the session token has expired (ExpiredToken: refresh the AWS credentials)",
    "InvalidToken": "the session token is not valid (InvalidToken: check AWS_SESSION_TOKEN)",
}
_NO_CREDENTIALS = "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile or a role)"
_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EINTR,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ESTALE,
    errno.EBUSY,
}


@dataclass(frozen=True)
class Verdict:
    """What a storage failure is: whether waiting can heal it, and why it happened in a few words."""

    transient: bool
    reason: str


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def classify(exc: BaseException) -> Verdict:
    """Whether a storage failure can heal (connection trouble, timeouts, 5xx, throttling) and why it happened.

    Everything else fails at once: missing buckets, refused or missing credentials, other 4xx, and
    errors nobody knows how to wait out.
    """
    chain = _chain(exc)
    for e in chain:  # the server's own answer says most: find it under s3fs's translation
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            code = str(response["Error"].get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _TRANSIENT_CODES or status == 429 or status >= 500:
                return Verdict(True, f"the storage answered {code or 'HTTP'} {status}".rstrip())
            if code in _CODE_REASONS:
                return Verdict(False, _CODE_REASONS[code])
            if code == "404" or code.startswith("NoSuch"):
                return Verdict(False, f"not found ({code})")
            if status == 403 or code == "403":
                return Verdict(False, _CODE_REASONS["AccessDenied"])
            return Verdict(False, f"the storage refused the request ({code or 'HTTP'} {status})")
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError"}:
        return Verdict(False, _NO_CREDENTIALS)
    if names & {"SSLError", "InvalidProxiesConfigError"}:
        return Verdict(False, f"cannot talk to the storage endpoint ({type(chain[-1]).__name__})")
    if names & {
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "TimeoutError",
        "FSTimeoutError",
        "ServerTimeoutError",
        "timeout",
    }:
        return Verdict(True, "the storage endpoint did not answer in time")
    if names & {
        "EndpointConnectionError",
        "HTTPClientError",
        "ConnectionError",
        "ClientConnectionError",
        "ClientPayloadError",
        "IncompleteReadError",
        "IncompleteRead",
        "ResponseParserError",
    }:
        return Verdict(True, "cannot reach the storage endpoint")
    if isinstance(exc, FileNotFoundError):
        return Verdict(False, "not found")
    if isinstance(exc, PermissionError):
        return Verdict(False, "access denied")
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return Verdict(True, f"{exc.strerror or type(exc).__name__}")
    return Verdict(False, f"storage error ({type(exc).__name__}: {exc})" if str(exc) else type(exc).__name__)


def describe_error(uri: str, exc: BaseException) -> str:
    """One line on why storage at `uri` failed, naming the (redacted) URI and never a credential."""
    if isinstance(exc, StorageError):
        return str(exc)
    return f"{redact(uri)}: {_scrub(classify(exc).reason)}"


def _scrub(text: str) -> str:
    """A reason with any secret from the environment blanked (a server may echo what it was sent)."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text.splitlines()[0] if text else text


class StorageError(BadInput):
    """Storage that failed for good: an error that cannot heal, or transient ones past the deadline; one line."""

    def __init__(self, uri: str, reason: str, transient: bool = False):
        super().__init__(f"{uri}: {reason}")
        self.uri, self.reason, self.transient = uri, reason, transient


PREFLIGHT_TIMEOUT_S = 15.0


def preflight(uri: str, endpoint_url: str | None = None, timeout_s: float | None = None) -> None:
    """Prove the storage is reachable and writable: write a probe object and remove it (BadInput if not).

    A few seconds of retries at most (`timeout_s`, capped at 15 s): a user waits for this answer.
    """
    deadline = min(float(timeout_s or DEFAULT_TIMEOUT_S), PREFLIGHT_TIMEOUT_S)
    fs, root = open_storage(uri, endpoint_url, deadline)
    if split_uri(uri)[0] == "file":
        # A local root not made yet is made by the run's first write: the probe goes to the nearest directory
        # that exists, so that a run refused later (by preflight, or a lease) leaves nothing behind.
        while not os.path.lexists(root) and os.path.dirname(root) != root:
            root = os.path.dirname(root)
        if not os.path.isdir(root):
            raise BadInput(f"{redact(uri)}: {root} is a file, not a directory")
    probe = join(root, f".orchestrator-probe-{uuid.uuid4().hex}")
    try:
        call(fs, "pipe_file", probe, b"probe")
        call(fs, "rm_file", probe)
    except StorageError as exc:  # the probe's own name means nothing to the user
        raise BadInput(f"{redact(uri)}: {exc.reason}") from None
    except BadInput:
        raise
    except Exception as exc:  # every failure here is the user's storage, reported in one line
        raise BadInput(describe_error(uri, exc)) from None


def with_retries(
    fn: Callable[[], T],
    what: str,
    timeout_s: float | None = None,
    uri: str | None = None,
    first_delay: float = 0.2,
    max_delay: float = 10.0,
) -> T:
    """Call fn; retry what can heal with jittered exponential back-off until `timeout_s` has passed.

    What cannot heal raises StorageError at once (FileNotFoundError of an object stays itself: a
    reader decides what absence means); what is still failing at the deadline raises StorageError
    naming the URI, the operation and the last reason.
    """
    deadline = float(timeout_s or _default_timeout_s)
    shown = redact(uri) if uri else what
    start = time.monotonic()
    delay = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except (IsADirectoryError, NotADirectoryError, StorageError):
            raise
        except Exception as exc:
            verdict = classify(exc)
            if isinstance(exc, FileNotFoundError) and not verdict.reason.startswith("the bucket"):
                raise
            if not verdict.transient:
                raise StorageError(shown, _scrub(verdict.reason)) from exc
            elapsed = time.monotonic() - start
            # Jittered: many workers that lost the same endpoint do not all come back in step.
            sleep = random.uniform(delay / 2, delay)
            if elapsed + sleep >= deadline:
                past = "" if _interactive else f", past checkpoint.upload_timeout_s={deadline:g}"
                raise StorageError(
                    shown,
                    f"{what} still failing after {elapsed:.1f} s and {attempt} attempt(s){past} ({_scrub(verdict.reason)})",
                    transient=True,
                ) from exc
            log.log(
                logging.DEBUG if _interactive else logging.WARNING,
                "%s %s failed (%s), retry %d in %.1fs",
                *(what, shown, verdict.reason, attempt, sleep),
            )
            time.sleep(sleep)
            delay = min(delay * 2, max_delay)


def call(fs, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
    """`fs.<method>(path, ...)` under the retry policy and the filesystem's deadline, errors naming the path's URI.

    On an async filesystem (s3fs) each attempt is also cut at the time left: a socket timeout alone
    does not bound a request whose body the server never reads.
    """
    deadline = timeout_of(fs)
    end = time.monotonic() + deadline
    bounded = _is_async(fs)

    def attempt() -> Any:
        extra = {"timeout": max(0.5, end - time.monotonic())} if bounded else {}
        return getattr(fs, method)(path, *args, **kwargs, **extra)

    return with_retries(attempt, _VERBS.get(method, method), deadline, to_uri(fs, path))


_VERBS = {
    "cat_file": "read",
    "pipe_file": "write",
    "exists": "stat",
    "info": "stat",
    "ls": "list",
    "rm_file": "remove",
    "rm": "remove",
}


def _is_async(fs) -> bool:
    from fsspec.asyn import AsyncFileSystem

    return isinstance(fs, AsyncFileSystem)


# Transfers: large objects move in parts, several at once, and the files of a checkpoint move
# together. Measured on the same server in one run (bench/checkpoint_transfer.py, BENCHMARKS.md):
# uploads through boto3's transfer manager (threads) cost the client a third of the CPU of s3fs's
# async multipart and ran 1.3x faster on a loaded machine, so large objects go up through it (under
# the same retry policy, its own retries off), in boto3's own 8 MiB parts: a 300 MiB commit of two
# files reached 0.94 of `upload_file` with them, 0.88 with 16 MiB parts (two waves of ten parts,
# the second part-empty, where 8 MiB makes four); s3fs's parallel ranged reads
# outran boto3's download_file 2x, so reads stay with s3fs, in 64 MiB ranges: still parallel for a
# large file, and fewer requests (moto answers each range by copying the whole object: 16 MiB
# ranges read at 40-48 MiB/s there, 64 MiB at 64-70).
PART_SIZE = 8 * 2**20
READ_PART_SIZE = 64 * 2**20
PARTS_IN_FLIGHT = 10  # for all the large objects of one write_files together, as boto3's default
FILES_IN_FLIGHT = 4
MAX_CONNECTIONS = PARTS_IN_FLIGHT * FILES_IN_FLIGHT


def _ranges(fs, concurrency: int = PARTS_IN_FLIGHT) -> dict[str, int]:
    """Ranged-read options for s3fs (an object past one range is read in parallel ranges); none elsewhere."""
    return {"chunksize": READ_PART_SIZE, "max_concurrency": concurrency} if _is_s3(fs) else {}


def _is_s3(fs) -> bool:
    return any(p in ("s3", "s3a") for p in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)))


def read_bytes(fs, path: str) -> bytes:
    """Read a whole small object (one request), retrying transient failures."""
    _check_readable(fs, path)
    return call(fs, "cat_file", path, **_ranges(fs, concurrency=1))


def read_large(fs, path: str) -> bytes:
    """Read a whole object, a large one as parallel ranged reads, retrying transient failures."""
    _check_readable(fs, path)
    return call(fs, "cat_file", path, **_ranges(fs))


def _check_readable(fs, path: str) -> None:
    """StorageError for a local path that is a FIFO, socket or device: reading one waits for a writer for ever."""
    if _is_local(fs):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return  # the read says what is wrong (not found, denied), as before
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise StorageError(to_uri(fs, path), "not a regular file (a FIFO, socket or device)")


def _is_local(fs) -> bool:
    return any(p in ("file", "local") for p in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)))


def write_bytes(fs, path: str, data: bytes, transfers=None) -> None:
    """Write a whole object (a large one in parallel parts), retrying transient failures.

    `transfers`: a boto3 TransferManager whose parts in flight this upload shares with others.
    """
    if _in_parts(fs, data):
        _upload_parts(fs, path, data, transfers)
    else:
        call(fs, "pipe_file", path, data)


def _in_parts(fs, data: bytes) -> bool:
    """Whether an object goes up as a multipart upload (two parts or more, to S3)."""
    return _is_s3(fs) and len(data) >= 2 * PART_SIZE


def _transfer_manager(fs):
    """A boto3 TransferManager with PARTS_IN_FLIGHT parts of PART_SIZE in flight, for the uploads given to it together."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    config = TransferConfig(
        multipart_threshold=2 * PART_SIZE,
        multipart_chunksize=PART_SIZE,
        max_concurrency=PARTS_IN_FLIGHT,
        use_threads=True,
    )
    return create_transfer_manager(_transfer_client(fs), config)


def _upload_parts(fs, path: str, data: bytes, transfers=None) -> None:
    import io

    bucket, _, key = fs._strip_protocol(path).partition("/")
    if transfers is None:
        with _transfer_manager(fs) as own:
            _upload_parts(fs, path, data, own)
        return
    with_retries(
        lambda: transfers.upload(io.BytesIO(data), bucket, key).result(),
        "write",
        timeout_of(fs),
        to_uri(fs, path),
    )


_CLIENT_LOCK = threading.Lock()


def _transfer_client(fs):
    """A boto3 S3 client configured as the s3fs filesystem is (endpoint, region, timeouts, one attempt); one per filesystem."""
    with _CLIENT_LOCK:
        client = getattr(fs, "orchestrator_transfer_client", None)
        if client is None:
            import boto3
            from botocore.config import Config

            kwargs = {k: v for k, v in fs.client_kwargs.items() if k in ("endpoint_url", "region_name")}
            client = boto3.session.Session().client("s3", config=Config(**fs.config_kwargs), **kwargs)
            fs.orchestrator_transfer_client = client
        return client


def write_files(fs, files: dict[str, bytes]) -> None:
    """Write several objects at once, each under the retry policy; returns when all are written."""
    if not any(_in_parts(fs, data) for data in files.values()):
        concurrently([lambda path=path, data=data: write_bytes(fs, path, data) for path, data in files.items()])
        return
    # The large ones share one pool of parts in flight (more requests at once only queue at the
    # server): when one file's last parts are up, the others' parts take every slot, where a fixed
    # share per file left half of them idle while the largest file finished.
    with _transfer_manager(fs) as transfers:
        concurrently(
            [lambda path=path, data=data: write_bytes(fs, path, data, transfers) for path, data in files.items()]
        )


def read_files(fs, paths: list[str]) -> dict[str, bytes]:
    """Read several objects at once (large ones in parallel ranges), each under the retry policy."""
    return dict(zip(paths, concurrently([lambda path=path: read_large(fs, path) for path in paths]), strict=True))


def concurrently(tasks: list[Callable[[], T]], workers: int = FILES_IN_FLIGHT) -> list[T]:
    """Run tasks on a few threads (storage calls and hashing release the GIL); results in order.

    The first failure is raised once every task has ended, so no write is still in flight when a
    caller goes on (to write a manifest, or to report the failure).
    """
    if len(tasks) <= 1:
        return [task() for task in tasks]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(workers, len(tasks)), thread_name_prefix="storage") as pool:
        futures = [pool.submit(task) for task in tasks]
    return [f.result() for f in futures]


def exists(fs, path: str) -> bool:
    """Whether a path exists, retrying transient failures."""
    return call(fs, "exists", path)
