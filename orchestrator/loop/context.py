"""What the loop needs from whoever runs it (Ray Train, a Tune trial, a test)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.console import Event


def _stderr(msg: str) -> None:
    # Not print(): Ray Train patches print on workers to also log it, which shows every line twice.
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


@dataclass
class LoopContext:
    """Rank, world size and device; the run's URI; where metrics, progress and messages go."""

    run_uri: str
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, Any]], None] = lambda metrics: None
    log: Callable[[str], None] = _stderr
    base_dir: str | None = None
    # Rank 0 hands every metrics entry to the trackers; it must return at once (tracking.Tracker queues).
    track: Callable[[dict[str, Any]], None] | None = None
    # Rank 0's progress events (console.format_event); None: their plain lines go to `log`.
    progress: Callable[[Event], None] | None = None
    # Whether whoever runs the loop wants it to end now (a Tune scheduler that stopped the trial at a report).
    should_stop: Callable[[], bool] = lambda: False
    # The run's lease as the driver holds it ({"uri", "token"}, lease.RunLease.token_ref): checked before each commit.
    lease: dict[str, Any] | None = None
    # data.engine=ray: this rank's shard of the train split (anything with `iter_torch_batches`), made by whoever runs the loop.
    train_shard: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_initialized()
