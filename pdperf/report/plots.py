"""Inline SVG charts, written by hand: the report must open offline, from its folder, anywhere.

No matplotlib (a heavy import for a CI job), no JavaScript, no CDN: each chart is one
``<svg>`` string with a ``viewBox``, so it scales with the page, prints, and survives being
attached to a ticket. Points carry ``<title>`` elements, which browsers show as tooltips.
Three shapes cover the report: lines (latency vs load, throughput vs latency), stacked
horizontal bars (latency attribution) and ratio intervals (baseline comparisons).
Every chart has a title, axis labels with units and a legend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from pdperf.stats import format_value

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
VERDICT_COLORS = {"regressed": "#c62828", "improved": "#2e7d32", "unchanged": "#607d8b", "insufficient": "#b0bec5"}
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Arial, sans-serif"
_CHAR_W = 7.2  # average glyph width at 12 px (DejaVu Sans, the widest fallback), for legend layout


@dataclass
class Series:
    """One line: ``ys[i]`` at ``xs[i]``; a None y breaks the line. Drawn in the order given."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str = PALETTE[0]
    dashed: bool = False
    point_labels: Sequence[str] | None = None  # tooltip per point; drawn beside it when annotate
    annotate: bool = False
    width: float = 2.2
    markers: bool = True


@dataclass(frozen=True)
class LegendItem:
    label: str
    color: str
    dashed: bool = False
    marker: str = "line"  # line | box


@dataclass
class RatioRow:
    """One ratio with its interval and the limits it is judged against (for :func:`ratio_chart`)."""

    label: str
    ratio: float
    lo: float | None
    hi: float | None
    bad_limit: float  # e.g. 1.5 for a lower-is-better metric with max_change 0.5
    good_limit: float
    verdict: str
    tooltip: str = ""


def palette_color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def no_data(title: str, reason: str) -> str:
    """What stands in for a chart that has nothing to draw: the title and why."""
    return (f'<div class="pdperf-nodata"><strong>{escape(title)}</strong>: not drawn, {escape(reason)}</div>')


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 10000:
        return f"{v / 1000:g}k"
    if a >= 1:
        return f"{v:,.10g}" if v == int(v) else f"{v:.3g}"
    return f"{v:.2g}"


