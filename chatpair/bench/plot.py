"""``chatpair bench --plot FILE``: the run as a picture, SVG written with the standard library.

Two charts, one above the other, drawn from exactly what ``--json`` prints:

* **latency** - how many messages took how long: the histogram's buckets
  (:class:`~chatpair.bench.histogram.LogHistogram`, regrouped into eight
  bins per doubling) as bars on a log time axis, the cumulative share as a
  line over them (right axis), and p50, p99 and p99.9 marked. Idle mode,
  which sends no messages, draws its time to pair instead.
* **throughput over time** - messages delivered per second (per 0.1 s in
  runs under 10 s: :meth:`BenchResult.throughput_series`), with the mean.

:func:`render_svg` returns the SVG text; :func:`write_plot` writes it, or a
PNG through ``rsvg-convert`` (librsvg) when the name ends in ``.png`` - no
Python dependency for either.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from xml.sax.saxutils import escape

from chatpair.bench.histogram import LogHistogram
from chatpair.bench.report import format_ns
from chatpair.bench.result import BenchResult
from chatpair.errors import ConfigError

WIDTH, HEIGHT = 960, 780
LEFT, RIGHT = 90, 80  # margins around a chart's plotting area
BINS_PER_OCTAVE = 8
BAR, CDF, FLOW, INK, GRID, MUTED = "#4C78A8", "#E45756", "#54A24B", "#222", "#e4e4e4", "#666"
FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"


def check_plot_path(path: str) -> None:
    """Refuse, before the run, a name that cannot be written (ConfigError)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".svg", ".png"):
        raise ConfigError(f"--plot {path}: the name must end in .svg or .png")
    if ext == ".png" and shutil.which("rsvg-convert") is None:
        raise ConfigError("--plot as PNG needs rsvg-convert (Debian/Ubuntu: apt install librsvg2-bin); "
                          "or write .svg")


def write_plot(result: BenchResult, path: str) -> None:
    """Write the picture of ``result`` to ``path`` (.svg, or .png via rsvg-convert)."""
    check_plot_path(path)
    svg = render_svg(result)
    if path.lower().endswith(".svg"):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(svg)
        return
    with tempfile.NamedTemporaryFile("w", suffix=".svg", encoding="utf-8", delete=False) as tmp:
        tmp.write(svg)
    try:
        proc = subprocess.run(["rsvg-convert", "--format", "png", "--zoom", "1.5", "--output", path, tmp.name],
                              capture_output=True, text=True, timeout=60, check=False)
    finally:
        os.unlink(tmp.name)
    if proc.returncode != 0:
        raise ConfigError(f"--plot {path}: rsvg-convert failed: {proc.stderr.strip()[:200]}")


# -- axes ----------------------------------------------------------------------------------


def nice_ticks(hi: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2 or 5 times a power of ten) up to at least ``hi``."""
    if hi <= 0:
        return [0.0, 1.0]
    raw = hi / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    n = math.ceil(hi / step - 1e-9)
    return [i * step for i in range(n + 1)]


def si(v: float) -> str:
    """``1.2M``, ``850k``, ``12``: a rate for an axis label."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def time_label(ns: float) -> str:
    """An axis label for a duration: ``500 ns``, ``2 µs``, ``1 ms``, ``1.5 s``."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def time_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 steps between ``lo`` and ``hi`` ns (only powers of ten when that is too many)."""
    decades = range(math.floor(math.log10(max(lo, 1))), math.ceil(math.log10(max(hi, 1))) + 1)
    ticks = [m * 10 ** e for e in decades for m in (1, 2, 5) if lo <= m * 10 ** e <= hi]
    if len(ticks) < 3:  # a narrow range: every digit
        ticks = [m * 10 ** e for e in decades for m in range(1, 10) if lo <= m * 10 ** e <= hi]
    if len(ticks) > 9:
        ticks = [t for t in ticks if str(int(t)).startswith("1")]
    return ticks


