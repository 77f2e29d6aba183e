"""A picture of a run: bounded series, a one-line sparkline, and an SVG chart.

* :class:`Series` keeps at most ``cap`` points of a metric spread over the
  whole run, whatever its length: when full it drops every other point and
  keeps one point in twice as many from then on. Memory is flat.
* :func:`sparkline` draws values as one line of block characters (the CLI's
  end-of-run summary).
* :func:`svg_chart` draws each series against the step in a panel of its own
  (its own value axis, the step axis shared), with ticks, labels and a
  title: plain SVG 1.1 text that any Markdown viewer shows (``summary.md``
  references it). Hand-written, a few dozen lines: a plotting library
  (matplotlib) costs more to import than the whole run's summary may take.

Steps on the chart count from 1, as people read them. Pure functions, no
I/O; non-finite values are left out of a chart and a sparkline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape

from ._format import fmt_value

__all__ = ["Series", "sparkline", "svg_chart"]

_BLOCKS = "▁▂▃▄▅▆▇█"
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
_W, _PANEL_H, _LEFT, _RIGHT, _TOP, _GAP = 640, 150, 70, 20, 30, 50


class Series:
    """Up to ``cap`` ``(step, value)`` points of one metric, spread over the run."""

    __slots__ = ("_offered", "cap", "points", "stride")

    def __init__(self, cap: int = 400) -> None:
        self.cap = cap
        self.points: list[tuple[int, float]] = []
        self.stride = 1
        self._offered = 0

    def add(self, step: int, value: float) -> None:
        """Offer a point; every ``stride``-th one is kept."""
        self._offered += 1
        if (self._offered - 1) % self.stride:
            return
        self.points.append((step, value))
        if len(self.points) >= self.cap:
            self.points = self.points[::2]
            self.stride *= 2


def _finite(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(s, v) for s, v in points if math.isfinite(v)]


def sparkline(values: Sequence[float], width: int = 32) -> str:
    """``values`` as at most ``width`` block characters, low to high (each the mean
    of its share of the values); ``""`` when none is finite."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:
        n = len(vals)
        vals = [
            sum(part) / len(part)
            for i in range(width)
            if (part := vals[i * n // width : (i + 1) * n // width])
        ]
    lo, hi = min(vals), max(vals)
    # a constant (a learning rate) averaged over unequal shares differs in its last
    # bits: drawn flat, not as noise blown up to the full height
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):
        return _BLOCKS[len(_BLOCKS) // 2] * len(vals)
    top = len(_BLOCKS) - 1
    return "".join(_BLOCKS[round((v - lo) / (hi - lo) * top)] for v in vals)


def svg_chart(
    panels: Sequence[tuple[str, Sequence[tuple[int, float]]]],
    *,
    title: str,
    last_step: int | None = None,
) -> str:
    """One SVG: a panel per ``(name, points)`` (steps 0-based in, drawn from 1), the
    step axis from 1 to ``last_step + 1`` (default: the last point's) in every panel."""
    drawn = [(name, _finite(points)) for name, points in panels]
    drawn = [(name, pts) for name, pts in drawn if pts]
    x_hi = max([last_step or 0, *(pts[-1][0] for _, pts in drawn)]) + 1
    height = _TOP + len(drawn) * (_PANEL_H + _GAP) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" '
        f'viewBox="0 0 {_W} {height}" font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{_W}" height="{height}" fill="white"/>',
        f'<text x="{_W / 2}" y="18" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    for i, (name, pts) in enumerate(drawn):
        top = _TOP + i * (_PANEL_H + _GAP)
        out += _panel(name, pts, top, x_hi, _COLORS[i % len(_COLORS)])
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _panel(name: str, pts: list[tuple[int, float]], top: float, x_hi: int, color: str) -> list[str]:
    """One metric's panel: frame, ticks and labels, the line (and dots when few)."""
    plot_w, left = _W - _LEFT - _RIGHT, _LEFT
    values = [v for _, v in pts]
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - (abs(lo) or 1.0) * 0.05, hi + (abs(hi) or 1.0) * 0.05
    x_lo = 1

    def x(step: int) -> float:
        return left + (step + 1 - x_lo) / max(x_hi - x_lo, 1) * plot_w

    def y(value: float) -> float:
        return top + _PANEL_H - (value - lo) / (hi - lo) * _PANEL_H

    bottom = top + _PANEL_H
    out = [
        f'<g class="panel" data-metric="{escape(name)}">',
        f'<text class="name" x="{left}" y="{top - 6:.1f}" font-size="12">{escape(name)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{_PANEL_H}" fill="none" '
        'stroke="#999"/>',
    ]
    for value in (lo, (lo + hi) / 2, hi):
        out.append(
            f'<text class="ytick" x="{left - 4}" y="{y(value) + 4:.1f}" '
            f'text-anchor="end">{fmt_value(value)}</text>'
        )
    for step in sorted({x_lo, (x_lo + x_hi) // 2, x_hi}):
        out.append(
            f'<text class="xtick" x="{x(step - 1):.1f}" y="{bottom + 14:.1f}" '
            f'text-anchor="middle">{step}</text>'
        )
    out.append(
        f'<text class="xlabel" x="{left + plot_w / 2}" y="{bottom + 28:.1f}" '
        'text-anchor="middle">step</text>'
    )
    coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)
    out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
    if len(pts) <= 60:  # few points (evals): each one marked
        out += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="{color}"/>' for s, v in pts]
    out.append("</g>")
    return out
