"""Small SVG charts for the offline report: lines, markers, bars, heatmaps, colour bars and legends, no dependencies.

The report drew its figures with matplotlib, whose import and SVG writer took seconds at the end of every run and
sweep trial; these are a few kilobytes of markup written in milliseconds. Every text is XML-escaped (`esc`): run
names, trial ids, metric names and parameter values end up in titles, ticks and legends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.report.scales import (
    BLUES,
    VIRIDIS,
    Colormap,
    Scale,
    _limits,
    linear_ticks,
    log_ticks,
    minor_log_ticks,
)
from orchestrator.report.svg import (
    FONT,
    FRAME_COLOR,
    GLYPH,
    GRID_COLOR,
    LABEL_FONT,
    LEGEND_FONT,
    MINOR_GRID_COLOR,
    TEXT_COLOR,
    THIN_ABOVE,
    TICK_FONT,
    TITLE_FONT,
    _marker,
    _num,
    clip_text,
    data_uri,
    esc,
    text_width,
    thin,
)

# The pages draw with charts alone: what they use of svg and scales is theirs from here too.
__all__ = [
    "BLUES",
    "VIRIDIS",
    "Axes",
    "Colormap",
    "Mark",
    "Scale",
    "clip_text",
    "data_uri",
    "esc",
    "figure",
    "linear_ticks",
    "log_ticks",
    "minor_log_ticks",
    "text_width",
    "thin",
]

LEGEND_PLACES = (
    "upper right",
    "upper left",
    "lower left",
    "lower right",
    "center right",
    "center left",
    "lower center",
    "upper center",
)


# ----------------------------------------------------------------------------------------------
# Marks: what a panel draws, in data coordinates


@dataclass
class Mark:
    """One series or annotation: a line, markers, a vertical or horizontal rule, bars, heatmap cells or texts."""

    kind: str  # line | points | vline | hline | bars | cells | text
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    color: str = "#1f77b4"
    width: float = 1.6
    dash: str = ""
    marker: str = ""  # "" | o | ring | star | x
    size: float = 3.0  # a marker's radius; a heatmap's number of rows
    opacity: float = 1.0
    label: str | None = None
    texts: list[str] = field(default_factory=list)
    colors: list[str] = field(default_factory=list)  # per cell
    text_colors: list[str] = field(default_factory=list)  # per cell
    anchor: str = "start"
    font: float = TICK_FONT


# ----------------------------------------------------------------------------------------------
# A panel: axes, grid, marks, legend, colour bar


@dataclass
class Axes:
    """One plot panel; `render` lays it out in a box of the figure."""

    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    xlog: bool = False
    ylog: bool = False
    xlim: tuple[float, float] | None = None
    ylim: tuple[float, float] | None = None
    grid: bool = True
    square: bool = False
    xticks: list[tuple[float, str]] | None = None  # fixed ticks instead of round numbers; [] for none
    yticks: list[tuple[float, str]] | None = None
    legend_loc: str | None = None  # None: no legend; "best": the corner that hides the fewest points
    legend_cols: int = 1
    colorbar: tuple[Colormap, float, float, str] | None = None  # colours, low, high, label
    marks: list[Mark] = field(default_factory=list)

    def line(
        self,
        xs: Sequence[float],
        ys: Sequence[float],
        color: str,
        label: str | None = None,
        width: float = 1.6,
        dash: str = "",
        marker: str = "",
        size: float = 3.0,
    ) -> None:
        self.marks.append(Mark("line", list(xs), list(ys), color, width, dash, marker, size, label=label))

    def points(
        self,
        xs: Sequence[float],
        ys: Sequence[float],
        color: str,
        label: str | None = None,
        marker: str = "o",
        size: float = 3.0,
        opacity: float = 1.0,
    ) -> None:
        self.marks.append(
            Mark("points", list(xs), list(ys), color, marker=marker, size=size, opacity=opacity, label=label)
        )

    def vline(self, x: float, color: str, label: str | None = None, dash: str = "", width: float = 1.2) -> None:
        self.marks.append(Mark("vline", [x], [], color, width, dash, label=label))

    def hline(self, y: float, color: str, label: str | None = None, dash: str = "", width: float = 1.0) -> None:
        self.marks.append(Mark("hline", [], [y], color, width, dash, label=label))

    def bars(self, edges: Sequence[float], heights: Sequence[float], color: str, opacity: float = 0.85) -> None:
        self.marks.append(Mark("bars", list(edges), list(heights), color, opacity=opacity))

    def cells(self, values: list[list[float]], cmap: Colormap, texts: list[list[str]], dark_above: float = 0.5) -> None:
        """A heatmap of `values` in [0, 1]: cell (i, j) centred on x=j, y=i, its text ("" for none) on top, white on dark cells.

        One background rectangle in the colour of 0, then only the other cells: a large, mostly empty matrix stays small.
        """
        shown = [
            (j, i, v, texts[i][j]) for i, row in enumerate(values) for j, v in enumerate(row) if v > 0 or texts[i][j]
        ]
        self.marks.append(
            Mark(
                "cells",
                [c[0] for c in shown],
                [c[1] for c in shown],
                color=cmap(0.0),
                size=len(values),
                colors=[cmap(c[2]) for c in shown],
                texts=[c[3] for c in shown],
                text_colors=["#fff" if c[2] > dark_above else TEXT_COLOR for c in shown],
            )
        )

    def text(
        self, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], anchor: str = "start", font: float = 9.5
    ) -> None:
        self.marks.append(Mark("text", list(xs), list(ys), TEXT_COLOR, texts=list(texts), anchor=anchor, font=font))

    # -- layout

    def _range(self, axis: str) -> tuple[float, float]:
        fixed, log = (self.xlim, self.xlog) if axis == "x" else (self.ylim, self.ylog)
        if fixed:
            return fixed
        values: list[float] = []
        for m in self.marks:
            if (
                m.kind in ("line", "points", "text", "cells")
                or (m.kind == "vline" and axis == "x")
                or (m.kind == "hline" and axis == "y")
            ):
                values += m.xs if axis == "x" else m.ys
            elif m.kind == "bars":
                values += m.xs if axis == "x" else [0.0, *(h * 1.05 for h in m.ys)]
        if any(m.kind == "bars" for m in self.marks):
            return _limits(values, log, 0.0 if axis == "y" else 0.03)
        return _limits(values, log)

    def _ticks(self, scale: Scale, fixed: list[tuple[float, str]] | None) -> list[tuple[float, str]]:
        if fixed is not None:
            return fixed
        lo, hi = sorted((scale.lo, scale.hi))
        ticks = log_ticks(lo, hi) + minor_log_ticks(lo, hi) if scale.log else linear_ticks(lo, hi)
        return [(v, label) for v, label in ticks if lo - 1e-9 * abs(hi - lo) <= v <= hi + 1e-9 * abs(hi - lo)]

    def render(self, x0: float, y0: float, w: float, h: float, uid: str) -> list[str]:
        """SVG elements of this panel inside the box (x0, y0, w, h); `uid` keeps its clip and gradient ids apart."""
        sx, sy = Scale(*self._range("x"), log=self.xlog), Scale(*self._range("y"), log=self.ylog)
        xt, yt = self._ticks(sx, self.xticks), self._ticks(sy, self.yticks)
        ytick_w = max((text_width(t, TICK_FONT) for _, t in yt), default=0)
        left = x0 + 8 + (LABEL_FONT + 6 if self.ylabel else 0) + ytick_w + (6 if yt else 0)
        right = x0 + w - 12 - (self._colorbar_width() if self.colorbar else 0)
        top = y0 + (TITLE_FONT + 14 if self.title else 10)
        stagger = self._staggered(xt, right - left)
        bottom = (
            y0
            + h
            - 8
            - (LABEL_FONT + 6 if self.xlabel else 0)
            - (TICK_FONT + 8 if xt else 2)
            - (TICK_FONT + 3 if stagger else 0)
        )
        if self.square:  # centred in the room left beside the colour bar
            side = min(right - left, bottom - top)
            left, right = left + (right - left - side) / 2, left + (right - left + side) / 2
            bottom = top + side
        sx.px0, sx.px1, sy.px0, sy.px1 = left, right, bottom, top
        box = (left, top, right, bottom)
        out = [
            f'<rect x="{_num(left)}" y="{_num(top)}" width="{_num(right - left)}" height="{_num(bottom - top)}" fill="#fff"/>'
        ]
        out += self._grid(sx, sy, xt, yt, box)
        out.append(
            f'<clipPath id="{uid}"><rect x="{_num(left)}" y="{_num(top)}" width="{_num(right - left)}" height="{_num(bottom - top)}"/></clipPath>'
        )
        out.append(f'<g clip-path="url(#{uid})">')
        for m in self.marks:
            out += self._draw(m, sx, sy, box)
        out.append("</g>")
        out.append(
            f'<rect x="{_num(left)}" y="{_num(top)}" width="{_num(right - left)}" height="{_num(bottom - top)}" fill="none" stroke="{FRAME_COLOR}" stroke-width="0.8"/>'
        )
        out += self._axis_text(sx, sy, xt, yt, box, stagger, x0, y0, w, h)
        if self.colorbar:
            out += self._colorbar_svg(box, uid)
        if self.legend_loc:
            out += self._legend(sx, sy, box)
        return out

    def _staggered(self, ticks: list[tuple[float, str]], width: float) -> bool:
        """Whether fixed tick labels are too wide side by side, and go on two rows (alternately)."""
        if self.xticks is None or len(ticks) < 2:
            return False
        return sum(text_width(t, TICK_FONT) + 8 for _, t in ticks) > width * 0.9

    def _grid(self, sx: Scale, sy: Scale, xt, yt, box) -> list[str]:
        if not self.grid:
            return []
        left, top, right, bottom = box
        out = []
        for minor, color in ((False, GRID_COLOR), (True, MINOR_GRID_COLOR)):  # minor ticks: those without a label
            lines = [f"M{_num(sx(v))} {_num(top)}V{_num(bottom)}" for v, t in xt if sx.valid(v) and (t == "") == minor]
            lines += [f"M{_num(left)} {_num(sy(v))}H{_num(right)}" for v, t in yt if sy.valid(v) and (t == "") == minor]
            if lines:
                out.append(f'<path d="{"".join(lines)}" stroke="{color}" stroke-width="0.8" fill="none"/>')
        return out

    def _axis_text(
        self, sx: Scale, sy: Scale, xt, yt, box, stagger: bool, x0: float, y0: float, w: float, h: float
    ) -> list[str]:
        left, top, right, bottom = box
        out, ticks = [], []
        spacing = (right - left) / max(1, len(xt) - 1) * (2 if stagger else 1) if self.xticks is not None else w
        for i, (v, label) in enumerate(xt):
            if not sx.valid(v):
                continue
            x, y = sx(v), bottom + 5 + TICK_FONT + (TICK_FONT + 3 if stagger and i % 2 else 0)
            ticks.append(f"M{_num(x)} {_num(bottom)}v{4 if label else 2}")
            out.append(
                f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="middle">{esc(clip_text(label, spacing / (TICK_FONT * GLYPH)))}</text>'
            )
        for v, label in yt:
            if sy.valid(v):
                ticks.append(f"M{_num(left)} {_num(sy(v))}h{-4 if label else -2}")
                out.append(
                    f'<text x="{_num(left - 6)}" y="{_num(sy(v) + TICK_FONT * 0.35)}" text-anchor="end">{esc(label)}</text>'
                )
        if ticks:
            out.insert(0, f'<path d="{"".join(ticks)}" stroke="{FRAME_COLOR}" stroke-width="0.8"/>')
        if self.title:
            title = clip_text(self.title, w / (TITLE_FONT * GLYPH))
            out.append(
                f'<text x="{_num((left + right) / 2)}" y="{_num(y0 + TITLE_FONT + 4)}" text-anchor="middle" font-size="{TITLE_FONT:g}">{esc(title)}</text>'
            )
        if self.xlabel:
            label = clip_text(self.xlabel, (right - left) / (LABEL_FONT * GLYPH))
            out.append(
                f'<text x="{_num((left + right) / 2)}" y="{_num(y0 + h - 8)}" text-anchor="middle" font-size="{LABEL_FONT:g}">{esc(label)}</text>'
            )
        if self.ylabel:  # rotated: its glyphs stand left of x
            ytick_w = max((text_width(t, TICK_FONT) + 6 for v, t in yt if sy.valid(v)), default=0)
            x, y = left - ytick_w - 6 - LABEL_FONT * 0.25, (top + bottom) / 2
            label = clip_text(self.ylabel, (bottom - top) / (LABEL_FONT * GLYPH))
            out.append(
                f'<text x="{_num(x)}" y="{_num(y)}" transform="rotate(-90 {_num(x)} {_num(y)})" text-anchor="middle" font-size="{LABEL_FONT:g}">{esc(label)}</text>'
            )
        return out

    def _draw(self, m: Mark, sx: Scale, sy: Scale, box) -> list[str]:
        left, top, right, bottom = box
        dash = f' stroke-dasharray="{m.dash}"' if m.dash else ""
        if m.kind == "vline":
            return (
                [
                    f'<path d="M{_num(sx(m.xs[0]))} {_num(top)}V{_num(bottom)}" stroke="{m.color}" stroke-width="{m.width:g}"{dash}/>'
                ]
                if sx.valid(m.xs[0])
                else []
            )
        if m.kind == "hline":
            return (
                [
                    f'<path d="M{_num(left)} {_num(sy(m.ys[0]))}H{_num(right)}" stroke="{m.color}" stroke-width="{m.width:g}"{dash}/>'
                ]
                if sy.valid(m.ys[0])
                else []
            )
        if m.kind == "bars":
            return self._bars(m, sx, sy)
        if m.kind == "cells":
            return self._cells(m, sx, sy)
        if m.kind == "text":
            return [
                f'<text x="{_num(sx(x) + 3)}" y="{_num(sy(y) + m.font * 0.35)}" font-size="{m.font:g}" text-anchor="{m.anchor}">{esc(t)}</text>'
                for x, y, t in zip(m.xs, m.ys, m.texts, strict=False)
                if sx.valid(x) and sy.valid(y)
            ]
        pts = [(sx(x), sy(y)) for x, y in zip(m.xs, m.ys, strict=False) if sx.valid(x) and sy.valid(y)]
        out = []
        if m.kind == "line" and len(pts) > 1:
            coords = " ".join(f"{_num(x)},{_num(y)}" for x, y in thin(pts))
            out.append(
                f'<polyline points="{coords}" fill="none" stroke="{m.color}" stroke-width="{m.width:g}" stroke-linejoin="round"{dash}/>'
            )
        if m.kind == "line" and len(pts) == 1 and not m.marker:  # a line of one point would draw nothing
            out.append(_marker("o", *pts[0], max(m.width, 2.0), m.color))
        if m.marker:
            seen = set()
            for x, y in pts:
                key = (round(x * 2), round(y * 2))
                if key not in seen:  # points on the same half-pixel draw once
                    seen.add(key)
                    out.append(_marker(m.marker, x, y, m.size, m.color, m.opacity))
        return out

    def _bars(self, m: Mark, sx: Scale, sy: Scale) -> list[str]:
        out = [f'<g fill="{m.color}" fill-opacity="{m.opacity:g}" stroke="#fff" stroke-width="0.5">']
        for a, b, height in zip(m.xs, m.xs[1:], m.ys, strict=False):
            if height > 0:
                x, y = sx(a), sy(height)
                out.append(f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(sx(b) - x)}" height="{_num(sy(0) - y)}"/>')
        return out + ["</g>"]

    def _cells(self, m: Mark, sx: Scale, sy: Scale) -> list[str]:
        n = int(m.size)
        x1, y1, x2, y2 = sx(-0.5), sy(-0.5), sx(n - 0.5), sy(n - 0.5)
        out = [
            f'<rect x="{_num(min(x1, x2))}" y="{_num(min(y1, y2))}" width="{_num(abs(x2 - x1))}" height="{_num(abs(y2 - y1))}" fill="{m.color}"/>'
        ]
        labels = []
        for x, y, color, text, tc in zip(m.xs, m.ys, m.colors, m.texts, m.text_colors, strict=False):
            x1, y1, x2, y2 = sx(x - 0.5), sy(y - 0.5), sx(x + 0.5), sy(y + 0.5)
            out.append(
                f'<rect x="{_num(min(x1, x2))}" y="{_num(min(y1, y2))}" width="{_num(abs(x2 - x1))}" height="{_num(abs(y2 - y1))}" fill="{color}"/>'
            )
            if text:
                labels.append(f'<text x="{_num(sx(x))}" y="{_num(sy(y) + 3.5)}" fill="{tc}">{esc(text)}</text>')
        return out + (['<g text-anchor="middle" font-size="10">', *labels, "</g>"] if labels else [])

    # -- legend and colour bar

    def _legend(self, sx: Scale, sy: Scale, box) -> list[str]:
        entries = [m for m in self.marks if m.label]
        if not entries:
            return []
        left, top, right, bottom = box
        cols = max(1, min(self.legend_cols, len(entries)))
        rows = math.ceil(len(entries) / cols)
        limit = max(8, ((right - left) / cols - 40) / (LEGEND_FONT * GLYPH))
        labels = [clip_text(m.label or "", limit) for m in entries]
        col_w = 30 + max(text_width(t, LEGEND_FONT) for t in labels) + 8
        lw, lh = cols * col_w + 6, rows * (LEGEND_FONT + 5) + 8
        lx, ly = self._legend_place(lw, lh, sx, sy, box)
        out = [
            f'<g font-size="{LEGEND_FONT:g}"><rect x="{_num(lx)}" y="{_num(ly)}" width="{_num(lw)}" height="{_num(lh)}" rx="3" '
            f'fill="#fff" fill-opacity="0.85" stroke="#ccc" stroke-width="0.8"/>'
        ]
        for k, (m, label) in enumerate(zip(entries, labels, strict=False)):
            ex, ey = lx + 6 + (k // rows) * col_w, ly + 4 + (k % rows) * (LEGEND_FONT + 5) + (LEGEND_FONT + 5) / 2
            out.append(self._legend_sample(m, ex, ey))
            out.append(f'<text x="{_num(ex + 30)}" y="{_num(ey + LEGEND_FONT * 0.35)}">{esc(label)}</text>')
        return out + ["</g>"]

    @staticmethod
    def _legend_sample(m: Mark, x: float, y: float) -> str:
        if m.kind == "points":
            return _marker(m.marker or "o", x + 12, y, min(m.size, 6), m.color, m.opacity)
        dash = f' stroke-dasharray="{m.dash}"' if m.dash else ""
        line = f'<path d="M{_num(x)} {_num(y)}h24" stroke="{m.color}" stroke-width="{min(m.width, 2.5):g}"{dash}/>'
        return line + (_marker(m.marker, x + 12, y, m.size, m.color) if m.marker else "")

    def _legend_place(self, lw: float, lh: float, sx: Scale, sy: Scale, box) -> tuple[float, float]:
        """The legend's corner: `legend_loc`, or under "best" the place that hides the fewest data points."""
        left, top, right, bottom = box
        inset = 6

        def corner(place: str) -> tuple[float, float]:
            vertical, _, horizontal = place.partition(" ") if " " in place else ("center", "", place)
            x = (
                left + inset
                if horizontal == "left"
                else right - inset - lw
                if horizontal == "right"
                else (left + right - lw) / 2
            )
            y = (
                top + inset
                if vertical == "upper"
                else bottom - inset - lh
                if vertical == "lower"
                else (top + bottom - lh) / 2
            )
            return x, y

        if self.legend_loc != "best":
            return corner(self.legend_loc or "upper right")
        pts = self._sample_points(sx, sy, box)

        def hidden(place: str) -> float:
            x, y = corner(place)
            return sum(weight for px, py, weight in pts if x <= px <= x + lw and y <= py <= y + lh)

        return corner(min(LEGEND_PLACES, key=hidden))

    def _sample_points(self, sx: Scale, sy: Scale, box) -> list[tuple[float, float, float]]:
        """(x, y, weight) of what a legend would hide: data points most, lines every 8 px, vertical rules least."""
        left, top, right, bottom = box
        pts: list[tuple[float, float, float]] = []
        for m in self.marks:
            if m.kind in ("line", "points"):
                xy = [(sx(x), sy(y)) for x, y in zip(m.xs, m.ys, strict=False) if sx.valid(x) and sy.valid(y)]
                if len(xy) > THIN_ABOVE:
                    xy = xy[:: len(xy) // THIN_ABOVE + 1]
                if m.kind == "points" or m.marker:
                    pts += [(x, y, 3.0) for x, y in xy]
                if m.kind == "line":
                    for (x1, y1), (x2, y2) in zip(xy, xy[1:], strict=False):
                        n = min(50, int(math.hypot(x2 - x1, y2 - y1) / 8) + 1)
                        pts += [(x1 + (x2 - x1) * k / n, y1 + (y2 - y1) * k / n, 1.0) for k in range(n)]
            elif m.kind == "vline" and sx.valid(m.xs[0]):
                pts += [(sx(m.xs[0]), y, 0.3) for y in range(int(top), int(bottom), 8)]
        return pts

    def _colorbar_width(self) -> float:
        cmap, lo, hi, label = self.colorbar
        ticks = linear_ticks(min(lo, hi), max(lo, hi), 5)
        return (
            16
            + 14
            + 5
            + max((text_width(t, TICK_FONT) for _, t in ticks), default=0)
            + (LABEL_FONT + 10 if label else 0)
        )

    def _colorbar_svg(self, box, uid: str) -> list[str]:
        cmap, lo, hi, label = self.colorbar
        left, top, right, bottom = box
        height = (bottom - top) * 0.8
        x, y = right + 16, top + (bottom - top - height) / 2
        stops = "".join(
            f'<stop offset="{i / (len(cmap.anchors) - 1):.3f}" stop-color="{c}"/>' for i, c in enumerate(cmap.anchors)
        )
        out = [
            f'<linearGradient id="{uid}g" x1="0" y1="1" x2="0" y2="0">{stops}</linearGradient>',
            f'<rect x="{_num(x)}" y="{_num(y)}" width="14" height="{_num(height)}" fill="url(#{uid}g)" stroke="{FRAME_COLOR}" stroke-width="0.6"/>',
        ]
        span = (hi - lo) or 1.0
        ticks = linear_ticks(min(lo, hi), max(lo, hi), 5) if hi != lo else [(lo, f"{lo:.4g}")]
        widest = 0.0
        for v, text in ticks:
            ty = y + height - (v - lo) / span * height
            widest = max(widest, text_width(text, TICK_FONT))
            out.append(
                f'<path d="M{_num(x + 14)} {_num(ty)}h3" stroke="{FRAME_COLOR}" stroke-width="0.8"/>'
                f'<text x="{_num(x + 19)}" y="{_num(ty + TICK_FONT * 0.35)}">{esc(text)}</text>'
            )
        if label:
            lx, ly = x + 19 + widest + 6 + LABEL_FONT * 0.8, y + height / 2
            text = clip_text(label, height / (LABEL_FONT * GLYPH))
            out.append(
                f'<text x="{_num(lx)}" y="{_num(ly)}" transform="rotate(-90 {_num(lx)} {_num(ly)})" text-anchor="middle" font-size="{LABEL_FONT:g}">{esc(text)}</text>'
            )
        return out


def figure(panels: Sequence[Axes], width: float, height: float) -> str:
    """One standalone SVG document holding `panels` side by side."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'font-family="{FONT}" font-size="{TICK_FONT:g}" fill="{TEXT_COLOR}">',
        '<rect width="100%" height="100%" fill="#fff"/>',
    ]
    share = width / len(panels)
    for i, ax in enumerate(panels):
        parts += ax.render(i * share, 0, share, height, f"p{i}")
    parts.append("</svg>")
    return "".join(parts)
