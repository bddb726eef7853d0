"""The offline HTML report of a run, a sweep or a cross-validation, and the list of runs under a storage.

One self-contained file: every figure is an SVG embedded as a data URI (written by
orchestrator.report.charts: no JavaScript, no network), so it opens anywhere, from disk or from object
storage. Every value the report did not build itself (names, URIs, settings, errors) is escaped.

What lives where:
  read.py        what a run, sweep or cv left in storage: RunData, SweepData, CvData, their loaders, the record file names
  charts.py      hand-written SVG charts (lines, markers, bars, heatmaps, legends), no dependencies
  scales.py      the charts' colormaps, linear and log scales, ticks and limits
  svg.py         the charts' SVG text: escaping, text widths, coordinates, marker shapes, thinning
  curves.py      ROC and precision-recall points and areas, NumPy only
  html.py        page skeleton, style, palette, status badges, tables, number and time formats, links, escaping
  settings.py    the settings of a job that applied to its run (what the pages list)
  run_page.py    a run's figures and its page (render_run)
  sweep_page.py  a sweep's figures and its page (render_sweep)
  cv_page.py     a cross-validation's figures and its page (render_cv)
  listing.py     the runs and sweeps under a storage (`orchestrator runs`)
  __init__.py    render and write_report: the report of whatever a URI holds
"""

from __future__ import annotations

import logging

from orchestrator import outfile, storage
from orchestrator.errors import BadInput
from orchestrator.report.cv_page import render_cv
from orchestrator.report.html import link_base
from orchestrator.report.listing import list_runs
from orchestrator.report.read import (
    CV_RECORD,
    SWEEP_RECORD,
    CvData,
    RunData,
    SweepData,
    _guarded,
    _open,
    load_cv,
    load_run,
    load_sweep,
)
from orchestrator.report.run_page import render_run
from orchestrator.report.sweep_page import render_sweep
from orchestrator.rundir import METRICS, REPORT, RUN_RECORD, TEST_RECORD, RunDir

log = logging.getLogger(__name__)

__all__ = [
    "CV_RECORD",
    "CvData",
    "METRICS",
    "REPORT",
    "RUN_RECORD",
    "SWEEP_RECORD",
    "TEST_RECORD",
    "RunData",
    "SweepData",
    "list_runs",
    "load_cv",
    "load_run",
    "load_sweep",
    "render",
    "render_cv",
    "render_run",
    "render_sweep",
    "write_report",
    "write_report_safely",
]


def render(uri: str, endpoint_url: str | None = None, inside: bool = True) -> str:
    """The report of whatever `uri` holds, a run, a sweep or a cross-validation; BadInput when it holds none.

    `inside`: the page goes into `uri` itself, so its links to the files there are relative; else they are URIs.
    """
    home = _open(uri, endpoint_url)
    base = link_base(uri, inside)
    if _guarded(uri, lambda: home.exists(CV_RECORD)):  # a cross-validation is a sweep too: its own page first
        return render_cv(load_cv(uri, endpoint_url), base)
    if _guarded(uri, lambda: home.exists(SWEEP_RECORD)):
        return render_sweep(load_sweep(uri, endpoint_url), base)
    if not _guarded(uri, lambda: home.exists(RUN_RECORD)):
        raise BadInput(f"{uri}: holds no run or sweep (no {RUN_RECORD} or {SWEEP_RECORD})")
    return render_run(load_run(uri, endpoint_url), base)


def write_report(uri: str, out: str | None = None, endpoint_url: str | None = None, force: bool = False) -> str:
    """Write the report of a run or sweep to `out` (a local file, checked as `export`'s is: an existing one only with
    `force`) or to `<uri>/report.html`; return where it went."""
    if out:
        target = outfile.check_target(out, force)  # before the page is rendered: a refused target costs nothing
        outfile.write_target(target, render(uri, endpoint_url, inside=False).encode(), force)
        return target
    page = render(uri, endpoint_url).encode()
    home = _open(uri, endpoint_url)
    storage.write_bytes(home.fs, home.path(REPORT), page)
    return home.uri_of(REPORT)


def write_report_safely(run: RunDir) -> str | None:
    """Write `<run>/report.html` at the end of a run, sweep or cv; a report that cannot be made is a warning, not a failure."""
    try:
        return write_report(run.uri, endpoint_url=run.endpoint_url)
    except Exception as exc:
        log.warning(
            "report: could not write %s (%s: %s)",
            run.uri_of(REPORT),
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return None
