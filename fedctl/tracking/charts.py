"""Charts for run reports: line charts, bar charts and heatmaps as inline SVG, or PNG.

The SVG is written here, by hand, so an HTML report needs no plotting library and stays one
self-contained file (a few kB per chart, readable in any browser, no script). PNGs (``fedctl
report --png``) are drawn from the same chart descriptions with matplotlib, the optional
``fedctl[report]`` extra, imported only then. Every piece of text that reaches the SVG is
escaped: site names, tags and error messages come from sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

#: colours of successive series (colour-blind-safe "Tableau 10")
PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]
#: legend entries shown before "+N more"
LEGEND_MAX = 12
W, H = 680, 300
LEFT, RIGHT, TOP, BOTTOM = 80, 150, 30, 44


@dataclass
class Series:
    """One line (x, y points) or one bar segment per category (``values``)."""

    name: str
    points: list[tuple[float, float]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    color: str | None = None


@dataclass
class LineChart:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    unit: str = ""  # "bytes", "s" or "" (how tick labels are written)


@dataclass
class BarChart:
    title: str
    xlabel: str
    ylabel: str
    categories: list[str]
    series: list[Series]
    stacked: bool = False
    unit: str = ""


@dataclass
class Heatmap:
    title: str
    rows: list[str]
    cols: list[str]
    values: list[list[float | None]]
    row_label: str = ""
    col_label: str = ""


Chart = LineChart | BarChart | Heatmap


# ---------------------------------------------------------------------------- numbers


def fmt(value: float, unit: str = "") -> str:
    """A tick or cell label: 4 significant digits; bytes in KiB/MiB/GiB."""
    if unit == "bytes":
        for suffix, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= size:
                return f"{value / size:.3g} {suffix}"
        return f"{value:.0f} B"
    text = f"{value:.4g}"
    return f"{text} s" if unit == "s" else text


def nice_ticks(
    lo: float, hi: float, count: int = 5, *, integer: bool = False, unit: str = ""
) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (whole numbers with ``integer``;
    round numbers of KiB, MiB or GiB for bytes)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if unit == "bytes":
        scale = 1024 ** min(3, int(math.log(max(abs(hi), abs(lo), 1.0), 1024)))
        if scale > 1:
            return [t * scale for t in nice_ticks(lo / scale, hi / scale, count)]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, math.ceil(step))
    start = math.floor(lo / step) * step
    ticks: list[float] = []
    v = start
    while v <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(round(v, 12))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 12))
    return ticks


def slug(text: str, limit: int = 60) -> str:
    """``text`` as a short ASCII file-name part (``ε (epsilon) over rounds`` →
    ``epsilon-over-rounds``)."""
    out = "".join(c if c.isascii() and c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in out.split("-") if p)[:limit] or "chart"


def _color(series: Series, i: int) -> str:
    return series.color or PALETTE[i % len(PALETTE)]


# ---------------------------------------------------------------------------- SVG


def _frame(title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" '
        f'height="{H}" role="img" aria-label="{escape(title)}" class="chart">',
        f"<title>{escape(title)}</title>",
        f'<text x="{LEFT}" y="18" class="ct">{escape(title)}</text>',
    ]


def _axes(
    lo: float,
    hi: float,
    ticks: list[float],
    xlabel: str,
    ylabel: str,
    unit: str,
) -> tuple[list[str], Any]:
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    top, bottom = max(ticks[-1], hi), min(ticks[0], lo)
    span = (top - bottom) or 1.0

    def y_of(v: float) -> float:
        return TOP + ph - (v - bottom) / span * ph

    out = [f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="pl"/>']
    for t in ticks:
        y = y_of(t)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" class="gr"/>')
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="tk" text-anchor="end">'
            f"{escape(fmt(t, unit))}</text>"
        )
    out.append(
        f'<text x="{LEFT + pw / 2:.0f}" y="{H - 6}" class="al" text-anchor="middle">'
        f"{escape(xlabel)}</text>"
    )
    mid = TOP + ph / 2
    out.append(
        f'<text x="12" y="{mid:.0f}" class="al" text-anchor="middle" '
        f'transform="rotate(-90 12 {mid:.0f})">{escape(ylabel[:40])}</text>'
    )
    return out, y_of


def _legend(series: list[Series]) -> list[str]:
    out = []
    x = W - RIGHT + 12
    shown = series[:LEGEND_MAX]
    for i, s in enumerate(shown):
        y = TOP + 8 + i * 16
        out.append(f'<rect x="{x}" y="{y - 8}" width="10" height="10" fill="{_color(s, i)}"/>')
        out.append(f'<text x="{x + 15}" y="{y + 1}" class="lg">{escape(s.name[:22])}</text>')
    if len(series) > len(shown):
        y = TOP + 8 + len(shown) * 16
        out.append(f'<text x="{x}" y="{y + 1}" class="lg">+{len(series) - len(shown)} more</text>')
    return out


def _line_svg(chart: LineChart) -> str:
    out = _frame(chart.title)
    pts = [p for s in chart.series for p in s.points]
    if not pts:
        out.append(f'<text x="{LEFT}" y="{H / 2:.0f}" class="al">no data</text></svg>')
        return "\n".join(out)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ticks = nice_ticks(min(ys), max(ys), unit=chart.unit)
    axes, y_of = _axes(min(ys), max(ys), ticks, chart.xlabel, chart.ylabel, chart.unit)
    out += axes
    pw = W - LEFT - RIGHT
    x_lo, x_hi = min(xs), max(xs)
    x_span = (x_hi - x_lo) or 1.0

    def x_of(v: float) -> float:
        pad = 10
        return LEFT + pad + (v - x_lo) / x_span * (pw - 2 * pad) if x_hi > x_lo else LEFT + pw / 2

    whole = all(float(x).is_integer() for x in xs)
    for t in nice_ticks(x_lo, x_hi, 6, integer=whole):
        if x_lo <= t <= x_hi:
            out.append(
                f'<text x="{x_of(t):.1f}" y="{H - BOTTOM + 16}" class="tk" '
                f'text-anchor="middle">{escape(fmt(t))}</text>'
            )
    for i, s in enumerate(chart.series):
        if not s.points:
            continue
        color = _color(s, i)
        coords = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in s.points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8">')
        out.append(f"<title>{escape(s.name)}</title></polyline>")
        if len(s.points) <= 60:
            for x, y in s.points:
                out.append(
                    f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="2.6" fill="{color}">'
                    f"<title>{escape(s.name)}: {escape(fmt(x))} → "
                    f"{escape(fmt(y, chart.unit))}</title></circle>"
                )
    out += _legend(chart.series)
    out.append("</svg>")
    return "\n".join(out)


def _bar_svg(chart: BarChart) -> str:
    out = _frame(chart.title)
    n = len(chart.categories)
    if not n or not chart.series:
        out.append(f'<text x="{LEFT}" y="{H / 2:.0f}" class="al">no data</text></svg>')
        return "\n".join(out)
    if chart.stacked:
        top = max(sum(s.values[i] for s in chart.series) for i in range(n))
    else:
        top = max(max(s.values) for s in chart.series)
    ticks = nice_ticks(0.0, top or 1.0, unit=chart.unit)
    axes, y_of = _axes(0.0, top, ticks, chart.xlabel, chart.ylabel, chart.unit)
    out += axes
    pw = W - LEFT - RIGHT
    slot = pw / n
    width = slot * 0.8
    label_every = max(1, math.ceil(n / 20))
    for i, cat in enumerate(chart.categories):
        x0 = LEFT + i * slot + slot * 0.1
        base = 0.0
        for j, s in enumerate(chart.series):
            v = s.values[i]
            if chart.stacked:
                y1, y0 = y_of(base + v), y_of(base)
                x, w = x0, width
                base += v
            else:
                w = width / len(chart.series)
                x = x0 + j * w
                y1, y0 = y_of(v), y_of(0.0)
            if v:
                out.append(
                    f'<rect x="{x:.1f}" y="{y1:.1f}" width="{max(w, 0.5):.1f}" '
                    f'height="{max(y0 - y1, 0.0):.1f}" fill="{_color(s, j)}">'
                    f"<title>{escape(cat)} · {escape(s.name)}: "
                    f"{escape(fmt(v, chart.unit))}</title></rect>"
                )
        if i % label_every == 0:
            out.append(
                f'<text x="{x0 + width / 2:.1f}" y="{H - BOTTOM + 16}" class="tk" '
                f'text-anchor="middle">{escape(cat)}</text>'
            )
    out += _legend(chart.series)
    out.append("</svg>")
    return "\n".join(out)


def _heat_color(t: float) -> str:
    """White → blue for t in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    r, g, b = (int(255 + (c - 255) * t) for c in (0x2B, 0x5C, 0x9E))
    return f"#{r:02x}{g:02x}{b:02x}"


