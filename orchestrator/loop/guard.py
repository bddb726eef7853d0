"""The loss guard: a NaN or infinite loss is caught without a host sync per step, and named by its step."""

from __future__ import annotations

import torch

from orchestrator.failure import NonFiniteLoss


class LossGuard:
    """Watches every micro-batch loss on its device; the host reads it only where the loop already waits.

    With `skip`, the step whose loss is not finite is not applied (that needs one read per step).
    """

    def __init__(self, device: torch.device, skip: bool):
        self.skip = skip
        self._first_step = torch.full((), -1, dtype=torch.long, device=device)
        self._first_value = torch.zeros((), dtype=torch.float32, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Note the loss of a micro-batch of optimizer step `step` (1-based); no sync."""
        value = loss.detach().float()
        first = (~torch.isfinite(value)) & (self._first_step < 0)
        self._first_step = torch.where(first, torch.full_like(self._first_step, step), self._first_step)
        self._first_value = torch.where(first, value, self._first_value)

    def check(self) -> None:
        """Raise NonFiniteLoss naming the first bad step since the start (fail mode)."""
        if not self.skip and int(self._first_step.item()) >= 0:
            raise NonFiniteLoss(int(self._first_step.item()), float(self._first_value.item()))

    def take_skip(self) -> int | None:
        """Skip mode: the step to skip when this step's loss was not finite (then forgotten), else None."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # DDP averages gradients: one rank's NaN is every rank's, so every rank must skip together.
            torch.distributed.all_reduce(self._first_step, op=torch.distributed.ReduceOp.MAX)
        step = int(self._first_step.item())
        if step < 0:
            return None
        self._first_step.fill_(-1)
        return step
