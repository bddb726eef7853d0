"""The per-worker training loop: the one place where a step happens.

The loop knows nothing of Ray, Tune, Kubernetes or S3. It gets a `LoopContext` (rank, world
size, device, a `report` for metrics and a `log` for progress) and the URI of its run, so a unit
test can drive it in-process. Restoring the latest committed checkpoint is the first thing it
does, every time: a fresh start is just "nothing to restore".
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from orchestrator import checkpoint as ckpt
from orchestrator import storage, tracking
from orchestrator.console import Event, text_progress
from orchestrator.data import load_data
from orchestrator.metrics import compute_metrics, default_mode, is_better
from orchestrator.models import build_model
from orchestrator.optim import build_optimizer, build_schedule
from orchestrator.spec import CLASSIFICATION_METRICS, LM_METRICS, REGRESSION_METRICS, JobSpec

log = logging.getLogger(__name__)


def _stderr(msg: str) -> None:
    # Not print(): Ray Train patches print on workers to also log it, which shows every line twice.
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


@dataclass
class LoopContext:
    """What the loop needs from whoever runs it (Ray Train, a test, a sweep trial)."""

    run_uri: str
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, Any]], None] = lambda metrics: None
    log: Callable[[str], None] = _stderr
    base_dir: Optional[str] = None
    # Rank 0 hands every metrics entry to the trackers; it must return at once (tracking.Tracker queues).
    track: Optional[Callable[[dict[str, Any]], None]] = None
    # Rank 0's progress events (console.format_event); None: their plain lines go to `log`.
    progress: Optional[Callable[[Event], None]] = None
    # Whether whoever runs the loop wants it to end now (a Tune scheduler that stopped the trial at a report).
    should_stop: Callable[[], bool] = lambda: False


@dataclass
class TrainState:
    """Counters and bookkeeping saved in every checkpoint; with the RNG states, enough to continue bit-for-bit."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch of the next batch
    batch: int = 0  # index of the next batch within that epoch
    samples: int = 0
    best_metric: Optional[str] = None  # the metric that ranks validations (early stopping, keep_best)
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    bad_validations: int = 0  # early stopping: validations since the last improvement
    stopped_early: bool = False
    checkpoint_blocked_s: float = 0.0  # time the training thread spent in checkpointing (snapshot, or waiting on an upload)
    report_blocked_s: float = 0.0  # time the training thread spent handing metrics to ctx.report (Ray, Tune)
    report_blocked_max_s: float = 0.0  # the longest single report
    first_step_at: Optional[float] = None  # wall clock of the first and latest optimizer step (benchmarks, ETA)
    last_step_at: Optional[float] = None
    last_val: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Seeding and RNG state


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Pieces of a step


def compute_loss(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classes and tokens, MSE for regression."""
    if task == "regression":
        return F.mse_loss(outputs.float().reshape(-1), targets.float().reshape(-1))
    if task == "lm":
        return F.cross_entropy(outputs.float().reshape(-1, outputs.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(outputs.float(), targets)


def autocast_for(precision: str, device: torch.device):
    """The autocast context for a precision (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def apply_init_and_freeze(model: torch.nn.Module, spec: JobSpec, say: Callable[[str], None]) -> None:
    """Load `model.init_from` weights (shape-compatible tensors) and freeze `model.freeze` patterns."""
    if spec.model.init_from:
        weights = ckpt.load_weights(spec.model.init_from, spec.checkpoint.endpoint_url)
        own = model.state_dict()
        usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(weights) - set(usable))
        model.load_state_dict(usable, strict=False)
        say(f"initialised {len(usable)} tensors from {spec.model.init_from}" + (f" (skipped {len(skipped)} of another shape or name)" if skipped else ""))
    if spec.model.freeze:
        frozen = 0
        for name, param in model.named_parameters():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in spec.model.freeze):
                param.requires_grad_(False)
                frozen += 1
        if not frozen:
            raise ValueError(f"model.freeze: no parameter matches {spec.model.freeze}")
        say(f"froze {frozen} parameter tensors matching {spec.model.freeze}")


