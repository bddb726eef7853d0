"""A bring-your-own loop (`entrypoint:`) as a run like any other: its reports become steps, metrics and checkpoints.

A user's `train_loop_per_worker(config)` reports to Ray with `ray.train.report(metrics, checkpoint=...)`. For the
length of the loop, each worker's `ray.train.report` is wrapped (before the user's module is imported, so that
`from ray.train import report` gets the wrapper too), and each report is also:

- a step: the count of its reports (continued from the checkpoint it resumed from), or the `step` it reported, one
  more where it numbers its steps from 0 (a step is counted once done, as the built-in loop counts them);
- a checkpoint of ours, when it carries one: Ray stores it as `<run>/checkpoint_<step>/` (the name every rank agrees
  on), then rank 0 commits it with a manifest (its files' sizes and sha256, the step, epoch and metrics), so that
  `orchestrator checkpoints` lists it and the summary names it;
- an entry of metrics.jsonl (val_* keys as a validation, the rest as training metrics) and a progress line.

The summary counts what the loop reported: its steps, and its epochs as the distinct `epoch` values it reported. A loop
that names its checkpoint directories itself (`checkpoint_dir_name`) keeps its names, and those are not committed.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.events import Sink
from orchestrator.lease import check_token
from orchestrator.rundir import RunDir
from orchestrator.runrecord import RunStatus, RunSummary, test_summary


def own_loop_config(
    entrypoint: str,
    user_config: dict[str, Any],
    base_dir: str | None,
    run_uri: str,
    endpoint_url: str | None,
    events: Sink | None,
) -> dict[str, Any]:
    """What each worker of a bring-your-own loop is handed: the loop, its config, where the run's records go, and
    where rank 0's progress events go (see events.py; none: it prints their lines)."""
    return {
        "entrypoint": entrypoint,
        "base_dir": base_dir,
        "user_config": user_config,
        "run_uri": run_uri,
        "endpoint_url": endpoint_url,
        "events": events,
    }


def run_own_loop(config: dict[str, Any]) -> None:
    """On a Ray Train worker: the user's loop, each of its reports also recorded as a step of the run."""
    import ray.train

    from orchestrator.hooks import import_hook

    recorder = ReportRecorder(config) if config.get("run_uri") else None
    original = ray.train.report
    if recorder is not None:
        ray.train.report = recorder.wrap(original)
    try:
        fn = import_hook(config["entrypoint"], config.get("base_dir"), "entrypoint")
        fn(config["user_config"])
    finally:
        ray.train.report = original
        events = config.get("events")
        if hasattr(events, "flush"):  # the driver takes the mailbox's last events once the fit has returned
            events.flush()


def _scalars(metrics: dict[str, Any]) -> dict[str, float | int]:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k not in ("step", "epoch")
    }


def _file_digests(directory: str) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under a local checkpoint directory, by its path relative to it."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(block)
            out[os.path.relpath(path, directory).replace(os.sep, "/")] = {
                "size": os.path.getsize(path),
                "sha256": digest.hexdigest(),
            }
    return out


