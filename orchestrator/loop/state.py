"""The loop's counters and bookkeeping, and the RNG states: together, enough to continue a run bit for bit."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Counters and bookkeeping saved in every checkpoint; with the RNG states, enough to continue bit-for-bit."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch of the next batch
    batch: int = 0  # index of the next batch within that epoch (within its last leg, after an elastic restart)
    # [world size, batches each rank took] of the earlier world sizes of this epoch: an elastic
    # restart continues with what they left of the epoch, each example once.
    legs: list[list[int]] = field(default_factory=list)
    # [epoch, batch] of each resume whose data source cannot continue an epoch exactly (data.engine=ray):
    # the rest of that epoch was taken from a new pass over it.
    redrawn: list[list[int]] = field(default_factory=list)
    samples: int = 0
    best_metric: str | None = None  # the metric that ranks validations (early stopping, keep_best)
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    bad_validations: int = 0  # early stopping: validations since the last improvement
    stopped_early: bool = False
    checkpoint_blocked_s: float = (
        0.0  # time the training thread spent in checkpointing (snapshot, or waiting on an upload)
    )
    report_blocked_s: float = 0.0  # time the training thread spent handing metrics to ctx.report (Ray, Tune)
    report_blocked_max_s: float = 0.0  # the longest single report
    first_step_at: float | None = None  # wall clock of the first and latest optimizer step (benchmarks, ETA)
    last_step_at: float | None = None
    last_val: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def stepped(self, last_of_epoch: bool) -> None:
        """One optimizer step was taken (the epoch rolls over after its last batch)."""
        self.step += 1
        self.last_step_at = time.time()
        if self.first_step_at is None:
            self.first_step_at = self.last_step_at
        if last_of_epoch:
            self.epoch, self.batch, self.legs = self.epoch + 1, 0, []

    def counters(self) -> dict[str, Any]:
        """What a summary needs of the state (no history): it rides in each checkpoint's manifest."""
        keep = (
            "step",
            "epoch",
            "best_metric",
            "best_value",
            "best_step",
            "best_metrics",
            "stopped_early",
            "redrawn",
            "first_step_at",
            "last_step_at",
            "report_blocked_s",
            "report_blocked_max_s",
            "last_val",
        )
        return {k: getattr(self, k) for k in keep}


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
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the RNG states `capture_rng` took."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
