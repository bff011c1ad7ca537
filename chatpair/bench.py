"""``chatpair bench``: load generation and statistics, returning a result object.

Nothing here prints; :mod:`chatpair.benchreport` renders a :class:`BenchResult`
and :mod:`chatpair.cli` is the only place that talks to a terminal.

The shape
    The main process starts (or targets) a server, then starts ``procs``
    *load processes* (multiprocessing, spawn context) so that the load is not
    the bottleneck. Each load process owns a share of the pairs: both clients
    of a pair live in the same process and meet in a room of their own, so
    the server pairs them with each other and never across processes. The
    main process only orchestrates (ready / go / done over a pipe), watches
    progress through a shared array, and samples the server's RSS, CPU and
    descriptors from ``/proc`` when the server is local.

Messages
    Every MSG payload is ASCII (valid UTF-8)::

        SSSSSSSSSS:TTTTTTTTTTTTTTTTTTT:abcdef...   (seq 10 digits, send time 19 digits)

    ``seq`` counts the sender's messages from 0; ``T`` is ``time.monotonic_ns()``
    (CLOCK_MONOTONIC is system-wide, so a latency measured across processes is
    valid). Senders work in *batches* of :data:`BATCH` messages whose seqs are
    ``b*BATCH .. b*BATCH+BATCH-1``: the whole batch is made with a handful of
    C-level bulk operations (:class:`MessageFactory`), so a batch of a
    thousand frames costs a few microseconds. All messages of a batch carry
    the time the batch was made - each message still has its own seq and its
    own send time field.

Verification (exact, not sampled)
    A receiver knows what the next frames *must* be: seq ``expect``,
    ``expect+1``, ... up to the end of the sender's batch, each with the send
    time written in the first of them. It builds those bytes the same way the
    sender did and compares them with the received bytes in one
    ``bytearray.startswith`` (a memcmp): header, seq, send time and padding of
    every frame are checked without a Python loop per message. Anything else
    (a control frame, a gap, a swap, a foreign byte) falls to the slow path,
    which parses frames one by one, so loss (``sent - received``) and
    out-of-order arrivals (a seq below the highest already seen) are counted
    exactly.

Latency
    Per-message latencies go into a log-linear histogram (32 sub-buckets per
    power of two: every percentile is within 1.6 % of the true value). Values
    below 64 ns are exact.
"""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import secrets
import select
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait as mp_wait
from typing import Any, Callable, Iterable

from chatpair.errors import ChatpairError, ConfigError
from chatpair.listener import raise_fd_limit
from chatpair.protocol import (
    BANNER_PREFIX,
    HEADER,
    MAX_BANNER,
    FrameType,
    encode_frame,
)

MODES = ("flood", "pingpong", "idle", "churn")

#: Messages per sender batch. A power of ten, so seq = batch * BATCH + index
#: is the decimal batch number followed by a fixed 3-digit index.
BATCH = 1000
SEQ_DIGITS = 10
TS_DIGITS = 19
#: ``SSSSSSSSSS:TTTTTTTTTTTTTTTTTTT:`` - the smallest valid bench message.
PREFIX_LEN = SEQ_DIGITS + 1 + TS_DIGITS + 1
MIN_SIZE = PREFIX_LEN
#: Offsets inside a frame (5-byte header first).
_SEQ_AT = HEADER.size
_TS_AT = _SEQ_AT + SEQ_DIGITS + 1
_TS_END = _TS_AT + TS_DIGITS
#: Placeholders in the batch template; the padding never contains them.

#: One recv may take this much; big reads mean few system calls in a flood.
RECV_SIZE = 256 * 1024
#: A largest frame plus a full read must fit in the shared receive buffer.
RECV_BUFFER = RECV_SIZE + 70_000
#: Pairs being connected at once per load process: enough to keep the
#: listener busy, few enough not to overflow its accept backlog.
CONNECT_WINDOW = 256
#: A load process opening more than this many sockets is split further
#: (the usual per-process limit is 20,000 descriptors here, some are needed
#: for pipes and the interpreter).
MAX_SOCKETS_PER_PROC = 19_000

_MSG = int(FrameType.MSG)
_PING = int(FrameType.PING)
_PONG = int(FrameType.PONG)
_BYE_FRAME = encode_frame(FrameType.BYE)


# ------------------------------------------------------------------------------
# Configuration and results
# ------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Every knob of a run; plain data so it pickles into the load processes."""

    mode: str = "flood"
    pairs: int = 10
    #: Messages per client (flood, pingpong: A's turns; churn: per client per
    #: pair). ``None``: run for ``duration`` instead (not for churn).
    messages: int | None = None
    #: Seconds of load (flood, pingpong, churn) or of holding (idle).
    duration: float | None = None
    size: int = 64
    #: Load processes; 0 picks enough for the descriptors needed (at least 1).
    procs: int = 0
    target: tuple[str, int] | None = None
    tls: bool = False
    cafile: str | None = None
    insecure: bool = False
    #: Extra ``chatpair server`` options for a server bench starts itself.
    server_args: tuple[str, ...] = ()
    #: Measure this running server's process tree (with ``target``).
    server_pid: int | None = None
    #: Flood: messages a sender may have ahead of what its partner received
    #: (0: no limit - the kernel's autotuned buffers then hold seconds of
    #: backlog, so latency measures queue length and a run overshoots its
    #: duration). Enough batches in flight keep the server saturated.
    window: int = 2 * BATCH
    #: Give up on messages not seen for this long once senders are done.
    stall_timeout: float = 10.0
    #: Hard limit on the whole run.
    timeout: float = 600.0

    def resolved(self) -> "BenchConfig":
        """Defaults filled in and checked; raises ConfigError for bad values."""
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        if self.pairs < 1:
            raise ConfigError("--pairs must be at least 1")
        if self.size < MIN_SIZE:
            raise ConfigError(f"--size must be at least {MIN_SIZE} bytes (seq and send time are in the message)")
        if self.size > 65_535:
            raise ConfigError("--size must be at most 65535 bytes (the server's default max_frame)")
        if self.messages is not None and self.messages < 1:
            raise ConfigError("--messages must be at least 1")
        if self.duration is not None and self.duration < 0:
            raise ConfigError("--duration cannot be negative")
        if self.server_args and self.target:
            raise ConfigError("server options only apply to the server bench starts; not with --target")
        cfg = BenchConfig(**asdict(self))
        if cfg.mode == "churn":
            cfg.messages = cfg.messages or 10
            cfg.duration = 3.0 if cfg.duration is None else cfg.duration
        elif cfg.mode == "idle":
            cfg.duration = cfg.duration or 0.0
        elif cfg.messages is None and cfg.duration is None:
            cfg.duration = 3.0
        elif cfg.messages is not None:
            cfg.duration = None
        sockets = 2 * cfg.pairs
        need = max(1, math.ceil(sockets / MAX_SOCKETS_PER_PROC))
        cfg.procs = min(cfg.pairs, max(cfg.procs or 1, need))
        return cfg


