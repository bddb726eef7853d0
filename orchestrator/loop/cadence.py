"""What follows an optimizer step: a log line, a validation, a checkpoint; and when training is over."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.loop.state import TrainState
from orchestrator.spec import JobSpec


@dataclass
class Cadence:
    """The job's `train.log_every_n_steps`, `validation.every_n_steps` and `checkpoint.every_n_*`, against the run's length."""

    spec: JobSpec
    total_steps: int

    def over(self, state: TrainState) -> bool:
        """Training is done: the last step was taken, or early stopping said so."""
        return state.step >= self.total_steps or state.stopped_early

    def log_due(self, step: int) -> bool:
        return step % self.spec.train.log_every_n_steps == 0 or step == self.total_steps

    def validation_due(self, step: int, last_of_epoch: bool) -> bool:
        """Every N steps, else at each epoch's end; and always after the last step."""
        every = self.spec.validation.every_n_steps
        return bool(every and step % every == 0) or (not every and last_of_epoch) or step >= self.total_steps

    def checkpoint_due(self, state: TrainState, last_of_epoch: bool) -> bool:
        """Every N steps or epochs, and always when training is over."""
        c = self.spec.checkpoint
        return (
            self.over(state)
            or bool(c.every_n_steps and state.step % c.every_n_steps == 0)
            or bool(last_of_epoch and c.every_n_epochs and state.epoch % c.every_n_epochs == 0)
        )
