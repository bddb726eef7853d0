"""The runs, sweeps and cross-validations directly under a storage (`orchestrator runs`): one row each, read from their records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from orchestrator import storage
from orchestrator.errors import BadInput
from orchestrator.lease import RunLease
from orchestrator.report.read import CV_RECORD, RUN_RECORD, SWEEP_RECORD, _finite, _guarded, _open
from orchestrator.rundir import RunDir

RESUMES = "rerun resumes"  # what an interrupted run's row says: the same command again continues it


def list_runs(storage_uri: str, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """The runs and sweeps directly under a storage, newest first: status, steps, best metric, wall time.

    A record that cannot be read (not JSON, not a record, not a file) is a row saying so: one bad run
    does not hide the others.
    """
    home = _open(storage_uri, endpoint_url)
    entries = _guarded(storage_uri, lambda: _listing(home))
    if entries is None:
        raise BadInput(f"{storage_uri}: no such storage")
    rows = []
    for name in sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"):
        uri = f"{storage_uri.rstrip('/')}/{name}"
        row = _row(home, name, uri)
        if row is not None:
            rows.append({"name": name, "uri": uri, **row})
    return sorted(rows, key=lambda r: str(r.get("started") or ""), reverse=True)


def _listing(home: RunDir) -> list[dict[str, Any]] | None:
    # A listing, not an existence check: s3fs's check of a bucket answers False for an endpoint it cannot reach.
    try:
        return storage.call(home.fs, "ls", home.root, detail=True)
    except FileNotFoundError:
        return None


class Unreadable(str):
    """Why a record could not be read."""


def _record(home: RunDir, path: str) -> Any:
    """A record's JSON (None when there is none), or `Unreadable` saying why it cannot be read."""
    try:
        return home.read_json(path)
    except storage.StorageError as exc:
        if exc.transient:
            raise  # the storage itself is failing: the whole listing says so, once
        return Unreadable(f"{path.rsplit('/', 1)[-1]}: {exc.reason}")
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return Unreadable(f"{path.rsplit('/', 1)[-1]}: not JSON ({type(exc).__name__})")


def _row(home: RunDir, name: str, uri: str) -> dict[str, Any] | None:
    """The row of one directory under the storage: a run, a cross-validation, a sweep, one that cannot be read, or None."""
    run = _guarded(uri, lambda: _record(home, f"{name}/{RUN_RECORD}"))
    if isinstance(run, dict):
        summary = run.get("summary") or {}
        best = summary.get("best") or {}
        return {
            "kind": "run",
            **_state(home, name, uri, run.get("status")),
            "started": run.get("started"),
            "ended": run.get("ended"),
            "steps": summary.get("steps"),
            "best_metric": best.get("metric"),
            "best_value": best.get("value"),
            "wall_s": _wall(run, summary.get("wall_s")),
        }
    if run is not None:
        return _unreadable("run", run if isinstance(run, Unreadable) else f"{RUN_RECORD}: not a run record")
    cv = _guarded(uri, lambda: _record(home, f"{name}/{CV_RECORD}"))
    sweep = _guarded(uri, lambda: _record(home, f"{name}/{SWEEP_RECORD}"))
    bad = next((r for r in (cv, sweep) if r is not None and not isinstance(r, dict)), None)
    if bad is not None:
        return _unreadable("cv" if cv is not None else "sweep", bad if isinstance(bad, Unreadable) else "not a record")
    if isinstance(cv, dict) and isinstance(sweep, dict):
        # A cross-validation: its "best" column is the mean of its metric over the folds.
        metric = cv.get("metric")
        return {
            "kind": "cv",
            **_state(home, name, uri, cv.get("status")),
            "started": sweep.get("started"),
            "ended": sweep.get("ended"),
            "steps": cv.get("total_steps"),
            "best_metric": f"mean {metric}",
            "best_value": ((cv.get("metrics") or {}).get(metric) or {}).get("mean"),
            "wall_s": _wall(sweep, cv.get("wall_s")),
        }
    if isinstance(sweep, dict):
        result = sweep.get("result") or {}
        best = result.get("best") or {}
        return {
            "kind": "sweep",
            **_state(home, name, uri, sweep.get("status")),
            "started": sweep.get("started"),
            "ended": sweep.get("ended"),
            "steps": result.get("total_steps"),
            "best_metric": result.get("metric") or (sweep.get("spec") or {}).get("metric"),
            # The best trial's best value, as the sweep's result line and report rank it; "metric" is its last value
            # (the only one a sweep.json from before best_metric has).
            "best_value": best.get("best_metric") if _finite(best.get("best_metric")) else best.get("metric"),
            "wall_s": _wall(sweep, result.get("wall_s")),
        }
    return None


def _state(home: RunDir, name: str, uri: str, status: Any) -> dict[str, Any]:
    """The row's status, with a hint: an interrupted run resumes; a `running` one whose driver is gone did not end."""
    if status == "interrupted":
        return {"status": status, "hint": RESUMES}
    if status == "running":
        gone = RunLease(home.fs, storage.join(home.root, name), uri).gone()
        if gone:
            # Killed beyond recording (SIGKILL, a lost machine): its record cannot say so, its lease can.
            return {"status": "died", "hint": f"{gone}; {RESUMES}"}
    return {"status": status}


def _unreadable(kind: str, reason: str) -> dict[str, Any]:
    return {"kind": kind, "status": f"unreadable ({reason})", "started": None, "ended": None, "steps": None}


def _wall(record: dict[str, Any], wall_s: float | None) -> float | None:
    if _finite(wall_s):
        return round(float(wall_s), 1)
    try:
        start = datetime.fromisoformat(record["started"])
        end = datetime.fromisoformat(record["ended"]) if record.get("ended") else None
    except (KeyError, TypeError, ValueError):
        return None
    return round((end - start).total_seconds(), 1) if end else None