class LogHistogram:
    """Log-linear histogram of non-negative integers (nanoseconds here).

    Values below 64 have a bucket each; above, every power of two is split in
    32 buckets, so a bucket's width is under 1/32 of its value and a
    percentile read from the middle of its bucket is within 1.6 %.
    """

    SUB = 32

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    @staticmethod
    def index(v: int) -> int:
        if v < 64:
            return v if v > 0 else 0
        shift = v.bit_length() - 6
        return 64 + (shift - 1) * 32 + ((v >> shift) - 32)

    @staticmethod
    def bounds(idx: int) -> tuple[int, int]:
        """[low, high) of a bucket."""
        if idx < 64:
            return idx, idx + 1
        shift = (idx - 64) // 32 + 1
        low = ((idx - 64) % 32 + 32) << shift
        return low, low + (1 << shift)

    def add(self, v: int, n: int = 1) -> None:
        i = self.index(v) if v > 0 else 0
        self.counts[i] = self.counts.get(i, 0) + n

    def merge(self, other: "LogHistogram") -> None:
        for i, n in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile(self, p: float) -> float | None:
        """Value at percentile ``p`` (0-100), bucket midpoint; None when empty."""
        total = self.total
        if not total:
            return None
        rank = max(1, math.ceil(total * p / 100.0))
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                low, high = self.bounds(i)
                return low if high - low == 1 else (low + high) / 2
        return None  # pragma: no cover - rank <= total

    def max(self) -> float | None:
        if not self.counts:
            return None
        return float(self.bounds(max(self.counts))[1] - 1)

    def min(self) -> float | None:
        if not self.counts:
            return None
        return float(self.bounds(min(self.counts))[0])

    def summary(self) -> dict[str, float | None]:
        return {
            "count": self.total,
            "p50": self.percentile(50), "p90": self.percentile(90), "p99": self.percentile(99),
            "p99.9": self.percentile(99.9), "max": self.max(), "min": self.min(),
        }

    def octaves(self) -> list[tuple[int, int, int]]:
        """Counts per power of two: ``(low, high, count)`` from min to max (for drawing)."""
        if not self.counts:
            return []
        per: dict[int, int] = {}
        for i, n in self.counts.items():
            low, _ = self.bounds(i)
            k = max(low, 1).bit_length() - 1
            per[k] = per.get(k, 0) + n
        lo, hi = min(per), max(per)
        return [(1 << k, 1 << (k + 1), per.get(k, 0)) for k in range(lo, hi + 1)]


@dataclass
class ServerStats:
    """The server's process tree as seen in /proc at one moment."""

    pids: list[int]
    rss: int  # bytes, summed over the processes
    cpu: float  # user + system seconds, summed
    fds: int  # open descriptors, summed


@dataclass
class BenchResult:
    """Everything a run measured. ``to_dict()`` is what ``--json`` prints."""

    config: dict[str, Any]
    mode: str
    pairs: int
    procs: int
    size: int
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    out_of_order: int = 0
    corrupt: int = 0
    undelivered_notices: int = 0
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
        for name in self.__dataclass_fields__:
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


# ------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------


class MessageFactory:
    """Builds bench MSG frames of one size (see the module docstring).

    A batch is one 69-byte (for size 64) *unit* repeated - header, batch
    number, a ``000`` index, send time, padding - with the three index digit
    columns then written by strided slice assignment from precomputed
    columns. That is three C loops and one memcpy-doubling per batch, about
    6 ns per message, where ``bytes.replace`` over a template took 160.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.frame = size + HEADER.size
        self.header = HEADER.pack(size + 1, _MSG)
        pad_len = size - PREFIX_LEN
        alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789"
        self.pad = (alphabet * (pad_len // len(alphabet) + 1))[:pad_len]
        digits = [b"%03d" % i for i in range(BATCH)]
        #: Column j holds digit j of the index of every message of a batch.
        self.columns = [bytes(d[j] for d in digits) for j in range(3)]
        self._fmt = b"%07d%03d:%019d:"
        #: One whole frame as a single %-template (a '%' in the header or the
        #: padding is escaped), so a lone message costs one formatting call.
        self._one = self.header.replace(b"%", b"%%") + self._fmt + self.pad.replace(b"%", b"%%")

    def build(self, seq: int, count: int, ts: int) -> bytearray | bytes:
        """Frames ``seq .. seq+count-1`` (within one batch), all stamped ``ts``."""
        batch, first = divmod(seq, BATCH)
        if count == 1:
            return self._one % (batch, first, ts)
        assert first + count <= BATCH
        out = bytearray(self.header + self._fmt % (batch, 0, ts) + self.pad) * count
        f, end, last = self.frame, count * self.frame, first + count
        at = _SEQ_AT + SEQ_DIGITS - 3
        for j, column in enumerate(self.columns):
            out[at + j:end:f] = column[first:last]
        return out


# ------------------------------------------------------------------------------
# The load process
# ------------------------------------------------------------------------------

# Client states
CONNECTING, BANNER, HANDSHAKE, PAIRED, CLOSING, CLOSED = range(6)


class Client:
    """One bench connection and its send/receive bookkeeping."""

    __slots__ = (
        "sock", "fd", "pair", "peer", "role", "name", "state", "left", "t0", "t_paired",
        "sent", "total", "send_done", "out", "outmv", "off", "ctrl", "expect", "received",
        "ooo", "corrupt", "undelivered", "t_last", "events", "eof", "slow_until", "blocked",
    )

    def __init__(self, pair: "Pair", role: int, name: str) -> None:
        self.sock: socket.socket | None = None
        self.fd = -1
        self.pair = pair
        self.peer: Client | None = None
        self.role = role  # 0: A (initiates in pingpong), 1: B
        self.name = name
        self.state = CONNECTING
        self.left = b""  # bytes received but not yet a whole frame
        self.t0 = 0
        self.t_paired = 0
        self.sent = 0  # messages made (and being or been written)
        self.total = -1  # messages to send; -1: until the deadline
        self.send_done = False
        self.out = b""
        self.outmv = memoryview(b"")
        self.off = 0
        self.ctrl = bytearray()  # control frames to write at the next frame boundary
        self.expect = 0  # highest seq received + 1
        self.received = 0
        self.ooo = 0
        self.corrupt = 0
        self.undelivered = 0
        self.t_last = 0  # pingpong A: send time of the message in flight
        self.events = 0  # registered selector events
        self.eof = False
        self.slow_until = 0
        self.blocked = False  # flood: the window is full; the partner's progress resumes it


class Pair:
    __slots__ = ("index", "room", "a", "b", "closed", "cycle", "t0", "pending")

    def __init__(self, index: int, room: str) -> None:
        self.pending = False  # connecting, not yet paired (counts in LoadWorker.connecting)
        self.index = index
        self.room = room
        self.a: Client | None = None
        self.b: Client | None = None
        self.closed = 0
        self.cycle = 0
        self.t0 = 0


class Poller:
    """Level-triggered readiness by descriptor: epoll where there is one."""

    READ = 1
    WRITE = 4

    def __init__(self) -> None:
        self._ep = select.epoll() if hasattr(select, "epoll") else None
        self._sel = None if self._ep else selectors.DefaultSelector()

    def register(self, fd: int, events: int) -> None:
        if self._ep:
            self._ep.register(fd, events)
        else:
            self._sel.register(fd, self._to_sel(events))  # type: ignore[union-attr]

    def modify(self, fd: int, events: int) -> None:
        if self._ep:
            self._ep.modify(fd, events)
        else:
            self._sel.modify(fd, self._to_sel(events))  # type: ignore[union-attr]

    def unregister(self, fd: int) -> None:
        try:
            if self._ep:
                self._ep.unregister(fd)
            else:
                self._sel.unregister(fd)  # type: ignore[union-attr]
        except (KeyError, ValueError, OSError):
            pass

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        if self._ep:
            return self._ep.poll(timeout)
        out = []
        for key, ev in self._sel.select(timeout):  # type: ignore[union-attr]
            out.append((key.fd, (self.READ if ev & selectors.EVENT_READ else 0)
                        | (self.WRITE if ev & selectors.EVENT_WRITE else 0)))
        return out

    @staticmethod
    def _to_sel(events: int) -> int:
        return ((selectors.EVENT_READ if events & 1 else 0) | (selectors.EVENT_WRITE if events & 4 else 0))

    def close(self) -> None:
        if self._ep:
            self._ep.close()
        else:
            self._sel.close()  # type: ignore[union-attr]


#: Linux: bind() an address but leave the port to connect(), which then only
#: needs the 4-tuple to be unique (IP_BIND_ADDRESS_NO_PORT from <linux/in.h>).
_IP_BIND_ADDRESS_NO_PORT = 24
#: Connections per loopback source address (its own ephemeral port space).
_CONNECTS_PER_SOURCE = 2_000


def spread_sources_possible(host: str) -> bool:
    """True when connections to ``host`` can come from many loopback addresses.

    Thousands of connections to one address and port from 127.0.0.1 make the
    kernel search an ever fuller ephemeral port range; past about half of it
    each connect() costs hundreds of microseconds (measured here: 9,900 pairs
    paired at 1,200/s instead of 3,900/s). Linux routes all of 127.0.0.0/8 to
    loopback, so each load process spreads its clients over its own source
    addresses, each with a fresh port range.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return socket.inet_aton(host)[0] == 127
    except OSError:
        return False


