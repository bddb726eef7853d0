"""What a checkpoint holds, how it is written, committed, listed, verified and restored.

A checkpoint is `<run>/checkpoint_<step>/` holding `model.safetensors` (weights, readable without
this package), `state.pt` (optimizer, schedule, scaler, counters, data position, early stopping,
metrics history; tensors and plain data only), `rng.pt` (every rank's RNG states), `job.yaml`
(the resolved job) and `manifest.json`, written last: the commit marker. A directory without a
manifest, or whose files do not match it (size and sha256), is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator import storage
from orchestrator.errors import BadInput
from orchestrator.lease import LeaseLost

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
FORMAT_VERSION = 1


def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint at an optimizer step (zero-padded so names sort by step)."""
    return f"checkpoint_{step:08d}"


@dataclass
class CheckpointManifest:
    """The commit marker: which files make the checkpoint, and what it is."""

    step: int
    epoch: int
    metrics: dict[str, Any]
    files: dict[str, dict[str, Any]]  # name -> {"size": int, "sha256": str} (a sharded checkpoint's shards: "crc32")
    run_record: str = "../run.json"
    created: float = field(default_factory=time.time)
    format: int = FORMAT_VERSION
    # The loop's counters at this step (best, last validation, timings): what a summary needs, without state.pt.
    train: dict[str, Any] = field(default_factory=dict)
    # "full": model.safetensors and state.pt hold everything; "sharded": every rank's shards (sharded_checkpoint).
    layout: str = "full"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True, default=float).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CheckpointManifest:
        raw = json.loads(data)
        return cls(
            **{
                k: raw[k]
                for k in ("step", "epoch", "metrics", "files", "run_record", "created", "format", "train", "layout")
                if k in raw
            }
        )


@dataclass
class CheckpointInfo:
    """A committed checkpoint as listed: where it is and what its manifest says."""

    uri: str
    path: str
    manifest: CheckpointManifest

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def epoch(self) -> int:
        return self.manifest.epoch

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.metrics

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.manifest.files.values())

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "metrics": self.metrics, "size": self.size, "uri": self.uri}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Serialization: tensors through safetensors and torch.save of plain data; loading never unpickles code


def serialize_weights(state_dict: dict) -> bytes:
    """Weights as safetensors bytes (contiguous CPU tensors)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state_dict.items()})


def deserialize_weights(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def serialize_state(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def deserialize_state(data: bytes) -> Any:
    """Load torch.save'd plain data with weights_only=True: no code is unpickled."""
    import torch

    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


# ----------------------------------------------------------------------------------------------
# Writing, committing, retention


def commit_checkpoint(
    fs,
    run_root: str,
    step: int,
    epoch: int,
    files: dict[str, bytes],
    metrics: dict[str, Any],
    train: dict[str, Any] | None = None,
    guard: Callable[[], None] | None = None,
) -> str:
    """Write the files of a checkpoint, then its manifest last (with the loop's `train` counters); return the checkpoint path.

    `guard` (the run's lease check) runs before the first write and again before the manifest: when it raises,
    nothing (or nothing visible) is committed.
    """
    if guard is not None:
        guard()
    path = storage.join(run_root, checkpoint_dir_name(step))
    manifest_path = storage.join(path, MANIFEST)
    # A leftover manifest at this step (a checkpoint skipped as corrupt) must not vouch for new files.
    if storage.exists(fs, manifest_path):
        storage.call(fs, "rm_file", manifest_path)
    # Every file at once (large ones in parallel parts), hashed while they upload; the manifest
    # goes only after all of them are written, so a crash or failure mid-way leaves no commit.
    results = storage.concurrently(
        [lambda data=data: sha256(data) for data in files.values()]
        + [lambda: storage.write_files(fs, {storage.join(path, name): data for name, data in files.items()})],
        workers=len(files) + 1,
    )
    entries = {
        name: {"size": len(data), "sha256": digest}
        for (name, data), digest in zip(files.items(), results[: len(files)], strict=True)
    }
    manifest = CheckpointManifest(step=step, epoch=epoch, metrics=metrics, files=entries, train=train or {})
    if guard is not None:
        guard()
    write_manifest(fs, path, manifest)
    return path