def _heatmap_svg(chart: Heatmap) -> str:
    rows, cols = chart.rows, chart.cols
    cell_w = max(24.0, min(72.0, 520 / max(len(cols), 1)))
    cell_h = max(14.0, min(28.0, 420 / max(len(rows), 1)))
    left, top = 150, 64
    width = left + cell_w * len(cols) + 20
    height = top + cell_h * len(rows) + 20
    vals = [v for row in chart.values for v in row if v is not None]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    span = (hi - lo) or 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" role="img" class="chart" '
        f'aria-label="{escape(chart.title)}">',
        f"<title>{escape(chart.title)}</title>",
        f'<text x="10" y="18" class="ct">{escape(chart.title)}</text>',
        f'<text x="10" y="{top - 30}" class="al">rows: {escape(chart.row_label)} · columns: '
        f"{escape(chart.col_label)}</text>",
    ]
    show_text = len(cols) <= 16 and len(rows) <= 24
    for j, col in enumerate(cols):
        x = left + j * cell_w + cell_w / 2
        out.append(
            f'<text x="{x:.1f}" y="{top - 8}" class="tk" text-anchor="middle">'
            f"{escape(col[:10])}</text>"
        )
    for i, row in enumerate(rows):
        y = top + i * cell_h
        out.append(
            f'<text x="{left - 6}" y="{y + cell_h / 2 + 4:.1f}" class="tk" text-anchor="end">'
            f"{escape(row[:24])}</text>"
        )
        for j, col in enumerate(cols):
            v = chart.values[i][j]
            x = left + j * cell_w
            fill = _heat_color((v - lo) / span) if v is not None else "#eeeeee"
            label = fmt(v) if v is not None else "–"
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell_w:.1f}" height="{cell_h:.1f}" '
                f'fill="{fill}" stroke="#fff"><title>{escape(row)} on {escape(col)}: '
                f"{escape(label)}</title></rect>"
            )
            if show_text:
                dark = v is not None and (v - lo) / span > 0.6
                out.append(
                    f'<text x="{x + cell_w / 2:.1f}" y="{y + cell_h / 2 + 4:.1f}" '
                    f'class="cv{" dk" if dark else ""}" text-anchor="middle">'
                    f"{escape(label)}</text>"
                )
    out.append("</svg>")
    return "\n".join(out)


