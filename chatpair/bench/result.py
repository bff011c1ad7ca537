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

from chatpair.bench.histogram import LogHistogram


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
    server_command: list[str] = field(default_factory=list)

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

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        names = [f.name for f in fields(self)]
        for name in [*_IDENTITY, *(n for n in names if n not in _IDENTITY)]:
            value = getattr(self, name)
            if isinstance(value, LogHistogram):
                d[name] = {k: (None if v is None else (round(v) if k != "count" else v))
                           for k, v in value.summary().items()}
                d[name]["unit"] = "ns"
            else:
                d[name] = value
        d["ok"] = self.ok
        d["failures"] = self.failures
        return d