def write_manifest(fs, path: str, manifest: CheckpointManifest) -> None:
    """Commit the checkpoint at `path`, whose files are all written: its manifest, whole or not at all."""
    manifest_path = storage.join(path, MANIFEST)
    if storage.split_uri(path)[0] == "file" and "file" in _protocols(fs):
        # On a local disk a crash mid-write would leave a torn manifest: write aside, then rename.
        tmp = manifest_path + ".tmp"
        storage.write_bytes(fs, tmp, manifest.to_json())
        fs.mv(tmp, manifest_path)
    else:
        storage.write_bytes(fs, manifest_path, manifest.to_json())  # an object PUT is atomic


def _protocols(fs) -> tuple:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def list_checkpoints(fs, run_root: str, uri_prefix: str | None = None) -> list[CheckpointInfo]:
    """Committed checkpoints of a run (those with a readable manifest), oldest first."""
    try:
        entries = storage.call(fs, "ls", run_root, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not CHECKPOINT_RE.match(name):
            continue
        path = storage.join(run_root, name)
        try:
            manifest = CheckpointManifest.from_json(storage.read_bytes(fs, storage.join(path, MANIFEST)))
        except FileNotFoundError:
            continue  # not committed: invisible
        except (ValueError, KeyError, TypeError):
            log.warning("checkpoint %s has an unreadable manifest; skipped", path)
            continue
        uri = storage.join(uri_prefix.rstrip("/"), name) if uri_prefix else storage.to_uri(fs, path)
        found.append(CheckpointInfo(uri=uri, path=path, manifest=manifest))
    return sorted(found, key=lambda c: c.step)


def read_verified(fs, info: CheckpointInfo, names: list[str] | None = None) -> dict[str, bytes]:
    """Read a checkpoint's files, checking each against the manifest; ValueError on a mismatch."""
    names = names or list(info.manifest.files)
    for name in names:
        if name not in info.manifest.files:
            raise ValueError(f"{info.uri}: manifest lists no {name}")

    def fetch(name: str) -> bytes:
        data = storage.read_large(fs, storage.join(info.path, name))
        expected = info.manifest.files[name]
        if len(data) != expected["size"] or not _matches(data, expected):
            raise ValueError(f"{info.uri}/{name}: does not match its manifest (truncated or corrupt)")
        return data

    # All files at once (large ones in parallel ranges), each checked as it arrives.
    return dict(zip(names, storage.concurrently([lambda name=name: fetch(name) for name in names]), strict=True))


def _matches(data: bytes, expected: dict[str, Any]) -> bool:
    """Whether a file's bytes have the checksum its manifest entry gives (sha256, or a sharded checkpoint's CRC-32)."""
    if "crc32" in expected:
        import zlib

        return zlib.crc32(data) == expected["crc32"]
    return sha256(data) == expected["sha256"]


def restore_latest(fs, run_root: str) -> tuple[CheckpointInfo, dict[str, bytes]] | None:
    """The newest checkpoint whose files match its manifest, with its files; None for a fresh start."""
    for info in reversed(list_checkpoints(fs, run_root)):
        try:
            return info, read_verified(fs, info)
        except (ValueError, FileNotFoundError) as exc:
            log.warning("skipping checkpoint %s: %s", info.uri, exc)
    return None


def apply_retention(
    fs,
    run_root: str,
    keep_last: int,
    keep_best: int = 0,
    best_metric: str | None = None,
    best_mode: str = "min",
    best_step: int | None = None,
) -> list[str]:
    """Delete committed checkpoints beyond the newest `keep_last` and the best `keep_best`; return deleted paths.

    `best_step` is the run's own best (early stopping's min_delta can make it differ from the top value): it is
    the first of the `keep_best`, the rest ranked by `best_metric`.
    """
    found = list_checkpoints(fs, run_root)
    keep = {c.path for c in found[-keep_last:]}
    if keep_best and best_metric:
        scored = [c for c in found if isinstance(c.metrics.get(best_metric), (int, float))]
        scored.sort(key=lambda c: (c.step != best_step, c.metrics[best_metric] * (-1 if best_mode == "max" else 1)))
        keep |= {c.path for c in scored[:keep_best]}
    return delete_checkpoints(fs, [c for c in found if c.path not in keep])


def delete_checkpoints(fs, checkpoints: list[CheckpointInfo]) -> list[str]:
    """Delete committed checkpoints, each manifest first so that a half-deleted checkpoint is never visible as committed."""
    deleted = []
    for c in checkpoints:
        storage.call(fs, "rm_file", storage.join(c.path, MANIFEST))
        storage.call(fs, "rm", c.path, recursive=True)
        deleted.append(c.path)
    return deleted


# ----------------------------------------------------------------------------------------------
# Asynchronous saving: the step blocks only for the snapshot; at most one upload in flight


class CheckpointWriter:
    """Serializes and commits snapshots on a background thread (or inline when not async)."""

    def __init__(
        self,
        fs,
        run_root: str,
        asynchronous: bool = True,
        after_commit: Callable[[str], None] | None = None,
        guard: Callable[[], None] | None = None,
    ):
        self.fs = fs
        self.guard = guard
        self.run_root = run_root
        self.asynchronous = asynchronous
        self.after_commit = after_commit
        self.last_committed: str | None = None
        self._error: BaseException | None = None
        self._pending: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=1)
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        if asynchronous:
            self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._pending.get()
            if job is None:
                return
            try:
                job()
            except BaseException as exc:  # surfaced to the training thread at the next save/wait
                self._error = exc
            finally:
                self._idle.set()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, LeaseLost):
                raise err  # not an upload that failed: the run must stop, and say why
            raise RuntimeError(f"checkpoint upload failed: {err}") from err

    def save(
        self,
        step: int,
        epoch: int,
        build_files: Callable[[], dict[str, bytes]],
        metrics: dict[str, Any],
        then: Callable[[], None] | None = None,
        train: dict[str, Any] | None = None,
    ) -> None:
        """Commit a checkpoint; `build_files` serializes an in-memory snapshot (run in the background when async).

        `then` runs after the commit on the same thread (e.g. rewriting metrics.jsonl on an object store).
        """

        def job() -> None:
            path = commit_checkpoint(self.fs, self.run_root, step, epoch, build_files(), metrics, train, self.guard)
            self.last_committed = path
            if self.after_commit:
                self.after_commit(path)
            if then:
                then()

        if not self.asynchronous:
            job()
            return
        self.wait()  # at most one upload in flight
        self._idle.clear()
        self._pending.put(job)

    def wait(self) -> None:
        """Block until the upload in flight (if any) is committed; re-raise its failure."""
        self._idle.wait()
        self._raise_pending_error()

    def close(self) -> None:
        """Wait for the last upload, then stop the thread."""
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._pending.put(None)
                self._thread.join(timeout=5)
                self._thread = None


# ----------------------------------------------------------------------------------------------
# Reading weights out


def resolve_checkpoint(uri: str, endpoint_url: str | None = None):
    """(fs, CheckpointInfo) for a checkpoint URI, or for a run URI its latest checkpoint; BadInput if none."""
    fs, path = storage.open_storage(uri, endpoint_url)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if CHECKPOINT_RE.match(name):
        parent = path.rstrip("/").rsplit("/", 1)[0]
        for info in list_checkpoints(fs, parent):
            if info.path.rstrip("/") == path.rstrip("/"):
                return fs, info
        raise BadInput(f"{uri}: not a committed checkpoint (no manifest.json)")
    found = list_checkpoints(fs, path)
    if not found:
        raise BadInput(f"{uri}: no committed checkpoint here")
    return fs, found[-1]
