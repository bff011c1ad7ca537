"""What the server counts, for the status line and ``/metrics``. No sockets, no clocks of its own.

Counting is spread over the threads and processes that see each event,
and summed in one place:

==========================  ===============================================================
who                         counts
==========================  ===============================================================
every selector loop         :class:`LoopStats`, written by the loop's own thread only:
(listener, relay threads,   messages and bytes relayed, pairs made and how long they
relay worker processes)     lasted (:class:`Histogram`), ERRORs sent by code
the listener's acceptor     connections accepted, and denied (``--deny``)
the listener's admission    refusals by reason (``server_full``, ``too_many_connections``)
the listener                gauges: connections open, handshaking, waiting, pairs chatting
==========================  ===============================================================

A relay worker sends its :meth:`LoopStats.snapshot` to the listener over
its channel (``{"op": "stats"}``) at most every :data:`REPORT_SECONDS`, and
only when something changed (:meth:`LoopStats.report_due`). The listener
keeps the latest report of each worker slot in a :class:`WorkerLedger`,
which folds the last report of a worker that died into a base, so totals
never go down when a worker is restarted (counts since its last report are
lost with it). Relay threads' counters are read directly: plain ints, and
dicts copied in one step under the GIL.

:class:`Totals` is one consistent reading of all of it, made in the
listener's thread; the ``/metrics`` endpoint and the status line only ever
read a finished ``Totals``.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Any

from chatpair.proto import ErrorCode

#: Upper bounds (seconds) of the pair-duration histogram's buckets; +Inf is implied.
PAIR_DURATION_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
#: A relay worker reports its counters to the listener at most this often.
REPORT_SECONDS = 1.0
#: Why a connection is refused, for ``chatpair_refusals_total{reason}`` (every one shown, at 0 too).
REFUSAL_REASONS = ("denied", ErrorCode.SERVER_FULL.value, ErrorCode.TOO_MANY_CONNECTIONS.value)
#: Every ERROR code the server sends, for ``chatpair_errors_total{code}`` (every one shown, at 0 too).
ERROR_CODES = tuple(code.value for code in ErrorCode)


class Histogram:
    """Counts per bucket (not cumulative; the last one is over every bound) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = PAIR_DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, counts: list[int], total: float) -> None:
        """Add another histogram's counts (same bounds) and sum."""
        if len(counts) == len(self.counts):
            self.counts = [a + b for a, b in zip(self.counts, counts)]
            self.sum += total

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with +Inf: Prometheus's buckets."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            out.append((bound, running))
        return out