def svg(chart: Chart) -> str:
    """The chart as one ``<svg>`` element."""
    if isinstance(chart, LineChart):
        return _line_svg(chart)
    if isinstance(chart, BarChart):
        return _bar_svg(chart)
    return _heatmap_svg(chart)


# ---------------------------------------------------------------------------- PNG


def matplotlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def png(chart: Chart, path: Path) -> None:
    """Draw ``chart`` into ``path`` with matplotlib (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(chart.title, fontsize=10, loc="left")
    if isinstance(chart, LineChart):
        for i, s in enumerate(chart.series):
            if s.points:
                xs, ys = zip(*s.points, strict=True)
                ax.plot(
                    xs,
                    ys,
                    marker="o" if len(xs) <= 60 else None,
                    ms=3,
                    color=_color(s, i),
                    label=s.name[:22],
                )
        ax.set_xlabel(chart.xlabel)
        ax.set_ylabel(chart.ylabel)
    elif isinstance(chart, BarChart):
        n = len(chart.categories)
        cats = list(range(n))
        base = [0.0] * n
        width = 0.8 / (1 if chart.stacked else max(len(chart.series), 1))
        for j, s in enumerate(chart.series):
            if chart.stacked:
                ax.bar(cats, s.values, 0.8, bottom=base, color=_color(s, j), label=s.name)
                base = [b + v for b, v in zip(base, s.values, strict=True)]
            else:
                shifted = [x - 0.4 + width * (j + 0.5) for x in cats]
                ax.bar(shifted, s.values, width, color=_color(s, j), label=s.name)
        step = max(1, math.ceil(n / 20))
        ax.set_xticks(cats[::step], chart.categories[::step])
        ax.set_xlabel(chart.xlabel)
        ax.set_ylabel(chart.ylabel)
    else:
        import numpy as np

        data = np.array([[np.nan if v is None else v for v in row] for row in chart.values])
        image = ax.imshow(data, cmap="Blues", aspect="auto")
        ax.set_xticks(range(len(chart.cols)), [c[:10] for c in chart.cols], fontsize=8)
        ax.set_yticks(range(len(chart.rows)), [r[:24] for r in chart.rows], fontsize=8)
        ax.set_xlabel(chart.col_label)
        ax.set_ylabel(chart.row_label)
        fig.colorbar(image, ax=ax)
        if len(chart.cols) <= 16 and len(chart.rows) <= 24:
            finite = data[~np.isnan(data)]
            mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
            for i, row in enumerate(chart.values):
                for j, v in enumerate(row):
                    if v is not None:
                        ax.text(
                            j,
                            i,
                            fmt(v),
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="white" if v > mid else "black",
                        )
    if isinstance(chart, LineChart | BarChart) and chart.series:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(
                handles[:LEGEND_MAX],
                labels[:LEGEND_MAX],
                fontsize=7,
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                frameon=False,
            )
    fig.tight_layout()
    fig.savefig(path, format="png")
