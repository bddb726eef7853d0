"""What a run trains, built from the spec: data, model, optimizer, schedule, scaler, and the step counts they imply."""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from orchestrator.data import Splits, load_data
from orchestrator.loop.context import LoopContext
from orchestrator.loop.sharding import is_sharded, shard_model
from orchestrator.models import build_model
from orchestrator.optim import LRSchedule, build_optimizer, build_schedule
from orchestrator.spec import JobSpec
from orchestrator.weights import load_weights


@dataclass
class Parts:
    """The run's data and the objects that train on it (the model unwrapped: no DDP, not compiled; sharded under fsdp)."""

    splits: Splits
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    batches_per_epoch: int  # per rank
    accum: int  # micro-batches per optimizer step
    total_steps: int

    @property
    def task(self) -> str:
        return self.splits.info.task


def build_parts(spec: JobSpec, ctx: LoopContext, say: Callable[[str], None]) -> Parts:
    """Load the data, build the model (with `model.init_from` and `model.freeze`), the optimizer, schedule and scaler."""
    if ctx.base_dir and ctx.base_dir not in sys.path:
        sys.path.insert(0, ctx.base_dir)
    splits = load_data(spec, ctx.base_dir, train_shard=ctx.train_shard)
    model = build_model(spec, splits.info, base_dir=ctx.base_dir)
    apply_init_and_freeze(model, spec, say)
    model.to(ctx.device)
    if is_sharded(spec):  # before the optimizer: its parameters are the shards
        shard_model(model, spec, ctx)
    optimizer = build_optimizer(model, spec.optim)
    batches_per_epoch = splits.train.num_batches(ctx.world_size)
    if batches_per_epoch == 0:
        raise ValueError(f"data: the training split has fewer than {ctx.world_size} examples per worker")
    accum = spec.train.grad_accum_steps
    total_steps = math.ceil(batches_per_epoch / accum) * spec.train.epochs
    if spec.train.max_steps:
        total_steps = min(total_steps, spec.train.max_steps)
    schedule = build_schedule(optimizer, spec.schedule, total_steps)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=spec.train.precision == "fp16")
    return Parts(splits, model, optimizer, schedule, scaler, batches_per_epoch, accum, total_steps)


def apply_init_and_freeze(model: torch.nn.Module, spec: JobSpec, say: Callable[[str], None]) -> None:
    """Load `model.init_from` weights (shape-compatible tensors) and freeze `model.freeze` patterns."""
    if spec.model.init_from:
        weights = load_weights(spec.model.init_from, spec.checkpoint.endpoint_url)
        own = model.state_dict()
        usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(weights) - set(usable))
        if not usable:  # preflight says so first; weights that changed since would train from scratch, silently
            raise ValueError(f"model.init_from: no tensor of {spec.model.init_from} fits the model by name and shape")
        model.load_state_dict(usable, strict=False)
        say(
            f"initialised {len(usable)} of the model's {len(own)} tensors from {spec.model.init_from}"
            + (f" (skipped {len(skipped)} of another shape or name)" if skipped else "")
        )
    if spec.model.freeze:
        frozen = 0
        for name, param in model.named_parameters():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in spec.model.freeze):
                param.requires_grad_(False)
                frozen += 1
        if not frozen:
            raise ValueError(f"model.freeze: no parameter matches {spec.model.freeze}")
        say(f"froze {frozen} parameter tensors matching {spec.model.freeze}")


def wrap_model(model: torch.nn.Module, spec: JobSpec, ctx: LoopContext) -> torch.nn.Module:
    """The model as the step runs it: DDP across ranks, compiled when `train.compile` (fsdp: sharded and compiled already)."""
    if is_sharded(spec):
        return model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if spec.train.compile:
        model = torch.compile(model)
    return model
