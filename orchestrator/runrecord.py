"""run.json, the one record of a run: what ran, its status through its life, and how it ended.

A run's record is created `running` when the run starts (`RunRecord.begin`), and ended once
(`RunRecord.end`): `finished`; `failed` (the summary's `error` says why); `interrupted` (a signal:
Ctrl-C, SIGTERM; a rerun resumes); or `stopped` (`orchestrator stop`, or a sweep's scheduler ended the
trial). A record still `running` after its process is gone was cut off (a killed driver); the next
attempt of the same run writes a new record with `attempts` counted on. This module is the only writer
(the run session, orchestrator.session, decides what it says).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from orchestrator import checkpoint as ckpt
from orchestrator.rundir import RUN_RECORD, TEST_RECORD, RunDir
from orchestrator.storage import redact


class RunStatus(str, Enum):
    """Where a run is in its life; the value is what run.json says."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"  # `orchestrator stop`, or a sweep's scheduler ended the trial at a report
    INTERRUPTED = "interrupted"  # a signal (Ctrl-C, SIGTERM): a rerun resumes

    def __str__(self) -> str:
        return self.value


@dataclass
class Best:
    """The run's best validation by the watched metric, and the checkpoint that holds it (None once deleted)."""

    metric: str | None = None
    value: float | None = None
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


@dataclass
class TestSummary:
    """Where test.json is and what it says in short: the checkpoint it evaluated and its metrics."""

    uri: str
    checkpoint: str | None
    step: int | None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    """How a run ended: the `--json` line of `orchestrator run` and run.json's `summary`."""

    run: str
    run_uri: str
    status: RunStatus
    steps: int | None = 0
    epochs: int | None = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # the last validation
    best: Best | None = None
    checkpoint: str | None = None  # the newest committed checkpoint
    stopped_early: bool = False
    first_step_at: float | None = None
    last_step_at: float | None = None
    report_blocked_s: float | None = None
    report_blocked_max_s: float | None = None
    test: TestSummary | None = None
    resumed_from: str | None = None
    report: str | None = None
    wall_s: float | None = None
    error: str | None = None  # why it failed, was interrupted or stopped
    signal: str | None = None  # interrupted: the signal's name (SIGINT, SIGTERM)
    exit_code: int | None = None  # failed by the job's own sys.exit(n) / os._exit(n): n
    already_finished: bool = False
    # [epoch, batch] of each resume that took the rest of an epoch from a new pass (data.engine=ray).
    redrawn: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = str(self.status)
        for optional in ("error", "signal", "exit_code", "already_finished", "redrawn"):
            if out[optional] is None or out[optional] is False or out[optional] == []:
                del out[optional]
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSummary:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["status"] = RunStatus(values.get("status", "finished"))
        if isinstance(values.get("best"), dict):
            values["best"] = Best(**{k: v for k, v in values["best"].items() if k in {f.name for f in fields(Best)}})
        if isinstance(values.get("test"), dict):
            values["test"] = TestSummary(
                **{k: v for k, v in values["test"].items() if k in {f.name for f in fields(TestSummary)}}
            )
        return cls(**values)


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class RunRecord:
    """run.json: the resolved job, status, start and end, command line, provenance, tracking ids, summary."""

    run: str
    status: RunStatus
    started: str
    job: dict[str, Any]
    ended: str | None = None
    command: list[str] = field(default_factory=list)
    job_file: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)
    attempts: int = 1
    summary: RunSummary | None = None
    # A sweep trial's: its sweep, settings, and where it started from.
    sweep: str | None = None
    config: dict[str, Any] | None = None
    resumed_from: str | None = None
    exploited_from: str | None = None
    # The run's identity (spec.identity): the fingerprint of the settings that change its result.
    fingerprint: str | None = None
    # Where its loop ran and by which rule (executor.choose_executor).
    executor: dict[str, Any] | None = None
    # Each `--extend`: from which step, and the horizon before and after.
    extended: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def begin(cls, run: str, job: dict[str, Any], previous: RunRecord | None = None, **details: Any) -> RunRecord:
        """A new attempt of a run, `running` from now; `previous` is the record of the attempt before (attempts count on)."""
        details.setdefault("command", [redact(word) for word in sys.argv])
        return cls(
            run=run,
            status=RunStatus.RUNNING,
            started=now(),
            job=job,
            attempts=(previous.attempts if previous else 0) + 1,
            **details,
        )

    def end(self, status: RunStatus, summary: RunSummary | None) -> None:
        """The attempt ended: its status and summary, stamped now."""
        self.status, self.ended, self.summary = RunStatus(status), now(), summary

    @property
    def finished(self) -> bool:
        return self.status == RunStatus.FINISHED

    @property
    def identity(self) -> dict[str, Any]:
        """The settings of this run that change its result (spec.identity), read from its resolved job."""
        from orchestrator.spec import JobSpec
        from orchestrator.spec.identity import settings_of

        try:  # through the job's model: a field added since this run was recorded reads as its default
            job = JobSpec.model_validate(self.job).to_dict()
        except ValueError:
            job = self.job
        return settings_of(job)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["status"] = str(self.status)
        out["summary"] = self.summary.to_dict() if self.summary else None
        for trial_field in ("sweep", "config", "resumed_from", "exploited_from"):
            if out[trial_field] is None and self.sweep is None:
                del out[trial_field]  # a plain run's record has none of a trial's fields
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["status"] = RunStatus(values["status"])
        values["summary"] = RunSummary.from_dict(values["summary"]) if isinstance(values.get("summary"), dict) else None
        return cls(**values)

    def save(self, run: RunDir) -> None:
        run.write_json(RUN_RECORD, self.to_dict(), indent=1)

    @classmethod
    def load(cls, run: RunDir) -> RunRecord | None:
        """The run's record, or None when it has none (or one this version cannot read)."""
        raw = run.read_json(RUN_RECORD)
        if not isinstance(raw, dict):
            return None
        try:
            return cls.from_dict(raw)
        except (KeyError, TypeError, ValueError):
            return None