class LoopStats:
    """The counters of one selector loop; only the loop's own thread writes them.

    ``msgs`` and ``bytes`` are incremented inline on the relay's hot path;
    the rest through the methods.
    """

    __slots__ = ("_next_report", "_reported", "_since", "bytes", "durations", "errors", "msgs", "pairs")

    def __init__(self) -> None:
        self.msgs = 0  # MSG frames (or lines) relayed to a partner
        self.bytes = 0  # their bytes as the sender sent them (frame headers included)
        self.pairs = 0  # pairs this loop started relaying
        self.errors: dict[str, int] = {}  # ERROR code -> how many were sent
        self.durations = Histogram()  # seconds each ended pair lasted here
        self._since: dict[tuple[int, int], float] = {}  # pair -> when this loop started relaying it
        self._reported: tuple[Any, ...] = self._key()  # what the last report said (nothing new: no report)
        self._next_report = 0.0

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def pair_started(self, a: int, b: int, now: float) -> None:
        self.pairs += 1
        self._since[(a, b) if a < b else (b, a)] = now

    def pair_ended(self, a: int, b: int, now: float) -> None:
        """The pair of ``a`` and ``b`` ended (harmless for a pair not started here)."""
        started = self._since.pop((a, b) if a < b else (b, a), None)
        if started is not None:
            self.durations.observe(max(0.0, now - started))

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain data (JSON for a worker's report); safe from another thread."""
        durations = self.durations
        return {"msgs": self.msgs, "bytes": self.bytes, "pairs": self.pairs, "errors": self.errors.copy(),
                "durations": list(durations.counts), "durations_sum": durations.sum}

    def _key(self) -> tuple[Any, ...]:
        return (self.msgs, self.bytes, self.pairs, self.durations.sum, sum(self.errors.values()))

    def report_due(self, now: float) -> dict[str, Any] | None:
        """A relay worker's report for the listener, if one is due and something changed; else None."""
        if now < self._next_report:
            return None
        self._next_report = now + REPORT_SECONDS
        key = self._key()
        if key == self._reported:
            return None
        self._reported = key
        report = self.snapshot()
        report["pid"] = os.getpid()
        return report


@dataclass
class Totals:
    """One reading of the whole server: gauges as of now, counters since it started."""

    time: float = 0.0  # when (time.monotonic()), for rates between two readings
    connections: int = 0  # admitted and not closed, wherever they are
    handshaking: int = 0
    waiting: int = 0
    pairs: int = 0  # chatting now
    workers: int = 0  # relay worker processes running (0 without --workers)
    accepted: int = 0
    msgs: int = 0
    bytes: int = 0
    pairs_total: int = 0
    refusals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_CODES, 0))
    durations: Histogram = field(default_factory=Histogram)

    def add(self, snapshot: dict[str, Any]) -> None:
        """Add one loop's counters (a :meth:`LoopStats.snapshot` or a worker's report)."""
        self.msgs += snapshot.get("msgs", 0)
        self.bytes += snapshot.get("bytes", 0)
        self.pairs_total += snapshot.get("pairs", 0)
        for code, n in snapshot.get("errors", {}).items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.durations.add(snapshot.get("durations", []), snapshot.get("durations_sum", 0.0))

    def status_line(self, previous: Totals | None) -> tuple[str, dict[str, Any]]:
        """The status line's text, and its numbers as log fields; the rate since ``previous``."""
        rate = 0.0
        if previous is not None and self.time > previous.time:
            rate = max(0, self.msgs - previous.msgs) / (self.time - previous.time)
        fields = {"event": "status", "connections": self.connections, "handshaking": self.handshaking,
                  "waiting": self.waiting, "pairs": self.pairs, "messages_per_second": round(rate, 2),
                  "messages": self.msgs, "bytes": self.bytes}
        text = (f"status: {self.connections} connection{'s' if self.connections != 1 else ''}"
                f" ({self.handshaking} handshaking), {self.pairs} pair{'s' if self.pairs != 1 else ''},"
                f" {self.waiting} waiting, {rate:.1f} messages/s; {self.msgs} message{'s' if self.msgs != 1 else ''}"
                " relayed since start")
        if self.workers or previous is not None and previous.workers:
            fields["workers"] = self.workers
            text += f"; {self.workers} relay worker{'s' if self.workers != 1 else ''} running"
        return text, fields


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two loops' counters (snapshots or reports) as one."""
    errors = dict(a.get("errors", {}))
    for code, n in b.get("errors", {}).items():
        errors[code] = errors.get(code, 0) + n
    hist = Histogram()
    hist.add(a.get("durations", []), a.get("durations_sum", 0.0))
    hist.add(b.get("durations", []), b.get("durations_sum", 0.0))
    return {"msgs": a.get("msgs", 0) + b.get("msgs", 0), "bytes": a.get("bytes", 0) + b.get("bytes", 0),
            "pairs": a.get("pairs", 0) + b.get("pairs", 0), "errors": errors,
            "durations": hist.counts, "durations_sum": hist.sum}


class WorkerLedger:
    """The latest report of each relay worker slot; what a restarted worker had counted is kept."""

    def __init__(self) -> None:
        self._latest: dict[int, dict[str, Any]] = {}  # slot -> its current process's last report
        self._retired: dict[str, Any] = {}  # the last reports of every process that is gone, summed

    def update(self, slot: int, report: dict[str, Any]) -> None:
        if not report:
            return
        latest = self._latest.get(slot)
        if latest is not None and latest.get("pid") != report.get("pid"):
            self._retired = merge(self._retired, latest)  # a new process in this slot
        self._latest[slot] = report

    def add_to(self, totals: Totals) -> None:
        totals.add(self._retired)
        for report in self._latest.values():
            totals.add(report)
