"""The run's checkpoints under scaling.strategy=fsdp: every rank saves and restores its own shards.

A save copies this rank's shards to the host on the training thread, then a background thread hands
them to DCP (its collectives on a process group of their own, so they never interleave with the
step's): each rank uploads its file at once, and rank 0 commits (manifest last) when all have
returned. A restore reads what this rank's shards need from the newest committed checkpoint, on
any world size, or a full (DDP) checkpoint's tensors.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from orchestrator import checkpoint as ckpt
from orchestrator import sharded_checkpoint as shards
from orchestrator import storage
from orchestrator.lease import LeaseLost
from orchestrator.loop.checkpointer import Checkpointer, _cpu_copy, _lease_guard
from orchestrator.loop.context import LoopContext
from orchestrator.loop.evaluate import all_gather, batch_outputs, test_metric_names, write_test_summary
from orchestrator.loop.parts import Parts
from orchestrator.loop.sharding import load_full_state, load_model_weights, snapshot_state
from orchestrator.loop.state import TrainState, capture_rng
from orchestrator.metrics import compute_metrics
from orchestrator.rundir import MetricsLog, RunDir
from orchestrator.runrecord import TestSummary
from orchestrator.spec import JobSpec


class ShardedCheckpointer(Checkpointer):
    """Restore, save and close a sharded run's checkpoints for one rank (every rank writes)."""

    def __init__(self, run: RunDir, spec: JobSpec, ctx: LoopContext, parts: Parts):
        self.run, self.spec, self.ctx, self.parts = run, spec, ctx, parts
        self.shard_bytes_read: tuple[int, int] | None = None
        self.guard = _lease_guard(ctx.lease, spec.checkpoint.endpoint_url) if ctx.is_main else None
        self.writer = None
        # Gloo whatever the training backend: the saves' plan and commit run beside the step, on the host.
        self.group = dist.new_group(backend="gloo")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer") if spec.checkpoint.async_ else None
        self.pending: Future | None = None
        # Host buffers a background save copies the shards into, kept from one save to the next (snapshot_state).
        self.staging: dict[str, torch.Tensor] | None = {} if self.pool is not None else None
        self.last_committed: str | None = None

    def _load_whole(self, weights: dict, optimizer_state: dict) -> None:
        """A full (DDP) checkpoint's tensors: this rank keeps its shard of each."""
        load_full_state(self.parts.model, self.parts.optimizer, weights, optimizer_state)

    def save(self, state: TrainState, metrics: dict[str, Any], metrics_log: MetricsLog | None) -> None:
        """Checkpoint this step (every rank calls it): the training thread blocks for the host copy only."""
        blocked_from = time.perf_counter()
        rngs = all_gather(capture_rng(), self.ctx.world_size)
        self.wait()  # at most one save in flight
        p = self.parts
        snapshot = snapshot_state(p.model, p.optimizer, self.staging)  # the last save is done with its buffers
        own = self._own_files(state, rngs) if self.ctx.is_main else None
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        step, epoch, counters = state.step, state.epoch, _cpu_copy(state.counters())
        retain = self._retention(state.best_step) if self.ctx.is_main else None
        flush = metrics_log.snapshot_flush() if metrics_log is not None else None
        path = storage.join(self.run.root, ckpt.checkpoint_dir_name(step))

        def commit(shard_files: dict[str, dict[str, Any]], dcp_json: bytes) -> None:  # rank 0, all shards written
            shards.commit_sharded(
                self.run.fs, path, step, epoch, shard_files, dcp_json, own(), scalars, counters, self.guard
            )

        def job() -> None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

            writer = shards.ShardWriter(self.run.fs, path, commit, self.guard)
            # What every rank holds alike (batch norm's statistics, step counts) is rank 0's, as a DDP checkpoint has it.
            planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
            try:
                dcp.save(snapshot, storage_writer=writer, planner=planner, process_group=self.group)
            except CheckpointException as exc:
                lost = _lease_lost(exc)
                if lost is not None:
                    raise lost from None  # not an upload that failed: the run must stop, and say why
                raise
            if self.ctx.is_main:
                self.last_committed = path
                retain()
                if flush is not None:
                    flush()

        if self.pool is None:
            job()
        else:
            self.pending = self.pool.submit(job)
        state.checkpoint_blocked_s += time.perf_counter() - blocked_from

    def _own_files(self, state: TrainState, rngs: list):
        """Rank 0's files beside the shards (schedule, scaler, counters, every rank's RNG, the job), built off the step."""
        p = self.parts
        sched_state, scaler_state = _cpu_copy(p.schedule.state_dict()), _cpu_copy(p.scaler.state_dict())
        train_state = _cpu_copy(asdict(state))
        job_yaml = yaml.safe_dump(self.spec.to_dict(), sort_keys=False).encode()

        def build() -> dict[str, bytes]:
            return {
                "state.pt": ckpt.serialize_state(
                    {"schedule": sched_state, "scaler": scaler_state, "train": train_state}
                ),
                "rng.pt": ckpt.serialize_state(rngs),
                "job.yaml": job_yaml,
            }

        return build

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its failure."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            pending.result()
        except LeaseLost:
            raise
        except Exception as exc:
            raise RuntimeError(f"checkpoint upload failed: {exc}") from exc

    def close(self) -> str | None:
        """Wait for the last save to commit; the URI of the newest committed checkpoint (rank 0), else None."""
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
                self.pool = None
        if not self.ctx.is_main:
            return None
        if self.guard is not None:  # LeaseLost when another run has taken the directory: nothing more of ours there
            self.guard()
        if self.last_committed:
            return storage.to_uri(self.run.fs, self.last_committed)
        latest = ckpt.list_checkpoints(self.run.fs, self.run.root)
        return latest[-1].uri if latest else None

    def abandon(self) -> None:
        """Whatever ended the loop, the save in flight is committed (or fails) before this rank lets go."""
        with contextlib.suppress(Exception):
            self.close()