class _Scale:
    """Maps data to pixels, linear or log10, and picks readable ticks."""

    def __init__(self, values: Sequence[float], log: bool, p0: float, p1: float, *, zero: bool = False,
                 ticks_at: Sequence[float] | None = None, pad: float = 0.0):
        self.log, self.p0, self.p1 = log, p0, p1
        lo, hi = min(values), max(values)
        if log:
            lo, hi = lo / (1 + pad), hi * (1 + pad)
            if hi / lo < 1.5:
                lo, hi = lo / 1.25, hi * 1.25
            self.lo, self.hi = math.log10(lo), math.log10(hi)
            self.ticks = list(ticks_at) if ticks_at is not None else self._log_ticks(lo, hi)
        else:
            if zero:
                lo = min(lo, 0.0)
            span = hi - lo
            if span == 0:
                span = abs(hi) or 1.0
                lo, hi = (lo - span * 0.5, hi + span * 0.5) if not zero else (lo, hi + span)
            lo, hi = (lo - span * pad if not (zero and lo == 0) else lo), hi + span * pad
            if ticks_at is not None:
                self.ticks = list(ticks_at)
                self.lo, self.hi = lo, hi
            else:
                self.ticks = self._nice_ticks(lo, hi)
                self.lo, self.hi = min(self.ticks[0], lo), max(self.ticks[-1], hi)

    @staticmethod
    def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
        span = hi - lo
        raw = span / n
        mag = 10 ** math.floor(math.log10(raw))
        step = mag
        for m in (1, 2, 2.5, 5, 10):
            step = m * mag
            if span / step <= n:
                break
        start = math.floor(lo / step) * step
        ticks = []
        v = start
        while v < hi + step * 0.999:
            ticks.append(round(v, 12))
            v += step
        return ticks

    @staticmethod
    def _log_ticks(lo: float, hi: float) -> list[float]:
        for mantissas in ((1.0,), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)):
            ticks = [m * 10 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                     for m in mantissas if lo <= m * 10 ** k <= hi]
            if len(ticks) >= 3:
                return ticks[:: max(1, len(ticks) // 8)]
        return [lo, hi]

    def __call__(self, v: float) -> float:
        x = math.log10(v) if self.log else v
        frac = (x - self.lo) / ((self.hi - self.lo) or 1.0)
        return self.p0 + frac * (self.p1 - self.p0)


def _finite(v: float | None, log: bool) -> bool:
    return v is not None and math.isfinite(v) and (v > 0 or not log)


def _legend(items: Sequence[LegendItem], x0: float, y0: float, width: float) -> tuple[str, float]:
    """Legend rows that wrap at ``width``; returns the SVG and the height used."""
    out, x, y = [], x0, y0
    for it in items:
        w = 34 + len(it.label) * _CHAR_W
        if x + w > x0 + width and x > x0:
            x, y = x0, y + 18
        if it.marker == "box":
            out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="18" height="10" fill="{it.color}"/>')
        else:
            dash = ' stroke-dasharray="6 4"' if it.dashed else ""
            out.append(f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 22:.1f}" y2="{y - 4:.1f}" stroke="{it.color}" '
                       f'stroke-width="2.5"{dash}/>')
        out.append(f'<text x="{x + 26:.1f}" y="{y:.1f}" font-size="12">{escape(it.label)}</text>')
        x += w
    return "".join(out), (y - y0) + 18 if items else 0.0


def _svg(width: float, height: float, title: str, body: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="pdperf-chart" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'width="{width:.0f}" height="{height:.0f}" role="img" aria-label="{escape(title)}" '
            f'font-family="{escape(FONT)}"><title>{escape(title)}</title>'
            f'<rect width="100%" height="100%" fill="#ffffff"/>{body}</svg>')


def _axes(xs: _Scale, ys: _Scale, left: float, top: float, right: float, bottom: float, x_label: str,
          y_label: str, title: str) -> list[str]:
    out = [f'<text x="{left:.1f}" y="20" font-size="14" font-weight="600">{escape(title)}</text>']
    for t in ys.ticks:
        if not (min(ys.p0, ys.p1) - 0.5 <= ys(t) <= max(ys.p0, ys.p1) + 0.5):
            continue
        y = ys(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e0e0e0"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" fill="#333">'
                   f'{_fmt_tick(t)}</text>')
    for t in xs.ticks:
        if not (xs.p0 - 0.5 <= xs(t) <= xs.p1 + 0.5):
            continue
        x = xs(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#f0f0f0"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 16}" font-size="11" text-anchor="middle" fill="#333">'
                   f'{_fmt_tick(t)}</text>')
    out.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#444"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#444"/>')
    out.append(f'<text x="{(left + right) / 2:.1f}" y="{bottom + 36}" font-size="12" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    cy = (top + bottom) / 2
    out.append(f'<text x="16" y="{cy:.1f}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 16 {cy:.1f})">{escape(y_label)}</text>')
    return out


def line_chart(series: Sequence[Series], *, title: str, x_label: str, y_label: str, log_x: bool | None = None,
               log_y: bool | None = None, x_ticks_at_data: bool = False, legend: Sequence[LegendItem] | None = None,
               width: int = 620, height: int = 340) -> str:
    """Lines with markers; log axes chosen automatically when values span more than ~30x.

    Returns an ``<svg>`` string, or a :func:`no_data` note when no series has a point.
    """
    pts = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if y is not None]
    if not pts:
        return no_data(title, "no data points")
    all_x = [x for x, _ in pts]
    all_y = [y for _, y in pts]
    if log_x is None:
        pos = [x for x in all_x if x > 0]
        log_x = len(pos) == len(all_x) and max(pos) / min(pos) >= 30
    if log_y is None:
        pos = [y for y in all_y if y > 0]
        log_y = len(pos) == len(all_y) and max(pos) / min(pos) >= 30
    all_x = [x for x in all_x if _finite(x, log_x)]
    all_y = [y for y in all_y if _finite(y, log_y)]
    if not all_x or not all_y:
        return no_data(title, "no finite data points")
    if legend is None:
        legend = [LegendItem(s.label, s.color, s.dashed) for s in series]
    left, right, top = 70.0, width - 20.0, 34.0
    legend_svg, legend_h = _legend(legend, left, 0, right - left)
    bottom = height - 50.0
    total_h = height + legend_h
    data_x = sorted(set(all_x))
    xs = _Scale(all_x, log_x, left, right, pad=0.06,
                ticks_at=data_x if x_ticks_at_data and len(data_x) <= 12 else None)
    ys = _Scale(all_y, log_y, bottom, top, zero=not log_y, pad=0.05)
    body = _axes(xs, ys, left, top, right, bottom, x_label, y_label, title)
    placed: list[tuple[float, float]] = []  # annotation positions, to skip ones that would overlap
    for s in series:
        labels = list(s.point_labels) if s.point_labels else [""] * len(s.xs)
        segments: list[list[tuple[float, float]]] = [[]]
        for x, y in zip(s.xs, s.ys):
            if _finite(y, log_y) and _finite(x, log_x):
                segments[-1].append((xs(x), ys(y)))  # type: ignore[arg-type]
            elif segments[-1]:
                segments.append([])
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        for seg in segments:
            if len(seg) > 1:
                d = " ".join(f"{'M' if i == 0 else 'L'}{px:.1f},{py:.1f}" for i, (px, py) in enumerate(seg))
                body.append(f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="{s.width}"{dash} '
                            'stroke-linejoin="round" stroke-linecap="round"/>')
        for x, y, lab in zip(s.xs, s.ys, labels):
            if not s.markers or not (_finite(y, log_y) and _finite(x, log_x)):
                continue
            px, py = xs(x), ys(y)  # type: ignore[arg-type]
            fill = "#ffffff" if s.dashed else s.color
            tip = f"{s.label}: {lab + ', ' if lab else ''}x={_fmt_tick(x)}, y={y:.4g}"
            body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.6" fill="{fill}" stroke="{s.color}" '
                        f'stroke-width="1.8"><title>{escape(tip)}</title></circle>')
            if s.annotate and lab and all(abs(px - qx) > 24 or abs(py - qy) > 11 for qx, qy in placed):
                placed.append((px, py))
                body.append(f'<text x="{px + 5:.1f}" y="{py - 6:.1f}" font-size="10" fill="{s.color}">'
                            f'{escape(lab)}</text>')
    body.append(f'<g transform="translate(0 {height + 8:.0f})">{legend_svg}</g>')
    return _svg(width, total_h, title, "".join(body))


