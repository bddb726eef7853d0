"""One handle on a run's directory: opened once from its URI, with the verbs on what lives there.

```
<checkpoint.storage>/<run name>/
  run.json  metrics.jsonl  checkpoint_<step>/  test.json  report.html  run.log  tensorboard/
  .lease    (who runs here now: see `lease`)
```

Whoever holds a `RunDir` reads and writes those files through it, so the layout lives here and
nowhere else: the filesystem is opened once, and each file format has one reader and one writer
(run.json's shape is `runrecord`'s, a checkpoint's is `checkpoint`'s).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import storage
from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
METRICS = "metrics.jsonl"
TEST_RECORD = "test.json"
REPORT = "report.html"
LOG_FILE = "run.log"


def run_uri_for(spec: JobSpec, name: str | None = None) -> str:
    """The URI of a run's directory: `<checkpoint.storage>/<name>` (local storage as an absolute path)."""
    protocol, path = storage.split_uri(spec.checkpoint.storage)
    root = path if protocol == "file" else f"{protocol}://{path}"
    return f"{root.rstrip('/')}/{name or spec.name}"


@dataclass
class RunDir:
    """A run's directory on some storage: its URI as a user writes it, the filesystem and the root path on it."""

    uri: str
    fs: Any
    root: str
    endpoint_url: str | None = None

    @classmethod
    def open(cls, uri: str, endpoint_url: str | None = None, timeout_s: float | None = None) -> RunDir:
        """The run at `uri`; its storage operations retry what can heal within `timeout_s` (checkpoint.upload_timeout_s)."""
        fs, root = storage.open_storage(uri, endpoint_url, timeout_s)
        return cls(uri=uri.rstrip("/"), fs=fs, root=root, endpoint_url=endpoint_url)

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return storage.split_uri(self.uri)[0] == "file"

    def path(self, *parts: str) -> str:
        """A path inside the run on its filesystem."""
        return storage.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """The URI of something inside the run, as a user would write it."""
        return "/".join([self.uri, *parts])

    def exists(self, *parts: str) -> bool:
        return storage.exists(self.fs, self.path(*parts))

    # -- JSON documents (run.json, test.json, sweep.json)

    def read_json(self, name: str) -> Any:
        """The JSON document `name`, or None when there is none."""
        try:
            return json.loads(storage.read_bytes(self.fs, self.path(name)))
        except FileNotFoundError:
            return None

    def write_json(
        self, name: str, document: Any, indent: int | None = None, default: Callable[[Any], Any] = str
    ) -> None:
        storage.write_bytes(self.fs, self.path(name), json.dumps(document, indent=indent, default=default).encode())

    # -- metrics.jsonl

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every entry of metrics.jsonl, oldest first (empty when there is none); a torn last line is skipped."""
        try:
            text = storage.read_bytes(self.fs, self.path(METRICS)).decode()
        except FileNotFoundError:
            return []
        entries = []
        for line in text.splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a crash mid-append leaves a torn last line
        return entries

    def metrics_log(self, history: list[dict[str, Any]]) -> MetricsLog:
        """The writer of metrics.jsonl, starting from a (restored) history."""
        return MetricsLog(self.fs, self.path(METRICS), history)

    # -- the test record

    def read_test(self) -> dict[str, Any] | None:
        """test.json: the best checkpoint on the test split (metrics and what the plots need), or None."""
        return self.read_json(TEST_RECORD)

    def write_test(self, record: dict[str, Any]) -> str:
        self.write_json(TEST_RECORD, record, default=float)  # NumPy scalars are numbers
        return self.uri_of(TEST_RECORD)


class MetricsLog:
    """metrics.jsonl of a run: every entry by step, rewritten whole from the restored history, then appended."""

    def __init__(self, fs, path: str, history: list[dict[str, Any]]):
        self.fs, self.path = fs, path
        self.local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        self.lines = [json.dumps(e, default=float) for e in history]
        # A resumed run's file may hold steps past the checkpoint: rewrite it so no step appears twice.
        self._rewrite()

    def _rewrite(self, lines: list[str] | None = None) -> None:
        data = "".join(line + "\n" for line in (self.lines if lines is None else lines)).encode()
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path)
        else:
            storage.write_bytes(self.fs, self.path, data)

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, default=float)
        self.lines.append(line)
        if self.local:  # appended as it happens so a crashed run keeps its history
            with open(self.path, "a") as fh:
                fh.write(line + "\n")

    def flush(self, lines: list[str] | None = None) -> None:
        """Object stores cannot append: rewrite the whole file (at checkpoints and at the end).

        Best effort: the history also lives in every checkpoint, and the next flush rewrites it whole.
        """
        if self.local:
            return
        try:
            self._rewrite(lines)
        except Exception as exc:
            log.warning("could not rewrite %s (%s); the checkpoints keep the history", self.path, type(exc).__name__)

    def snapshot_flush(self) -> Callable[[], None]:
        """A flush of the lines as they are now, to run later on the checkpoint writer's thread."""
        lines = list(self.lines)
        return lambda: self.flush(lines)
