"""Inline SVG charts for the HTML report, written by hand so the report needs no plotting library.

Every function returns one ``<svg>`` element as a string (no ``xmlns``: it is meant to be inlined in HTML5), sized
by a ``viewBox`` so CSS can scale it. All text is escaped; points and bars carry a ``<title>`` tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

GROUPS = ("head", "medium", "tail")
RUN_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#9c755f", "#edc948", "#ff9da7")
GROUP_COLORS = {"head": "#3a6ea5", "medium": "#c98a2c", "tail": "#b5443e", None: "#888888"}
GROUP_MARKERS = {"head": "circle", "medium": "square", "tail": "triangle"}
FONT = 'font-family="system-ui, sans-serif"'


@dataclass
class Point:
    """One class of one run in the AP-versus-count scatter."""

    count: float  # training images n_c
    ap: float  # AP in %
    group: str | None  # head / medium / tail (None: ungrouped)
    label: str  # tooltip text


@dataclass
class Series:
    """One run in the AP-versus-count scatter."""

    name: str
    color: str
    points: list[Point] = field(default_factory=list)
    mean: float | None = None  # drawn as a dashed line (the run's mAP)


def run_color(i: int) -> str:
    """The colour of the ``i``-th run (cycles through a colour-blind-friendly palette)."""
    return RUN_COLORS[i % len(RUN_COLORS)]


def _num(v: float) -> str:
    """Short tick label: integers without decimals, others with up to 3 significant digits."""
    return str(int(round(v))) if abs(v - round(v)) < 1e-9 else f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` evenly spaced round ticks (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi]."""
    if not hi > lo:
        lo, hi = (lo - 1, hi + 1) if lo == hi else (hi, lo)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    ticks, t = [], math.floor(lo / step + 1e-9) * step
    while t < hi + step * (1 - 1e-9):
        ticks.append(round(t, 12))
        t += step
    return ticks


def _svg(width: float, height: float, label: str, body: Sequence[str]) -> str:
    head = f'<svg viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" role="img"'
    return f'{head} aria-label="{escape(label)}" {FONT} font-size="11">' + "".join(body) + "</svg>"


