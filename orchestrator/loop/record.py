"""What the loop tells the world as it goes: every metrics entry (history, metrics.jsonl, trackers), and rank 0's progress."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from orchestrator.console import Event, text_progress
from orchestrator.loop.context import LoopContext
from orchestrator.loop.state import TrainState
from orchestrator.rundir import MetricsLog

log = logging.getLogger(__name__)


class Recorder:
    """Every metrics entry goes into the state's history (checkpoints carry it), metrics.jsonl (rank 0) and the trackers."""

    def __init__(
        self, state: TrainState, metrics_log: MetricsLog | None, track: Callable[[dict[str, Any]], None] | None
    ):
        self.state, self.metrics_log, self.track = state, metrics_log, track

    def record(self, entry: dict[str, Any]) -> None:
        entry["time"] = time.time()
        self.state.history.append(entry)
        if self.metrics_log:
            self.metrics_log.append(entry)
        if self.track is not None:
            try:
                self.track(dict(entry))
            except Exception as exc:  # tracking is never a reason to stop training
                log.warning("tracking failed at step %s: %s", entry.get("step"), exc)


class Progress:
    """Rank 0's progress events (console.format_event shows them); the other ranks say nothing."""

    def __init__(self, ctx: LoopContext):
        self.emit: Callable[[Event], None] = (
            (ctx.progress or text_progress(ctx.log)) if ctx.is_main else (lambda event: None)
        )

    def say(self, text: str) -> None:
        self.emit({"kind": "message", "text": text})

    def start(self, text: str, step: int, total_steps: int, epochs: int) -> None:
        self.emit({"kind": "start", "step": step, "total_steps": total_steps, "epochs": epochs, "text": text})

    def validation(self, step: int, metrics: dict[str, Any]) -> None:
        self.emit({"kind": "val", "step": step, "metrics": metrics})

    def test(self, step: int, metrics: dict[str, Any]) -> None:
        self.emit(
            {"kind": "test", "step": step, "metrics": {k: v for k, v in metrics.items() if not isinstance(v, list)}}
        )


class Throughput:
    """Loss, samples and steps since the last log line: what a train entry says of that window."""

    def __init__(self, device: torch.device, world_size: int):
        self.world_size = world_size
        self.loss = torch.zeros((), device=device)  # summed on the device: no host sync per step
        self._reset()

    def _reset(self) -> None:
        self.start, self.samples, self.batches, self.steps = time.perf_counter(), 0, 0, 0
        self.loss.zero_()

    def add_batch(self, loss: torch.Tensor, samples: int) -> None:
        self.loss += loss.float()
        self.batches += 1
        self.samples += samples

    def entry(self, state: TrainState, total_steps: int, lr: float) -> tuple[dict[str, Any], float]:
        """The train entry of the window (loss, LR, samples/s across ranks) and the ETA it implies; starts a new window."""
        elapsed = time.perf_counter() - self.start
        rate = self.samples * self.world_size / elapsed if elapsed > 0 else 0.0
        eta = (total_steps - state.step) * elapsed / max(1, self.steps)
        entry = {
            "step": state.step,
            "epoch": state.epoch,
            "split": "train",
            "loss": self.loss.item() / max(1, self.batches),
            "lr": lr,
            "samples_per_s": rate,
        }
        self._reset()
        return entry, eta
