"""What a bench run measured: :class:`BenchResult`, and the counts it shares.

:class:`MessageCounts` is the one list of message counters: each load
process reports its own (:class:`chatpair.bench.load_accounts.LoadReport`)
and the run's result adds them up. Nothing here prints;
:mod:`chatpair.bench.report` renders a result for a person and
``BenchResult.to_dict()`` is what ``--json`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from chatpair.bench.config import MIN_SAMPLES, MIN_SECONDS
from chatpair.bench.histogram import LogHistogram
from chatpair.netutil import format_hostport

#: The throughput series is per this many seconds...
SERIES_INTERVAL = 1.0
#: ...or per tenth of it when the measured phase is shorter than this, so a
#: short run still draws a line.
SERIES_FINE_BELOW = 10.0
#: Load processes count deliveries per tick of this many ns of ``monotonic_ns``
#: (absolute ticks, so the main process lines the processes up exactly).
TICK_NS = 10_000_000


@dataclass
class MessageCounts:
    """Messages counted exactly (not sampled), for one load process or a whole run."""

    sent: int = 0
    delivered: int = 0
    lost: int = 0
    out_of_order: int = 0
    corrupt: int = 0
    undelivered_notices: int = 0  # NOTICE undelivered frames from the server

    def add_counts(self, other: MessageCounts) -> None:
        """Add ``other``'s counters to these."""
        for f in fields(MessageCounts):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


#: ``to_dict()`` puts these first (what was run, then what it counted), the
#: order the JSON has always had.
_IDENTITY = ("config", "mode", "pairs", "procs", "size")


