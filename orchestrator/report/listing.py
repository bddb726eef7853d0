"""The runs, sweeps and cross-validations directly under a storage (`orchestrator runs`): one row each, read from their records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from orchestrator import storage
from orchestrator.errors import BadInput
from orchestrator.report.read import CV_RECORD, RUN_RECORD, SWEEP_RECORD, _child_dirs, _finite, _guarded, _open

RESUMES = "rerun resumes"  # what an interrupted run's row says: the same command again continues it


def list_runs(storage_uri: str, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """The runs and sweeps directly under a storage, newest first: status, steps, best metric, wall time."""
    home = _open(storage_uri, endpoint_url)
    if not _guarded(storage_uri, lambda: storage.exists(home.fs, home.root)):
        raise BadInput(f"{storage_uri}: no such storage")
    rows = []
    for name in _guarded(storage_uri, lambda: _child_dirs(home)):
        uri = f"{storage_uri.rstrip('/')}/{name}"
        run = _guarded(uri, lambda name=name: home.read_json(f"{name}/{RUN_RECORD}"))
        if isinstance(run, dict):
            summary = run.get("summary") or {}
            best = summary.get("best") or {}
            rows.append(
                {
                    "name": name,
                    "kind": "run",
                    "uri": uri,
                    "status": run.get("status"),
                    "started": run.get("started"),
                    "ended": run.get("ended"),
                    "steps": summary.get("steps"),
                    "best_metric": best.get("metric"),
                    "best_value": best.get("value"),
                    "wall_s": _wall(run, summary.get("wall_s")),
                    **({"hint": RESUMES} if run.get("status") == "interrupted" else {}),
                }
            )
            continue
        cv = _guarded(uri, lambda name=name: home.read_json(f"{name}/{CV_RECORD}"))
        sweep = _guarded(uri, lambda name=name: home.read_json(f"{name}/{SWEEP_RECORD}"))
        if isinstance(cv, dict) and isinstance(sweep, dict):
            # A cross-validation: its "best" column is the mean of its metric over the folds.
            metric = cv.get("metric")
            rows.append(
                {
                    "name": name,
                    "kind": "cv",
                    "uri": uri,
                    "status": cv.get("status"),
                    "started": sweep.get("started"),
                    "ended": sweep.get("ended"),
                    "steps": cv.get("total_steps"),
                    "best_metric": f"mean {metric}",
                    "best_value": ((cv.get("metrics") or {}).get(metric) or {}).get("mean"),
                    "wall_s": _wall(sweep, cv.get("wall_s")),
                }
            )
            continue
        if isinstance(sweep, dict):
            result = sweep.get("result") or {}
            best = result.get("best") or {}
            rows.append(
                {
                    "name": name,
                    "kind": "sweep",
                    "uri": uri,
                    "status": sweep.get("status"),
                    "started": sweep.get("started"),
                    "ended": sweep.get("ended"),
                    "steps": result.get("total_steps"),
                    "best_metric": result.get("metric") or (sweep.get("spec") or {}).get("metric"),
                    "best_value": best.get("metric"),
                    "wall_s": _wall(sweep, result.get("wall_s")),
                }
            )
    return sorted(rows, key=lambda r: str(r.get("started") or ""), reverse=True)


def _wall(record: dict[str, Any], wall_s: float | None) -> float | None:
    if _finite(wall_s):
        return round(float(wall_s), 1)
    try:
        start = datetime.fromisoformat(record["started"])
        end = datetime.fromisoformat(record["ended"]) if record.get("ended") else None
    except (KeyError, TypeError, ValueError):
        return None
    return round((end - start).total_seconds(), 1) if end else None
