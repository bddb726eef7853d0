"""Which validation is the run's best, and when training stops early: decided here, at each validation."""

from __future__ import annotations

from typing import Any

from orchestrator.loop.state import TrainState
from orchestrator.metrics import default_mode, is_better
from orchestrator.spec import JobSpec


def watched_metric(spec: JobSpec) -> tuple[str, str]:
    """The validation metric that makes a checkpoint the best (and that early stopping watches), with its mode."""
    early = spec.early_stopping
    metric = (early.metric if early else None) or spec.checkpoint.best_metric or "val_loss"
    mode = (early.mode if early else None) or spec.checkpoint.best_mode or default_mode(metric)
    return metric, mode


class EarlyStopping:
    """The watched metric against the best so far: a new best needs `min_delta`; `patience` validations without one stop training."""

    def __init__(self, spec: JobSpec):
        self.metric, self.mode = watched_metric(spec)
        early = spec.early_stopping
        self.min_delta = early.min_delta if early else 0.0
        self.patience = early.patience if early else None

    def observe(self, state: TrainState, val: dict[str, Any]) -> None:
        """Record a validation's verdict in the state: best metric, value, step and metrics; validations without progress."""
        value = val.get(self.metric)
        if isinstance(value, (int, float)) and (
            state.best_value is None or is_better(value, state.best_value, self.mode, self.min_delta)
        ):
            state.best_value, state.best_step, state.bad_validations = float(value), state.step, 0
            state.best_metrics = {k: v for k, v in val.items() if not isinstance(v, list)}
        else:
            state.bad_validations += 1
        if self.patience and state.bad_validations >= self.patience:
            state.stopped_early = True

    def stop_message(self, state: TrainState) -> str:
        return (
            f"early stopping at step {state.step}: {self.metric} has not improved for {self.patience} validations "
            f"(best {state.best_value:.4f} at step {state.best_step})"
        )
