"""A run's life, once for every kind of run: `orchestrator run`, each sweep trial, each cv fold (and a cv's refit).

```
RunPlan (frozen: the job, its run directory, the executor, what it continues)
  -> RunSession.begin     provenance, trackers started, run.json `running` (fingerprint, executor, extension)
  -> RunSession.host      the executor's attempts (trainer.fit_with_decisions), and how they ended:
                            finished | failed (the reason; a job's own exit code) | interrupted (a signal)
                            | stopped (`orchestrator stop`; a sweep's scheduler) | failed, the lease lost
  -> RunSession.end       the summary (from the checkpoints), run.json ended: unless the lease was lost,
                            when the directory is someone else's and nothing more is written there
  -> RunSession.finish    the trackers closed with the summary and the run's files
```

The caller adds what is its own: `launch` the lease, the identity check, Ray, the console and the report;
`sweep.trial` Tune's reports. The identity of a run (what a rerun may change) is spec.identity's; whether
a rerun resumes, is already done, extends or is refused is `check_rerun`'s.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator import checkpoint as ckpt
from orchestrator.errors import BadInput, StopRequested
from orchestrator.events import Sink, worker_group_channel
from orchestrator.executor import (
    RULES,
    DriverHooks,
    Executor,
    GroupHooks,
    LoopOutcome,
    run_in_driver,
    run_in_group,
    run_in_task,
)
from orchestrator.failure import job_exit_code, one_line
from orchestrator.lease import LeaseLost
from orchestrator.provenance import add_placement, collect_provenance
from orchestrator.rundir import RunDir
from orchestrator.runrecord import RunRecord, RunStatus, RunSummary, now, summary_from_checkpoints
from orchestrator.spec import JobSpec
from orchestrator.spec.identity import changes, fingerprint, only_horizon_grew, refusal, settings_of
from orchestrator.tracking import TrackingSession
from orchestrator.trainer import RunFailedForGood, fit_with_decisions, loop_config_of

# A driver that the Jobs API started (`orchestrator submit`) has this in its environment: a SIGTERM there is
# `orchestrator stop` (or `ray job stop`), a stop the user asked for.
JOBS_API_DRIVER = "RAY_JOB_CONFIG_JSON_ENV_VAR"


# ----------------------------------------------------------------------------------------------
# Signals: Ctrl-C and SIGTERM end a run as interrupted, recorded, with a word on how to resume


class Interrupted(KeyboardInterrupt):
    """A signal (or the loss of the run's lease) ended the run in the driver; a KeyboardInterrupt, as Ray treats one."""

    def __init__(self, signum: int, lost_to: str | None = None):
        super().__init__(signum, lost_to)
        self.signum, self.lost_to = signum, lost_to


class RunSignals:
    """While a run lives (main thread only): SIGINT and SIGTERM raise Interrupted there, once; the rest of its end
    (recording it, stopping Ray) is not cut short by another. `lost_lease` interrupts it the same way from the
    lease's renewal thread."""

    def __init__(self) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self.raised = False
        self.signum: int | None = (
            None  # the signal that interrupted the run (Ray may re-raise it as a KeyboardInterrupt)
        )
        self.lost_to: str | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> RunSignals:
        if self.active:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def claim(self) -> None:
        """Take the signals back from whatever installed its own handlers since (ray.init's SIGTERM: sys.exit)."""
        if self.active and self._saved:
            for sig in self._saved:
                signal.signal(sig, self._handle)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.raised:
            return
        self.raised, self.signum = True, signum
        raise Interrupted(signum, self.lost_to)

    def lost_lease(self, holder: str) -> None:
        """The lease went to another run: interrupt the run now (a real signal, so a blocking wait wakes too)."""
        self.lost_to = holder
        if self.active and self._saved:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def exit_code_of(summary: RunSummary) -> int:
    """The command's exit code for how a run ended: 0, 1 (failed), 128 + the signal (interrupted, stopped by one)."""
    if summary.status == RunStatus.FAILED:
        return 1
    if summary.signal:
        return 128 + int(getattr(signal, summary.signal, signal.SIGTERM))
    return 0


# ----------------------------------------------------------------------------------------------
# The plan and the rerun rule


@dataclass(frozen=True)
class TrialOf:
    """A sweep trial's (or a fold's) place in its sweep: what its run.json and trackers say of it."""

    sweep: str
    record_name: str  # the trial's id (`fold-0`, `<trial>/fold-1`)
    config: dict[str, Any]
    parent_run_id: str | None = None
    exploited_from: str | None = None


@dataclass(frozen=True)
class RunPlan:
    """A run decided before anything starts: the job, its directory, the executor, and what it continues."""

    spec: JobSpec
    run: RunDir
    executor: Executor
    base_dir: str
    job_file: str | None = None
    address: str | None = None  # None: an embedded Ray (or, for the driver executor, none at all)
    previous: RunRecord | None = None
    data_fingerprint: dict[str, Any] | None = None
    t0: float = field(default_factory=time.time)
    lease: dict[str, Any] | None = None  # lease.RunLease.token_ref: what the loop checks before each commit
    extension: dict[str, Any] | None = None  # --extend: {"from_step", "changes"}
    trial: TrialOf | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return settings_of(self.spec.to_dict())


@dataclass(frozen=True)
class Rerun:
    """What a run's earlier attempt means for this one: nothing done yet, resumed, already done, or extended."""

    previous: RunRecord | None = None
    done: bool = False  # finished with these settings: nothing to do
    extension: dict[str, Any] | None = None


def check_rerun(previous: RunRecord | None, spec: JobSpec, uri: str, extend: bool = False) -> Rerun:
    """The one rule of a rerun: same settings resume (or say it is done), changed ones are refused (BadInput, exit 2)
    naming each field; `extend` continues a run for a longer horizon (train.epochs, train.max_steps) only."""
    if previous is None:
        if extend:
            raise BadInput(f"--extend: {uri} holds no run to extend")
        return Rerun()
    found = changes(previous.identity, settings_of(spec.to_dict()))
    steps = (previous.summary.steps if previous.summary else None) or 0
    if not extend:
        if found:
            raise refusal(uri, "run", previous.finished, found, "name", steps if only_horizon_grew(found) else None)
        return Rerun(previous, done=previous.finished)
    if not found:
        t = spec.train
        raise BadInput(
            f"--extend: {uri} already runs to train.epochs {t.epochs}, train.max_steps {t.max_steps}; "
            f"name a longer horizon, e.g. train.epochs={t.epochs * 2}"
        )
    if not only_horizon_grew(found):
        raise refusal(uri, "run", previous.finished, found, "name", None)
    if previous.summary and previous.summary.stopped_early:
        raise BadInput(
            f"--extend: {uri} stopped early at step {steps} (early_stopping): more epochs would stop again at once; "
            "use --fresh for a new run"
        )
    return Rerun(previous, extension={"from_step": steps, "changes": {p: [old, new] for p, old, new in found}})


def extension_line(plan: RunPlan) -> str:
    """What `--extend` does, said once: from which step, to which horizon, and what becomes of the LR schedule."""
    ext = plan.extension or {}
    horizon = ", ".join(f"{p} {old} -> {new}" for p, (old, new) in ext.get("changes", {}).items())
    schedule = plan.spec.schedule.name
    if schedule in ("cosine", "warmup_cosine"):
        how = f"the {schedule} schedule is re-planned for the new length: from there the LR is that of a run planned this long from the start"
    else:
        how = f"the {schedule} schedule has no horizon: it goes on as it was"
    return f"extending {plan.run.name} ({horizon}) from step {ext.get('from_step', 0)}; {how}"


# ----------------------------------------------------------------------------------------------
# The session


@dataclass
class Ending:
    """How the executor's attempts ended, before anything is recorded."""

    status: RunStatus
    outcome: LoopOutcome | None = None
    error: str | None = None
    signal: str | None = None
    exit_code: int | None = None
    lost: bool = False  # the lease went to another run: run.json is not ours to write any more


class RunSession:
    """One run's life (see the module's drawing): begin, host, end, finish. `say` is for one-line decisions."""

    def __init__(
        self,
        plan: RunPlan,
        say: Callable[[str], None],
        log_only: Callable[[str], None] | None = None,
        signals: RunSignals | None = None,
        events: Sink | None = None,
    ):
        self.plan, self.say, self.log_only, self.signals = plan, say, log_only, signals
        self.events = events  # where rank 0's progress events go (the console); none: the loop prints their lines
        self.provenance: dict[str, Any] = {}
        self.tracking: TrackingSession | None = None
        self.record: RunRecord | None = None
        self.resumed_from: str | None = None  # the checkpoint this attempt starts from
        self.lost = False  # the lease went to another run: its directory and trackers are not ours any more

    def begin(self) -> None:
        """Provenance, the trackers, and run.json saying `running` (with the run's fingerprint and executor)."""
        plan, spec, run = self.plan, self.plan.spec, self.plan.run
        here = plan.executor == Executor.DRIVER or plan.address is None  # hosts known here; else rank 0 reports them
        self.provenance = collect_provenance(spec, plan.base_dir, plan.data_fingerprint, hosts=1 if here else None)
        previous, trial = plan.previous, plan.trial
        self.tracking = TrackingSession.start(
            spec,
            run.uri,
            spec.name if trial else run.name,
            self.provenance,
            previous=previous.tracking if previous else None,
            parent_run_id=trial.parent_run_id if trial else None,
        )
        existing = ckpt.list_checkpoints(run.fs, run.root, uri_prefix=run.uri)
        # A bring-your-own loop resumes too: Ray hands it the newest checkpoint, which orchestrator.byo committed.
        self.resumed_from = existing[-1].uri if existing else None
        details: dict[str, Any] = {}
        if trial:
            details = {
                "sweep": trial.sweep,
                "config": trial.config,
                "exploited_from": trial.exploited_from,
                "resumed_from": self.resumed_from,
            }
        extended = list(previous.extended) if previous else []
        if plan.extension:
            extended.append({**plan.extension, "at": now()})
        self.record = RunRecord.begin(
            trial.record_name if trial else run.name,
            spec.to_dict(),
            previous,
            job_file=plan.job_file,
            provenance=self.provenance,
            tracking=self.tracking.to_record(),
            fingerprint=fingerprint(plan.settings),
            executor={"kind": str(plan.executor), "rule": RULES[plan.executor]},
            extended=extended,
            **details,
        )
        self.record.save(run)

    def loop_config(self) -> dict[str, Any]:
        """What the executor hands the loop (trainer.loop_config_of), with the lease to check before commits."""
        plan = self.plan
        tracking = self.tracking.worker_config() if self.tracking else None
        return loop_config_of(plan.spec, plan.run.uri, plan.base_dir, tracking, lease=plan.lease)

    def execute(
        self,
        config: dict[str, Any],
        driver: DriverHooks | Callable[[], DriverHooks] | None = None,
        group: GroupHooks | None = None,
    ) -> LoopOutcome:
        """The plan's executor, attempt after attempt as `failure.decide` says (each resumes from the last checkpoint).

        `driver` may be a factory: each attempt then gets hooks of its own (a sweep trial's reporter).
        """
        spec, executor, events = self.plan.spec, self.plan.executor, self.events
        # A worker group's events come through a mailbox actor, one for all its attempts (see events.py); a task's
        # stream and the driver's own hand theirs over before an attempt's end is known.
        with worker_group_channel(events if executor == Executor.GROUP else None) as channel:
            sender, settle = channel
            if executor == Executor.DRIVER:
                attempt = lambda: run_in_driver(spec, config, driver() if callable(driver) else driver, events)  # noqa: E731
            elif executor == Executor.TASK:
                attempt = lambda: run_in_task(spec, config, events)  # noqa: E731
            else:
                attempt = lambda: run_in_group(spec, config, group, sender)  # noqa: E731
            say, log_only = self.say, self.log_only
            # How an attempt ended is said after its last events.
            settled_log = (lambda text: (settle(), log_only(text))) if log_only else None
            return fit_with_decisions(attempt, spec, lambda line: (settle(), say(line)), settled_log)

    def host(self, work: Callable[[], LoopOutcome]) -> Ending:
        """Run `work` (the executor's attempts) and say how it ended; every way out is a state, none escapes."""
        try:
            return Ending(RunStatus.FINISHED, outcome=work())
        except StopRequested:
            return Ending(RunStatus.STOPPED, error="stopped by the sweep's scheduler")
        except SystemExit:
            if self.plan.trial is None:
                raise
            return Ending(RunStatus.STOPPED, error="stopped by the sweep's scheduler")  # Tune's way of ending a trial
        except KeyboardInterrupt as exc:  # Interrupted, or what Ray's waits make of it: the signals know which
            seen = self.signals
            signum = seen.signum if seen and seen.signum else getattr(exc, "signum", signal.SIGINT)
            return self._interrupted(signum, seen.lost_to if seen else getattr(exc, "lost_to", None))
        except LeaseLost as exc:
            return Ending(RunStatus.FAILED, error=str(exc), lost=True)
        except RunFailedForGood as exc:
            lost = isinstance(exc.__cause__, LeaseLost) or str(exc).startswith("lost the lease")
            return Ending(RunStatus.FAILED, error=str(exc), exit_code=job_exit_code(exc), lost=lost)
        except BadInput:
            raise  # input found bad only now (Ray's address, a tracker): the command's one line, exit 2
        except Exception as exc:  # the run failed for good: record it, report it, keep what was committed
            return Ending(RunStatus.FAILED, error=one_line(exc))

    def _interrupted(self, signum: int, lost_to: str | None) -> Ending:
        if lost_to is not None:
            error = f"lost the lease on {self.plan.run.uri} to another run ({lost_to}); it wrote nothing more"
            return Ending(RunStatus.FAILED, error=error, lost=True)
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and JOBS_API_DRIVER in os.environ:
            return Ending(RunStatus.STOPPED, error="stopped through the Jobs API (orchestrator stop)", signal=name)
        return Ending(RunStatus.INTERRUPTED, error=f"interrupted by {name}", signal=name)

    def end(self, ending: Ending, report: str | None = None) -> RunSummary:
        """The run's summary (its checkpoints say how far it got; `report` where its report goes), recorded in
        run.json unless the lease was lost."""
        plan, run = self.plan, self.plan.run
        outcome = ending.outcome or LoopOutcome()
        if plan.spec.entrypoint:
            # A bring-your-own loop's reports were recorded as its steps, metrics and checkpoints (orchestrator.byo).
            from orchestrator.byo import summary_of_reports

            summary = summary_of_reports(run, ending.status)
        else:
            summary = summary_from_checkpoints(run, ending.status)
        summary.error, summary.signal, summary.exit_code = ending.error, ending.signal, ending.exit_code
        summary.resumed_from = self.resumed_from
        summary.wall_s, summary.report = round(time.time() - plan.t0, 3), None if ending.lost else report
        add_placement(self.provenance, outcome.placement)
        self.lost = ending.lost
        if self.record is not None and not ending.lost:
            self.record.end(ending.status, summary)
            self.record.save(run)
        return summary

    def save_record(self) -> None:
        """Write run.json again (a field of the summary changed after `end`, e.g. the report that could not be made)."""
        if self.record is not None and self.record.summary is not None:
            self.record.save(self.plan.run)

    def finish(self, summary: RunSummary, artifacts: list[tuple[str, str | None]]) -> None:
        """Close the trackers with the run's end: its status, summary and files (not when the lease was lost)."""
        if self.tracking is not None and not self.lost:
            self.tracking.finish(self.plan.spec, summary.status, summary, artifacts)


def resume_line(summary: RunSummary) -> str:
    """The one line an interrupted run ends with: what stopped it, and that a rerun resumes (from where)."""
    why = summary.error or "interrupted"
    if summary.checkpoint:
        return f"{why}: rerun the same command to resume from step {summary.steps} ({summary.checkpoint})"
    return f"{why} before its first checkpoint: rerun the same command to start it again"
