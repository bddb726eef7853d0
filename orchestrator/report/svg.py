"""SVG text and marks for the report's charts: escaping, text widths without a font engine, coordinates,
marker shapes, and the thinning of long lines. No dependencies.
"""

from __future__ import annotations

import base64
import html
import math
import re

FONT = "DejaVu Sans,Helvetica,Arial,sans-serif"
GLYPH = 0.64  # a wide glyph's width in ems (digits, capitals): margins and legends are sized without a font engine
TICK_FONT, LABEL_FONT, TITLE_FONT, LEGEND_FONT = 11.0, 12.0, 14.0, 10.5
GRID_COLOR, MINOR_GRID_COLOR, FRAME_COLOR, TEXT_COLOR = "#e3e3e3", "#f2f2f2", "#444", "#222"
# Characters XML 1.0 forbids (a control character or lone surrogate would make the whole SVG unreadable).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# Past this many points a line is thinned to what a pixel column shows (first, lowest, highest, last).
THIN_ABOVE = 1500


def esc(text: object) -> str:
    """`text` as XML/HTML character data or a double-quoted attribute value."""
    return html.escape(_NOT_XML.sub("\ufffd", str(text)), quote=True)


def clip_text(text: str, chars: int) -> str:
    """`text` cut to `chars` characters, with an ellipsis when cut."""
    chars = max(2, int(chars))
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def text_width(text: str, size: float) -> float:
    """About how wide `text` is at font size `size`: digits and capitals are wider than lower case, spaces narrower."""
    ems = sum(GLYPH if c.isdigit() or c.isupper() else 0.32 if c in " .,:;()[]|'!ilj" else 0.52 for c in text)
    return ems * size


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8", "replace")).decode()


def _num(v: float) -> str:
    """A pixel coordinate, to a tenth of a pixel (whole ones without the decimal: a smaller file)."""
    return str(round(v)) if abs(v - round(v)) < 0.05 else f"{v:.1f}"


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _marker(kind: str, x: float, y: float, r: float, color: str, opacity: float = 1.0) -> str:
    alpha = f' fill-opacity="{opacity:g}"' if opacity < 1 else ""
    if kind == "ring":
        return f'<circle cx="{_num(x)}" cy="{_num(y)}" r="{_num(r)}" fill="none" stroke="{color}" stroke-width="2"/>'
    if kind == "star":
        pts = []
        for i in range(10):
            rad, angle = (r if i % 2 == 0 else r * 0.45), math.pi * (i / 5 - 0.5)
            pts.append(f"{_num(x + rad * math.cos(angle))},{_num(y + rad * math.sin(angle))}")
        return f'<polygon points="{" ".join(pts)}" fill="{color}"/>'
    if kind == "x":
        d = r * 0.75
        return (
            f'<path d="M{_num(x - d)} {_num(y - d)}L{_num(x + d)} {_num(y + d)}M{_num(x - d)} {_num(y + d)}L{_num(x + d)} {_num(y - d)}" '
            f'stroke="{color}" stroke-width="{_num(r * 0.55)}" stroke-linecap="round"/>'
        )
    return f'<circle cx="{_num(x)}" cy="{_num(y)}" r="{_num(r)}" fill="{color}"{alpha}/>'


def thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A long line with monotone x reduced to what each half-pixel column shows: its first, lowest, highest and last point."""
    if len(points) <= THIN_ABOVE:
        return points
    dx = [b[0] - a[0] for a, b in zip(points, points[1:], strict=False)]
    if not (all(d >= 0 for d in dx) or all(d <= 0 for d in dx)):
        return points
    out: list[tuple[float, float]] = []
    column: list[tuple[float, float]] = []

    def flush() -> None:
        keep = [column[0], min(column, key=lambda q: q[1]), max(column, key=lambda q: q[1]), column[-1]]
        out.extend(q for i, q in enumerate(keep) if q not in keep[:i])

    for p in points:
        if column and round(p[0] * 2) != round(column[0][0] * 2):
            flush()
            column = []
        column.append(p)
    flush()
    return out
