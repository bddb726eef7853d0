"""The sweep's live view: one line when trials change state or the best improves; trials and their status in words.

`SweepProgress` is a Tune callback that Tune keeps in its experiment state, so a resumed sweep gets
the interrupted one's back: it holds only data, and prints through this process's `say` (set by
`live_view`) from the moment Tune sets it up, with its clock started then.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from orchestrator.rundir import RunDir
from orchestrator.runrecord import RunRecord, RunStatus
from orchestrator.sweep.export import trial_status
from orchestrator.sweep.load import settings_text
from orchestrator.sweep.trial import trial_dir_name

# Where this process's live view goes; restored callbacks find it here rather than in their pickled state.
_say: Callable[[str], None] = print


def run_status(run_uri: str, endpoint: str | None, cv_folds: int | None = None) -> str | None:
    """The status in a trial's run.json (finished, stopped, failed, running), or None; a cross-validated trial's is its
    folds' (finished when every fold is)."""
    if cv_folds:
        statuses = [run_status(f"{run_uri}/fold-{i}", endpoint) for i in range(cv_folds)]
        return next((s for s in statuses if s != RunStatus.FINISHED), str(RunStatus.FINISHED))
    record = RunRecord.load(RunDir.open(run_uri, endpoint))
    return str(record.status) if record else None


def _is_better(value: Any, best: Any, mode: str) -> bool:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def best_so_far(values: list[Any], mode: str) -> float | None:
    """The best of a trial's values by the sweep's mode, NaN and non-numbers left out (the end's rule); None if none."""
    best = None
    for value in values:
        if _is_better(value, best, mode):
            best = value
    return best


def live_view(
    sweep_uri: str,
    endpoint: str | None,
    metric: str,
    mode: str,
    say: Callable[[str], None],
    every_s: float = 5.0,
    name_by: str | None = None,
    cv_folds: int | None = None,
) -> SweepProgress:
    """The live view of a sweep, printing through `say` (a restored one prints there too)."""
    global _say
    _say = say
    view = SweepProgress(sweep_uri, endpoint, metric, mode, every_s)
    view.name_by, view.cv_folds = name_by, cv_folds
    return view


class SweepProgress(Callback):
    """A Tune callback printing one line when trials change state or the best improves (at most every `every_s` otherwise)."""

    def __init__(self, sweep_uri: str, endpoint: str | None, metric: str, mode: str, every_s: float = 5.0):
        self.sweep_uri, self.endpoint, self.metric, self.mode, self.every_s = sweep_uri, endpoint, metric, mode, every_s
        self.t0 = time.time()
        self.last_line, self.last_time = "", 0.0
        self.ended: dict[str, str | None] = {}  # trial id -> its run's status, read once when it ends
        self.name_by: str | None = None  # the field that names trial directories (trial_dir_name)
        self.cv_folds: int | None = None  # sweep.cv_folds: a trial's status is its folds'
        self.bests: dict[str, float] = {}  # trial id -> the best value of the metric it reported to this view

    def setup(self, **info) -> None:
        # Called as Tune's run starts, a resumed one included: the clock runs from this process's start of it.
        self.t0 = time.time()
        self.last_line, self.last_time = "", 0.0

    def _show(self, trials, force: bool = False) -> None:
        counts: dict[str, int] = {}
        best = None
        for t in trials:
            if t.status == "TERMINATED" and t.trial_id not in self.ended:
                run = trial_dir_name(t.trial_id, t.config, getattr(self, "name_by", None))
                folds = getattr(self, "cv_folds", None)  # a view restored from before the field has none
                self.ended[t.trial_id] = run_status(f"{self.sweep_uri}/{run}", self.endpoint, folds)
            state = trial_status(t.status, self.ended.get(t.trial_id))
            counts[state] = counts.get(state, 0) + 1
            value = self._trial_best(t)
            if _is_better(value, best[0] if best else None, self.mode):
                best = (value, t)
        order = ("running", "pending", "paused", "stopped", "done", "error")
        parts = ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))
        line = f"trials: {parts}"
        if best:
            name = trial_dir_name(best[1].trial_id, best[1].config, getattr(self, "name_by", None))
            line += f" | best {self.metric} {best[0]:.4f} ({name}: {settings_text(best[1].config)})"
        now = time.time()
        if line != self.last_line or force or now - self.last_time > self.every_s * 6:
            elapsed = int(now - self.t0)
            _say(f"[{elapsed // 60}:{elapsed % 60:02d}] {line}")
            self.last_line, self.last_time = line, now

    def _trial_best(self, trial) -> float | None:
        # Each trial's best so far, not its latest: the end ranks trials by their best (export.collect_trials), and
        # the live line must not fall back as a trial's metric does. Tune's own per-trial record of the values is kept
        # across a resumed sweep; this view's own covers a NaN, which makes Tune's max forget the values before it.
        analysis = (getattr(trial, "metric_analysis", None) or {}).get(self.metric) or {}
        seen = self.__dict__.get("bests", {}).get(trial.trial_id)  # a view restored from before the field has none
        return best_so_far([analysis.get(self.mode), seen, (trial.last_result or {}).get(self.metric)], self.mode)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        bests = self.__dict__.setdefault("bests", {})
        best = best_so_far([bests.get(trial.trial_id), result.get(self.metric)], self.mode)
        if best is not None:
            bests[trial.trial_id] = best
        if time.time() - self.last_time >= self.every_s:
            self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial.get_pickled_error()
        reason = (
            str(error).strip().splitlines()[-1] if error is not None and str(error).strip() else "see its error file"
        )
        _say(f"trial {trial.trial_id} failed: {reason} ({trial.error_file})")
        self._show(trials, force=True)