def _lease_lost(exc: CheckpointException) -> LeaseLost | None:
    """The LeaseLost that one of DCP's ranks failed with (DCP gathers every rank's failure into one exception)."""
    for failure in (exc.failures or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else getattr(failure, "exception", failure)
        if isinstance(inner, LeaseLost):
            return inner
    return None


@torch.no_grad()
def evaluate_best_on_test_sharded(
    model, source, spec: JobSpec, ctx: LoopContext, task: str, run: RunDir, best_step: int | None
) -> TestSummary | None:
    """Every rank: the best committed checkpoint (else the latest) into the sharded model, the test split in rank shards.

    Rank 0 gathers the outputs, computes the exact metrics of the whole split and writes test.json.
    """
    chosen: list[ckpt.CheckpointInfo | None] = [None]
    if ctx.is_main:  # after rank 0's retention: the checkpoint it names is there
        found = ckpt.list_checkpoints(run.fs, run.root)
        if found and source.size:
            chosen[0] = next((c for c in found if c.step == best_step), found[-1])
    dist.broadcast_object_list(chosen, src=0)
    info = chosen[0]
    if info is None:
        return None
    load_model_weights(model, run.fs, info)
    local = [(out, y, loss_sum, n) for out, y, loss_sum, n in batch_outputs(model, source, spec, ctx, task)]
    gathered: list[Any] = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(_concat(local), gathered, dst=0)
    if not ctx.is_main:
        return None
    count = sum(part[3] for part in gathered)
    if count == 0:
        return None
    out, tgt = _interleave([p[0] for p in gathered]), _interleave([p[1] for p in gathered])
    metrics = compute_metrics(task, test_metric_names(task), out, tgt, sum(p[2] for p in gathered) / count)
    return write_test_summary(run, spec, task, metrics, out, tgt, info, best_step)


def _concat(local: list) -> tuple:
    """One rank's test outputs as (outputs, targets, summed loss, items); outputs None for lm."""
    outs = [o for o, _, _, _ in local if o is not None]
    tgts = [t for _, t, _, _ in local if t is not None]
    return (
        torch.cat(outs) if outs else None,
        torch.cat(tgts) if tgts else None,
        sum(p[2] for p in local),
        sum(p[3] for p in local),
    )


def _interleave(parts: list) -> torch.Tensor:
    """The ranks' strided shares (rank r holds examples r, r + world, ...) back in the split's order (empty for lm)."""
    if any(p is None for p in parts):
        return torch.empty(0)
    whole = torch.cat(parts)
    shares = [torch.arange(r, len(whole), len(parts)) for r in range(len(parts))]
    if any(len(s) != len(p) for s, p in zip(shares, parts, strict=True)):
        return whole  # not strided: the metrics do not depend on the order
    out = torch.empty_like(whole)
    out[torch.cat(shares)] = whole
    return out
