"""Rendering a :class:`~chatpair.bench.result.BenchResult` for a terminal: text only, no click.

* :func:`render` - the table of figures plus the latency histogram;
* :func:`render_histogram` - one row per power of two (log scale), bars drawn
  with the eighth blocks ``▏▎▍▌▋▊▉█`` so short bars still show their length;
* :class:`ProgressBar` - a one-line bar redrawn in place on a terminal.
"""

from __future__ import annotations

import time
from typing import TextIO

from chatpair.bench.histogram import LogHistogram
from chatpair.bench.result import BenchResult

_EIGHTHS = " ▏▎▍▌▋▊▉"


def format_ns(v: float | None) -> str:
    """A duration in nanoseconds, in the unit that reads best."""
    if v is None:
        return "-"
    if v < 1_000:
        return f"{v:.0f} ns"
    if v < 1_000_000:
        return f"{v / 1e3:.1f} µs" if v < 100_000 else f"{v / 1e3:.0f} µs"
    if v < 1_000_000_000:
        return f"{v / 1e6:.2f} ms" if v < 100_000_000 else f"{v / 1e6:.0f} ms"
    return f"{v / 1e9:.2f} s"


def format_bytes(v: float | None) -> str:
    if v is None:
        return "-"
    sign = "-" if v < 0 else ""
    v = abs(v)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{sign}{v:.0f} {unit}" if unit == "B" else f"{sign}{v:.1f} {unit}"
        v /= 1024
    return f"{v}"  # pragma: no cover


def _count(v: float) -> str:
    return f"{v:,.0f}"


