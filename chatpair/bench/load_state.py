"""The load process's plain state: a client connection and a pair of them.

No sockets are driven here; :mod:`chatpair.bench.load_connect` and
:mod:`chatpair.bench.load_traffic` do that. Both classes use ``__slots__``:
a load process holds up to 19,000 clients and the hot loops read their
fields for every frame.
"""

from __future__ import annotations

import socket
from enum import IntEnum

from chatpair.proto.resume import AckClock


class ClientState(IntEnum):
    """Where a client is; ordered, so ``state >= PAIRED`` reads as 'paired or past it'."""

    CONNECTING = 0  # TCP connect in progress
    BANNER = 1  # connected, HELLO sent, waiting for the banner line
    HANDSHAKE = 2  # banner seen, waiting for PAIRED
    PAIRED = 3  # the workload runs
    CLOSING = 4  # BYE sent or the run is over: an EOF is expected
    CLOSED = 5


#: The names the hot loops use, as plain ints: a global is one look-up
#: (``ClientState.PAIRED`` is two), and CPython compares exact ints on a
#: fast path that an IntEnum member misses. ``ClientState(c.state)`` names one.
CONNECTING, BANNER, HANDSHAKE, PAIRED, CLOSING, CLOSED = (int(state) for state in ClientState)


class Client:
    """One bench connection and its send/receive bookkeeping."""

    __slots__ = (
        "sock", "fd", "pair", "peer", "role", "name", "state", "left", "t0", "t_paired",
        "sent", "total", "send_done", "out", "outmv", "off", "ctrl", "expect", "received",
        "ooo", "corrupt", "undelivered", "t_last", "events", "slow_until", "blocked",
        "ack_clock", "server_acked", "target",
    )

    def __init__(self, pair: Pair, role: int, name: str) -> None:
        self.sock: socket.socket | None = None
        self.fd = -1
        self.pair = pair
        self.peer: Client | None = None
        self.role = role  # 0: A (initiates in pingpong), 1: B
        self.name = name
        self.state = CONNECTING  # a ClientState value
        self.left = b""  # bytes received but not yet a whole frame
        self.t0 = 0  # connect started (time to pair is measured from here)
        self.t_paired = 0
        self.sent = 0  # messages made (and being or been written)
        self.total = -1  # messages to send; -1: until the deadline
        self.send_done = False
        self.out: bytes | bytearray = b""  # the frames being written
        self.outmv = memoryview(b"")
        self.off = 0  # how much of ``out`` is written
        self.ctrl = bytearray()  # control frames to write at the next frame boundary
        self.expect = 0  # highest seq received + 1
        self.received = 0
        self.ooo = 0  # messages out of order
        self.corrupt = 0
        self.undelivered = 0  # NOTICE undelivered frames received
        self.t_last = 0  # pingpong A: send time of the message in flight
        self.events = 0  # registered poller events (0: not registered)
        self.slow_until = 0  # receive buffer offset up to which frames go the slow path
        self.blocked = False  # flood: the window is full; the partner's progress resumes it
        #: --resume: what this client received and when it must acknowledge it (None: no resume).
        self.ack_clock: AckClock | None = None
        self.server_acked = 0  # --resume: the server's highest ACK of this client's messages
        #: which of ``--target``'s servers it connects to: client number (2 * pair + role) mod targets
        self.target = 0


class Pair:
    """Two clients that meet in a room of their own; churn reuses the slot for each cycle."""

    __slots__ = ("index", "room", "a", "b", "closed", "cycle", "pending")

    def __init__(self, index: int, room: str) -> None:
        self.pending = False  # connecting, not yet paired (counts in LoadConnections.connecting)
        self.index = index
        self.room = room
        self.a: Client | None = None
        self.b: Client | None = None
        self.closed = 0  # how many of a and b are closed
        self.cycle = 0  # churn: which round of this slot (0: not churning)