def test_summary(run: RunDir) -> TestSummary | None:
    """The short form of the run's test.json, or None when it has none."""
    test = run.read_test()
    if test is None:
        return None
    return TestSummary(
        uri=run.uri_of(TEST_RECORD),
        checkpoint=test.get("checkpoint"),
        step=test.get("step"),
        metrics=test.get("metrics", {}),
    )


def summary_from_checkpoints(run: RunDir, status: RunStatus) -> RunSummary:
    """What the newest committed checkpoint says of a run: steps, epochs, last validation, best (and its checkpoint), test.

    The counters ride in each checkpoint's manifest; a checkpoint written before they did is read from its state.pt.
    """
    summary = RunSummary(run=run.name, run_uri=run.uri, status=status, test=test_summary(run))
    found = ckpt.list_checkpoints(run.fs, run.root, uri_prefix=run.uri)
    for info in reversed(found):
        # The built-in loop's counters (a bring-your-own loop's checkpoint records only the step it reported).
        train = info.manifest.train if "step" in info.manifest.train else _counters_from_state(run, info)
        if train is not None:
            break
    else:
        return summary
    summary.steps, summary.epochs, summary.metrics = train["step"], train["epoch"], train["last_val"]
    summary.checkpoint, summary.stopped_early = info.uri, train["stopped_early"]
    summary.best = Best(
        metric=train.get("best_metric"),
        value=train["best_value"],
        step=train["best_step"],
        metrics=train["best_metrics"],
        checkpoint=next((c.uri for c in found if c.step == train["best_step"]), None),
    )
    for key in ("first_step_at", "last_step_at", "report_blocked_s", "report_blocked_max_s"):
        setattr(summary, key, train.get(key))
    summary.redrawn = train.get("redrawn") or []
    return summary


def _counters_from_state(run: RunDir, info) -> dict[str, Any] | None:
    try:
        return ckpt.deserialize_state(ckpt.read_verified(run.fs, info, ["state.pt"])["state.pt"])["train"]
    except (ValueError, FileNotFoundError):
        return None  # not a checkpoint that verifies: the one before it says
