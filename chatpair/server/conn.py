"""One client's connection: who it is, its named states, its input and output buffers.

A :class:`Conn` is owned by exactly one loop at a time: the listener while it
handshakes or waits, a relay while it chats. Ownership moves with the object
(or, for relay worker processes, with its file descriptor and :meth:`Conn.state`).
Nothing here does I/O; the loops in :mod:`chatpair.server.loop` do.

What a connection *is doing* is two named states (:mod:`chatpair.server.states`):
its :class:`Mode` (frame, line, not known yet) and its :class:`Phase` (TLS
handshake, handshake, chatting, closing). What it *has* is grouped by
concern in the slots below; the bytes waiting to be written are one
:class:`OutQueue`.
"""

from __future__ import annotations

import selectors
import socket
from collections import deque
from typing import Any

from chatpair.proto import FrameDecoder, LineDecoder
from chatpair.server.session import Session
from chatpair.server.states import Mode, Phase
from chatpair.server.tls import is_tls

# Enum members read through the class cost a lookup each time; a connection
# reads them often, so once here.
_UNKNOWN, _LINE = Mode.UNKNOWN, Mode.LINE
_TLS_HANDSHAKE, _HANDSHAKE, _CHATTING = Phase.TLS_HANDSHAKE, Phase.HANDSHAKE, Phase.CHATTING

__all__ = ["Conn", "OutChunk", "OutQueue"]


class OutChunk:
    """Bytes queued for a connection, and how many partner MSGs they carry.

    Counting messages per chunk is what lets the server tell a sender exactly
    which messages never reached a partner who vanished (NOTICE undelivered).
    ``framed`` is false for line-mode text, which has no frame boundaries.
    """

    __slots__ = ("data", "framed", "msgs")

    def __init__(self, data: bytes, msgs: int = 0, framed: bool = True) -> None:
        self.data = data
        self.msgs = msgs
        self.framed = framed


class OutQueue(deque):  # type: ignore[type-arg]
    """What is queued for one connection, oldest first, and how far its writing got.

    A ``deque`` of :class:`OutChunk` itself, so "is anything queued?" stays a
    plain truth test on the send path.
    """

    __slots__ = ("first_sent", "last_progress", "unsent")

    def __init__(self) -> None:
        # No deque.__init__: deque.__new__ has made an empty, unbounded deque
        # already, and __init__ would only take an iterable or a maxlen. One
        # queue is made per connection; skipping it halves what that costs.
        self.first_sent = 0  # bytes of the first chunk already written
        self.unsent = 0  # bytes queued and not written yet: what flow control watches
        #: when the queue last made progress (or began): the write deadline counts from here
        self.last_progress = 0.0

    def push(self, chunk: OutChunk) -> None:
        self.append(chunk)
        self.unsent += len(chunk.data)

    def undelivered_msgs(self) -> int:
        """How many partner MSGs are queued here but not (fully) written."""
        total = 0
        for i, chunk in enumerate(self):
            if not chunk.msgs:
                continue
            if i == 0 and self.first_sent and chunk.framed:
                total += _frames_ending_after(chunk.data, self.first_sent)
            else:
                total += chunk.msgs
        return total


