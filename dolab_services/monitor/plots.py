"""Small inline SVG plots for the monitor's page: no JavaScript, no CDN, nothing fetched.

Pure functions from numbers to an ``<svg>`` string; every text in it is escaped, so the page can embed it raw.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import datetime, timezone

__all__ = ["bar_chart", "line_chart"]

_W, _H, _PAD = 520, 140, 28


def _fmt(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def line_chart(
    points: Sequence[tuple[float, float | None]], *, y_max: float | None = None, unit: str = "%", title: str = ""
) -> str:
    """A polyline of ``(epoch seconds, value)`` (None values break the line); the y axis from 0 to ``y_max``."""
    known = [(t, v) for t, v in points if v is not None and math.isfinite(v)]
    label = html.escape(title)
    if len(known) < 1:
        return (
            f'<svg class="plot" role="img" aria-label="{label}" width="{_W}" height="40">'
            '<text x="4" y="24">No readings yet.</text></svg>'
        )
    top = y_max if y_max else max(v for _, v in known) or 1.0
    t0, t1 = points[0][0], points[-1][0]
    span = (t1 - t0) or 1.0
    plot_w, plot_h = _W - 2 * _PAD, _H - 2 * _PAD
    segments: list[list[str]] = [[]]
    for t, v in points:
        if v is None or not math.isfinite(v):
            if segments[-1]:
                segments.append([])
            continue
        x = _PAD + plot_w * (t - t0) / span
        y = _PAD + plot_h * (1 - min(v, top) / top)
        segments[-1].append(f"{x:.1f},{y:.1f}")
    lines = "".join(
        f'<polyline fill="none" stroke="#1565c0" stroke-width="1.5" points="{" ".join(s)}"/>' for s in segments if s
    )
    start = datetime.fromtimestamp(t0, timezone.utc).strftime("%H:%M")
    end = datetime.fromtimestamp(t1, timezone.utc).strftime("%H:%M UTC")
    unit_text = html.escape(unit)
    return (
        f'<svg class="plot" role="img" aria-label="{label}" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}">'
        f"<title>{label}</title>"
        f'<rect x="{_PAD}" y="{_PAD}" width="{plot_w}" height="{plot_h}" fill="#f7f9fc" stroke="#ccd"/>'
        f'<text x="2" y="{_PAD + 4}" font-size="10">{_fmt(top)}{unit_text}</text>'
        f'<text x="2" y="{_PAD + plot_h}" font-size="10">0</text>'
        f'<text x="{_PAD}" y="{_H - 8}" font-size="10">{start}</text>'
        f'<text x="{_W - _PAD}" y="{_H - 8}" font-size="10" text-anchor="end">{end}</text>'
        f"{lines}</svg>"
    )


def bar_chart(bars: Sequence[tuple[str, float]], *, unit: str = "", title: str = "") -> str:
    """One bar per ``(label, value)``, left to right; each bar's ``<title>`` says its label and value."""
    label = html.escape(title)
    if not bars:
        return f'<svg class="plot" role="img" aria-label="{label}" width="{_W}" height="40"></svg>'
    top = max(v for _, v in bars) or 1.0
    plot_w, plot_h = _W - 2 * _PAD, _H - 2 * _PAD
    width = plot_w / len(bars)
    unit_text = html.escape(unit)
    rects = []
    for i, (name, value) in enumerate(bars):
        h = plot_h * max(0.0, value) / top
        x = _PAD + i * width
        rects.append(
            f'<rect x="{x + 1:.1f}" y="{_PAD + plot_h - h:.1f}" width="{max(1.0, width - 2):.1f}" height="{h:.1f}"'
            f' fill="#2e7d32"><title>{html.escape(name)}: {value:.3f}{unit_text}</title></rect>'
        )
    return (
        f'<svg class="plot" role="img" aria-label="{label}" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}">'
        f"<title>{label}</title>"
        f'<text x="2" y="{_PAD + 4}" font-size="10">{_fmt(top)}{unit_text}</text>'
        f'<text x="{_PAD}" y="{_H - 8}" font-size="10">{html.escape(bars[0][0])}</text>'
        f'<text x="{_W - _PAD}" y="{_H - 8}" font-size="10" text-anchor="end">{html.escape(bars[-1][0])}</text>'
        f"{''.join(rects)}</svg>"
    )