class Canvas:
    """SVG elements collected in order; :meth:`svg` wraps them in the document."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(self, x: float, y: float, s: str, size: int = 12, anchor: str = "start", color: str = INK,
             weight: str = "normal", rotate: bool = False, halo: bool = False) -> None:
        turn = f" transform='rotate(-90 {x:.1f} {y:.1f})'" if rotate else ""
        # halo: a white outline under the glyphs keeps a label readable over the lines it crosses
        ring = " stroke='white' stroke-width='3' paint-order='stroke'" if halo else ""
        self.add(f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' fill='{color}' "
                 f"font-weight='{weight}'{turn}{ring}>{escape(s)}</text>")

    def line(self, x1: float, y1: float, x2: float, y2: float, color: str = GRID, width: float = 1,
             dash: str = "") -> None:
        d = f" stroke-dasharray='{dash}'" if dash else ""
        self.add(f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' stroke='{color}' "
                 f"stroke-width='{width}'{d}/>")

    def svg(self) -> str:
        head = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
                f"viewBox='0 0 {WIDTH} {HEIGHT}' {FONT}>\n<rect width='100%' height='100%' fill='white'/>\n")
        return head + "\n".join(self.parts) + "\n</svg>\n"


# -- the charts ----------------------------------------------------------------------------


#: The marked percentiles, each with its colour (line and label share it, so they pair up at a glance).
PERCENTILES = ((50, "p50", INK), (99, "p99", "#7B3FA0"), (99.9, "p99.9", "#B35900"))
LABEL_SIZE = 11
#: Rows of percentile labels are this far apart (px); a label is this far from its line.
ROW, GAP = 14, 4
#: How far right of the plotting area a label may reach (below the top row, clear of
#: the "100%" tick and the right axis title).
MARGIN_REACH = RIGHT - 34


def text_width(text: str, size: int = LABEL_SIZE) -> float:
    """About how wide ``text`` is drawn in DejaVu Sans (px): narrow . and spaces, wide m."""
    em = sum(0.32 if ch in " .,:;|!il" else 0.98 if ch in "mMW" else 0.64 for ch in text)
    return em * size + 2


@dataclass(frozen=True)
class Placed:
    """Where a line's label goes: beside its line (``anchor`` start: right of it; end: left), on ``row``."""

    index: int
    text: str
    anchor_x: float
    anchor: str
    row: int
    left: float
    right: float


def out_of_order(a: tuple[float, float, str, int], b: tuple[float, float, str, int]) -> bool:
    """Are labels ``a`` (of the lower value) and ``b`` (left, right, anchor, ...) swapped on the page?

    On the same side of their lines, by the edge that touches the line; on
    opposite sides, by their middles.
    """
    if a[2] == b[2]:
        edge = 0 if a[2] == "start" else 1
        return a[edge] > b[edge] + 0.5
    return (a[0] + a[1]) / 2 > (b[0] + b[1]) / 2 + 0.5


def place_labels(marks: list[tuple[float, str]], x0: float, x1: float) -> list[Placed]:
    """Labels for vertical lines at ``x`` (in value order), each beside its own line, never swapped.

    Each label goes right or left of its line (near the right end it may
    reach into the margin, below the top row). Of all the ways to place them
    (two or three labels: a handful), the one chosen keeps the labels in the
    order of their lines from left to right, then crosses the fewest other
    lines, then reaches into the margin least, then puts the fewest on the
    left. Labels that would overlap go on separate rows, staggered down in
    value order: two close lines get a label each side, or one row apart.
    """
    xs = [xv for xv, _ in marks]

    def crossings(lo: float, hi: float, own: float) -> int:
        return sum(1 for xv in xs if lo - GAP < xv < hi + GAP and abs(xv - own) > 0.5)

    options: list[list[tuple[float, float, str, int]]] = []  # per label: (left, right, anchor, lowest row)
    for xv, text in marks:
        w = text_width(text)
        sides = [(xv + GAP, xv + GAP + w, "start", 0 if xv + GAP + w <= x1 else 1),
                 (xv - GAP - w, xv - GAP, "end", 0)]
        options.append([o for o in sides if o[0] >= x0 and o[1] <= x1 + MARGIN_REACH] or sides[:1])

    def cost(choice: tuple[tuple[float, float, str, int], ...]) -> tuple[int, int, int, int]:
        swapped = sum(1 for i, a in enumerate(choice) for b in choice[i + 1:] if out_of_order(a, b))
        crossed = sum(crossings(lo, hi, xv) for (lo, hi, _, _), xv in zip(choice, xs))
        return (swapped, crossed, sum(row for *_, row in choice), sum(a == "end" for _, _, a, _ in choice))

    best = min(itertools.product(*options), key=cost) if marks else ()
    placed: list[Placed] = []
    for i, ((xv, text), (lo, hi, anchor, row)) in enumerate(zip(marks, best)):
        for other in placed:  # below every earlier label it would touch: value order, top to bottom
            if lo < other.right + GAP and other.left < hi + GAP:
                row = max(row, other.row + 1)
        placed.append(Placed(i, text, xv + (GAP if anchor == "start" else -GAP), anchor, row, lo, hi))
    return placed


