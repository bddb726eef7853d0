"""One run per run directory: a lease that the driver holds for the run's whole life.

Two `orchestrator run` of one job at once (two terminals, a resubmission while the first driver
lives) would both train and both write checkpoints into one directory. The driver takes the
lease before it reads or writes anything there; a second driver refuses with one line naming
the holder, or waits for it (`run --wait-for-lease`).

- Local directories: `fcntl.flock` on `<run>/.lease`, held on an open file. The kernel drops the
  lock when the process dies however it dies, so a crashed run never blocks a rerun; the file
  also says who holds it (host, pid, since when) for the refusal's line.
- Object stores (S3): a lease object `<run>/.lease` created with a conditional PUT (If-None-Match),
  renewed by a thread every ttl/3 with If-Match on its ETag, and deleted at the end (If-Match
  again, so a lease someone else has since taken is never deleted). A lease whose last renewal is
  older than its ttl belongs to a dead driver: the next run takes it over with If-Match on the ETag
  it saw, so of two runs taking over at once exactly one wins. Its age is measured on the
  server's clock alone (the object's Last-Modified against the response's Date), so clock skew
  between machines does not matter.

A lease can be lost: a driver stalled past its ttl (paused, cut off) finds on waking that another run took
over. Two things then keep it from writing beside the new holder. The renewal thread, on its first refused
renewal, calls the lease's `on_lost` (the driver interrupts its run there). And every checkpoint commit, in
whatever process or node the loop runs, checks the lease's token in storage before it writes (`check_token`):
a run whose token is gone commits nothing and ends with `LeaseLost`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from orchestrator import storage
from orchestrator.errors import BadInput

log = logging.getLogger(__name__)

LEASE_FILE = ".lease"
DEFAULT_TTL_S = 60.0
# How often a waiting run looks again (at most; a local wait blocks on the lock itself).
WAIT_POLL_S = 1.0


@dataclass
class Holder:
    """Who holds a run's lease: written into the lease so that the refused run can name it."""

    host: str
    pid: int
    since: str  # ISO 8601, UTC: when the holder took the lease
    ttl_s: float | None = None  # object stores: the lease is stale once unrenewed this long
    token: str = ""  # tells this holder from an earlier one with the same pid on the same host

    @classmethod
    def me(cls, ttl_s: float | None) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            since=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            ttl_s=ttl_s,
            token=uuid.uuid4().hex,
        )

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            doc = json.loads(data)
            return cls(
                host=str(doc["host"]),
                pid=int(doc["pid"]),
                since=str(doc["since"]),
                ttl_s=None if doc.get("ttl_s") is None else float(doc["ttl_s"]),
                token=str(doc.get("token", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self, **extra: Any) -> bytes:
        return json.dumps({**asdict(self), **extra}).encode()

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since}"


class LeaseHeld(BadInput):
    """Another run holds the run directory: exit 2, nothing written."""

    def __init__(self, uri: str, holder: Holder | None):
        who = holder.describe() if holder else "a process that has not written its name yet"
        super().__init__(
            f"{storage.redact(uri)}: already in use by another run ({who}); "
            "wait for it with --wait-for-lease, or use --fresh for a new run"
        )
        self.holder = holder


class LeaseLost(Exception):
    """This run's lease is someone else's now: nothing more may be written into the run directory."""

    def __init__(self, uri: str, holder: str):
        super().__init__(uri, holder)
        self.uri, self.holder = uri, holder

    def __str__(self) -> str:
        return f"lost the lease on {storage.redact(self.uri)} to another run ({self.holder}); it wrote nothing more"


def check_token(lease_uri: str, token: str, endpoint_url: str | None = None) -> None:
    """Raise LeaseLost unless the lease object at `lease_uri` still names `token` (the writer's check before a commit)."""
    fs, path = storage.open_storage(lease_uri, endpoint_url)
    try:
        holder = Holder.parse(storage.read_bytes(fs, path))
    except FileNotFoundError:
        holder = None
    if holder is None or holder.token != token:
        raise LeaseLost(lease_uri.rsplit("/", 1)[0], holder.describe() if holder else "none holds it now")


class RunLease:
    """The lease on one run directory; `acquire` then `release` (or use it as a context manager)."""

    def __init__(self, fs, root: str, uri: str, ttl_s: float = DEFAULT_TTL_S):
        self.fs, self.root, self.uri, self.ttl_s = fs, root, uri, float(ttl_s)
        self.path = storage.join(root, LEASE_FILE)
        self.local = storage.split_uri(uri)[0] == "file"
        self.holder: Holder | None = None
        self.lost = False  # an object-store lease that someone took over while we lived (we could not renew)
        self.on_lost: Callable[[str], None] | None = None  # told who holds it now, once, from the renewal thread
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @classmethod
    def for_run(cls, run, ttl_s: float = DEFAULT_TTL_S) -> RunLease:
        return cls(run.fs, run.root, run.uri, ttl_s)

    @property
    def object_uri(self) -> str:
        """The lease object's URI (the run's `.lease`)."""
        return f"{self.uri.rstrip('/')}/{LEASE_FILE}"

    def token_ref(self) -> dict[str, Any] | None:
        """What a loop anywhere needs to check this lease before a commit (`check_token`): picklable plain data."""
        return {"uri": self.object_uri, "token": self.holder.token} if self.holder else None

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self, wait: bool = False, on_wait: Callable[[Holder | None], None] | None = None) -> RunLease:
        """Take the lease, or raise LeaseHeld naming the holder; with `wait`, block until it is free.

        `on_wait` is told (once) who holds it when this call starts waiting.
        """
        if self.local:
            self._acquire_local(wait, on_wait)
            return self
        try:
            self._acquire_object(wait, on_wait)
        except BadInput:
            raise
        except Exception as exc:  # preflight reached this storage a moment ago: say what failed, in one line
            raise BadInput(storage.describe_error(self.uri, exc)) from None
        return self

    def release(self) -> None:
        """Give the lease back (idempotent); a crashed holder's lease goes by itself (local) or expires (S3)."""
        if self.local:
            if self._fd is not None:
                os.close(self._fd)  # closing the last descriptor drops the lock
                self._fd = None
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self._etag is not None and not self.lost:
            try:
                self._client().delete_object(Bucket=self._bucket, Key=self._key, IfMatch=self._etag)
            except Exception as exc:  # an unreleased lease only delays the next run by its ttl
                log.warning("could not release the lease %s (%s)", storage.to_uri(self.fs, self.path), _code(exc))
        self._etag = None

    def gone(self) -> str | None:
        """Why the driver of a run recorded `running` is known to be gone (SIGKILL, a lost machine), or None.

        None also when it cannot be told (a driver on another host, no readable lease): `runs` then shows the
        record's word. A read only: taking the lock to test it could refuse a run starting at that instant.
        """
        if self.local:
            holder = self._read_local_holder()
            if holder is None or holder.host != socket.gethostname():
                return None
            try:
                os.kill(holder.pid, 0)
            except ProcessLookupError:
                return f"its driver (pid {holder.pid}) is gone"
            except OSError:
                pass  # alive, another user's
            return None
        try:
            got = self._client().get_object(Bucket=self._bucket, Key=self._key)
            holder = Holder.parse(got["Body"].read())
        except Exception:  # no lease object (released, or never taken), or storage trouble: nothing to go on
            return None
        # The expiry rule of a takeover (_acquire_object): the holder's own ttl, on the server's clock.
        ttl, age = (holder.ttl_s if holder and holder.ttl_s else self.ttl_s), _age_s(got)
        return f"its driver stopped renewing its lease {age:.0f} s ago" if age > ttl else None

    # -- local: flock

    def _acquire_local(self, wait: bool, on_wait: Callable[[Holder | None], None] | None) -> None:
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        # Not O_TRUNC: opening must not wipe the holder's name before we know we hold the lock.
        # Python's descriptors are not inherited by the processes Ray starts (close-on-exec).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_local_holder()
                if not wait:
                    raise LeaseHeld(self.uri, holder) from None
                if on_wait:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            self.holder = Holder.me(None)
            os.ftruncate(fd, 0)
            os.pwrite(fd, self.holder.encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _read_local_holder(self) -> Holder | None:
        # The holder writes its name right after it takes the lock: a reader can come in between.
        for _ in range(20):
            try:
                with open(self.path, "rb") as fh:
                    holder = Holder.parse(fh.read())
            except FileNotFoundError:
                return None  # no lease was ever taken here: nothing to wait for
            except OSError:
                holder = None
            if holder is not None:
                return holder
            time.sleep(0.05)
        return None

    # -- object stores: conditional PUT

    @property
    def _bucket(self) -> str:
        return self.fs.split_path(self.path)[0]

    @property
    def _key(self) -> str:
        return self.fs.split_path(self.path)[1]

    def _client(self):
        return storage._transfer_client(self.fs)

    def _acquire_object(self, wait: bool, on_wait: Callable[[Holder | None], None] | None) -> None:
        client, told = self._client(), False
        me = Holder.me(self.ttl_s)
        while True:
            try:
                put = client.put_object(Bucket=self._bucket, Key=self._key, Body=me.encode(), IfNoneMatch="*")
                break
            except Exception as exc:
                if not _precondition_failed(exc):
                    raise
            try:
                got = client.get_object(Bucket=self._bucket, Key=self._key)
            except Exception as exc:
                if _code(exc) in ("NoSuchKey", "404"):
                    continue  # released between our PUT and our GET: try to create it again
                raise
            holder = Holder.parse(got["Body"].read())
            ttl = holder.ttl_s if holder and holder.ttl_s else self.ttl_s
            age = _age_s(got)
            if age > ttl:
                # The holder stopped renewing a ttl ago: it is dead (or cut off). Take over what we saw,
                # so that of two runs taking over at once only one succeeds.
                try:
                    put = client.put_object(Bucket=self._bucket, Key=self._key, Body=me.encode(), IfMatch=got["ETag"])
                    log.info("took over the expired lease of %s", holder.describe() if holder else "an unknown run")
                    break
                except Exception as exc:
                    if not _precondition_failed(exc):
                        raise
                    continue
            if not wait:
                raise LeaseHeld(self.uri, holder)
            if on_wait and not told:
                on_wait(holder)
                told = True
            time.sleep(min(WAIT_POLL_S, max(0.1, ttl - age)))
        self.holder, self._etag, self.lost = me, put["ETag"], False
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        """Rewrite the lease every ttl/3 while the run lives; a failed renewal is retried at the next tick."""
        client, n = self._client(), 0
        while not self._stop.wait(self.ttl_s / 3):
            n += 1
            try:
                put = client.put_object(
                    Bucket=self._bucket,
                    Key=self._key,
                    Body=self.holder.encode(renewal=n),
                    IfMatch=self._etag,
                )
                self._etag = put["ETag"]
            except Exception as exc:
                if _precondition_failed(exc) or _code(exc) in ("NoSuchKey", "404"):
                    # Renewals failed for a whole ttl and another run took the lease (and may have ended since).
                    self._lose(client)
                    return
                log.warning("could not renew the lease on %s (%s)", storage.redact(self.uri), _code(exc))

    def _lose(self, client) -> None:
        self.lost = True
        try:
            holder = Holder.parse(client.get_object(Bucket=self._bucket, Key=self._key)["Body"].read())
            who = holder.describe() if holder else "another run"
        except Exception:  # gone, or unreadable: the loss is what matters
            who = "another run"
        if self.on_lost is None:
            log.error("lost the lease on %s to %s", storage.redact(self.uri), who)
            return
        self.on_lost(who)  # its holder stops the run, and says so


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return type(exc).__name__


def _precondition_failed(exc: BaseException) -> bool:
    # 412: the condition did not hold; 409 ConditionalRequestConflict: a concurrent conditional write won.
    return _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _age_s(got: dict[str, Any]) -> float:
    """Seconds since the lease object was last written, on the server's clock (Last-Modified vs Date)."""
    modified = got["LastModified"]
    date = got.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = datetime.now(timezone.utc)
    if date:
        with contextlib.suppress(TypeError, ValueError):
            now = parsedate_to_datetime(date)
    return (now - modified).total_seconds()