def all_gather(obj: Any, world_size: int) -> list[Any]:
    """Every rank's object (a list of one when not distributed)."""
    if world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, source, spec: JobSpec, ctx: LoopContext, task: str, names: Optional[list[str]] = None, return_outputs: bool = False):
    """Metrics of a split over all ranks' shards; every rank gets the same numbers (with `return_outputs`, also the outputs and targets)."""
    model.eval()
    outputs, targets, loss_sum, count = [], [], 0.0, 0
    for x, y in source.batches(0, ctx.rank, ctx.world_size):
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        with autocast_for(spec.train.precision, ctx.device):
            out = model(x)
        n = y.numel() if task == "lm" else y.shape[0]
        loss_sum += compute_loss(task, out, y).item() * n
        count += n
        if task != "lm":  # per-token logits of a language model are too big to gather; perplexity needs only the loss
            outputs.append(out.float().cpu())
            targets.append(y.cpu())
    model.train()
    gathered = all_gather((loss_sum, count, outputs, targets), ctx.world_size)
    total_loss = sum(g[0] for g in gathered)
    total = sum(g[1] for g in gathered)
    if total == 0:
        return ({}, None, None) if return_outputs else {}
    outs = [o for g in gathered for o in g[2]]
    tgts = [t for g in gathered for t in g[3]]
    out_t = torch.cat(outs) if outs else torch.empty(0)
    tgt_t = torch.cat(tgts) if tgts else torch.empty(0)
    metrics = compute_metrics(task, names or spec.metric_names(), out_t, tgt_t, total_loss / total)
    return (metrics, out_t, tgt_t) if return_outputs else metrics


def evaluate_best_on_test(model: torch.nn.Module, source, spec: JobSpec, ctx: LoopContext, task: str, fs, run_root: str, best_step: Optional[int]) -> Optional[dict[str, Any]]:
    """Rank 0 alone: the best committed checkpoint (else the latest) on the whole test split, written to `<run>/test.json`."""
    found = ckpt.list_checkpoints(fs, run_root)
    if not found or source.size == 0:
        return None
    info = next((c for c in found if c.step == best_step), found[-1])
    model = copy.deepcopy(model)
    model.load_state_dict(ckpt.deserialize_weights(ckpt.read_verified(fs, info, [ckpt.WEIGHTS])[ckpt.WEIGHTS]))
    names = list({"classification": CLASSIFICATION_METRICS, "regression": REGRESSION_METRICS, "lm": LM_METRICS}.get(task, ("loss",)))
    metrics, out, tgt = evaluate(model, source, spec, replace(ctx, rank=0, world_size=1), task, names=names, return_outputs=True)
    checkpoint_uri = storage.to_uri(fs, info.path)
    record = tracking.build_test_record(task, metrics, out.numpy() if out is not None else None, tgt.numpy() if tgt is not None else None,
                                        checkpoint_uri, info.step, best_step, spec.train.seed)
    path = storage.join(run_root, tracking.TEST_RECORD)
    storage.write_bytes(fs, path, json.dumps(record, default=float).encode())
    return {"uri": storage.to_uri(fs, path), "checkpoint": checkpoint_uri, "step": info.step, "metrics": record["metrics"]}


# ----------------------------------------------------------------------------------------------
# The loop


def run_training(spec: JobSpec, ctx: LoopContext) -> dict[str, Any]:
    """Train `spec` on this rank, resuming from the run's latest committed checkpoint; return a summary."""
    is_main = ctx.rank == 0
    emit = (ctx.progress or text_progress(ctx.log)) if is_main else (lambda event: None)

    def say(text: str) -> None:
        emit({"kind": "message", "text": text})

    seed_everything(spec.train.seed + ctx.rank)
    if ctx.base_dir and ctx.base_dir not in sys.path:
        sys.path.insert(0, ctx.base_dir)

    splits = load_data(spec, ctx.base_dir)
    task = splits.info.task
    raw_model = build_model(spec, splits.info, base_dir=ctx.base_dir)
    apply_init_and_freeze(raw_model, spec, say)
    raw_model.to(ctx.device)
    optimizer = build_optimizer(raw_model, spec.optim)
    batches_per_epoch = splits.train.num_batches(ctx.world_size)
    if batches_per_epoch == 0:
        raise ValueError(f"data: the training split has fewer than {ctx.world_size} examples per worker")
    accum = spec.train.grad_accum_steps
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = steps_per_epoch * spec.train.epochs
    if spec.train.max_steps:
        total_steps = min(total_steps, spec.train.max_steps)
    schedule = build_schedule(optimizer, spec.schedule, total_steps)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=spec.train.precision == "fp16")
    state = TrainState()

    fs, run_root = storage.open_storage(ctx.run_uri, spec.checkpoint.endpoint_url)
    resumed_from = None
    restored = ckpt.restore_latest(fs, run_root)
    if restored is not None:
        info, files = restored
        raw_model.load_state_dict(ckpt.deserialize_weights(files[ckpt.WEIGHTS]))
        saved = ckpt.deserialize_state(files["state.pt"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        state = TrainState(**saved["train"])
        rngs = ckpt.deserialize_state(files["rng.pt"])
        # Same world size: each rank continues its own streams; another size re-derives them from the seed.
        if len(rngs) == ctx.world_size:
            restore_rng(rngs[ctx.rank])
        else:
            seed_everything(spec.train.seed + ctx.rank + 7919 * state.step)
            # Elastic restart on another number of workers: keep the epoch's position in examples seen.
            state.batch = min(state.batch * len(rngs) // ctx.world_size, batches_per_epoch - 1)
        resumed_from = info.uri
        say(f"resumed from {info.uri} (step {state.step}, epoch {state.epoch}, batch {state.batch})")

    model: torch.nn.Module = raw_model
    if ctx.world_size > 1 and dist.is_initialized():
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(raw_model, device_ids=device_ids)
    if spec.train.compile:
        model = torch.compile(model)

    metrics_log = MetricsLog(fs, storage.join(run_root, "metrics.jsonl"), state.history) if is_main else None
    writer = ckpt.CheckpointWriter(fs, run_root, asynchronous=spec.checkpoint.async_) if is_main else None
    watched, watched_mode = watched_metric(spec)

    state.best_metric = watched

    def record(entry: dict[str, Any]) -> None:
        entry["time"] = time.time()
        state.history.append(entry)
        if metrics_log:
            metrics_log.append(entry)
        if is_main and ctx.track is not None:
            try:
                ctx.track(dict(entry))
            except Exception as exc:  # tracking is never a reason to stop training
                log.warning("tracking failed at step %s: %s", entry.get("step"), exc)

    def save_checkpoint(metrics: dict[str, Any]) -> None:
        # Every rank hands its RNG state to rank 0, which alone writes; the snapshot is a host copy.
        rngs = all_gather(capture_rng(), ctx.world_size)
        if not is_main:
            return
        weights = {k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items()}
        opt_state = _cpu_copy(optimizer.state_dict())
        sched_state, scaler_state = _cpu_copy(schedule.state_dict()), _cpu_copy(scaler.state_dict())
        train_state = _cpu_copy(asdict(state))
        job_yaml = yaml.safe_dump(spec.to_dict(), sort_keys=False).encode()

        def build_files() -> dict[str, bytes]:
            return {
                ckpt.WEIGHTS: ckpt.serialize_weights(weights),
                "state.pt": ckpt.serialize_state({"optimizer": opt_state, "schedule": sched_state, "scaler": scaler_state, "train": train_state}),
                "rng.pt": ckpt.serialize_state(rngs),
                "job.yaml": job_yaml,
            }

        retain, flush = _retention(fs, run_root, spec, state.best_step), metrics_log.snapshot_flush()

        def after_commit() -> None:
            retain()
            flush()

        writer.save(state.step, state.epoch, build_files, {k: v for k, v in metrics.items() if not isinstance(v, list)}, then=after_commit)

    def validate() -> dict[str, Any]:
        val = evaluate(raw_model, splits.val, spec, ctx, task)
        if not val:
            return {}
        val = {f"val_{k}": v for k, v in val.items()}
        state.last_val = val
        schedule.on_validation(val)
        value = val.get(watched)
        if isinstance(value, (int, float)) and (state.best_value is None or is_better(value, state.best_value, watched_mode, spec.early_stopping.min_delta if spec.early_stopping else 0.0)):
            state.best_value, state.best_step, state.bad_validations = float(value), state.step, 0
            state.best_metrics = {k: v for k, v in val.items() if not isinstance(v, list)}
        else:
            state.bad_validations += 1
        if spec.early_stopping and state.bad_validations >= spec.early_stopping.patience:
            state.stopped_early = True
        entry = {"step": state.step, "epoch": state.epoch, "split": "val", **val}
        record(entry)
        return val

    emit({"kind": "start", "step": state.step, "total_steps": total_steps, "epochs": spec.train.epochs,
          "text": f"training {spec.name}: {spec.model.name} on {spec.data.name} ({splits.info.sizes}), {ctx.world_size} worker(s), {total_steps} steps"})
    try:
        model.train()
        window_start, window_samples, window_n, window_steps = time.perf_counter(), 0, 0, 0
        window_loss = torch.zeros((), device=ctx.device)  # summed on the device: no host sync per step
        t_start = time.perf_counter()
        done = state.step >= total_steps or state.stopped_early
        reported = False
        while not done and state.epoch < spec.train.epochs:
            micro, group = 0, accum
            for x, y in splits.train.batches(state.epoch, ctx.rank, ctx.world_size, start_batch=state.batch):
                x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                if micro == 0:  # the epoch's last group may be short: average over the micro-batches it has
                    group = min(accum, batches_per_epoch - state.batch)
                state.batch += 1
                micro += 1
                last_of_epoch = state.batch == batches_per_epoch
                stepping = micro == group
                sync = model.no_sync() if (isinstance(model, torch.nn.parallel.DistributedDataParallel) and not stepping) else contextlib.nullcontext()
                with sync:
                    with autocast_for(spec.train.precision, ctx.device):
                        out = model(x)
                    loss = compute_loss(task, out, y)
                    scaler.scale(loss / group).backward()
                window_loss += loss.detach().float()
                window_n += 1
                window_samples += y.shape[0]
                state.samples += y.shape[0] * ctx.world_size
                if not stepping:
                    continue
                micro = 0
                if spec.train.clip_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), spec.train.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                state.step += 1
                window_steps += 1
                state.last_step_at = time.time()
                if state.first_step_at is None:
                    state.first_step_at = state.last_step_at
                if last_of_epoch:
                    state.epoch, state.batch = state.epoch + 1, 0
                if ctx.should_stop():
                    raise SystemExit(0)  # as Tune ends a trial it stops: the handler below commits the upload in flight

                if state.step % spec.train.log_every_n_steps == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    rate = window_samples * ctx.world_size / elapsed if elapsed > 0 else 0.0
                    steps_left = total_steps - state.step
                    eta = steps_left * elapsed / max(1, window_steps)
                    train_entry = {"step": state.step, "epoch": state.epoch, "split": "train", "loss": window_loss.item() / max(1, window_n), "lr": schedule.lr, "samples_per_s": rate}
                    record(train_entry)
                    emit({"kind": "train", **train_entry, "total_steps": total_steps, "epochs": spec.train.epochs, "eta_s": eta,
                          "epoch_shown": min(state.epoch + (0 if last_of_epoch else 1), spec.train.epochs)})
                    window_start, window_samples, window_n, window_steps = time.perf_counter(), 0, 0, 0
                    window_loss.zero_()

                end_of_training = state.step >= total_steps
                validate_now = (spec.validation.every_n_steps and state.step % spec.validation.every_n_steps == 0) or (not spec.validation.every_n_steps and last_of_epoch)
                val = validate() if (validate_now or end_of_training) else {}
                checkpoint_now = (
                    end_of_training
                    or state.stopped_early
                    or bool(spec.checkpoint.every_n_steps and state.step % spec.checkpoint.every_n_steps == 0)
                    or bool(last_of_epoch and spec.checkpoint.every_n_epochs and state.epoch % spec.checkpoint.every_n_epochs == 0)
                )
                scalars = {k: v for k, v in val.items() if not isinstance(v, list)}  # a confusion matrix is for the log, not a report
                if val:
                    emit({"kind": "val", "step": state.step, "metrics": scalars})
                if checkpoint_now:
                    blocked_from = time.perf_counter()
                    save_checkpoint(val or state.last_val)
                    state.checkpoint_blocked_s += time.perf_counter() - blocked_from
                if val:
                    # After the checkpoint: a scheduler that stops or pauses a trial here keeps this step.
                    blocked_from = time.perf_counter()
                    ctx.report({"step": state.step, "epoch": state.epoch, **scalars, "lr": schedule.lr})
                    blocked = time.perf_counter() - blocked_from
                    state.report_blocked_s += blocked
                    state.report_blocked_max_s = max(state.report_blocked_max_s, blocked)
                    reported = True
                if end_of_training or state.stopped_early:
                    done = True
                    break
            else:
                if state.batch != 0:  # an epoch shorter than expected would desynchronise ranks
                    raise RuntimeError(f"epoch {state.epoch} ended after {state.batch} of {batches_per_epoch} batches")
        if state.stopped_early:
            say(f"early stopping at step {state.step}: {watched} has not improved for {spec.early_stopping.patience} validations (best {state.best_value:.4f} at step {state.best_step})")

    except BaseException:
        if writer:
            # Whatever ended the loop, the upload in flight is committed before this rank lets go.
            with contextlib.suppress(Exception):
                writer.close()
        raise

    if not reported and state.last_val:
        # Restored a run whose training had already ended (killed before anyone recorded it): the caller,
        # a Tune trial for one, still gets the final metrics once.
        ctx.report({"step": state.step, "epoch": state.epoch, **{k: v for k, v in state.last_val.items() if not isinstance(v, list)}, "lr": schedule.lr})
    committed = None
    if writer:
        writer.close()
        committed = storage.to_uri(fs, writer.last_committed) if writer.last_committed else None
        if committed is None:
            latest = ckpt.list_checkpoints(fs, run_root)
            committed = latest[-1].uri if latest else None
        metrics_log.flush()
    test = evaluate_best_on_test(raw_model, splits.test, spec, ctx, task, fs, run_root, state.best_step) if is_main else None
    if test:
        emit({"kind": "test", "step": test["step"], "metrics": {k: v for k, v in test["metrics"].items() if not isinstance(v, list)}})
    if ctx.world_size > 1 and dist.is_initialized():
        # The other ranks wait for rank 0's last upload and test evaluation: none tears the group down under it.
        dist.barrier()
    return {
        "steps": state.step,
        "epochs": state.epoch,
        "stopped_early": state.stopped_early,
        "metrics": state.last_val,
        "best": {"metric": watched, "value": state.best_value, "step": state.best_step, "metrics": state.best_metrics},
        "checkpoint": committed,
        "resumed_from": resumed_from,
        "test": test,
        "train_s": time.perf_counter() - t_start,
    }


def watched_metric(spec: JobSpec) -> tuple[str, str]:
    """The validation metric that makes a checkpoint the best (and that early stopping watches), with its mode."""
    early = spec.early_stopping
    metric = (early.metric if early else None) or spec.checkpoint.best_metric or "val_loss"
    mode = (early.mode if early else None) or spec.checkpoint.best_mode or default_mode(metric)
    return metric, mode


def _retention(fs, run_root: str, spec: JobSpec, best_step: Optional[int]) -> Callable[[], None]:
    """Retention after a commit, with the best step as it was when the checkpoint was taken (not as training has moved on)."""
    metric, mode = watched_metric(spec)
    return lambda: ckpt.apply_retention(fs, run_root, spec.checkpoint.keep_last, spec.checkpoint.keep_best, metric, mode, best_step=best_step)


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with tensors on the host, so the background writer never sees training mutate them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class MetricsLog:
    """metrics.jsonl of a run: every entry by step, rewritten whole from the restored history, then appended."""

    def __init__(self, fs, path: str, history: list[dict[str, Any]]):
        self.fs, self.path = fs, path
        self.local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        self.lines = [json.dumps(e, default=float) for e in history]
        # A resumed run's file may hold steps past the checkpoint: rewrite it so no step appears twice.
        self._rewrite()

    def _rewrite(self, lines: Optional[list[str]] = None) -> None:
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

    def flush(self, lines: Optional[list[str]] = None) -> None:
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
