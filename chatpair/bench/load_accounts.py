"""What a load process is told, what it counts, and what it tells back.

:class:`LoadSpec` goes into a load process (pickled), :class:`LoadReport`
comes out of it over the pipe, and the shared progress array is written a
few times a second. :class:`LoadAccounts` is the bottom layer of a load
process (see :mod:`chatpair.bench.load`): the histograms, the errors, the
report, the progress - nothing that touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chatpair.bench.config import BenchConfig
from chatpair.bench.histogram import LogHistogram
from chatpair.bench.load_state import CONNECTING, Client, Pair
from chatpair.bench.result import TICK_NS, MessageCounts

#: A load process keeps this many error lines (the first ones tell most).
MAX_ERRORS = 20


@dataclass
class LoadSpec:
    """What one load process does (pickled into it)."""

    index: int
    config: BenchConfig
    #: The servers to connect to: client ``k`` (A of pair ``i`` is ``2i``, B ``2i + 1``) uses ``k mod len``.
    targets: tuple[tuple[str, int], ...]
    first_pair: int
    pairs: int
    run_id: str

    @property
    def indices(self) -> range:
        """The numbers of this process's pairs (rooms are named after them)."""
        return range(self.first_pair, self.first_pair + self.pairs)


@dataclass
class LoadReport(MessageCounts):
    """What one load process measured, sent to the main process at the end.

    Times are ``time.monotonic_ns()`` (comparable across processes), CPU
    times ``os.times()`` seconds of this process.
    """

    # The pairing phase (histograms as LogHistogram counts).
    paired: int = 0
    t_connect0: int = 0
    t_connected: int = 0
    pair_time: dict[int, int] = field(default_factory=dict)
    # The measured phase.
    t_go: int = 0
    cpu_go: float = 0.0
    latency: dict[int, int] = field(default_factory=dict)
    rtt: dict[int, int] = field(default_factory=dict)
    cycles: int = 0  # churn: pairs that completed a whole cycle
    #: Messages delivered per absolute tick (``monotonic_ns() // TICK_NS``) while measuring.
    ticks: dict[int, int] = field(default_factory=dict)
    acks_sent: int = 0  # --resume: ACK frames this process sent
    acks_received: int = 0  # --resume: ACK frames the server sent it
    t_end: int = 0
    cpu_end: float = 0.0
    errors: list[str] = field(default_factory=list)
    #: target index -> [clients, clients paired, messages sent, messages delivered] of its clients
    per_target: dict[int, list[int]] = field(default_factory=dict)
    #: pairs whose partners were paired on different targets (churn: pair cycles)
    cross_pairs: int = 0

    def add_client(self, c: Client) -> None:
        """Add one client's counts; what its partner sent and it never got is lost."""
        counts = self.per_target.setdefault(c.target, [0, 0, 0, 0])
        counts[0] += 1
        counts[1] += 1 if c.t_paired else 0
        counts[2] += c.sent
        counts[3] += c.received
        if c.role == 0 and c.t_paired and c.peer is not None and c.peer.target != c.target:
            self.cross_pairs += 1
        self.sent += c.sent
        self.delivered += c.received
        self.out_of_order += c.ooo
        self.corrupt += c.corrupt
        self.undelivered_notices += c.undelivered
        peer = c.peer
        if peer is not None and peer.state != CONNECTING:
            self.lost += max(0, peer.sent - c.received)


class LoadAccounts:
    """The bottom layer of a load process: its spec, its counts, its report.

    For subclasses: :meth:`error`, :meth:`record_latency` (hot),
    :meth:`publish`; override :meth:`progress_count`,
    :meth:`delivered_so_far` and :meth:`count_open_pairs` where a workload
    counts otherwise. For the entry point: :meth:`finish_report`.
    """

    def __init__(self, spec: LoadSpec, progress: Any = None) -> None:
        self.spec = spec
        self.cfg = spec.config
        self.pairs: list[Pair] = []
        self.paired = 0
        self.latency = LogHistogram()
        self.rtt = LogHistogram()
        self.pair_time = LogHistogram()
        self.report = LoadReport()
        self.errors: list[str] = []
        self.progress = progress  # shared array: [progress_count, delivered] per load process
        #: Shared flag (``.value``) the main process sets on Ctrl-C: wind down, report what you have.
        self.stop_flag: Any = None
        #: After 'go': deliveries are counted per tick for the throughput series.
        self.measuring = False
        self.ticks: dict[int, int] = {}
        # Bound here: attribute look-ups in the hot loop cost.
        self._lat_counts = self.latency.counts

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)

    def record_latency(self, lat: int, n: int) -> None:
        # Inlined LogHistogram.add: this runs once per received segment.
        if lat < 64:
            i = lat if lat > 0 else 0
        else:
            shift = lat.bit_length() - 6
            i = 64 + (shift - 1) * 32 + ((lat >> shift) - 32)
        c = self._lat_counts
        c[i] = c.get(i, 0) + n

    def record_delivered(self, now: int, n: int) -> None:
        """``n`` messages arrived at ``now`` (ns): the throughput-over-time series."""
        if self.measuring:
            t = now // TICK_NS
            ticks = self.ticks
            ticks[t] = ticks.get(t, 0) + n

    def stopping(self) -> bool:
        """True once the main process asked every load process to wind down (Ctrl-C)."""
        flag = self.stop_flag
        return flag is not None and bool(flag.value)

    def reset_accounts(self) -> None:
        """Forget everything counted so far (churn's warm-up cycles are not measured)."""
        self.report = LoadReport()
        self.latency = LogHistogram()
        self._lat_counts = self.latency.counts
        self.pair_time = LogHistogram()
        self.ticks = {}
        self.pairs = []
        self.paired = 0

    def publish(self) -> None:
        """Tell the main process how far this process is (it draws the progress bar)."""
        if self.progress is not None:
            base = 2 * self.spec.index
            self.progress[base] = self.progress_count()
            self.progress[base + 1] = self.delivered_so_far()

    def progress_count(self) -> int:
        """The first progress figure: pairs paired (churn: pairs completed)."""
        return self.paired

    def delivered_so_far(self) -> int:
        return sum(p.a.received + p.b.received for p in self.pairs if p.a and p.b)

    def count_open_pairs(self, r: LoadReport) -> None:
        """Add the clients still held at the end to ``r``."""
        for pair in self.pairs:
            for c in (pair.a, pair.b):
                if c is not None:
                    r.add_client(c)

    def finish_report(self) -> LoadReport:
        r = self.report
        self.count_open_pairs(r)
        r.errors = self.errors
        r.latency = self.latency.counts
        r.rtt = self.rtt.counts
        r.pair_time = self.pair_time.counts
        r.ticks = self.ticks
        r.paired = self.paired
        return r