def stacked_bar_chart(rows: Sequence[tuple[str, dict[str, float]]], segments: Sequence[str], *, title: str,
                      x_label: str, segment_labels: dict[str, str] | None = None, width: int = 620) -> str:
    """Horizontal bars, one per row, split into ``segments`` (missing segments count 0)."""
    rows = [(label, vals) for label, vals in rows if any((vals.get(s) or 0) > 0 for s in segments)]
    if not rows:
        return no_data(title, "no positive values")
    segment_labels = segment_labels or {}
    label_w = min(260.0, max(len(r[0]) for r in rows) * _CHAR_W + 12)
    left, right, top, bar_h, gap = label_w + 8, width - 60.0, 34.0, 18.0, 8.0
    bottom = top + len(rows) * (bar_h + gap)
    totals = [sum(max(v.get(s) or 0.0, 0.0) for s in segments) for _, v in rows]
    xs = _Scale([0.0, max(totals)], False, left, right, zero=True)
    ys = _Scale([0.0, 1.0], False, bottom, top, ticks_at=[])
    body = _axes(xs, ys, left, top, right, bottom, x_label, "", title)
    colors = {s: palette_color(i) for i, s in enumerate(segments)}
    for i, ((label, vals), total) in enumerate(zip(rows, totals)):
        y = top + gap / 2 + i * (bar_h + gap)
        body.append(f'<text x="{left - 6:.1f}" y="{y + bar_h - 5:.1f}" font-size="11" text-anchor="end">'
                    f'{escape(label)}</text>')
        x = left
        for s in segments:
            v = max(vals.get(s) or 0.0, 0.0)
            if v <= 0:
                continue
            w = xs(v) - xs(0)
            tip = f"{label}: {segment_labels.get(s, s)} {v:.4g} ({v / total * 100:.0f}%)"
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{bar_h}" fill="{colors[s]}">'
                        f'<title>{escape(tip)}</title></rect>')
            x += w
        body.append(f'<text x="{x + 4:.1f}" y="{y + bar_h - 5:.1f}" font-size="10" fill="#333">'
                    f'{escape(format_value(total))}</text>')
    legend = [LegendItem(segment_labels.get(s, s), colors[s], marker="box") for s in segments]
    legend_svg, legend_h = _legend(legend, left, 0, right - left)
    height = bottom + 50
    body.append(f'<g transform="translate(0 {height + 8:.0f})">{legend_svg}</g>')
    return _svg(width, height + legend_h, title, "".join(body))