def latency_bins(hist: LogHistogram) -> list[tuple[float, float, int]]:
    """The histogram regrouped: ``(low, high, count)`` per eighth of a doubling, gaps included."""
    per: dict[int, int] = {}
    for idx, n in hist.counts.items():
        low, high = hist.bounds(idx)
        j = math.floor(math.log2(max((low + high) / 2, 1)) * BINS_PER_OCTAVE)
        per[j] = per.get(j, 0) + n
    if not per:
        return []
    return [(2 ** (j / BINS_PER_OCTAVE), 2 ** ((j + 1) / BINS_PER_OCTAVE), per.get(j, 0))
            for j in range(min(per), max(per) + 1)]


def _latency_chart(c: Canvas, hist: LogHistogram, title: str, top: float, height: float,
                   what: str = "messages") -> None:
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, top + height, top
    c.text(x0, top - 14, title, 15, weight="bold")
    bins = latency_bins(hist)
    if not bins:
        c.text((x0 + x1) / 2, (y0 + y1) / 2, "no samples", 14, "middle", MUTED)
        return
    total = sum(n for _, _, n in bins)
    lo, hi = bins[0][0] / 1.25, bins[-1][1] * 1.25
    llo, lhi = math.log2(lo), math.log2(hi)

    def x(v: float) -> float:
        return x0 + (math.log2(max(v, lo)) - llo) / (lhi - llo) * (x1 - x0)

    share_ticks = nice_ticks(100 * max(n for _, _, n in bins) / total, 4)
    top_share = share_ticks[-1]

    def y(share: float) -> float:
        return y0 - share / top_share * (y0 - y1)

    for t in share_ticks:
        c.line(x0, y(t), x1, y(t))
        c.text(x0 - 8, y(t) + 4, f"{t:g}%", 11, "end", MUTED)
    for t in time_ticks(lo, hi):
        c.line(x(t), y0, x(t), y0 + 5, MUTED)
        c.text(x(t), y0 + 19, time_label(t), 11, "middle", MUTED)
    for low, high, n in bins:
        if n:
            h = 100 * n / total / top_share * (y0 - y1)
            c.add(f"<rect x='{x(low) + 0.5:.1f}' y='{y0 - h:.1f}' width='{max(x(high) - x(low) - 1, 1):.1f}' "
                  f"height='{h:.1f}' fill='{BAR}' fill-opacity='0.85'/>")
    # the cumulative share, on the right axis, from the fine buckets
    seen = 0
    points = [f"{x(lo):.1f},{y0:.1f}"]
    for idx in sorted(hist.counts):
        seen += hist.counts[idx]
        points.append(f"{x(hist.bounds(idx)[1]):.1f},{y0 - seen / total * (y0 - y1):.1f}")
    points.append(f"{x1:.1f},{y1:.1f}")
    c.add(f"<polyline points='{' '.join(points)}' fill='none' stroke='{CDF}' stroke-width='2'/>")
    for pct in (0, 25, 50, 75, 100):
        yy = y0 - pct / 100 * (y0 - y1)
        c.text(x1 + 8, yy + 4, f"{pct}%", 11, "start", CDF)
    marks = [(x(v), f"{label} {format_ns(v)}", color) for p, label, color in PERCENTILES
             if (v := hist.percentile(p)) is not None]
    for xv, _, color in marks:
        c.line(xv, y1, xv, y0, color, 1.2, "4 3")
    for mark in place_labels([(xv, text) for xv, text, _ in marks], x0, x1):
        color = marks[mark.index][2]
        c.text(mark.anchor_x, y1 + 12 + ROW * mark.row, mark.text, LABEL_SIZE, mark.anchor, color, halo=True)
    c.line(x0, y0, x1, y0, INK)
    c.text(x0 - 58, (y0 + y1) / 2, f"share of {what}", 12, "middle", MUTED, rotate=True)
    c.text(x1 + 60, (y0 + y1) / 2, f"{what} at or below (cumulative)", 12, "middle", CDF, rotate=True)
    c.text((x0 + x1) / 2, y0 + 38, "time taken (log scale)", 12, "middle", MUTED)


