"""run_training: the recipe. Build, restore, then for each step: step, and what the cadence says is due; finish."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from orchestrator.errors import StopRequested
from orchestrator.loop.cadence import Cadence
from orchestrator.loop.checkpointer import Checkpointer
from orchestrator.loop.context import LoopContext
from orchestrator.loop.early_stopping import EarlyStopping
from orchestrator.loop.evaluate import evaluate, evaluate_best_on_test
from orchestrator.loop.guard import LossGuard
from orchestrator.loop.parts import Parts, build_parts, wrap_model
from orchestrator.loop.record import Progress, Recorder, Throughput
from orchestrator.loop.sharded_checkpointer import ShardedCheckpointer, evaluate_best_on_test_sharded
from orchestrator.loop.sharding import ensure_process_group, is_sharded
from orchestrator.loop.state import TrainState, seed_everything
from orchestrator.loop.step import TrainStep
from orchestrator.rundir import RunDir
from orchestrator.runrecord import Best, TestSummary
from orchestrator.spec import JobSpec


@dataclass
class LoopResult:
    """How the loop ended on this rank (rank 0's also knows its committed checkpoint and test record)."""

    steps: int
    epochs: int
    stopped_early: bool
    metrics: dict[str, Any]  # the last validation
    best: Best
    checkpoint: str | None  # rank 0: the newest committed checkpoint
    resumed_from: str | None
    test: TestSummary | None  # rank 0: the best checkpoint on the test split
    train_s: float


def run_training(spec: JobSpec, ctx: LoopContext) -> LoopResult:
    """Train `spec` on this rank, resuming from the run's latest committed checkpoint."""
    own_group = ensure_process_group(ctx) if is_sharded(spec) else False
    try:
        progress = Progress(ctx)
        seed_everything(spec.train.seed + ctx.rank)
        parts = build_parts(spec, ctx, progress.say)
        run = RunDir.open(ctx.run_uri, spec.checkpoint.endpoint_url, spec.checkpoint.upload_timeout_s)
        checkpointer = (ShardedCheckpointer if is_sharded(spec) else Checkpointer)(run, spec, ctx, parts)
        state, resumed_from = checkpointer.restore(progress.say)
        loop = _Loop(spec, ctx, parts, wrap_model(parts.model, spec, ctx), state, run, checkpointer, progress)
        t_start = time.perf_counter()
        try:
            loop.train()
        except BaseException:
            checkpointer.abandon()
            raise
        return loop.finish(resumed_from, time.perf_counter() - t_start)
    finally:
        if own_group:
            dist.destroy_process_group()


class _Loop:
    """One rank's training, from the restored state to the end: the parts run_training assembled, and the step's bookkeeping."""

    def __init__(
        self,
        spec: JobSpec,
        ctx: LoopContext,
        parts: Parts,
        model,
        state: TrainState,
        run: RunDir,
        checkpointer: Checkpointer,
        progress: Progress,
    ):
        self.spec, self.ctx, self.parts, self.model, self.state = spec, ctx, parts, model, state
        self.run, self.checkpointer, self.progress = run, checkpointer, progress
        self.metrics_log = run.metrics_log(state.history) if ctx.is_main else None
        self.recorder = Recorder(state, self.metrics_log, ctx.track if ctx.is_main else None)
        self.early = EarlyStopping(spec)
        state.best_metric = self.early.metric
        self.cadence = Cadence(spec, parts.total_steps)
        self.step = TrainStep(model, parts, spec, ctx.device)
        self.guard = LossGuard(ctx.device, skip=spec.failure.nonfinite_loss == "skip")
        self.window = Throughput(ctx.device, ctx.world_size)
        self.reported = False

    def train(self) -> None:
        """Epochs of micro-batches, an optimizer step per group of `train.grad_accum_steps`, until the cadence says it is over."""
        spec, ctx, parts, state = self.spec, self.ctx, self.parts, self.state
        info = parts.splits.info
        n = ctx.world_size
        where = "in the driver" if spec.scaling.num_workers == 0 else f"{n} worker{'' if n == 1 else 's'}"
        self.progress.start(
            f"training {spec.name}: {spec.model.name} on {spec.data.name} ({info.sizes}), {where}, "
            f"{parts.total_steps} steps",
            state.step,
            parts.total_steps,
            spec.train.epochs,
        )
        self.model.train()
        while not self.cadence.over(state) and state.epoch < spec.train.epochs:
            micro, group = 0, parts.accum
            legs = tuple((w, b) for w, b in state.legs)
            expected = parts.splits.train.num_batches(ctx.world_size, legs) if legs else parts.batches_per_epoch
            if expected == 0:  # an elastic restart where the earlier world size left too little for a batch
                state.epoch, state.batch, state.legs = state.epoch + 1, 0, []
                continue
            batches = parts.splits.train.batches(state.epoch, ctx.rank, ctx.world_size, state.batch, legs)
            for x, y in batches:
                x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                if micro == 0:  # the epoch's last group may be short: average over the micro-batches it has
                    group = min(parts.accum, expected - state.batch)
                state.batch += 1
                micro += 1
                last_of_epoch = state.batch == expected
                loss = self.step.backward(x, y, group, last=micro == group)
                self.guard.observe(loss, state.step + 1)
                self.window.add_batch(loss, y.shape[0])
                state.samples += y.shape[0] * ctx.world_size
                if micro < group:
                    continue
                micro = 0
                skipped = self.guard.take_skip() if self.guard.skip else None
                if skipped is None:
                    self.step.apply()
                else:
                    self.step.discard()
                    self.progress.say(
                        f"step {skipped}: the loss is not finite; its update skipped (failure.nonfinite_loss)"
                    )
                state.stepped(last_of_epoch)
                self.window.steps += 1
                self.after_step(last_of_epoch)
                if ctx.should_stop():
                    raise StopRequested()  # run_training commits the upload in flight on its way out
                if self.cadence.over(state):
                    break
            else:
                if state.batch != 0:  # an epoch shorter than expected would desynchronise ranks
                    raise RuntimeError(f"epoch {state.epoch} ended after {state.batch} of {expected} batches")
        if state.stopped_early:
            self.progress.say(self.early.stop_message(state))

    def after_step(self, last_of_epoch: bool) -> None:
        """What the cadence says is due after this step: a log line, a validation, a checkpoint, a report."""
        state, cadence = self.state, self.cadence
        if cadence.log_due(state.step) or cadence.validation_due(state.step, last_of_epoch):
            self.guard.check()  # before the loss is logged or the weights judged
        if cadence.log_due(state.step):
            entry, eta = self.window.entry(state, self.parts.total_steps, self.parts.schedule.lr)
            self.recorder.record(entry)
            self.progress.emit(
                {
                    "kind": "train",
                    **entry,
                    "total_steps": self.parts.total_steps,
                    "epochs": self.spec.train.epochs,
                    "eta_s": eta,
                    "epoch_shown": min(state.epoch + (0 if last_of_epoch else 1), self.spec.train.epochs),
                }
            )
        val = self.validate() if cadence.validation_due(state.step, last_of_epoch) else {}
        scalars = {
            k: v for k, v in val.items() if not isinstance(v, list)
        }  # a confusion matrix is for the log, not a report
        if val:
            self.progress.validation(state.step, scalars)
        if cadence.checkpoint_due(state, last_of_epoch):
            self.guard.check()  # weights past a non-finite loss never become the latest checkpoint
            self.checkpointer.save(state, val or state.last_val, self.metrics_log)
        if val:
            # After the checkpoint: a scheduler that stops or pauses a trial here keeps this step.
            self.report(scalars)

    def validate(self) -> dict[str, Any]:
        """The validation split's metrics (val_*), the schedule and early stopping told, the entry recorded."""
        state = self.state
        val = evaluate(self.parts.model, self.parts.splits.val, self.spec, self.ctx, self.parts.task)
        if not val:
            return {}
        val = {f"val_{k}": v for k, v in val.items()}
        state.last_val = val
        self.parts.schedule.on_validation(val)
        self.early.observe(state, val)
        self.recorder.record({"step": state.step, "epoch": state.epoch, "split": "val", **val})
        return val

    def report(self, scalars: dict[str, Any]) -> None:
        """Hand the metrics to whoever runs the loop; the time it holds the training thread is counted."""
        state = self.state
        blocked_from = time.perf_counter()
        self.ctx.report({"step": state.step, "epoch": state.epoch, **scalars, "lr": self.parts.schedule.lr})
        blocked = time.perf_counter() - blocked_from
        state.report_blocked_s += blocked
        state.report_blocked_max_s = max(state.report_blocked_max_s, blocked)
        self.reported = True

    def finish(self, resumed_from: str | None, train_s: float) -> LoopResult:
        """The last upload committed, metrics.jsonl flushed, the best checkpoint on the test split (rank 0), the ranks in step."""
        state, ctx = self.state, self.ctx
        if not self.reported and state.last_val:
            # Restored a run whose training had already ended (killed before anyone recorded it): the caller,
            # a Tune trial for one, still gets the final metrics once.
            self.report({k: v for k, v in state.last_val.items() if not isinstance(v, list)})
        committed = self.checkpointer.close()
        if self.metrics_log is not None:
            self.metrics_log.flush()
        test = None
        if is_sharded(self.spec):  # every rank holds a shard of the model: all of them evaluate
            test = evaluate_best_on_test_sharded(
                self.parts.model, self.parts.splits.test, self.spec, ctx, self.parts.task, self.run, state.best_step
            )
        elif ctx.is_main:
            test = evaluate_best_on_test(
                self.parts.model, self.parts.splits.test, self.spec, ctx, self.parts.task, self.run, state.best_step
            )
        if test:
            self.progress.test(test.step, test.metrics)
        if ctx.distributed:
            # The other ranks wait for rank 0's last upload and test evaluation: none tears the group down under it.
            dist.barrier()
        best = Best(metric=self.early.metric, value=state.best_value, step=state.best_step, metrics=state.best_metrics)
        return LoopResult(
            steps=state.step,
            epochs=state.epoch,
            stopped_early=state.stopped_early,
            metrics=state.last_val,
            best=best,
            checkpoint=committed,
            resumed_from=resumed_from,
            test=test,
            train_s=train_s,
        )
