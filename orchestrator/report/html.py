"""The report's HTML: page skeleton, style, status badges, tables, fact cards and embedded figures.

Every value shown is escaped with `esc` (from charts: one escaping for the SVG and the page around it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from orchestrator.report import charts
from orchestrator.report.charts import esc

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
BEST_COLOR, STOP_COLOR = "#2ca02c", "#d62728"


def _embed(svg: str, caption: str) -> str:
    cap = esc(caption)
    return f'<figure class="plot"><img alt="{cap}" src="{charts.data_uri(svg)}"><figcaption>{cap}</figcaption></figure>'


STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:18px 28px}header h1{margin:0 0 6px;font-size:22px}
header .sub{opacity:.85;font-size:14px}main{padding:8px 28px 40px}
h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
.facts{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.fact{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px 12px;min-width:110px}
.fact b{display:block;font-size:18px}.fact span{font-size:12px;color:#666}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:14px}
figure.plot{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:0;padding:10px}
figure.plot img{width:100%;height:auto;display:block}figcaption{font-size:12px;color:#555;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:8px 0}
td,th{border:1px solid #e0e0e0;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:12px;word-break:break-all}
.status{font-weight:bold}.status-ok{color:#2e7d32}.status-bad{color:#c62828}.status-warn{color:#ef6c00}.status-busy{color:#1565c0}.status-idle{color:#666}
p.files{font-size:13px}.tables{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.tables table{margin:0}details{margin:8px 0}summary{cursor:pointer;font-weight:bold}p.note{color:#666;font-size:13px}
"""


# The CSS class of each status a run or trial records; any other status shows in the neutral colour.
STATUS_CLASS = {
    "finished": "ok",
    "done": "ok",
    "failed": "bad",
    "error": "bad",
    "stopped": "warn",
    "running": "busy",
    "pending": "idle",
    "paused": "idle",
}


@dataclass(frozen=True)
class Status:
    """A status shown as a coloured word: the class comes from STATUS_CLASS, the word is escaped like any value."""

    value: Any

    def html(self) -> str:
        word = str(self.value or "unknown")
        return f'<span class="status status-{STATUS_CLASS.get(word, "idle")}">{esc(word)}</span>'


def num(value: float, digits: int = 4) -> str:
    """A measured number as every page writes one: `digits` significant digits, trailing zeros kept (0.02120 beside
    0.05049), an exponent only below 1e-4 or from 1e6 on; integers as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    value = float(f"{value:.{digits - 1}e}")  # rounded first: 9.99996 is 10.00, not 9.99996 at four places
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -4 or magnitude >= 6:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{max(0, digits - 1 - magnitude)}f}"


def when(stamp: Any) -> str:
    """A record's ISO timestamp as people read it: local date and time to the second, with the zone."""
    try:
        moment = datetime.fromisoformat(str(stamp))
    except ValueError:
        return str(stamp)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def duration(seconds: Any) -> str | None:
    """A duration as every page writes one, rounded (not cut) to the second: 6 s, 1 min 05 s, 1 h 02 min; None for no
    number."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return None
    whole = int(seconds + 0.5)  # half up: round() would make 6.5 s 6 s
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    minutes = int(seconds / 60 + 0.5)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def took(record: dict[str, Any], wall_s: Any) -> str | None:
    """How long a run or sweep took, as `duration` writes it: its wall time, else from its `started` to its `ended`."""
    # The wall time, when recorded, is what the command printed and the facts show. `started` is stamped once the
    # input is checked, about a second after the command's clock started: 8.2 s of wall were 7.2 s between the stamps.
    if duration(wall_s) is not None:
        return duration(wall_s)
    try:
        ended, started = (datetime.fromisoformat(str(record[key])) for key in ("ended", "started"))
    except (KeyError, TypeError, ValueError):
        return None
    return duration((ended - started).total_seconds())


@dataclass(frozen=True)
class Setting:
    """A value someone wrote (a job's or a search's setting): shown as written, 0.003 and not 0.003000."""

    value: Any


@dataclass(frozen=True)
class Link:
    """A link to a file beside the page or under it (`parts` of a relative path), or, for a page written elsewhere,
    to the file's URI under `base`; the text is escaped like any value."""

    parts: tuple[str, ...]
    text: str
    base: str | None = None  # None: relative to the page

    def html(self) -> str:
        # Each part percent-encoded whole: a trial called `javascript:x` or `"><img ...>` stays a path.
        path = "/".join(quote(str(part), safe="") for part in self.parts)
        href = f"./{path}" if self.base is None else f"{self.base.rstrip('/')}/{path}"
        return f'<a href="{esc(href)}">{esc(self.text)}</a>'


def link_base(uri: str, relative: bool) -> str | None:
    """Where a page's links to a run's files start: None (relative) for a page inside the run, else the run's URI
    (a local run's as a file:// URI that a browser opens)."""
    if relative:
        return None
    if "://" in uri and not uri.startswith("file://"):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{quote(rest, safe='/')}"
    from pathlib import Path

    return Path(uri.removeprefix("file://")).resolve().as_uri()


def _fmt(value: Any) -> str:
    """Any value from a record as HTML text: escaped, whatever its type; measured numbers as `num` writes them."""
    if isinstance(value, (Status, Link)):
        return value.html()
    if isinstance(value, Setting):
        value = value.value
        if isinstance(value, float) and math.isfinite(value):
            return f"{value:g}"
    if isinstance(value, bool) or value is None:
        return esc(json.dumps(value))
    if isinstance(value, (int, float)):
        return num(value)
    if isinstance(value, (dict, list)):
        return f"<code>{esc(json.dumps(value, default=str))}</code>"
    return esc(value)


def _is_number(cell: Any) -> bool:
    value = cell.value if isinstance(cell, Setting) else cell
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _table(rows: list[list[Any]], head: list[str]) -> str:
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for cell in row:
            text = _fmt(cell)
            cls = ' class="num"' if _is_number(cell) else ""
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv_table(data: dict[str, Any]) -> str:
    """Settings as written: one table per top-level section (dotted keys inside), laid out side by side."""
    from orchestrator.spec import flatten

    plain = [[k, Setting(v)] for k, v in data.items() if not isinstance(v, dict) or not v]
    tables = [_table(plain, ["field", "value"])] if plain else []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            tables.append(_table([[k, Setting(v)] for k, v in flatten(value).items()], [key, "value"]))
    return '<div class="tables">' + "".join(tables) + "</div>"


def _files(links: list[Link]) -> str:
    """The line of links to a run's own files (run.log, metrics.jsonl, ...)."""
    if not links:
        return ""
    return '<p class="files">files: ' + " &middot; ".join(link.html() for link in links) + "</p>"


def _facts(items: list[tuple[str, Any]]) -> str:
    cells = [f'<div class="fact"><b>{_fmt(v)}</b><span>{esc(k)}</span></div>' for k, v in items if v is not None]
    return '<div class="facts">' + "".join(cells) + "</div>"


def _page(title: str, subtitle: str, body: str) -> str:
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><header><h1>{esc(title)}</h1>"
        f'<div class="sub">{subtitle}</div></header><main>{body}<p class="note">Written by orchestrator report on {generated}.</p></main></body></html>\n'
    )


def _status(status: Any) -> str:
    return Status(status).html()
