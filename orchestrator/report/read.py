"""Reading what a run or a sweep left in storage: its records, its metrics history, its trials.

Every failure to read storage becomes one BadInput line naming the URI (`_open`, `_guarded`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from orchestrator import storage
from orchestrator.errors import BadInput
from orchestrator.rundir import RUN_RECORD, RunDir

SWEEP_RECORD = "sweep.json"
CV_RECORD = "cv.json"  # orchestrator.cv's record, beside the sweep record of the folds


@dataclass
class RunData:
    """Everything a run left: run.json, the metrics history, the test record."""

    uri: str
    record: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] | None = None
    files: set[str] = field(default_factory=set)  # the names of the files directly in the run's directory

    @property
    def summary(self) -> dict[str, Any]:
        return self.record.get("summary") or {}

    @property
    def job(self) -> dict[str, Any]:
        return self.record.get("job") or {}

    def entries(self, split: str) -> list[dict[str, Any]]:
        return [e for e in self.history if e.get("split") == split]


def _open(uri: str, endpoint_url: str | None) -> RunDir:
    try:
        return RunDir.open(uri, endpoint_url)
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(storage.describe_error(uri, exc)) from None


def _guarded(uri: str, fn):
    try:
        return fn()
    except BadInput:
        raise
    except Exception as exc:  # storage that cannot be read: one line naming the URI
        raise BadInput(storage.describe_error(uri, exc)) from None


def load_run(uri: str, endpoint_url: str | None = None) -> RunData:
    """A run's record, history and test record; BadInput when the URI holds no run.

    The record is read as it is, not as a RunRecord: the report shows whatever a run left, old or odd.
    """
    run = _open(uri, endpoint_url)
    record = _guarded(uri, lambda: run.read_json(RUN_RECORD))
    if not isinstance(record, dict):
        raise BadInput(f"{uri}: holds no run (no {RUN_RECORD})")
    history = _guarded(uri, run.read_metrics)
    test = _guarded(uri, run.read_test)
    files = set(_guarded(uri, lambda: _children(run, "file")))
    return RunData(uri=uri.rstrip("/"), record=record, history=history, test=test, files=files)


@dataclass
class SweepData:
    """A sweep's record and its trials (each a run in `<sweep>/<trial id>`)."""

    uri: str
    record: dict[str, Any]
    trials: list[dict[str, Any]]  # trial_id, status, config, metric, best_metric, steps, run (RunData or None)
    files: set[str] = field(default_factory=set)  # the names of the files directly in the sweep's directory

    @property
    def spec(self) -> dict[str, Any]:
        return self.record.get("spec") or {}

    @property
    def metric(self) -> str:
        return (self.record.get("result") or {}).get("metric") or self.spec.get("metric") or "val_loss"

    @property
    def mode(self) -> str:
        mode = (self.record.get("result") or {}).get("mode") or self.spec.get("mode")
        if mode:
            return mode
        from orchestrator.metrics import default_mode

        try:
            return default_mode(self.metric)
        except ValueError:
            return "min"


def load_sweep(uri: str, endpoint_url: str | None = None) -> SweepData:
    """A sweep's sweep.json and every trial run under it (finished or not); BadInput when the URI holds no sweep."""
    home = _open(uri, endpoint_url)
    record = _guarded(uri, lambda: home.read_json(SWEEP_RECORD))
    if not isinstance(record, dict):
        raise BadInput(f"{uri}: holds no sweep (no {SWEEP_RECORD})")
    rows = {row["trial_id"]: dict(row) for row in (record.get("result") or {}).get("trials") or []}
    # A sweep still running (or interrupted) has no result yet: its trial directories say what ran.
    for name in _guarded(uri, lambda: _child_dirs(home)):
        if name not in rows and _guarded(uri, lambda name=name: home.exists(name, RUN_RECORD)):
            rows[name] = {"trial_id": name}
    trials = []
    for trial_id, row in sorted(rows.items()):
        run_uri = row.get("run_uri") or f"{uri.rstrip('/')}/{trial_id}"
        try:
            run = load_run(run_uri, endpoint_url)
        except BadInput:
            run = None
        if run is not None:
            row.setdefault("config", run.record.get("config") or {})
            row.setdefault("status", run.record.get("status"))
            row.setdefault("steps", run.summary.get("steps"))
        row.setdefault("config", {})
        row["run"] = run
        trials.append(row)
    files = set(_guarded(uri, lambda: _children(home, "file")))
    data = SweepData(uri=uri.rstrip("/"), record=record, trials=trials, files=files)
    for row in trials:
        values = _metric_values(row["run"], data.metric) if row["run"] else []
        if row.get("metric") is None and values:
            row["metric"] = values[-1][1]
        if row.get("best_metric") is None and values:
            row["best_metric"] = (max if data.mode == "max" else min)(v for _, v in values)
    return data


@dataclass
class CvData:
    """A cross-validation's cv.json, its sweep record, and each fold's run (RunData, or None when it has none)."""

    uri: str
    record: dict[str, Any]
    sweep_record: dict[str, Any] | None
    folds: list[dict[str, Any]]  # cv.json's folds, each with "run"
    files: set[str] = field(default_factory=set)  # the names of the files directly in the cross-validation's directory

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.get("metrics") or {}

    @property
    def test(self) -> dict[str, Any]:
        return self.record.get("test") or {}


def load_cv(uri: str, endpoint_url: str | None = None) -> CvData:
    """A cross-validation's records and its fold runs; BadInput when the URI holds none."""
    home = _open(uri, endpoint_url)
    record = _guarded(uri, lambda: home.read_json(CV_RECORD))
    if not isinstance(record, dict):
        raise BadInput(f"{uri}: holds no cross-validation (no {CV_RECORD})")
    folds = []
    for fold in record.get("folds") or []:
        fold = dict(fold)
        try:
            fold["run"] = load_run(fold.get("run_uri") or f"{uri.rstrip('/')}/fold-{fold['fold']}", endpoint_url)
        except BadInput:
            fold["run"] = None
        folds.append(fold)
    sweep_record = _guarded(uri, lambda: home.read_json(SWEEP_RECORD))
    files = set(_guarded(uri, lambda: _children(home, "file")))
    return CvData(uri=uri.rstrip("/"), record=record, sweep_record=sweep_record, folds=folds, files=files)


def _children(home: RunDir, kind: str) -> list[str]:
    """The names of the directories (`kind` directory) or files (file) directly in `home`."""
    try:
        entries = home.fs.ls(home.root, detail=True)
    except FileNotFoundError:
        return []
    return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == kind]


def _child_dirs(home: RunDir) -> list[str]:
    return _children(home, "directory")


def _metric_values(run: RunData, metric: str) -> list[tuple[int, float]]:
    return [(e["step"], float(e[metric])) for e in run.history if _finite(e.get(metric))]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
