"""One optimizer step: micro-batches under autocast with a scaled backward, then clipping, the step and the schedule."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from orchestrator.loop.parts import Parts
from orchestrator.spec import JobSpec


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


class TrainStep:
    """Accumulates a group of micro-batches into one optimizer step."""

    def __init__(self, model: torch.nn.Module, parts: Parts, spec: JobSpec, device: torch.device):
        self.model, self.parts, self.spec, self.device = model, parts, spec, device
        self._ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def backward(self, x: torch.Tensor, y: torch.Tensor, group: int, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch, its loss weighted 1/`group`; DDP syncs gradients on the group's last."""
        sync = self.model.no_sync() if (self._ddp and not last) else contextlib.nullcontext()
        with sync:
            with autocast_for(self.spec.train.precision, self.device):
                out = self.model(x)
            loss = compute_loss(self.parts.task, out, y)
            self.parts.scaler.scale(loss / group).backward()
        return loss.detach()

    def apply(self) -> None:
        """Clip (when asked), step the optimizer through the scaler, clear the gradients, advance the schedule."""
        p = self.parts
        if self.spec.train.clip_grad_norm:
            p.scaler.unscale_(p.optimizer)
            torch.nn.utils.clip_grad_norm_(p.model.parameters(), self.spec.train.clip_grad_norm)
        p.scaler.step(p.optimizer)
        p.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        p.schedule.step()

    def discard(self) -> None:
        """A skipped step: its gradients dropped, the optimizer untouched, the schedule on (the step is counted)."""
        self.parts.optimizer.zero_grad(set_to_none=True)
        self.parts.schedule.step()