def _text(x: float, y: float, s: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {extra}>{escape(s)}</text>'


def marker(group: str | None, x: float, y: float, color: str, r: float = 4.0, title: str = "") -> str:
    """A scatter marker whose shape shows the group: circle = head, square = medium, triangle = tail."""
    tip = f"<title>{escape(title)}</title>" if title else ""
    style = f'fill="{color}" fill-opacity="0.8" stroke="{color}"'
    shape = GROUP_MARKERS.get(group or "", "ring")
    if shape == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" {style}>{tip}</rect>'
    if shape == "triangle":
        pts = f"{x:.1f},{y - 1.2 * r:.1f} {x - 1.1 * r:.1f},{y + 0.8 * r:.1f} {x + 1.1 * r:.1f},{y + 0.8 * r:.1f}"
        return f'<polygon points="{pts}" {style}>{tip}</polygon>'
    fill = 'fill="none"' if shape == "ring" else f'fill="{color}" fill-opacity="0.8"'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {fill} stroke="{color}">{tip}</circle>'


def _legend(items: Sequence[tuple[str, str, str | None]], x0: float, width: float) -> tuple[list[str], float]:
    """Legend entries (label, colour, group marker or None for a swatch) wrapped into rows; returns (svg, height)."""
    out, x, y = [], x0, 14.0
    for label, color, group in items:
        w = 22 + 6.6 * len(label)
        if x + w > width and x > x0:
            x, y = x0, y + 16
        if group is None:
            out.append(f'<rect x="{x:.1f}" y="{y - 8:.1f}" width="12" height="10" fill="{color}"/>')
        else:
            out.append(marker(group, x + 6, y - 3, color))
        out.append(_text(x + 16, y, label, "start"))
        x += w
    return out, y + 10


def _y_axis(ticks: Sequence[float], sy: Callable[[float], float], x0: float, x1: float, label: str) -> list[str]:
    out = []
    for t in ticks:
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e3e3e3"/>')
        out.append(_text(x0 - 5, sy(t) + 4, _num(t), "end"))
    mid = (sy(ticks[0]) + sy(ticks[-1])) / 2
    out.append(_text(14, mid, label, extra=f'transform="rotate(-90 14 {mid:.1f})"'))
    return out


def ap_vs_count(
    series: Sequence[Series],
    head_threshold: float | None = None,
    tail_threshold: float | None = None,
    width: float = 760,
    height: float = 420,
) -> str:
    """Scatter of per-class AP (y, %) against training count n_c (x, log scale), one colour per run.

    Marker shapes show each class's group; shaded bands show the groups' count ranges when the thresholds are
    given (tail: n_c < tail_threshold, head: n_c >= head_threshold). Counts below 1 are drawn at 1.
    """
    legend = [(s.name, s.color, None) for s in series] + [(g, "#555555", g) for g in GROUPS]
    body, top = _legend(legend, 56, width - 10)
    L, R, T, B = 56.0, 16.0, top + 14, 44.0
    counts = [max(p.count, 1.0) for s in series for p in s.points] or [1.0, 10.0]
    lo, hi = math.floor(math.log10(min(counts))), math.ceil(math.log10(max(counts)))
    hi = hi if hi > lo else lo + 1
    a0, a1 = lo - 0.03 * (hi - lo), hi + 0.02 * (hi - lo)  # log10 range with a margin: no marker on an axis

    def sx(n: float) -> float:
        return L + (math.log10(n) - a0) / (a1 - a0) * (width - L - R)

    def sy(ap: float) -> float:
        return T + (1 - ap / 100) * (height - T - B)

    if head_threshold is not None and tail_threshold is not None:
        edges = [10.0**a0, tail_threshold - 0.5, head_threshold - 0.5, 10.0**a1]
        for g, a, b in zip(("tail", "medium", "head"), edges, edges[1:], strict=False):
            xa, xb = sx(min(max(a, 10.0**a0), 10.0**a1)), sx(min(max(b, 10.0**a0), 10.0**a1))
            if xb - xa < 1:
                continue
            body.append(f'<rect x="{xa:.1f}" y="{T}" width="{xb - xa:.1f}" height="{height - T - B:.1f}" '
                        f'fill="{GROUP_COLORS[g]}" fill-opacity="0.07"/>')  # fmt: skip
            if xb - xa > 40:
                body.append(_text((xa + xb) / 2, T + 12, g, extra=f'fill="{GROUP_COLORS[g]}" font-weight="bold"'))
    body += _y_axis(nice_ticks(0, 100), sy, L, width - R, "AP (%)")
    for d in range(lo, hi + 1):  # decades labelled, 2..9 as minor grid lines
        body.append(f'<line x1="{sx(10**d):.1f}" x2="{sx(10**d):.1f}" y1="{T}" y2="{height - B}" stroke="#cfcfcf"/>')
        body.append(_text(sx(10**d), height - B + 14, _num(10**d)))
        for m in range(2, 10) if d < hi else ():
            xm = sx(m * 10**d)
            body.append(f'<line x1="{xm:.1f}" x2="{xm:.1f}" y1="{T}" y2="{height - B}" stroke="#f0f0f0"/>')
            if hi - lo <= 2 and m in (2, 5):
                body.append(_text(xm, height - B + 14, _num(m * 10**d), extra='fill="#777"'))
    body.append(_text((L + width - R) / 2, height - 8, "training images per class n_c (log scale)"))
    k = len(series)
    for i, s in enumerate(series):
        dx = (i - (k - 1) / 2) * 3.0  # small offset per run so markers at the same n_c do not hide each other
        if s.mean is not None:
            y = sy(s.mean)
            body.append(f'<line x1="{L}" x2="{width - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="{s.color}" '
                        f'stroke-dasharray="5 4"><title>{escape(s.name)}: mAP {s.mean:.2f}</title></line>')  # fmt: skip
        body += [marker(p.group, sx(max(p.count, 1.0)) + dx, sy(p.ap), s.color, title=p.label) for p in s.points]
    return _svg(width, height, "per-class AP against training images per class", body)


def count_bars(
    names: Sequence[str],
    counts: Sequence[int],
    groups: Sequence[str | None],
    head_threshold: float | None = None,
    tail_threshold: float | None = None,
    height: float = 360,
) -> str:
    """Bar chart of training images per class, sorted in descending order and coloured by group."""
    order = sorted(range(len(names)), key=lambda i: (-counts[i], names[i]))
    longest = max((min(len(n), 18) for n in names), default=1)
    L, R, T, B = 56.0, 16.0, 34.0, 24 + 5.2 * longest
    bar = 14.0 if len(names) <= 60 else 11.0
    width = max(480.0, L + R + bar * len(names))
    step = (width - L - R) / max(len(names), 1)
    ticks = nice_ticks(0, max(max(counts, default=1), 1))

    def sy(v: float) -> float:
        return T + (1 - v / ticks[-1]) * (height - T - B)

    items = [(g, GROUP_COLORS[g], None) for g in GROUPS if g in groups]
    body, _ = _legend(items, L, width)
    body += _y_axis(ticks, sy, L, width - R, "training images")
    for rank, i in enumerate(order):
        x, color = L + rank * step, GROUP_COLORS.get(groups[i], GROUP_COLORS[None])
        tip = escape(f"{names[i]}: {counts[i]} training images ({groups[i] or 'no group'})")
        top, w = sy(counts[i]), max(step - 2, 1)
        body.append(f'<rect x="{x + 1:.1f}" y="{top:.1f}" width="{w:.1f}" height="{sy(0) - top:.1f}" fill="{color}">'
                    f"<title>{tip}</title></rect>")  # fmt: skip
        label = names[i] if len(names[i]) <= 18 else names[i][:17] + "\u2026"
        cx, cy = x + step / 2 + 3, height - B + 8
        body.append(_text(cx, cy, label, "end", f'font-size="10" transform="rotate(-55 {cx:.1f} {cy:.1f})"'))
    for name, t in (("head", head_threshold), ("tail", tail_threshold)):
        if t is not None and 0 < t <= ticks[-1]:
            y = sy(t)
            body.append(f'<line x1="{L}" x2="{width - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GROUP_COLORS[name]}" '
                        'stroke-dasharray="4 3"/>')  # fmt: skip
            bound = f"head: n_c \u2265 {_num(t)}" if name == "head" else f"tail: n_c < {_num(t)}"
            body.append(_text(width - R - 2, y - 3, bound, "end", f'fill="{GROUP_COLORS[name]}"'))
    return _svg(width, height, "training images per class", body)


def line_chart(
    points: Sequence[tuple[float, float]],
    color: str,
    x_label: str = "step",
    y_label: str = "loss",
    width: float = 340,
    height: float = 190,
) -> str:
    """A small line chart of (x, y) points (e.g. training loss against step)."""
    L, R, T, B = 52.0, 12.0, 10.0, 34.0
    xs, ys = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
    xt, yt = nice_ticks(min(xs), max(xs), 4), nice_ticks(min(ys), max(ys), 4)

    def sx(v: float) -> float:
        return L + (v - xt[0]) / (xt[-1] - xt[0]) * (width - L - R)

    def sy(v: float) -> float:
        return T + (1 - (v - yt[0]) / (yt[-1] - yt[0])) * (height - T - B)

    body = _y_axis(yt, sy, L, width - R, y_label)
    body += [_text(sx(t), height - B + 14, _num(t)) for t in xt]
    body.append(_text((L + width - R) / 2, height - 4, x_label))
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    if len(points) > 1:
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
    for x, y in points if len(points) <= 40 else points[-1:]:
        body.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}">'
                    f"<title>{escape(x_label)} {_num(x)}: {escape(y_label)} {y:.4g}</title></circle>")  # fmt: skip
    return _svg(width, height, f"{y_label} against {x_label}", body)