class Conn:
    """A client connection: identity, named states, input, output, pairing."""

    __slots__ = (  # noqa: RUF023 - grouped by concern, not sorted
        # who: fixed when the connection is made
        "sock", "fd", "cid", "addr", "tls", "name", "room",
        # named states, and what each phase waits for
        "mode", "phase", "tls_want", "tls_started", "handshake_deadline", "refusal", "close_at",
        # input: buffers, liveness, what holds reading back
        "decoder", "pending", "last_rx", "pinged", "paused", "throttled_until", "tokens", "token_time",
        # output
        "out",
        # pairing and ownership
        "partner", "quiet_waiting", "owner", "events",
        # resume (PROTOCOL.md section 6): None for v1 and line-mode clients
        "session",
    )

    def __init__(self, sock: socket.socket, cid: int, addr: str, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.cid = cid
        self.addr = addr
        #: a TLS socket: reads may leave bytes select() cannot see (decided once, here)
        self.tls = is_tls(sock)
        self.name = ""
        self.room: str | None = None

        self.mode = _UNKNOWN
        self.phase = _TLS_HANDSHAKE if self.tls else _HANDSHAKE
        #: TLS_HANDSHAKE: the selector event its next step waits for (a server reads the ClientHello first)
        self.tls_want = selectors.EVENT_READ
        #: TLS_HANDSHAKE: the first byte was a TLS record, the handshake has begun (see tls.peek_first_byte)
        self.tls_started = False
        #: TLS_HANDSHAKE and HANDSHAKE: when the listener gives up (absolute, never extended; 0: none)
        self.handshake_deadline = 0.0
        #: (code, message) when a limit refuses this client: said as soon as its mode is known
        self.refusal: tuple[str, str] | None = None
        self.close_at = 0.0  # CLOSING: when the socket is closed even if the client never closes

        #: handshake: FrameDecoder or LineDecoder; line mode: LineDecoder
        self.decoder: FrameDecoder | LineDecoder | None = None
        #: frame mode after the handshake: received bytes of an incomplete frame
        self.pending = b""
        self.last_rx = now  # keepalive and the idle timeout count from the last frame received
        self.pinged = False
        self.paused = False  # not read while its (or its partner's) output backlog is high
        self.throttled_until = 0.0  # over its rate: not read before this time (0.0: not throttled)
        self.tokens = 0.0  # rate limit bucket: messages this client may still send at once...
        self.token_time = now  # ...as of this time

        self.out = OutQueue()

        self.partner: Conn | None = None
        #: line mode: PEER_LEFT already said "waiting for a partner"
        self.quiet_waiting = False
        #: The one loop that may register, read, write or close this
        #: connection; None while it is handed from one loop to another.
        #: Only :meth:`ConnLoop.adopt_conn` and :meth:`ConnLoop.release_conn`
        #: change it, each on its own loop's thread.
        self.owner: object | None = None
        self.events = 0  # selector mask currently registered (0 = not registered)
        #: A resumable session (HELLO asked for resume): outlives this socket if it drops.
        self.session: Session | None = None

    def __repr__(self) -> str:
        return f"<Conn {self.cid} {self.name or '?'}@{self.addr}>"

    @property
    def label(self) -> str:
        """How the log names this client: ``alice@10.0.0.5:51234``."""
        return f"{self.name}@{self.addr}" if self.name else self.addr

    def undelivered_msgs(self) -> int:
        """How many partner MSGs are queued here but not (fully) written."""
        return self.out.undelivered_msgs()

    # -- hand-over between processes (relay workers) -------------------------

    def state(self) -> dict[str, Any]:
        """Everything but the socket, as plain data, to move the client to another process."""
        line_buffer = self.decoder.buffered if isinstance(self.decoder, LineDecoder) else b""
        return {
            "cid": self.cid, "addr": self.addr, "mode": int(self.mode), "name": self.name, "room": self.room,
            "pending": self.pending.hex(), "line_buffer": line_buffer.hex(),
            "out": [(c.data.hex(), c.msgs, c.framed) for c in self.out], "out_off": self.out.first_sent,
            "pinged": self.pinged, "quiet_waiting": self.quiet_waiting, "tokens": self.tokens,
            "session": self.session.state() if self.session is not None else None,
        }

    @classmethod
    def from_state(cls, sock: socket.socket, st: dict[str, Any], now: float, max_line: int) -> Conn:
        """A connection handed over by another process: past its handshake, chatting."""
        conn = cls(sock, st["cid"], st["addr"], now)
        conn.mode = Mode(st["mode"])
        conn.phase = _CHATTING
        conn.name = st["name"]
        conn.room = st["room"]
        conn.pending = bytes.fromhex(st["pending"])
        if conn.mode is _LINE:
            conn.decoder = LineDecoder(max_line)
            buffered = bytes.fromhex(st["line_buffer"])
            if buffered:
                conn.decoder.feed(buffered)
        out = conn.out
        for data, msgs, framed in st["out"]:
            out.push(OutChunk(bytes.fromhex(data), msgs, framed))
        out.first_sent = st["out_off"]
        out.unsent -= out.first_sent
        if out:
            # The write deadline counts from when this process got the bytes
            # to write, not from the epoch (0.0 would time out at once).
            out.last_progress = now
        conn.pinged = st["pinged"]
        conn.quiet_waiting = st["quiet_waiting"]
        conn.tokens = st["tokens"]
        if st.get("session") is not None:
            conn.session = Session.from_state(st["session"], now)
        return conn

    def take_socket(self, other: Conn) -> None:
        """RESUME: carry on this client's session on ``other``'s new socket (``other`` is discarded).

        What was queued for the old socket is gone with it: the session's
        replay log has everything the client may not have seen.
        """
        self.sock, self.fd, self.tls, self.addr = other.sock, other.fd, other.tls, other.addr
        self.pending = other.pending
        self.last_rx = other.last_rx
        self.pinged = False
        self.paused = False
        self.out = OutQueue()
        self.events = 0
        self.phase = _CHATTING


def _frames_ending_after(data: bytes, offset: int) -> int:
    """Frames in ``data`` whose last byte lies at or after ``offset``."""
    pos = count = 0
    while pos + 4 <= len(data):
        end = pos + 4 + int.from_bytes(data[pos:pos + 4], "big")
        if end > offset:
            count += 1
        pos = end
    return count