def trim_ratio_rows(rows: Sequence[RatioRow], limit: int = 40) -> tuple[list[RatioRow], int]:
    """At most ``limit`` rows for a readable chart: every regression and improvement first, then
    the largest other changes; returns the rows in their original order and how many were left out."""
    if len(rows) <= limit:
        return list(rows), 0

    def weight(r: RatioRow) -> tuple[int, float]:
        return (0 if r.verdict in ("regressed", "improved") else 1, -abs(math.log(r.ratio)) if r.ratio > 0 else 0.0)
    keep = set(sorted(range(len(rows)), key=lambda i: weight(rows[i]))[:limit])
    return [r for i, r in enumerate(rows) if i in keep], len(rows) - len(keep)


def ratio_chart(rows: Sequence[RatioRow], *, title: str, x_label: str = "current / baseline (log scale)",
                width: int = 760) -> str:
    """Each row a ratio with its interval on a log axis, the line of no change and its limits."""
    if not rows:
        return no_data(title, "no ratios to show")
    vals = [v for r in rows for v in (r.ratio, r.lo, r.hi, r.bad_limit, r.good_limit) if v is not None and v > 0]
    label_w = min(320.0, max(len(r.label) for r in rows) * _CHAR_W + 12)
    left, right, top, row_h = label_w + 8, width - 20.0, 34.0, 22.0
    bottom = top + len(rows) * row_h + 6
    xs = _Scale(vals + [1.0], True, left, right, pad=0.1)
    ys = _Scale([0.0, 1.0], False, bottom, top, ticks_at=[])
    body = _axes(xs, ys, left, top, right, bottom, x_label, "", title)
    x1 = xs(1.0)
    body.append(f'<line x1="{x1:.1f}" y1="{top}" x2="{x1:.1f}" y2="{bottom}" stroke="#222" stroke-width="1.2"/>')
    for i, r in enumerate(rows):
        y = top + 6 + i * row_h + row_h / 2
        color = VERDICT_COLORS.get(r.verdict, "#607d8b")
        body.append(f'<text x="{left - 6:.1f}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
                    f'{escape(r.label)}</text>')
        for lim in (r.bad_limit, r.good_limit):
            lx = xs(lim)
            body.append(f'<line x1="{lx:.1f}" y1="{y - 8:.1f}" x2="{lx:.1f}" y2="{y + 8:.1f}" stroke="#999" '
                        f'stroke-dasharray="2 2"/>')
        if r.lo is not None and r.hi is not None and r.lo > 0:
            body.append(f'<line x1="{xs(r.lo):.1f}" y1="{y:.1f}" x2="{xs(r.hi):.1f}" y2="{y:.1f}" '
                        f'stroke="{color}" stroke-width="2.5"/>')
        tip = r.tooltip or f"{r.label}: x{r.ratio:.3g} ({r.verdict})"
        body.append(f'<circle cx="{xs(r.ratio):.1f}" cy="{y:.1f}" r="4.5" fill="{color}">'
                    f'<title>{escape(tip)}</title></circle>')
    legend = [LegendItem(v, c, marker="box") for v, c in VERDICT_COLORS.items()]
    legend.append(LegendItem("limits (dotted)", "#999", dashed=True))
    legend_svg, legend_h = _legend(legend, left, 0, right - left)
    height = bottom + 50
    body.append(f'<g transform="translate(0 {height + 8:.0f})">{legend_svg}</g>')
    return _svg(width, height + legend_h, title, "".join(body))