def spread_source(sock: socket.socket, worker: int, n: int) -> None:
    """Bind ``sock`` to loopback source address number ``n // 2000`` of load process ``worker``."""
    k = n // _CONNECTS_PER_SOURCE
    try:
        sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.{100 + worker % 100}.{k // 250}.{1 + k % 250}", 0))
    except OSError:
        pass  # fall back to the kernel's choice of 127.0.0.1


@dataclass
class WorkerSpec:
    """What one load process does (pickled into it)."""

    index: int
    config: BenchConfig
    host: str
    port: int
    first_pair: int
    pairs: int
    run_id: str


@dataclass
class WorkerReport:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    out_of_order: int = 0
    corrupt: int = 0
    undelivered: int = 0
    errors: list[str] = field(default_factory=list)
    latency: dict[int, int] = field(default_factory=dict)
    rtt: dict[int, int] = field(default_factory=dict)
    pair_time: dict[int, int] = field(default_factory=dict)
    paired: int = 0
    t_connect0: int = 0
    t_connected: int = 0
    t_go: int = 0
    t_end: int = 0
    cycles: int = 0
    cpu_go: float = 0.0
    cpu_end: float = 0.0


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class LoadWorker:
    """The load of one process: connects its pairs and runs the workload on them."""

    def __init__(self, spec: WorkerSpec, progress: Any = None) -> None:
        self.spec = spec
        cfg = spec.config
        self.cfg = cfg
        self.mode = cfg.mode
        self.addr = (spec.host, spec.port)
        self._spread = spread_sources_possible(spec.host)
        self._connects = 0
        self.msgs = MessageFactory(cfg.size)
        self.F = self.msgs.frame
        self.hdr = self.msgs.header
        self.poller = Poller()
        self.clients: dict[int, Client] = {}
        self.buf = bytearray(RECV_BUFFER)
        self.bufmv = memoryview(self.buf)
        self.latency = LogHistogram()
        self.rtt = LogHistogram()
        self.pair_time = LogHistogram()
        self.report = WorkerReport()
        self.errors: list[str] = []
        self.progress = progress  # shared array: [paired, delivered] per worker
        self.deadline_ns = 0  # stop making new messages (duration runs)
        self.pairs: list[Pair] = []
        self.connecting = 0
        self.paired = 0
        self.last_rx = time.monotonic_ns()
        self.sending = False  # set by run(): before it, no MSG is made
        self.window = cfg.window if cfg.mode == "flood" else 0
        self.ssl_ctx: ssl.SSLContext | None = None
        if cfg.tls:
            ctx = ssl.create_default_context(cafile=cfg.cafile)
            if cfg.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self.ssl_ctx = ctx
        # Bound here: attribute look-ups in the hot loop cost.
        self._lat_counts = self.latency.counts

    # -- bookkeeping ------------------------------------------------------------------

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
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

    def publish(self) -> None:
        if self.progress is not None:
            base = 2 * self.spec.index
            self.progress[base] = self.paired
            self.progress[base + 1] = sum(c.received for c in self.clients.values()) if self.mode != "flood" \
                else self._delivered_fast()

    def _delivered_fast(self) -> int:
        return sum(p.a.received + p.b.received for p in self.pairs if p.a and p.b)  # type: ignore[union-attr]

    # -- connections ------------------------------------------------------------------

    def new_pair(self, pair: Pair) -> None:
        """Start connecting both clients of ``pair``."""
        tag = f"{pair.index}" if pair.cycle == 0 else f"{pair.index}.{pair.cycle}"
        if pair.cycle:
            pair.room = f"{self.spec.run_id}-{pair.index}-{pair.cycle}"
        a, b = Client(pair, 0, f"a{tag}"), Client(pair, 1, f"b{tag}")
        a.peer, b.peer = b, a
        pair.a, pair.b, pair.closed = a, b, 0
        pair.t0 = time.monotonic_ns()
        pair.pending = True
        self.connecting += 1
        for c in (a, b):
            self.connect(c)

    def connect(self, c: Client) -> None:
        c.t0 = time.monotonic_ns()
        family = socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_ctx is not None:
            # TLS: a blocking connect and handshake keeps the hot loop free of
            # SSLWant* cases; throughput over TLS is not what this measures best.
            sock.settimeout(30)
            try:
                sock.connect(self.addr)
                sock = self.ssl_ctx.wrap_socket(sock, server_hostname=self.addr[0])
            except (OSError, ssl.SSLError) as err:
                sock.close()
                self.fail_client(c, f"connect: {err}")
                return
            sock.setblocking(False)
            c.sock, c.fd = sock, sock.fileno()
            self.clients[c.fd] = c
            self.on_connected(c)
            return
        sock.setblocking(False)
        if self._spread:
            spread_source(sock, self.spec.index, self._connects)
        self._connects += 1
        err = sock.connect_ex(self.addr)
        c.sock, c.fd = sock, sock.fileno()
        self.clients[c.fd] = c
        if err == 0:
            self.on_connected(c)
        elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            c.events = Poller.WRITE
            self.poller.register(c.fd, Poller.WRITE)
        else:
            self.fail_client(c, f"connect: {os.strerror(err)}")

    def on_connected(self, c: Client) -> None:
        assert c.sock is not None
        c.state = BANNER
        # Names and rooms here are ASCII letters and digits: no JSON encoder needed.
        hello = encode_frame(FrameType.HELLO, b'{"version":1,"name":"%s","room":"%s"}'
                             % (c.name.encode(), c.pair.room.encode()))
        try:
            c.sock.send(hello)  # a fresh socket takes ~70 bytes at once
        except OSError as err:
            self.fail_client(c, f"send hello: {err}")
            return
        if c.events:
            c.events = Poller.READ
            self.poller.modify(c.fd, Poller.READ)
        else:
            c.events = Poller.READ
            self.poller.register(c.fd, Poller.READ)

    def on_connect_writable(self, c: Client) -> None:
        assert c.sock is not None
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail_client(c, f"connect to {self.addr[0]}:{self.addr[1]}: {os.strerror(err)}")
            return
        self.on_connected(c)

    def fail_client(self, c: Client, why: str) -> None:
        self.error(f"{c.name}: {why}")
        self.close_client(c)

    def close_client(self, c: Client) -> None:
        if c.state == CLOSED:
            return
        c.state = CLOSED
        if c.sock is not None:
            if c.events:
                self.poller.unregister(c.fd)
                c.events = 0
            self.clients.pop(c.fd, None)
            try:
                c.sock.close()
            except OSError:
                pass
        pair = c.pair
        pair.closed += 1
        if pair.pending:  # this pair will not be paired now: free its connect slot
            pair.pending = False
            self.connecting -= 1
        if pair.closed == 2:
            self.on_pair_closed(pair)

    def on_pair_closed(self, pair: Pair) -> None:
        """Both ends closed (churn starts the next cycle here)."""

    def set_events(self, c: Client, events: int) -> None:
        if c.events != events and c.state != CLOSED:
            self.poller.modify(c.fd, events)
            c.events = events

    # -- receiving ----------------------------------------------------------------------

    def on_readable(self, c: Client) -> int:
        """Read once; process every whole frame. Returns messages received."""
        sock = c.sock
        assert sock is not None
        buf = self.buf
        left = c.left
        n_left = len(left)
        if n_left:
            buf[:n_left] = left
        try:
            n = sock.recv_into(self.bufmv[n_left:] if n_left else self.bufmv, RECV_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return 0
        except OSError as err:
            if c.state < CLOSING or c.send_done is False:
                self.error(f"{c.name}: connection lost: {err}")
            self.close_client(c)
            return 0
        if n == 0:
            self.on_eof(c, n_left)
            return 0
        now = time.monotonic_ns()
        self.last_rx = now
        before = c.received
        end = n_left + n
        pos = self.process(c, end, now)
        c.left = bytes(buf[pos:end]) if pos < end else b""
        if self.ssl_ctx is not None and c.state != CLOSED:
            pending = sock.pending()  # type: ignore[attr-defined]
            if pending:
                return c.received - before + self.on_readable(c)
        return c.received - before

    def on_eof(self, c: Client, n_left: int) -> None:
        if c.state == CLOSING:
            self.close_client(c)
            return
        if n_left:
            self.error(f"{c.name}: server closed the connection in the middle of a frame")
        else:
            self.error(f"{c.name}: server closed the connection")
        self.close_client(c)

    def process(self, c: Client, end: int, now: int) -> int:
        """Consume whole frames from ``self.buf[:end]``; return where the rest starts."""
        buf = self.buf
        pos = 0
        if c.state == BANNER:
            nl = buf.find(b"\n", 0, end)
            if nl < 0:
                if end > MAX_BANNER:
                    self.fail_client(c, "not a chatpair server (no banner line)")
                return 0 if end <= MAX_BANNER else end
            if not buf.startswith(BANNER_PREFIX):
                self.fail_client(c, f"not a chatpair server: {bytes(buf[:min(nl, 80)])!r}")
                return end
            pos = nl + 1
            c.state = HANDSHAKE
        F = self.F
        hdr = self.hdr
        build = self.msgs.build
        while end - pos >= 5:
            if pos >= c.slow_until and end - pos >= F and c.state == PAIRED and buf.startswith(hdr, pos):
                # Fast path: the next frames should be seq expect.. of the sender's
                # current batch, all stamped with the first one's send time.
                k = c.expect
                n = (end - pos) // F
                room = BATCH - k % BATCH
                if n > room:
                    n = room
                try:
                    ts = int(buf[pos + _TS_AT:pos + _TS_END])
                except ValueError:
                    ts = -1
                if ts >= 0 and buf.startswith(build(k, n, ts), pos):
                    c.expect = k + n
                    c.received += n
                    lat = now - ts
                    self.record_latency(lat, n)
                    pos += n * F
                    continue
                # Something in these n frames is not what a faithful relay sends:
                # look at each of them on the slow path.
                c.slow_until = pos + n * F
            length = int.from_bytes(buf[pos:pos + 4], "big")
            if length == 0 or length > 16_777_215:
                self.fail_client(c, f"bad frame length {length}")
                return end
            if end - pos < 4 + length:
                break
            ftype = buf[pos + 4]
            payload = bytes(buf[pos + 5:pos + 4 + length])
            pos += 4 + length
            self.on_frame(c, ftype, payload, now)
            if c.state == CLOSED:
                return end
        return pos

    def on_frame(self, c: Client, ftype: int, payload: bytes, now: int) -> None:
        """The slow path: one frame of any type."""
        if ftype == _MSG:
            self.on_slow_msg(c, payload, now)
        elif ftype == FrameType.PAIRED:
            if c.state != HANDSHAKE:
                return
            assert c.peer is not None
            if b'"peer":"%s"' % c.peer.name.encode() not in payload.replace(b'": "', b'":"'):
                # Someone else is in our room: the target has other users in it.
                self.error(f"{c.name}: paired with someone else ({payload[:80]!r}), expected {c.peer.name!r}")
            c.state = PAIRED
            c.t_paired = now
            self.pair_time.add(now - c.t0)
            if c.peer.state >= PAIRED:
                self.on_pair_ready(c.pair, now)
        elif ftype == FrameType.NOTICE:
            try:
                code = json.loads(payload).get("code")
            except ValueError:
                code = None
            if code == "undelivered":
                c.undelivered += 1
        elif ftype == _PING:
            self.send_ctrl(c, encode_frame(FrameType.PONG, payload))
        elif ftype == FrameType.ERROR:
            try:
                obj = json.loads(payload)
                text = f"{obj.get('code')}: {obj.get('message')}"
            except ValueError:
                text = repr(payload[:100])
            self.fail_client(c, f"server error {text}")
        elif ftype in (FrameType.WELCOME, FrameType.WAITING, _PONG):
            pass
        elif ftype == FrameType.PEER_LEFT:
            if c.state == PAIRED and not self.peer_leaving_ok(c):
                self.error(f"{c.name}: partner left early: {payload[:100]!r}")
        else:
            self.error(f"{c.name}: unexpected frame type 0x{ftype:02x}")

    def peer_leaving_ok(self, c: Client) -> bool:
        peer = c.peer
        return peer is None or peer.state >= CLOSING or self.mode == "churn"

    def on_slow_msg(self, c: Client, payload: bytes, now: int) -> None:
        try:
            seq = int(payload[:SEQ_DIGITS])
            ts = int(payload[SEQ_DIGITS + 1:SEQ_DIGITS + 1 + TS_DIGITS])
        except ValueError:
            c.corrupt += 1
            c.received += 1
            return
        if seq < 0 or len(payload) != self.cfg.size or self.msgs.build(seq, 1, ts)[5:] != payload:
            c.corrupt += 1
        c.received += 1
        if seq >= c.expect:
            c.expect = seq + 1
        else:
            c.ooo += 1
        self.record_latency(now - ts, 1)

    def on_pair_ready(self, pair: Pair, now: int) -> None:
        if pair.pending:
            pair.pending = False
            self.connecting -= 1
        self.paired += 1

    # -- sending --------------------------------------------------------------------------

    def send_ctrl(self, c: Client, frame: bytes) -> None:
        """A control frame (PONG, BYE): written at the next frame boundary."""
        c.ctrl += frame
        if c.off >= len(c.out):
            self.flush(c)

    def queue(self, c: Client, data: bytes) -> None:
        """Write ``data`` after whatever is pending (it must be whole frames)."""
        if c.off >= len(c.out):
            if c.ctrl:
                data = bytes(c.ctrl) + data
                c.ctrl.clear()
            c.out, c.off = data, 0
            c.outmv = memoryview(data)
            self.flush(c)
        else:
            c.ctrl += data

    def flush(self, c: Client) -> bool:
        """Write pending bytes; True when nothing is left pending."""
        sock = c.sock
        if sock is None or c.state == CLOSED:
            return True
        while True:
            if c.off >= len(c.out):
                if not c.ctrl:
                    break
                c.out = bytes(c.ctrl)
                c.outmv = memoryview(c.out)
                c.off = 0
                c.ctrl.clear()
            try:
                c.off += sock.send(c.outmv[c.off:])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                break
            except OSError as err:
                self.fail_client(c, f"send: {err}")
                return True
            if c.off < len(c.out):
                break
        done = c.off >= len(c.out) and not c.ctrl
        if done:
            if c.events & Poller.WRITE:
                self.set_events(c, Poller.READ)
        elif not c.events & Poller.WRITE:
            self.set_events(c, Poller.READ | Poller.WRITE)
        return done

    def fill(self, c: Client) -> None:
        """Flood: keep the socket full of new batches until the sender is done."""
        sock = c.sock
        assert sock is not None
        build = self.msgs.build
        while True:
            if c.off >= len(c.out):
                if c.ctrl:
                    c.out = bytes(c.ctrl)
                    c.ctrl.clear()
                elif c.send_done:
                    self.set_events(c, Poller.READ)
                    self.on_send_done(c)
                    return
                else:
                    now = time.monotonic_ns()
                    n = BATCH - c.sent % BATCH
                    if c.total >= 0:
                        n = min(n, c.total - c.sent)
                    elif now >= self.deadline_ns:
                        n = 0
                    if n <= 0:
                        c.send_done = True
                        continue
                    if self.window and c.sent - c.peer.expect >= self.window:  # type: ignore[union-attr]
                        c.blocked = True
                        self.set_events(c, Poller.READ)
                        return
                    c.out = build(c.sent, n, now)
                    c.sent += n
                    if c.sent == c.total:
                        c.send_done = True
                c.outmv = memoryview(c.out)
                c.off = 0
            try:
                c.off += sock.send(c.outmv[c.off:])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                return
            except OSError as err:
                self.fail_client(c, f"send: {err}")
                return
            if c.off < len(c.out):
                return

    def on_send_done(self, c: Client) -> None:
        """A flood/churn sender wrote its last message."""

    # -- the loop -------------------------------------------------------------------------

    def step(self, timeout: float) -> None:
        clients = self.clients
        flood = self.mode in ("flood", "churn")
        for fd, ev in self.poller.poll(timeout):
            c = clients.get(fd)
            if c is None:
                continue
            if ev & 4:  # writable
                if c.state == CONNECTING:
                    self.on_connect_writable(c)
                    continue
                if flood and self.sending and c.state == PAIRED and not c.send_done:
                    self.fill(c)
                else:
                    self.flush(c)
            if ev & ~4 and c.state != CLOSED:  # readable, or error/hang-up: recv says which
                got = self.on_readable(c)
                if got:
                    self.on_received(c, got)

    def on_received(self, c: Client, n: int) -> None:
        """Workload reaction to ``n`` new messages on ``c``."""

    def connect_all(self, indices: Iterable[int]) -> None:
        """Connect and pair every pair in ``indices``, CONNECT_WINDOW at a time."""
        todo = list(indices)
        todo.reverse()
        self.report.t_connect0 = time.monotonic_ns()
        stall_limit = max(30.0, self.cfg.stall_timeout) * 1e9
        last_paired, last_change = 0, time.monotonic_ns()
        while todo or self.connecting > 0:
            while todo and self.connecting < CONNECT_WINDOW:
                i = todo.pop()
                pair = Pair(i, f"{self.spec.run_id}-{i}")
                self.pairs.append(pair)
                self.new_pair(pair)
            self.step(0.05)
            now = time.monotonic_ns()
            if self.paired != last_paired:
                last_paired, last_change = self.paired, now
                self.publish()
            elif now - last_change > stall_limit:
                self.error(f"pairing stalled: {self.connecting} pair(s) still not paired")
                break
        self.report.t_connected = time.monotonic_ns()
        self.publish()

    def close_all(self) -> None:
        self.deadline_ns = 0  # no new churn cycles from here on
        for c in list(self.clients.values()):
            c.state = CLOSING
            self.close_client(c)

    def finish_report(self) -> WorkerReport:
        r = self.report
        for pair in self.pairs:
            for c in (pair.a, pair.b):
                if c is None:
                    continue
                r.sent += c.sent
                r.delivered += c.received
                r.out_of_order += c.ooo
                r.corrupt += c.corrupt
                r.undelivered += c.undelivered
                if c.peer is not None and c.peer.state != CONNECTING:
                    r.lost += max(0, c.peer.sent - c.received)
        r.errors = self.errors
        r.latency = self.latency.counts
        r.rtt = self.rtt.counts
        r.pair_time = self.pair_time.counts
        r.paired = self.paired
        return r


class FloodWorker(LoadWorker):
    """Both clients of every pair send as fast as the socket allows."""

    def run(self) -> None:
        cfg = self.cfg
        total = cfg.messages if cfg.messages is not None else -1
        self.sending = True
        self.deadline_ns = time.monotonic_ns() + int((cfg.duration or 0) * 1e9)
        for pair in self.pairs:
            for c in (pair.a, pair.b):
                if c is not None and c.state == PAIRED:
                    c.total = total
                    self.set_events(c, Poller.READ | Poller.WRITE)
        self.drive()

    def on_received(self, c: Client, n: int) -> None:
        sender = c.peer
        if sender is not None and sender.blocked and sender.sent - c.expect < self.window:
            sender.blocked = False
            self.fill(sender)

    def complete(self) -> bool:
        for pair in self.pairs:
            for c in (pair.a, pair.b):
                if c is None or c.state != PAIRED:
                    continue
                peer = c.peer
                if not peer.send_done or c.expect < peer.sent:  # type: ignore[union-attr]
                    return False
        return True

    def drive(self) -> None:
        """Run the loop until every message is in, or nothing arrives for a while."""
        stall = int(self.cfg.stall_timeout * 1e9)
        self.last_rx = time.monotonic_ns()
        next_pub = 0
        while True:
            self.step(0.05)
            now = time.monotonic_ns()
            if now >= next_pub:
                next_pub = now + 100_000_000
                self.publish()
                if self.complete():
                    break
                if now - self.last_rx > stall and (self.deadline_ns == 0 or now > self.deadline_ns):
                    self.error(f"no message arrived for {self.cfg.stall_timeout:g} s; giving up")
                    break
        self.publish()


class PingPongWorker(FloodWorker):
    """Strict turns: A sends one message, B answers with one, A sends the next..."""

    def run(self) -> None:
        cfg = self.cfg
        self.turns = cfg.messages if cfg.messages is not None else -1
        self.deadline_ns = time.monotonic_ns() + int((cfg.duration or 0) * 1e9)
        active = [p for p in self.pairs if p.a is not None and p.a.state == PAIRED and p.b.state == PAIRED]  # type: ignore[union-attr]
        if len(active) == 1 and self.ssl_ctx is None:
            self.run_single(active[0])
            return
        for pair in active:
            self.send_one(pair.a)  # type: ignore[arg-type]
        self.drive()

    def run_single(self, pair: Pair) -> None:
        """One pair: blocking sockets, no selector - each hop wakes the reader
        directly instead of through epoll, which is a few microseconds less per
        message (measured: p50 one-way latency drops by about a tenth)."""
        a, b = pair.a, pair.b
        assert a is not None and b is not None
        for c in (a, b):
            self.poller.unregister(c.fd)
            c.events = 0
            c.sock.settimeout(self.cfg.stall_timeout)  # type: ignore[union-attr]
        self.single = True
        self.send_one(a)
        # on_received makes B answer and A send the next turn (or finish).
        while a.state == PAIRED and b.state == PAIRED and not a.send_done:
            for reader in (b, a):
                want = reader.received + 1
                while reader.received < want and reader.state == PAIRED:
                    got = self.on_readable(reader)
                    if got:
                        self.on_received(reader, got)
        self.publish()

    single = False  # run_single: sockets are blocking and not in the poller

    def set_events(self, c: Client, events: int) -> None:
        if not self.single:
            super().set_events(c, events)

    def send_one(self, c: Client) -> None:
        now = time.monotonic_ns()
        c.t_last = now
        data = self.msgs.build(c.sent, 1, now)
        c.sent += 1
        sock = c.sock
        if c.off >= len(c.out) and not c.ctrl and sock is not None and c.state != CLOSED:
            # Nothing queued: write straight away (the common case, and the
            # per-message cost here is what limits ping-pong on two cores).
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                sent = 0
            except OSError as err:
                self.fail_client(c, f"send: {err}")
                return
            if sent == len(data):
                return
            data = data[sent:]
        self.queue(c, data)

    def on_received(self, c: Client, n: int) -> None:
        if c.role == 1:
            for _ in range(n):
                self.send_one(c)
            return
        now = time.monotonic_ns()
        self.rtt.add(now - c.t_last)
        if (self.turns >= 0 and c.sent >= self.turns) or (self.turns < 0 and now >= self.deadline_ns):
            c.send_done = True
            assert c.peer is not None
            c.peer.send_done = True
            return
        self.send_one(c)

    def complete(self) -> bool:
        for pair in self.pairs:
            a, b = pair.a, pair.b
            if a is None or b is None or a.state != PAIRED:
                continue
            if not a.send_done or a.expect < b.sent or b.expect < a.sent:
                return False
        return True


class IdleWorker(LoadWorker):
    """Pairs are opened and held; the main process measures the server meanwhile."""


class ChurnWorker(LoadWorker):
    """Each slot connects a pair, exchanges a few messages, says BYE, and again."""

    def warm_up(self, slots: list[int]) -> None:
        """One cycle per slot, not counted: the server allocates what it keeps
        (worker channels, buffers) so the descriptor baseline is taken after."""
        self.run(slots, duration=0.0)
        self.report = WorkerReport()
        self.latency = LogHistogram()
        self._lat_counts = self.latency.counts
        self.pair_time = LogHistogram()
        self.pairs = []
        self.paired = 0
        self.churn_delivered = 0

    def run(self, slots: list[int], duration: float | None = None) -> None:
        cfg = self.cfg
        duration = cfg.duration if duration is None else duration
        self.deadline_ns = time.monotonic_ns() + int((duration or 0) * 1e9)
        self.sending = True
        self.cycles = 0
        self.slot_pairs: dict[int, Pair] = {}
        self.retired: list[Pair] = []
        for i in slots:
            pair = Pair(i, "")
            pair.cycle = 1
            self.pairs.append(pair)
            self.new_pair(pair)
        stall = int(max(cfg.stall_timeout, 10.0) * 1e9)
        self.last_rx = time.monotonic_ns()
        next_pub = 0
        while self.clients:
            self.step(0.05)
            now = time.monotonic_ns()
            if now >= next_pub:
                next_pub = now + 100_000_000
                self.publish()
                if now - self.last_rx > stall:
                    self.error(f"churn stalled: nothing arrived for {stall / 1e9:g} s")
                    break
        self.close_all()
        self.publish()

    def on_pair_ready(self, pair: Pair, now: int) -> None:
        super().on_pair_ready(pair, now)
        for c in (pair.a, pair.b):
            assert c is not None
            c.total = self.cfg.messages or 1
            self.set_events(c, Poller.READ | Poller.WRITE)

    def on_received(self, c: Client, n: int) -> None:
        self.maybe_bye(c)

    def on_send_done(self, c: Client) -> None:
        self.maybe_bye(c)

    def maybe_bye(self, c: Client) -> None:
        # BYE once this client sent everything and got everything from its
        # partner, so no message can be caught in the partner's departure.
        peer = c.peer
        assert peer is not None
        if c.state == PAIRED and c.send_done and c.off >= len(c.out) and peer.send_done \
                and c.expect >= peer.total:
            c.state = CLOSING
            self.send_ctrl(c, _BYE_FRAME)

    def on_pair_closed(self, pair: Pair) -> None:
        a, b = pair.a, pair.b
        assert a is not None and b is not None
        if a.t_paired and b.t_paired and a.received >= b.sent and b.received >= a.sent:
            self.cycles += 1
        # Keep the totals of the finished cycle, then reuse the slot.
        r = self.report
        for c in (a, b):
            r.sent += c.sent
            r.delivered += c.received
            r.out_of_order += c.ooo
            r.corrupt += c.corrupt
            r.undelivered += c.undelivered
            r.lost += max(0, c.peer.sent - c.received)  # type: ignore[union-attr]
        self.churn_delivered = getattr(self, "churn_delivered", 0) + a.received + b.received
        pair.a = pair.b = None
        if time.monotonic_ns() < self.deadline_ns:
            pair.cycle += 1
            self.new_pair(pair)

    def peer_leaving_ok(self, c: Client) -> bool:
        return True

    def _delivered_fast(self) -> int:
        return getattr(self, "churn_delivered", 0)

    def publish(self) -> None:
        if self.progress is not None:
            base = 2 * self.spec.index
            self.progress[base] = getattr(self, "cycles", 0)
            self.progress[base + 1] = self._delivered_fast()

    def finish_report(self) -> WorkerReport:
        r = self.report
        # Pairs cut short by the end of the run still count what they sent.
        for pair in self.pairs:
            if pair.a is not None:
                pair.closed = 2
                for c in (pair.a, pair.b):
                    r.sent += c.sent  # type: ignore[union-attr]
                    r.delivered += c.received  # type: ignore[union-attr]
        r.errors = self.errors
        r.latency = self.latency.counts
        r.pair_time = self.pair_time.counts
        r.paired = self.paired
        r.cycles = self.cycles
        return r


_WORKERS = {"flood": FloodWorker, "pingpong": PingPongWorker, "idle": IdleWorker, "churn": ChurnWorker}


def worker_main(spec: WorkerSpec, pipe: Connection, progress: Any) -> None:
    """Entry point of a load process: connect, report ready, wait for go, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    raise_fd_limit()
    worker = _WORKERS[spec.config.mode](spec, progress)
    indices = range(spec.first_pair, spec.first_pair + spec.pairs)
    try:
        if isinstance(worker, ChurnWorker):
            worker.warm_up(list(indices))
        else:
            worker.connect_all(indices)
        pipe.send(("ready", worker.paired))
        msg = pipe.recv()
        if msg != "go":
            worker.close_all()
            return
        worker.report.t_go = time.monotonic_ns()
        worker.report.cpu_go = _cpu_seconds()
        if isinstance(worker, ChurnWorker):
            worker.run(list(indices))
        elif isinstance(worker, FloodWorker):
            worker.run()
        # The measured phase ends with the last message received (the loop
        # notices completion a little later).
        worker.report.t_end = worker.last_rx if spec.config.mode in ("flood", "pingpong") \
            else time.monotonic_ns()
        if spec.config.mode == "idle":
            # Hold the pairs until the main process has measured the server.
            pipe.send(("held", None))
            pipe.recv()
        report = worker.finish_report()
        worker.close_all()
        report.cpu_end = _cpu_seconds()
        pipe.send(("done", report))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        worker.close_all()
    finally:
        worker.poller.close()
        pipe.close()


# ------------------------------------------------------------------------------
# The server under test
# ------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids = [int(x) for x in fh.read().split()]
        except OSError:
            continue
        for kid in kids:
            out.append(kid)
            out.extend(_descendants(kid))
    return out


def _is_helper(pid: int) -> bool:
    """multiprocessing's resource tracker is not part of the server's work."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"resource_tracker" in fh.read()
    except OSError:
        return True


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_stats(pids: list[int]) -> ServerStats:
    """RSS, CPU and descriptors of ``pids`` from /proc (missing ones count 0)."""
    rss = fds = 0
    cpu = 0.0
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                rss += int(fh.read().split()[1]) * _PAGE
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / _TICK
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            alive.append(pid)
        except (OSError, IndexError, ValueError):
            continue
    return ServerStats(alive, rss, cpu, fds)


class ServerUnderTest:
    """The process tree to sample: a server bench started itself, or a given pid."""

    def __init__(self, root_pid: int | None) -> None:
        self.root_pid = root_pid

    def pids(self) -> list[int]:
        """The working processes: the listener and its children (not the idle main one)."""
        if self.root_pid is None or not os.path.isdir(f"/proc/{self.root_pid}"):
            return []
        kids = [p for p in _descendants(self.root_pid) if not _is_helper(p)]
        return kids or [self.root_pid]

    def stats(self) -> ServerStats | None:
        pids = self.pids()
        return proc_stats(pids) if pids else None


class LocalServer(ServerUnderTest):
    """``python -m chatpair server`` on a free loopback port, for the run's length."""

    def __init__(self, extra_args: tuple[str, ...] = (), timeout: float = 20.0) -> None:
        self.command = [sys.executable, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", "0",
                        "-q", *extra_args]
        # stderr goes to a file: a pipe nobody reads would fill and block the server.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log, start_new_session=True)
        super().__init__(self.proc.pid)
        line = self._first_line(timeout)
        if not line.startswith(b"listening on "):
            self.stop()
            raise ChatpairError(f"the bench server did not start: {line.decode(errors='replace')!r} "
                                f"{self.log_tail()}".strip())
        self.port = int(line.rsplit(b":", 1)[1])
        self.host = "127.0.0.1"
        self._wait_ready(timeout)

    def _first_line(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        return buf.split(b"\n", 1)[0].strip()

    def _wait_ready(self, timeout: float) -> None:
        """A banner proves the listener process is up (and its workers started)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                banner = sock.recv(MAX_BANNER)
        except OSError as err:
            self.stop()
            raise ChatpairError(f"the bench server does not answer: {err}") from None
        if not banner.startswith(BANNER_PREFIX):
            self.stop()
            raise ChatpairError(f"the bench server sent no banner: {banner!r}")

    def log_tail(self, limit: int = 2000) -> str:
        try:
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-limit:]
        except (OSError, ValueError):
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL the whole session if it will not stop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


# ------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------

ProgressFn = Callable[[float, str], None]


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); ConfigError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--target must be HOST:PORT, not {text!r}")
    host = host.strip("[]")
    if not 0 < int(port) < 65536:
        raise ConfigError(f"bad port in --target {text!r}")
    return host, int(port)


class _Run:
    """The main-process side of one run: load processes, server samples, the result."""

    def __init__(self, cfg: BenchConfig, progress: ProgressFn | None) -> None:
        self.cfg = cfg
        self.progress_fn = progress
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Connection] = []
        self.shared = self.ctx.RawArray("q", 2 * cfg.procs)
        self.deadline = time.monotonic() + cfg.timeout

    def start_workers(self, host: str, port: int) -> None:
        cfg = self.cfg
        run_id = "bench" + secrets.token_hex(4)
        share, extra = divmod(cfg.pairs, cfg.procs)
        first = 0
        for i in range(cfg.procs):
            n = share + (1 if i < extra else 0)
            spec = WorkerSpec(i, cfg, host, port, first, n, run_id)
            first += n
            ours, theirs = self.ctx.Pipe()
            p = self.ctx.Process(target=worker_main, args=(spec, theirs, self.shared),
                                 name=f"chatpair-bench-{i}", daemon=True)
            p.start()
            theirs.close()
            self.procs.append(p)
            self.pipes.append(ours)

    def gather(self, tag: str, progress: Callable[[], tuple[float, str]] | None) -> list[Any]:
        """Wait for message ``tag`` from every load process, reporting progress meanwhile."""
        got: dict[int, Any] = {}
        while len(got) < len(self.pipes):
            if time.monotonic() > self.deadline:
                raise ChatpairError(f"bench timed out after {self.cfg.timeout:g} s")
            waitables: list[Any] = []
            for i, pipe in enumerate(self.pipes):
                if i not in got:
                    waitables += [pipe, self.procs[i].sentinel]
            for ready in mp_wait(waitables, timeout=0.1):
                for i, pipe in enumerate(self.pipes):
                    if i in got:
                        continue
                    if ready is pipe or ready == self.procs[i].sentinel:
                        try:
                            if not pipe.poll():
                                raise EOFError
                            kind, payload = pipe.recv()
                        except (EOFError, OSError):
                            raise ChatpairError(f"load process {i} died (exit code {self.procs[i].exitcode})") \
                                from None
                        if kind != tag:
                            raise ChatpairError(f"load process {i} said {kind!r}, expected {tag!r}")
                        got[i] = payload
            if progress and self.progress_fn:
                self.progress_fn(*progress())
        return [got[i] for i in range(len(self.pipes))]

    def send_all(self, msg: str) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(msg)
            except (BrokenPipeError, OSError):
                pass

    def stop_workers(self) -> None:
        self.send_all("stop")
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()

    def totals(self) -> tuple[int, int]:
        a = self.shared
        return sum(a[0::2]), sum(a[1::2])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_bench(config: BenchConfig, progress: ProgressFn | None = None) -> BenchResult:
    """Run one benchmark and return what it measured (see the module docstring).

    ``progress(fraction, label)`` is called a few times a second from this
    process while the load runs.
    """
    cfg = config.resolved()
    result = BenchResult(config=asdict(cfg), mode=cfg.mode, pairs=cfg.pairs, procs=cfg.procs, size=cfg.size)
    server: ServerUnderTest | None = None
    local: LocalServer | None = None
    if cfg.target:
        host, port = cfg.target
        if cfg.server_pid:
            server = ServerUnderTest(cfg.server_pid)
    else:
        raise_fd_limit()
        local = LocalServer(cfg.server_args)
        server = local
        host, port = local.host, local.port
        result.server_command = local.command
    run = _Run(cfg, progress)
    # SIGTERM (timeout, kill, a CI runner) must stop our server too, as Ctrl-C
    # does: turn it into KeyboardInterrupt so the cleanup below runs.
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        before = server.stats() if server else None
        if before:
            result.server_local = True
            result.server_pids = before.pids
            result.server_rss_before = before.rss
            result.server_fds_before = before.fds
        run.start_workers(host, port)
        t_start = time.monotonic()

        def pair_progress() -> tuple[float, str]:
            paired, _ = run.totals()
            return paired / cfg.pairs, f"pairing {paired}/{cfg.pairs}"

        readies = run.gather("ready", None if cfg.mode == "churn" else pair_progress)
        result.pairs_connected = sum(readies) if cfg.mode != "churn" else 0
        mid = server.stats() if server else None
        if mid and before and cfg.mode == "churn":
            # the baseline for the leak check is taken after the warm-up cycles
            before = mid
            result.server_fds_before = mid.fds
        if mid:
            result.server_rss_peak = mid.rss
        go = time.monotonic()
        if progress:
            progress(0.0, "running")
        run.send_all("go")
        expected = 2 * cfg.pairs * (cfg.messages or 0)

        def load_progress() -> tuple[float, str]:
            cycles, delivered = run.totals()
            if cfg.mode == "churn":
                return (time.monotonic() - go) / max(cfg.duration or 1, 1e-3), f"{cycles} pairs done"
            if cfg.duration:
                return (time.monotonic() - go) / cfg.duration, f"{delivered:,} msgs"
            return delivered / max(expected, 1), f"{delivered:,}/{expected:,} msgs"

        if cfg.mode == "idle":
            run.gather("held", None)
            held = server.stats() if server else None
            if held and before:
                result.server_rss_after = held.rss
                result.server_rss_peak = max(result.server_rss_peak or 0, held.rss)
                result.memory_per_pair = (held.rss - before.rss) / max(1, result.pairs_connected)
                # idle's work is connecting and pairing: CPU from start to all held
                result.server_cpu = held.cpu - before.cpu
            if cfg.duration:
                run.deadline = min(run.deadline, time.monotonic() + cfg.timeout)
                end = time.monotonic() + cfg.duration
                while time.monotonic() < end:  # holding is the workload here
                    if progress:
                        progress(1 - (end - time.monotonic()) / cfg.duration, "holding")
                    time.sleep(min(0.1, max(0.0, end - time.monotonic())))
            run.send_all("close")
        reports: list[WorkerReport] = run.gather("done", load_progress)
        after = server.stats() if server else None
        if progress:
            progress(1.0, "done")
        _merge(result, reports, cfg)
        if cfg.mode == "idle":
            result.load_cpu = result.load_cpu_total  # connecting is the workload
        elif after and before and mid:
            result.server_cpu = after.cpu - mid.cpu
            if cfg.mode != "idle":
                result.server_rss_after = after.rss
                result.server_rss_peak = max(result.server_rss_peak or 0, after.rss)
        if server and before and cfg.mode in ("churn", "idle"):
            result.server_fds_after = _settled_fds(server, before.fds)
            stats = server.stats()
            if stats and cfg.mode == "churn":
                result.server_rss_after = stats.rss
        del t_start
    finally:
        run.stop_workers()
        if local is not None:
            code = local.stop()
            if code not in (0, None):
                result.errors.append(f"the bench server exited with code {code}: {local.log_tail(500)}")
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return result


def _settled_fds(server: ServerUnderTest, target: int, wait: float = 5.0) -> int | None:
    """The server's descriptor count once closes have been processed (or after ``wait`` s)."""
    end = time.monotonic() + wait
    while True:
        stats = server.stats()
        if stats is None:
            return None
        if stats.fds <= target or time.monotonic() >= end:
            return stats.fds
        time.sleep(0.05)  # the server closes asynchronously; poll /proc briefly


def _merge(result: BenchResult, reports: list[WorkerReport], cfg: BenchConfig) -> None:
    for r in reports:
        result.sent += r.sent
        result.delivered += r.delivered
        result.lost += r.lost
        result.out_of_order += r.out_of_order
        result.corrupt += r.corrupt
        result.undelivered_notices += r.undelivered
        result.errors.extend(r.errors)
        result.latency.merge(LogHistogram(r.latency))
        result.rtt.merge(LogHistogram(r.rtt))
        result.pair_time.merge(LogHistogram(r.pair_time))
        result.churn_cycles += r.cycles
        result.load_cpu += r.cpu_end - r.cpu_go
        result.load_cpu_total += r.cpu_end
    if cfg.mode == "churn":
        result.pairs_connected = sum(r.paired for r in reports)
    t_go = min((r.t_go for r in reports if r.t_go), default=0)
    t_end = max((r.t_end for r in reports), default=0)
    result.elapsed = max(0.0, (t_end - t_go) / 1e9)
    if result.elapsed > 0 and cfg.mode in ("flood", "pingpong", "churn"):
        result.msgs_per_s = result.delivered / result.elapsed
        result.mb_per_s = result.delivered * cfg.size / result.elapsed / 1e6
    t_c0 = min((r.t_connect0 for r in reports if r.t_connect0), default=0)
    t_c1 = max((r.t_connected for r in reports), default=0)
    if t_c0 and t_c1 > t_c0:
        result.connect_elapsed = (t_c1 - t_c0) / 1e9
    if cfg.mode == "churn":
        result.pairs_per_s = result.churn_cycles / result.elapsed if result.elapsed else 0.0
    elif result.connect_elapsed:
        result.pairs_per_s = result.pairs_connected / result.connect_elapsed