class ReportRecorder:
    """One worker's part in the loop's reports: rank 0 numbers the steps (every rank stores its checkpoint part under
    the name rank 0 gives) and keeps the run's records; a barrier after each report when there are several ranks."""

    def __init__(self, config: dict[str, Any]):
        import ray.train

        self.context = ray.train.get_context()
        self.rank, self.world = self.context.get_world_rank(), self.context.get_world_size()
        self.run = RunDir.open(config["run_uri"], config.get("endpoint_url")) if self.rank == 0 else None
        # Only rank 0 numbers the steps: Ray gives every rank the checkpoint name rank 0 passes.
        self.step, self.offset = self._resumed(ray.train.get_checkpoint()) if self.run is not None else (0, None)
        self.metrics_log = None
        if self.run is not None:
            # A resumed loop reports again from its checkpoint's step: the steps after it are written anew.
            kept = [e for e in self.run.read_metrics() if isinstance(e.get("step"), int) and e["step"] <= self.step]
            self.metrics_log = self.run.metrics_log(kept)
        lease = config.get("lease")  # the run's lease (lease.RunLease.token_ref): checked before rank 0 writes
        self.guard = (lambda: check_token(lease["uri"], lease["token"], config.get("endpoint_url"))) if lease else None
        self.emit: Callable[[dict[str, Any]], None] = config.get("events") or (
            lambda event: print(event["text"], flush=True)
        )

    def _resumed(self, checkpoint) -> tuple[int, int | None]:
        """(step, our step less the loop's own) of the checkpoint Ray hands the loop to resume from; (0, None) if none."""
        name = str(getattr(checkpoint, "path", "") or "").rstrip("/").rsplit("/", 1)[-1]
        if not ckpt.CHECKPOINT_RE.match(name):
            return 0, None
        info = next((c for c in ckpt.list_checkpoints(self.run.fs, self.run.root) if c.path.endswith(name)), None)
        if info is None:
            return int(ckpt.CHECKPOINT_RE.match(name).group(1)), None
        reported = info.manifest.train.get("reported_step")
        return info.step, (info.step - reported if isinstance(reported, int) else None)

    def _next_step(self, reported: Any) -> int:
        if not isinstance(reported, int) or isinstance(reported, bool):
            return self.step + 1  # a count of the reports
        if self.offset is None:  # a loop that numbers its steps from 0 has done one more than it says
            self.offset = 1 if reported == 0 else 0
        return reported + self.offset

    def wrap(self, report: Callable) -> Callable:
        def recorded_report(metrics, checkpoint=None, checkpoint_dir_name=None, **kwargs):
            name = checkpoint_dir_name
            if self.rank == 0:
                self.step = self._next_step(metrics.get("step"))
                name = checkpoint_dir_name or ckpt.checkpoint_dir_name(self.step)
            local = _file_digests(checkpoint.path) if checkpoint is not None and self.rank == 0 else None
            report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, **kwargs)
            if self.world > 1:  # every rank's part of the checkpoint stored before rank 0 commits it
                from ray.train.collective import barrier

                barrier()
            if self.rank == 0:
                source = checkpoint.path if checkpoint is not None else None
                self.record(metrics, name if ckpt.CHECKPOINT_RE.match(name) else None, local, kwargs, source)

        return recorded_report

    def record(
        self, metrics: dict[str, Any], name: str | None, local: dict | None, options: dict[str, Any], source: str | None
    ) -> None:
        """Rank 0, after Ray took the report: commit its checkpoint, append its metrics, say it."""
        if self.guard is not None:
            self.guard()  # LeaseLost: another run holds the directory now, and nothing more is written there
        epoch = metrics.get("epoch") if isinstance(metrics.get("epoch"), int) else None
        scalars = _scalars(metrics)
        committed = None
        # An asynchronous upload may still be under way: only a checkpoint stored when report returned is committed.
        mode = options.get("checkpoint_upload_mode")
        if name and (mode is None or getattr(mode, "name", str(mode)).upper() == "SYNC"):
            committed = self._commit(name, epoch, scalars, local or {}, metrics.get("step"), source)
        base = {"step": self.step, **({"epoch": epoch} if epoch is not None else {}), "time": time.time()}
        train = {k: v for k, v in scalars.items() if not k.startswith("val_")}
        val = {k: v for k, v in scalars.items() if k.startswith("val_")}
        for split, values in (("train", train), ("val", val)):
            if values or (split == "train" and not val):
                self.metrics_log.append({**base, "split": split, **values})
        self.metrics_log.flush()
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items())
        text = f"step {self.step}" + (f"  epoch {epoch}" if epoch is not None else "") + (f"  {shown}" if shown else "")
        self.emit({"kind": "message", "text": text + (f"  committed {committed}" if committed else "")})

    def _commit(
        self, name: str, epoch: int | None, scalars: dict[str, Any], local: dict, reported, source: str | None
    ) -> str | None:
        """Write the manifest of the checkpoint Ray stored as `name`; its name, or None when there is none to commit.

        Ray's local mode (scaling.num_workers: 0) stores no checkpoint: rank 0's, still in `source`, is stored here.
        """
        path = self.run.path(name)
        try:
            stored = {
                e["name"].rstrip("/")[len(path.rstrip("/")) + 1 :]: e
                for e in self.run.fs.find(path, detail=True).values()
                if e.get("type") == "file"
            }
        except FileNotFoundError:
            stored = {}
        stored.pop(ckpt.MANIFEST, None)
        if not stored and local and source:
            files = {rel: Path(source, rel).read_bytes() for rel in local}
            storage.write_files(self.run.fs, {storage.join(path, rel): data for rel, data in files.items()})
            stored = dict(local)
        if not stored:
            return None  # no rank reported a checkpoint with this report
        files = {}
        for rel in stored:
            # Rank 0's files were hashed before they went up; another rank's are read back once to hash them.
            if rel in local:
                files[rel] = local[rel]
            else:
                data = storage.read_bytes(self.run.fs, storage.join(path, rel))
                files[rel] = {"size": len(data), "sha256": ckpt.sha256(data)}
        # The loop's own number of the step, so that a resumed loop's steps are numbered as before.
        train = {"reported_step": reported} if isinstance(reported, int) and not isinstance(reported, bool) else {}
        manifest = ckpt.CheckpointManifest(step=self.step, epoch=epoch or 0, metrics=scalars, files=files, train=train)
        ckpt.write_manifest(self.run.fs, path, manifest)
        return name


def summary_of_reports(run: RunDir, status: RunStatus) -> RunSummary:
    """What a bring-your-own loop's reports say of its run: steps, epochs, last metrics, newest committed checkpoint."""
    history = run.read_metrics()
    steps = [e["step"] for e in history if isinstance(e.get("step"), int)]
    epochs = {e["epoch"] for e in history if isinstance(e.get("epoch"), int)}
    last: dict[str, Any] = {}
    for entry in history:
        if entry.get("step") == (steps[-1] if steps else None):
            last.update(_scalars({k: v for k, v in entry.items() if k not in ("time", "split")}))
    found = ckpt.list_checkpoints(run.fs, run.root, uri_prefix=run.uri)
    return RunSummary(
        run=run.name,
        run_uri=run.uri,
        status=status,
        steps=steps[-1] if steps else 0,
        epochs=len(epochs) if epochs else None,
        metrics=last,
        checkpoint=found[-1].uri if found else None,
        test=test_summary(run),
    )
