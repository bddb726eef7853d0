"""Optimizers and learning-rate schedules built from the job file's `optim` and `schedule` sections.

A schedule's LR is a pure function of the optimizer step (`lr_at`), so a resumed run only needs
the step count (and, for plateau, its small bookkeeping) to continue exactly where it stopped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from orchestrator.metrics import is_better
from orchestrator.spec import OptimSpec, ScheduleSpec

# Schedules whose LR depends only on the step; plateau also depends on validation results.
STEP_SCHEDULES = ("constant", "step", "cosine", "warmup_cosine")
_WARMUP_SCHEDULES = ("constant", "warmup_cosine")


def build_optimizer(model: nn.Module, spec: OptimSpec) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters: group 0 (dim >= 2) decays, group 1 (biases, norms) does not."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Decaying biases and norm scales only pulls them toward 0 (a dead norm), it does not regularise.
        (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (are they all frozen by model.freeze?)")
    # Both groups are always present so that the state-dict layout does not depend on the model.
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov)
    if spec.name == "adam":
        return torch.optim.Adam(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)
    if spec.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=spec.lr, alpha=spec.alpha, eps=spec.eps, momentum=spec.momentum)
    raise ValueError(f"optim.name: unknown optimizer {spec.name!r}")


def lr_at(step: int, base_lr: float, spec: ScheduleSpec, total_steps: int) -> float:
    """The LR of a step-based schedule for the optimizer step `step` (0-based) of a `total_steps` run."""
    check_schedule(spec, total_steps)
    warmup = spec.warmup_steps
    if spec.name in _WARMUP_SCHEDULES and step < warmup:
        return base_lr * step / warmup
    if spec.name == "constant":
        return base_lr
    if spec.name == "step":
        return base_lr * spec.gamma ** (step // spec.step_size)
    if spec.name in ("cosine", "warmup_cosine"):
        start = warmup if spec.name == "warmup_cosine" else 0
        span = max(1, total_steps - start)
        progress = min(1.0, (step - start) / span)
        return spec.min_lr + (base_lr - spec.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.name: {spec.name!r} is not a step-based schedule")


def check_schedule(spec: ScheduleSpec, total_steps: int) -> None:
    """What a schedule needs of the run (ValueError naming the field): preflight asks it without building one."""
    if spec.warmup_steps and spec.name not in _WARMUP_SCHEDULES:
        raise ValueError(f"schedule.warmup_steps: {spec.name} has no warm-up; use constant or warmup_cosine")
    if spec.name in ("cosine", "warmup_cosine") and total_steps < 1:
        raise ValueError(f"schedule.name: {spec.name} needs the run's total steps (got {total_steps})")


class LRSchedule:
    """Sets every param group's LR once per optimizer step (`step`) and after validations (`on_validation`, plateau)."""

    def __init__(self, optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int):
        check_schedule(spec, total_steps)
        self.optimizer = optimizer
        self.spec = spec
        self.total_steps = int(total_steps)
        # `initial_lr` is kept in the optimizer's own state dict (torch's convention), so an
        # optimizer restored mid-warmup still knows its peak LR, not the warm-up LR it saved.
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lr = float(optimizer.param_groups[0]["initial_lr"])
        self.step_count = 0
        # Plateau bookkeeping: the LR of the first group, the best metric and the bad validations since.
        self.plateau_lr = self.base_lr
        self.best: float | None = None
        self.num_bad = 0
        self._apply()

    @property
    def lr(self) -> float:
        """The current LR of the first param group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self) -> None:
        """Advance one optimizer step."""
        self.step_count += 1
        self._apply()

    def on_validation(self, metrics: dict[str, Any]) -> None:
        """Feed a validation result; plateau drops the LR by `factor` after more than `patience` validations without improvement."""
        if self.spec.name != "plateau":
            return
        if self.spec.metric not in metrics:
            raise ValueError(
                f"schedule.metric: {self.spec.metric!r} is not among the validation metrics ({', '.join(sorted(metrics))})"
            )
        value = metrics[self.spec.metric]
        value = None if value is None else float(value)
        if is_better(value, self.best, self.spec.mode):
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        # torch's ReduceLROnPlateau semantics: `patience` bad validations are tolerated, the next one drops.
        if self.num_bad > self.spec.patience:
            self.plateau_lr = max(self.plateau_lr * self.spec.factor, self.spec.min_lr)
            self.num_bad = 0
        self._apply()

    def _current_base(self) -> float:
        if self.spec.name == "plateau":
            return self.plateau_lr
        return lr_at(self.step_count, self.base_lr, self.spec, self.total_steps)

    def _apply(self) -> None:
        lr = self._current_base()
        for group in self.optimizer.param_groups:
            # Groups with their own peak LR (e.g. a slower backbone) follow the same curve, scaled.
            ratio = group["initial_lr"] / self.base_lr if self.base_lr else 1.0
            group["lr"] = lr * ratio

    def state_dict(self) -> dict[str, Any]:
        """Plain data (loadable with torch.load(weights_only=True)): the step count and plateau bookkeeping."""
        return {
            "name": self.spec.name,
            "step_count": self.step_count,
            "plateau_lr": self.plateau_lr,
            "best": self.best,
            "num_bad": self.num_bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state: the next `step()` gives the LR an uninterrupted run would have had."""
        self.step_count = int(state["step_count"])
        self.plateau_lr = float(state["plateau_lr"])
        self.best = None if state["best"] is None else float(state["best"])
        self.num_bad = int(state["num_bad"])
        self._apply()


def build_schedule(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int) -> LRSchedule:
    """The LR schedule of the job, already applied to the optimizer for step 0."""
    return LRSchedule(optimizer, spec, total_steps)