def bar(fraction: float, width: int) -> str:
    """A bar of ``fraction`` (0..1) of ``width`` cells, in eighths of a cell."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[part] if part else "")


def render_histogram(hist: LogHistogram, title: str = "latency", width: int = 40) -> str:
    """Rows ``[low, high)  bar  percent  count``, one per power of two."""
    rows = hist.octaves()
    if not rows:
        return f"{title}: no samples"
    total = sum(n for _, _, n in rows) or 1
    peak = max(n for _, _, n in rows) or 1
    lines = [f"{title} histogram (log scale, {total:,} samples)"]
    for low, high, n in rows:
        label = f"{format_ns(low):>9} - {format_ns(high):<9}"
        lines.append(f"  {label} │{bar(n / peak, width):<{width}} {100 * n / total:5.1f}% {n:>12,}")
    return "\n".join(lines)


def _latency_row(name: str, hist: LogHistogram) -> tuple[str, str]:
    s = hist.summary()
    return name, "  ".join(f"{k} {format_ns(s[k])}" for k in ("p50", "p90", "p99", "p99.9", "max"))


def _target_rows(r: BenchResult) -> list[tuple[str, str]]:
    """Per-target and cross-target figures (``--target H1:P1,H2:P2,...``)."""
    rows = [(f"target {i + 1}", (f"{t['target']}: {t['clients']:,} clients ({t['paired']:,} paired), "
                                 f"sent {_count(t['sent'])}, delivered {_count(t['delivered'])}"))
            for i, t in enumerate(r.targets)]
    what = f"{r.cross_target_pairs:,} of {r.pairs_connected:,} pairs had their partners on different targets"
    if r.mode != "idle" and r.delivered:
        what += f"; all {_count(r.delivered)} messages delivered crossed targets (latency below)"
    rows.append(("cross-target", what))
    return rows


def render_table(result: BenchResult) -> str:
    """The figures of a run as aligned ``label  value`` lines."""
    r = result
    rows: list[tuple[str, str]] = []
    cfg = r.config
    what = f"{r.mode}, {r.pairs:,} pairs, {r.size} B messages, {r.procs} load process(es)"
    if r.mode in ("flood", "pingpong", "churn"):
        what += f", {cfg.get('messages')} msgs/client" if cfg.get("messages") and r.mode != "churn" \
            else f", {cfg.get('duration')} s"
    rows.append(("run", what))
    if r.server_command:
        rows.append(("server", " ".join(["chatpair", *r.server_command[3:]])))
    elif len(r.targets) > 1:
        rows.append(("servers", (f"{len(r.targets)} targets (not started by bench): client k on target k mod "
                                 f"{len(r.targets)}, so partners are on different targets")))
    elif cfg.get("target"):
        host, port = cfg["target"]
        rows.append(("server", f"{host}:{port} (not started by bench)"))
    rows.append(("pairs paired", f"{r.pairs_connected:,}" + (f" in {r.connect_elapsed:.3f} s "
                 f"({r.pairs_per_s:,.0f} pairs/s)" if r.mode != "churn" and r.connect_elapsed else "")))
    if len(r.targets) > 1:
        rows.extend(_target_rows(r))
    if r.pair_time.total:
        s = r.pair_time.summary()
        rows.append(("time to pair", (f"p50 {format_ns(s['p50'])}  p99 {format_ns(s['p99'])}  "
                                       f"max {format_ns(s['max'])}")))
    if r.mode == "churn":
        rows.append(("pairs completed", f"{r.churn_cycles:,} in {r.elapsed:.2f} s ({r.pairs_per_s:,.0f} pairs/s)"))
    if r.mode != "idle":
        rows.append(("messages", f"sent {_count(r.sent)}  delivered {_count(r.delivered)}  lost {r.lost}  "
                                 f"out of order {r.out_of_order}" + (f"  corrupt {r.corrupt}" if r.corrupt else "")))
        if r.interrupted:
            flight = f"{r.in_flight:,} sent but not yet arrived when interrupted (not counted as lost)"
            rows.append(("in flight", flight))
        if cfg.get("resume"):
            per = f" (one per {r.delivered / r.acks_sent:,.1f} messages received)" if r.acks_sent else ""
            rows.append(("resume ACKs", f"sent {r.acks_sent:,}{per}, received {r.acks_received:,}"))
        if r.undelivered_notices:
            rows.append(("undelivered", f"{r.undelivered_notices:,} NOTICE undelivered from the server"))
        rows.append(("throughput", f"{r.msgs_per_s:,.0f} msgs/s  {r.mb_per_s:,.1f} MB/s  over {r.elapsed:.3f} s"))
        if r.latency.total:
            rows.append(_latency_row("latency (1-way)", r.latency))
        if r.rtt.total:
            rows.append(_latency_row("round trip", r.rtt))
    # idle measures connecting and pairing; the others their load phase
    span = r.connect_elapsed if r.mode == "idle" else r.elapsed
    if r.server_local:
        rows.append(("server RSS", (f"{format_bytes(r.server_rss_before)} before, {format_bytes(r.server_rss_peak)} "
                                    f"peak, {format_bytes(r.server_rss_after)} after")))
        if r.memory_per_pair is not None:
            rows.append(("memory per pair", format_bytes(r.memory_per_pair)))
        if r.server_cpu is not None and span:
            rows.append(("server CPU", f"{r.server_cpu:.2f} s ({100 * r.server_cpu / span:.0f}% of a core)"
                                       + (" connecting and pairing" if r.mode == "idle" else "")))
        if r.server_fds_after is not None:
            rows.append(("server fds", f"{r.server_fds_before} before, {r.server_fds_after} after"))
    if span:
        rows.append(("load CPU", (f"{r.load_cpu:.2f} s ({100 * r.load_cpu / span:.0f}% of a core) "
                                  f"in the measured phase, {r.load_cpu_total:.2f} s in all")))
    if r.mode == "idle" and r.hold_elapsed:
        rows.append(("held", f"{r.pairs_connected:,} pairs for {r.hold_elapsed:g} s"))
    for warning in r.warnings:
        rows.append(("warning", warning))
    failures = r.failures
    verdict = "OK" if not failures else "FAIL: " + "; ".join(failures)
    rows.append(("result", ("INTERRUPTED, partial: " + verdict) if r.interrupted else verdict))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def render(result: BenchResult) -> str:
    """The whole human-readable report."""
    parts = [render_table(result)]
    if result.latency.total:
        parts.append(render_histogram(result.latency, "one-way latency"))
    if result.rtt.total:
        parts.append(render_histogram(result.rtt, "round-trip"))
    if result.mode in ("idle", "churn") and result.pair_time.total:
        parts.append(render_histogram(result.pair_time, "time to pair"))
    return "\n\n".join(parts)


class ProgressBar:
    """``[████▌     ]  45%  label`` redrawn in place (meant for a terminal's stderr)."""

    def __init__(self, stream: TextIO, width: int = 30, min_interval: float = 0.1) -> None:
        self.stream = stream
        self.width = width
        self.min_interval = min_interval
        self._last = 0.0
        self._drawn = False

    def update(self, fraction: float, label: str) -> None:
        now = time.monotonic()
        if now - self._last < self.min_interval and fraction < 1.0:
            return
        self._last = now
        fraction = max(0.0, min(1.0, fraction))
        line = f"\r[{bar(fraction, self.width):<{self.width}}] {100 * fraction:3.0f}%  {label}"
        self.stream.write(line[:200] + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
