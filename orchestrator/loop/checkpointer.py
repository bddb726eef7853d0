"""The run's checkpoints as the loop sees them: the latest restored at the start, snapshots committed as training goes.

Every rank hands rank 0 its RNG state; rank 0 alone writes. The snapshot is a host copy taken on the
training thread; serializing, uploading, committing and retention run on the writer's thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.lease import check_token
from orchestrator.loop.context import LoopContext
from orchestrator.loop.early_stopping import watched_metric
from orchestrator.loop.evaluate import all_gather
from orchestrator.loop.parts import Parts
from orchestrator.loop.sharding import load_sharded_state
from orchestrator.loop.state import TrainState, capture_rng, restore_rng, seed_everything
from orchestrator.rundir import MetricsLog, RunDir
from orchestrator.spec import JobSpec

log = logging.getLogger(__name__)


class Checkpointer:
    """Restore, save and close the run's checkpoints for one rank."""

    def __init__(self, run: RunDir, spec: JobSpec, ctx: LoopContext, parts: Parts):
        self.run, self.spec, self.ctx, self.parts = run, spec, ctx, parts
        self.shard_bytes_read: tuple[int, int] | None = None  # (read, stored) of a sharded checkpoint restored
        self.guard = _lease_guard(ctx.lease, spec.checkpoint.endpoint_url) if ctx.is_main else None
        self.writer = (
            ckpt.CheckpointWriter(run.fs, run.root, asynchronous=spec.checkpoint.async_, guard=self.guard)
            if ctx.is_main
            else None
        )

    def restore(self, say: Callable[[str], None]) -> tuple[TrainState, str | None]:
        """The state of the newest checkpoint that verifies, loaded into the parts, and its URI; a fresh state and None when there is none."""
        restored = self._restore_newest()
        if restored is None:
            return TrainState(), None
        info, saved, rngs = restored
        p, ctx = self.parts, self.ctx
        p.schedule.load_state_dict(saved["schedule"])
        p.scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["train"])
        # Same world size: each rank continues its own streams; another size re-derives them from the seed.
        if len(rngs) == ctx.world_size:
            restore_rng(rngs[ctx.rank])
        else:
            seed_everything(self.spec.train.seed + ctx.rank + 7919 * state.step)
            # Elastic restart on another number of workers: the data continues with what the old
            # world size left of this epoch (`BatchSource.batches(legs=...)`).
            if state.batch:
                state.legs = [*state.legs, [len(rngs), state.batch]]
                state.batch = 0
        read = ""
        if self.shard_bytes_read is not None:
            got, stored = self.shard_bytes_read
            read = f"; this rank read {got / 1e6:.3g} of the {stored / 1e6:.3g} MB of tensors in its shards"
        say(f"resumed from {info.uri} (step {state.step}, epoch {state.epoch}, batch {state.batch}){read}")
        if not p.splits.train.exact_resume and (state.batch or state.legs):
            # The source cannot continue where the epoch stopped: its remaining batches come from a new pass.
            state.redrawn.append([state.epoch, state.batch])
            say(
                f"epoch {state.epoch} continues with batches from a new pass over the train split "
                "(data.engine=ray resumes at epoch granularity)"
            )
        return state, info.uri

    def _restore_newest(self) -> tuple[ckpt.CheckpointInfo, dict[str, Any], list] | None:
        """The newest checkpoint that verifies loaded into the model and optimizer: (info, state.pt, rng.pt); None if none."""
        for info in reversed(ckpt.list_checkpoints(self.run.fs, self.run.root)):
            try:
                return info, *self._load(info)
            except (ValueError, FileNotFoundError, CheckpointException) as exc:
                log.warning("skipping checkpoint %s: %s", info.uri, exc)
        return None

    def _load(self, info: ckpt.CheckpointInfo) -> tuple[dict[str, Any], list]:
        """A checkpoint's weights and optimizer state into the (whole) model: a full one, or every rank's shards."""
        p = self.parts
        if info.manifest.layout == "sharded":
            files = ckpt.read_verified(self.run.fs, info, ["state.pt", "rng.pt"])
            self.shard_bytes_read = load_sharded_state(p.model, p.optimizer, self.run.fs, info)
            saved = ckpt.deserialize_state(files["state.pt"])
        else:
            files = ckpt.read_verified(self.run.fs, info)
            saved = ckpt.deserialize_state(files["state.pt"])
            self._load_whole(ckpt.deserialize_weights(files[ckpt.WEIGHTS]), saved["optimizer"])
        return saved, ckpt.deserialize_state(files["rng.pt"])

    def _load_whole(self, weights: dict, optimizer_state: dict) -> None:
        """A full checkpoint's weights and optimizer state into the whole model."""
        self.parts.model.load_state_dict(weights)
        self.parts.optimizer.load_state_dict(optimizer_state)

    def save(self, state: TrainState, metrics: dict[str, Any], metrics_log: MetricsLog | None) -> None:
        """Checkpoint this step (every rank calls it): the time the training thread spends here is counted in the state."""
        blocked_from = time.perf_counter()
        rngs = all_gather(capture_rng(), self.ctx.world_size)
        if self.writer is not None:
            self._snapshot_and_commit(state, rngs, metrics, metrics_log)
        state.checkpoint_blocked_s += time.perf_counter() - blocked_from

    def _snapshot_and_commit(
        self, state: TrainState, rngs: list, metrics: dict[str, Any], metrics_log: MetricsLog | None
    ) -> None:
        p = self.parts
        weights = {k: v.detach().to("cpu", copy=True) for k, v in p.model.state_dict().items()}
        opt_state = _cpu_copy(p.optimizer.state_dict())
        sched_state, scaler_state = _cpu_copy(p.schedule.state_dict()), _cpu_copy(p.scaler.state_dict())
        train_state = _cpu_copy(asdict(state))
        counters = _cpu_copy(state.counters())
        job_yaml = yaml.safe_dump(self.spec.to_dict(), sort_keys=False).encode()

        def build_files() -> dict[str, bytes]:
            return {
                ckpt.WEIGHTS: ckpt.serialize_weights(weights),
                "state.pt": ckpt.serialize_state(
                    {"optimizer": opt_state, "schedule": sched_state, "scaler": scaler_state, "train": train_state}
                ),
                "rng.pt": ckpt.serialize_state(rngs),
                "job.yaml": job_yaml,
            }

        retain = self._retention(state.best_step)
        flush = metrics_log.snapshot_flush() if metrics_log is not None else (lambda: None)

        def after_commit() -> None:
            retain()
            flush()

        scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        self.writer.save(state.step, state.epoch, build_files, scalars, then=after_commit, train=counters)

    def _retention(self, best_step: int | None) -> Callable[[], None]:
        """Retention after a commit, with the best step as it was when the checkpoint was taken (not as training has moved on)."""
        metric, mode = watched_metric(self.spec)
        c = self.spec.checkpoint
        return lambda: ckpt.apply_retention(
            self.run.fs, self.run.root, c.keep_last, c.keep_best, metric, mode, best_step=best_step
        )

    def close(self) -> str | None:
        """Wait for the last upload to commit; the URI of the newest committed checkpoint (rank 0), else None.

        LeaseLost when another run has taken the run directory: then no more is written (metrics, test record).
        """
        if self.writer is None:
            return None
        self.writer.close()
        if self.guard is not None:
            self.guard()
        if self.writer.last_committed:
            return storage.to_uri(self.run.fs, self.writer.last_committed)
        latest = ckpt.list_checkpoints(self.run.fs, self.run.root)
        return latest[-1].uri if latest else None

    def abandon(self) -> None:
        """Whatever ended the loop, the upload in flight is committed before this rank lets go."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()


def _lease_guard(lease: dict[str, Any] | None, endpoint_url: str | None) -> Callable[[], None] | None:
    """The check before each commit that the run still holds its lease (lease.check_token), where it has one."""
    if not lease:
        return None
    return lambda: check_token(lease["uri"], lease["token"], endpoint_url)


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with tensors on the host, so the background writer never sees training mutate them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj
