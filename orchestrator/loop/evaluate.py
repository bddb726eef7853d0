"""Metrics of a split reduced across ranks (every rank gets the same numbers), and the best checkpoint on the test split."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orchestrator import checkpoint as ckpt
from orchestrator import storage
from orchestrator.loop.context import LoopContext
from orchestrator.loop.step import autocast_for, compute_loss
from orchestrator.metrics import SplitState, compute_metrics, reduce_locally
from orchestrator.rundir import RunDir
from orchestrator.runrecord import TestSummary
from orchestrator.spec import CLASSIFICATION_METRICS, LM_METRICS, REGRESSION_METRICS, JobSpec
from orchestrator.weights import read_model_weights

# The test metrics use the whole split; the plot data in test.json a seeded sample of it, so the
# file stays small for big test sets.
MAX_PLOTTED_EXAMPLES = 20_000
MAX_PLOTTED_SCORES = 2_000_000


def all_gather(obj: Any, world_size: int) -> list[Any]:
    """Every rank's object (a list of one when not distributed)."""
    if world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """`t` summed ("sum") or maximised ("max") over every rank, in place; unchanged when not distributed."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, source, spec: JobSpec, ctx: LoopContext, task: str, names: list[str] | None = None
):
    """Metrics of a split over all ranks' shards; every rank gets the same numbers.

    Each rank reduces its shard to metric states (`SplitState`) and the ranks all_reduce those:
    what crosses ranks does not grow with the split or the world size.
    """
    state = SplitState(task, names or spec.metric_names())
    for out, y, loss_sum, n in batch_outputs(model, source, spec, ctx, task):
        state.update(out, y, loss_sum, n)
    return state.compute(all_reduce if ctx.world_size > 1 else reduce_locally)


def batch_outputs(model: torch.nn.Module, source, spec: JobSpec, ctx: LoopContext, task: str):
    """(outputs, targets, summed loss, items) per batch of this rank's shard, the model in eval mode meanwhile."""
    model.eval()
    try:
        x, seen = None, 0
        for x, y in source.batches(0, ctx.rank, ctx.world_size):
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with autocast_for(spec.train.precision, ctx.device):
                out = model(x)
            seen += 1
            n = y.numel() if task == "lm" else y.shape[0]
            loss_sum = compute_loss(task, out, y).item() * n
            # Per-token logits of a language model are not needed: perplexity needs only the loss.
            yield (None, None, loss_sum, n) if task == "lm" else (out.float().cpu(), y.cpu(), loss_sum, n)
        if spec.scaling.strategy == "fsdp" and ctx.world_size > 1:
            # A sharded forward gathers each block from every rank: a rank with a batch fewer runs one more, unused.
            for _ in range(source.num_batches(ctx.world_size) - seen):
                if x is None:
                    x = next(iter(source.batches(0, 0, ctx.world_size)))[0].to(ctx.device)
                with autocast_for(spec.train.precision, ctx.device):
                    model(x)
    finally:
        model.train()


@torch.no_grad()
def evaluate_whole(model: torch.nn.Module, source, spec: JobSpec, ctx: LoopContext, task: str, names: list[str]):
    """One process's metrics of a whole split, exact (ROC-AUC by ranks), with its outputs and targets (None for lm or an empty split)."""
    ctx = replace(ctx, rank=0, world_size=1)
    outputs, targets, loss_sum, count = [], [], 0.0, 0
    for out, y, batch_loss, n in batch_outputs(model, source, spec, ctx, task):
        loss_sum += batch_loss
        count += n
        if out is not None:
            outputs.append(out)
            targets.append(y)
    if count == 0:
        return {}, None, None
    out_t = torch.cat(outputs) if outputs else torch.empty(0)
    tgt_t = torch.cat(targets) if targets else torch.empty(0)
    return compute_metrics(task, names, out_t, tgt_t, loss_sum / count), out_t, tgt_t


def evaluate_best_on_test(
    model: torch.nn.Module, source, spec: JobSpec, ctx: LoopContext, task: str, run: RunDir, best_step: int | None
) -> TestSummary | None:
    """Rank 0 alone: the best committed checkpoint (else the latest) on the whole test split, written to `<run>/test.json`."""
    found = ckpt.list_checkpoints(run.fs, run.root)
    if not found or source.size == 0:
        return None
    info = next((c for c in found if c.step == best_step), found[-1])
    model = copy.deepcopy(model)
    model.load_state_dict(read_model_weights(run.fs, info))
    names = test_metric_names(task)
    # Rank 0 alone, so the whole split's outputs are here anyway (test.json keeps them for the
    # report's plots): the exact metrics, ROC-AUC by ranks rather than binned.
    metrics, out, tgt = evaluate_whole(model, source, spec, ctx, task, names)
    return write_test_summary(run, spec, task, metrics, out, tgt, info, best_step)


def test_metric_names(task: str) -> list[str]:
    """Every metric of the task: what the test split is measured by."""
    return list(
        {"classification": CLASSIFICATION_METRICS, "regression": REGRESSION_METRICS, "lm": LM_METRICS}.get(
            task, ("loss",)
        )
    )


def write_test_summary(
    run: RunDir, spec: JobSpec, task: str, metrics, out, tgt, info: ckpt.CheckpointInfo, best_step: int | None
) -> TestSummary:
    """test.json of the whole split's metrics and outputs (tensors, None for lm), and its summary."""
    checkpoint_uri = storage.to_uri(run.fs, info.path)
    record = build_test_record(
        task,
        metrics,
        out.numpy() if out is not None else None,
        tgt.numpy() if tgt is not None else None,
        checkpoint_uri,
        info.step,
        best_step,
        spec.train.seed,
    )
    return TestSummary(uri=run.write_test(record), checkpoint=checkpoint_uri, step=info.step, metrics=record["metrics"])


def build_test_record(
    task: str, metrics: dict[str, Any], outputs, targets, checkpoint: str, step: int, best_step: int | None, seed: int
) -> dict[str, Any]:
    """test.json: test_* metrics plus labels and softmax scores (classification) or predictions and targets (regression).

    `outputs` and `targets` are NumPy arrays of the whole split (unused for lm).
    """
    record: dict[str, Any] = {
        "split": "test",
        "task": task,
        "checkpoint": checkpoint,
        "step": step,
        "best_step": best_step,
        "metrics": {f"test_{k}": v for k, v in metrics.items()},
    }
    if task not in ("classification", "regression") or outputs is None or len(targets) == 0:
        record["examples"] = None if task == "lm" else 0
        return record
    n = len(targets)
    record["examples"] = n
    width = outputs.shape[1] if task == "classification" else 1
    cap = max(1, min(MAX_PLOTTED_EXAMPLES, MAX_PLOTTED_SCORES // max(1, width)))
    keep = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False)) if n > cap else np.arange(n)
    record["plotted_examples"] = int(keep.size)
    if task == "classification":
        logits = outputs[keep].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        record.update(
            num_classes=int(width), labels=targets[keep].astype(int).tolist(), scores=np.round(probs, 6).tolist()
        )
    else:
        record.update(
            predictions=outputs.reshape(-1)[keep].astype(float).tolist(),
            targets=targets.reshape(-1)[keep].astype(float).tolist(),
        )
    return record