@dataclass(kw_only=True)
class BenchResult(MessageCounts):
    """Everything a run measured. ``to_dict()`` is what ``--json`` prints."""

    config: dict[str, Any]
    mode: str
    pairs: int
    procs: int
    size: int
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0  # seconds of the measured phase
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0  # payload megabytes (10**6) delivered per second
    latency: LogHistogram = field(default_factory=LogHistogram)
    rtt: LogHistogram = field(default_factory=LogHistogram)
    pair_time: LogHistogram = field(default_factory=LogHistogram)
    pairs_connected: int = 0
    connect_elapsed: float = 0.0
    pairs_per_s: float = 0.0  # connect+pair rate (idle) or completed pairs/s (churn)
    churn_cycles: int = 0
    load_cpu: float = 0.0  # CPU seconds of the load processes during the measured phase
    load_cpu_total: float = 0.0  # ... over their whole life
    server_local: bool = False
    server_pids: list[int] = field(default_factory=list)
    server_rss_before: int | None = None
    server_rss_after: int | None = None
    server_rss_peak: int | None = None
    server_cpu: float | None = None  # CPU seconds during the measured phase
    server_fds_before: int | None = None
    server_fds_after: int | None = None
    memory_per_pair: float | None = None  # bytes (idle)
    hold_elapsed: float = 0.0  # idle: seconds the pairs were held after all were paired
    server_command: list[str] = field(default_factory=list)
    #: The WELCOME of the probe connection made before the load (None if none was made).
    server_welcome: dict[str, Any] | None = None
    acks_sent: int = 0  # --resume: ACK frames the bench clients sent
    acks_received: int = 0  # --resume: ACK frames the server sent them
    #: Ctrl-C (or SIGTERM) cut the run short: a partial result.
    interrupted: bool = False
    #: Interrupted runs: messages sent but not yet arrived when the report was made.
    in_flight: int = 0
    #: Messages delivered per TICK_NS from 'go' (the throughput series is made of them).
    ticks: list[int] = field(default_factory=list)
    #: Per ``--target`` server, in order: its clients' counts (see :meth:`add_targets`).
    targets: list[dict[str, Any]] = field(default_factory=list)
    #: Pairs (churn: pair cycles) whose partners were paired on different targets.
    cross_target_pairs: int = 0

    def add_targets(self, reports: list[Any], targets: tuple[tuple[str, int], ...]) -> None:
        """Per-target figures from the load processes' ``per_target`` counts.

        ``delivered`` counts messages received by that target's clients; with
        two targets or more every partner is on another target, so each one
        crossed from one server to another (in a cluster: a cross-node message).
        """
        totals: dict[int, list[int]] = {}
        for r in reports:
            self.cross_target_pairs += r.cross_pairs
            for index, counts in r.per_target.items():
                into = totals.setdefault(index, [0, 0, 0, 0])
                for i, n in enumerate(counts):
                    into[i] += n
        self.targets = []
        for index, (host, port) in enumerate(targets or ()):
            clients, paired, sent, delivered = totals.get(index, [0, 0, 0, 0])
            self.targets.append({"target": format_hostport(host, port), "clients": clients, "paired": paired, "sent": sent,
                                 "delivered": delivered})

    @property
    def failures(self) -> list[str]:
        """Why the run must exit non-zero (empty when it passed)."""
        out: list[str] = []
        if self.lost:
            out.append(f"{self.lost} message(s) lost")
        if self.out_of_order:
            out.append(f"{self.out_of_order} message(s) out of order")
        if self.corrupt:
            out.append(f"{self.corrupt} message(s) corrupted")
        if self.pairs_connected < self.pairs and self.mode != "churn":
            out.append(f"only {self.pairs_connected} of {self.pairs} pairs were paired")
        if (self.mode == "churn" and self.server_fds_before is not None
                and self.server_fds_after is not None and self.server_fds_after > self.server_fds_before):
            out.append(f"server descriptors grew from {self.server_fds_before} to {self.server_fds_after}")
        out.extend(self.errors[:5])
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def warnings(self) -> list[str]:
        """Why the figures may mean little (the run still passes)."""
        out: list[str] = []
        if self.interrupted:
            out.append("interrupted: a partial report of the run so far")
        if self.mode in ("flood", "pingpong", "churn") and self.elapsed < MIN_SECONDS:
            out.append(f"the measured phase lasted {self.elapsed:.2f} s: too short for the rates to mean much "
                       "(run for a few seconds or more: --duration 5)")
        if self.mode in ("flood", "pingpong") and self.latency.total < MIN_SAMPLES:
            out.append(f"only {self.latency.total:,} latency samples: the high percentiles need at least "
                       f"{MIN_SAMPLES:,} (more --messages or a longer --duration)")
        if self.mode == "churn" and self.churn_cycles < 100:
            out.append(f"only {self.churn_cycles} pairs completed: the pairing rate needs at least 100 "
                       "(more --pairs or a longer --duration)")
        if self.mode == "idle" and self.pairs_connected < 100 and self.memory_per_pair is not None:
            out.append(f"memory per pair from {self.pairs_connected} pairs is mostly noise: "
                       "use --pairs 1000 or more")
        return out

    def throughput_series(self) -> dict[str, Any]:
        """Messages delivered over time: per second (per 0.1 s in runs under 10 s).

        ``msgs_per_s[i]`` is the rate over ``[start_s[i], start_s[i] + width_s[i])``;
        a last interval shorter than a quarter is folded into the one before it.
        """
        interval = SERIES_INTERVAL if self.elapsed >= SERIES_FINE_BELOW else SERIES_INTERVAL / 10
        per = max(1, round(interval * 1e9 / TICK_NS))
        starts: list[float] = []
        counts: list[int] = []
        widths: list[float] = []
        ticks = self.ticks if self.mode != "idle" else []  # idle sends no messages
        for i in range(0, len(ticks), per):
            start = i * TICK_NS / 1e9
            width = min(interval, max(self.elapsed - start, TICK_NS / 1e9))
            n = sum(ticks[i:i + per])
            if counts and width < interval / 4:
                counts[-1] += n
                widths[-1] += width
                continue
            starts.append(round(start, 3))
            counts.append(n)
            widths.append(width)
        return {
            "interval_s": interval, "start_s": starts, "width_s": [round(w, 3) for w in widths],
            "delivered": counts, "msgs_per_s": [round(n / w, 1) if w > 0 else 0.0 for n, w in zip(counts, widths)],
        }

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        names = [f.name for f in fields(self) if f.name != "ticks"]
        for name in [*_IDENTITY, *(n for n in names if n not in _IDENTITY)]:
            value = getattr(self, name)
            if isinstance(value, LogHistogram):
                d[name] = {k: (None if v is None else (round(v) if k != "count" else v))
                           for k, v in value.summary().items()}
                d[name]["unit"] = "ns"
                # [low, high) in ns and the count of every bucket that has one: what --plot draws
                d[name]["buckets"] = [[*value.bounds(i), value.counts[i]] for i in sorted(value.counts)]
            else:
                d[name] = value
        pin = d["config"].get("fingerprint")
        if isinstance(pin, bytes):
            d["config"] = {**d["config"], "fingerprint": "SHA256:" + pin.hex()}
        d["throughput_series"] = self.throughput_series()
        d["warnings"] = self.warnings
        d["ok"] = self.ok
        d["failures"] = self.failures
        return d