def _throughput_chart(c: Canvas, result: BenchResult, top: float, height: float) -> None:
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, top + height, top
    series = result.throughput_series()
    per = "second" if series["interval_s"] >= 1 else "0.1 s"
    c.text(x0, top - 14, f"Throughput over time (messages delivered per second, measured per {per})", 15,
           weight="bold")
    rates: list[float] = series["msgs_per_s"]
    if not rates or result.elapsed <= 0:
        why = "idle mode sends no messages" if result.mode == "idle" else "no messages were delivered"
        c.text((x0 + x1) / 2, (y0 + y1) / 2, why, 14, "middle", MUTED)
        c.line(x0, y0, x1, y0, INK)
        return
    end = max(result.elapsed, series["start_s"][-1] + series["width_s"][-1])
    rate_ticks = nice_ticks(max(rates) * 1.05, 4)
    t_ticks = [t for t in nice_ticks(end, 8) if t <= end * 1.001]

    def x(t: float) -> float:
        return x0 + t / end * (x1 - x0)

    def y(r: float) -> float:
        return y0 - r / rate_ticks[-1] * (y0 - y1)

    for t in rate_ticks:
        c.line(x0, y(t), x1, y(t))
        c.text(x0 - 8, y(t) + 4, si(t), 11, "end", MUTED)
    for t in t_ticks:
        c.line(x(t), y0, x(t), y0 + 5, MUTED)
        c.text(x(t), y0 + 19, f"{t:g} s", 11, "middle", MUTED)
    steps: list[str] = []
    for start, width, rate in zip(series["start_s"], series["width_s"], rates):
        steps += [f"{x(start):.1f},{y(rate):.1f}", f"{x(start + width):.1f},{y(rate):.1f}"]
    first, last = x(series["start_s"][0]), x(series["start_s"][-1] + series["width_s"][-1])
    c.add(f"<polygon points='{first:.1f},{y0:.1f} {' '.join(steps)} {last:.1f},{y0:.1f}' fill='{FLOW}' "
          f"fill-opacity='0.22' stroke='none'/>")
    c.add(f"<polyline points='{' '.join(steps)}' fill='none' stroke='{FLOW}' stroke-width='2'/>")
    mean = sum(series["delivered"]) / end
    c.line(x0, y(mean), x1, y(mean), INK, 1, "6 4")
    c.text(x1 - 4, y(mean) - 6, f"mean {si(mean)} msgs/s", 11, "end")
    c.line(x0, y0, x1, y0, INK)
    c.text(x0 - 58, (y0 + y1) / 2, "messages per second", 12, "middle", MUTED, rotate=True)
    c.text((x0 + x1) / 2, y0 + 38, "seconds since the load started", 12, "middle", MUTED)


def _headline(result: BenchResult) -> str:
    r = result
    parts = [r.mode, f"{r.pairs:,} pair{'' if r.pairs == 1 else 's'}", f"{r.size} B messages"]
    if r.config.get("resume"):
        parts.append("with resume (ACKs)")
    if r.server_command:
        extra = r.server_command[r.server_command.index("-q") + 1:] if "-q" in r.server_command else []
        parts.append("server " + (" ".join(extra) if extra else "defaults"))
    elif r.config.get("target"):
        host, port = r.config["target"]
        parts.append(f"server {host}:{port}")
    return "chatpair bench · " + " · ".join(parts)


def _figures(result: BenchResult) -> str:
    r = result
    out: list[str] = []
    if r.mode == "idle":
        out.append(f"{r.pairs_connected:,} pairs paired at {r.pairs_per_s:,.0f} pairs/s")
        if r.memory_per_pair is not None:
            out.append(f"{r.memory_per_pair / 1024:,.1f} KiB per pair")
    else:
        out.append(f"{r.msgs_per_s:,.0f} msgs/s over {r.elapsed:.2f} s")
        s = r.latency.summary()
        out.append(f"one-way p50 {format_ns(s['p50'])}, p99 {format_ns(s['p99'])}")
        if r.rtt.total:
            out.append(f"round trip p50 {format_ns(r.rtt.percentile(50))}")
        out.append(f"{r.lost} lost" if not r.interrupted else "interrupted")
    failures = r.failures
    out.append("OK" if not failures else "FAIL")
    return "  ·  ".join(out)


def render_svg(result: BenchResult) -> str:
    """The two charts of ``result`` as an SVG document."""
    c = Canvas()
    c.text(LEFT, 34, _headline(result), 18, weight="bold")
    c.text(LEFT, 56, _figures(result), 13, color=MUTED)
    for i, warning in enumerate(result.warnings[:2]):
        c.text(LEFT, 74 + 15 * i, "⚠ " + warning, 11, color="#b35900")
    if result.mode == "idle":
        _latency_chart(c, result.pair_time, "Time to pair: from connect to PAIRED, per client", 130, 270,
                       "clients")
    else:
        _latency_chart(c, result.latency, "One-way latency: how many messages took how long", 130, 270)
    _throughput_chart(c, result, 510, 200)
    return c.svg()
