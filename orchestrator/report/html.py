"""The report's HTML: page skeleton, style, status badges, tables, fact cards and embedded figures.

Every value shown is escaped with `esc` (from charts: one escaping for the SVG and the page around it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
.tables{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.tables table{margin:0}details{margin:8px 0}summary{cursor:pointer;font-weight:bold}p.note{color:#666;font-size:13px}
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


def _fmt(value: Any) -> str:
    """Any value from a record as HTML text: escaped, whatever its type."""
    if isinstance(value, Status):
        return value.html()
    if isinstance(value, bool) or value is None:
        return esc(json.dumps(value))
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return f"<code>{esc(json.dumps(value, default=str))}</code>"
    return esc(value)


def _table(rows: list[list[Any]], head: list[str]) -> str:
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for cell in row:
            text = _fmt(cell)
            cls = ' class="num"' if isinstance(cell, (int, float)) and not isinstance(cell, bool) else ""
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv_table(data: dict[str, Any]) -> str:
    """One table per top-level section (dotted keys inside), laid out side by side."""
    from orchestrator.spec import flatten

    plain = [[k, v] for k, v in data.items() if not isinstance(v, dict) or not v]
    tables = [_table(plain, ["field", "value"])] if plain else []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            tables.append(_table([[k, v] for k, v in flatten(value).items()], [key, "value"]))
    return '<div class="tables">' + "".join(tables) + "</div>"


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
