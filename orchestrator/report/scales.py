"""Colours and scales of the report's charts: colormaps, linear and log scales, their ticks and limits."""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.report.svg import _finite

# ----------------------------------------------------------------------------------------------
# Colours and scales


@dataclass(frozen=True)
class Colormap:
    """Colours interpolated between anchors spread evenly over [0, 1]."""

    anchors: tuple[str, ...]

    def __call__(self, t: float) -> str:
        t = min(1.0, max(0.0, t)) if math.isfinite(t) else 0.0
        pos = t * (len(self.anchors) - 1)
        i = min(int(pos), len(self.anchors) - 2)
        a, b = _rgb(self.anchors[i]), _rgb(self.anchors[i + 1])
        return "#" + "".join(f"{round(x + (y - x) * (pos - i)):02x}" for x, y in zip(a, b, strict=False))

    def reversed(self) -> Colormap:
        return Colormap(self.anchors[::-1])


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


# matplotlib's "Blues" and "viridis", sampled at their anchors.
BLUES = Colormap(("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"))
VIRIDIS = Colormap(
    ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725")
)


@dataclass
class Scale:
    """Data values [lo, hi] onto pixels [px0, px1], linear or log10."""

    lo: float
    hi: float
    log: bool = False
    px0: float = 0.0
    px1: float = 1.0

    def _f(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def __call__(self, v: float) -> float:
        a, b = self._f(self.lo), self._f(self.hi)
        return self.px0 + (self._f(v) - a) / ((b - a) or 1.0) * (self.px1 - self.px0)

    def valid(self, v: object) -> bool:
        return _finite(v) and (not self.log or v > 0)


def linear_ticks(lo: float, hi: float, target: int = 6) -> list[tuple[float, str]]:
    """Round-numbered ticks (1, 2, 2.5 or 5 times a power of ten) inside [lo, hi], with their labels."""
    span = hi - lo
    if not (math.isfinite(span) and span > 1e-300):  # also what log10 of a vanishing step could not take
        return [(lo, f"{lo:.4g}")] if math.isfinite(lo) else []
    magnitude = 10 ** math.floor(math.log10(span / target))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if span / (m * magnitude) <= target)
    first = math.ceil(lo / step - 1e-9)
    values = [(first + i) * step for i in range(int((hi - first * step) / step + 1e-9) + 1)]
    return [(v, _tick_label(v, step)) for v in values]


def _tick_label(v: float, step: float) -> str:
    if abs(v) < step * 1e-6:
        v = 0.0  # not -0.0 or 1e-17
    if abs(v) >= 1e6 or step < 1e-4:
        return f"{v:.3g}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(round(step, decimals) - step) > step * 1e-6:  # 2.5, 0.25: one digit more than the magnitude says
        decimals += 1
    return f"{v:.{decimals}f}"


def log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """Powers of ten inside [lo, hi]; 1-2-5 steps when fewer than two fit; round linear ticks when even those don't."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = [10.0**k for k in range(first, last + 1) if lo * (1 - 1e-9) <= 10.0**k <= hi * (1 + 1e-9)]
    if len(decades) >= 2:
        every = max(1, math.ceil(len(decades) / 8))
        return [(v, _log_label(v)) for v in decades[::every]]
    steps = [
        m * 10.0**k
        for k in range(first, last + 1)
        for m in (1, 2, 5)
        if lo * (1 - 1e-9) <= m * 10.0**k <= hi * (1 + 1e-9)
    ]
    if len(steps) >= 2:
        return [(v, _log_label(v)) for v in steps]
    return [(v, label) for v, label in linear_ticks(lo, hi, 4) if v > 0]


def minor_log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """Unlabelled ticks at 2..9 times each power of ten, where the labelled ones are consecutive powers of ten."""
    decades = [math.log10(v) for v, _ in log_ticks(lo, hi)]
    if not 2 <= len(decades) <= 6 or any(abs(d - round(d)) > 1e-9 for d in decades) or decades[1] - decades[0] > 1.5:
        return []
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [(m * 10.0**k, "") for k in range(first, last + 1) for m in range(2, 10) if lo <= m * 10.0**k <= hi]


def _log_label(v: float) -> str:
    if 1e-3 <= v < 1e5:
        return f"{v:g}"
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def _limits(values: list[float], log: bool, margin: float = 0.05) -> tuple[float, float]:
    """The data range of `values` widened by `margin` of it on each side (in log space on a log axis)."""
    vs = [math.log10(v) if log else v for v in values if _finite(v) and (not log or v > 0)]
    if not vs:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = min(vs), max(vs)
    pad = (hi - lo) * margin if hi > lo else (0.5 if log else (abs(lo) * 0.05 or 0.5))
    lo, hi = lo - pad, hi + pad
    return (10**lo, 10**hi) if log else (lo, hi)
