"""One client's connection state, and how server events look in each mode.

A :class:`Conn` is owned by exactly one loop at a time: the listener while it
handshakes or waits, a relay while it chats. Ownership moves with the object
(or, for relay worker processes, with its file descriptor and :meth:`Conn.state`).
Nothing here does I/O; the loops in :mod:`chatpair.server.loop` do.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any

from chatpair.proto import (
    FrameDecoder,
    FrameType,
    LineDecoder,
    encode_json_frame,
    sanitize,
    sanitize_name,
)

MODE_UNKNOWN = 0  # handshake: no byte seen yet
MODE_FRAME = 1
MODE_LINE = 2


class OutChunk:
    """Bytes queued for a connection, and how many partner MSGs they carry.

    Counting messages per chunk is what lets the server tell a sender exactly
    which messages never reached a partner who vanished (NOTICE undelivered).
    """

    __slots__ = ("data", "msgs", "framed")

    def __init__(self, data: bytes, msgs: int = 0, framed: bool = True) -> None:
        self.data = data
        self.msgs = msgs
        self.framed = framed


class Conn:
    """A client connection: socket, identity, buffers, timers."""

    __slots__ = (
        "sock", "fd", "cid", "addr", "mode", "name", "room",
        "decoder", "pending", "out", "out_off", "out_bytes",
        "last_rx", "pinged", "write_stalled_since", "deadline",
        "partner", "events", "closing", "close_at", "paused",
        "quiet_waiting", "tokens", "token_time", "throttled_until", "tls_state",
        "refusal", "owner",
    )

    def __init__(self, sock: socket.socket, cid: int, addr: str, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.cid = cid
        self.addr = addr
        self.mode = MODE_UNKNOWN
        self.name = ""
        self.room: str | None = None
        #: handshake: FrameDecoder or LineDecoder; line mode: LineDecoder
        self.decoder: FrameDecoder | LineDecoder | None = None
        #: frame mode after the handshake: received bytes of an incomplete frame
        self.pending = b""
        self.out: deque[OutChunk] = deque()
        self.out_off = 0  # bytes of out[0] already sent
        self.out_bytes = 0  # bytes queued in out, unsent
        self.last_rx = now
        self.pinged = False
        self.write_stalled_since = 0.0
        self.deadline = 0.0  # handshake deadline (absolute, never extended)
        self.partner: Conn | None = None
        self.events = 0  # selector mask currently registered (0 = not registered)
        self.closing = False
        self.close_at = 0.0
        self.paused = False
        #: line mode: PEER_LEFT already said "waiting for a partner"
        self.quiet_waiting = False
        self.tokens = 0.0  # rate limiter: messages this client may still send at once
        self.token_time = now
        self.throttled_until = 0.0  # over its rate: not read again before this time
        self.tls_state = 0  # TLS handshake in progress: 1 wants to read, 2 wants to write
        #: (code, message) when a limit refuses this client: said as soon as its mode is known
        self.refusal: tuple[str, str] | None = None
        #: The one loop that may register, read, write or close this
        #: connection; None while it is handed from one loop to another.
        #: Only :meth:`ConnLoop.adopt_conn` and :meth:`ConnLoop.release_conn`
        #: change it, each on its own loop's thread.
        self.owner: object | None = None

    def __repr__(self) -> str:
        return f"<Conn {self.cid} {self.name or '?'}@{self.addr}>"

    @property
    def label(self) -> str:
        """How the log names this client: ``alice@10.0.0.5:51234``."""
        return f"{self.name}@{self.addr}" if self.name else self.addr

    def undelivered_msgs(self) -> int:
        """How many partner MSGs are queued here but not (fully) written."""
        total = 0
        for i, chunk in enumerate(self.out):
            if not chunk.msgs:
                continue
            if i == 0 and self.out_off and chunk.framed:
                total += _frames_ending_after(chunk.data, self.out_off)
            else:
                total += chunk.msgs
        return total

    # -- hand-over between processes (relay workers) -------------------------

    def state(self) -> dict[str, Any]:
        """Everything but the socket, as plain data, to move the client to another process."""
        line_buffer = self.decoder.buffered if isinstance(self.decoder, LineDecoder) else b""
        return {
            "cid": self.cid, "addr": self.addr, "mode": self.mode, "name": self.name, "room": self.room,
            "pending": self.pending.hex(), "line_buffer": line_buffer.hex(),
            "out": [(c.data.hex(), c.msgs, c.framed) for c in self.out], "out_off": self.out_off,
            "pinged": self.pinged, "quiet_waiting": self.quiet_waiting, "tokens": self.tokens,
        }

    @classmethod
    def from_state(cls, sock: socket.socket, st: dict[str, Any], now: float, max_line: int) -> Conn:
        conn = cls(sock, st["cid"], st["addr"], now)
        conn.mode = st["mode"]
        conn.name = st["name"]
        conn.room = st["room"]
        conn.pending = bytes.fromhex(st["pending"])
        if conn.mode == MODE_LINE:
            conn.decoder = LineDecoder(max_line)
            buffered = bytes.fromhex(st["line_buffer"])
            if buffered:
                conn.decoder.feed(buffered)
        for data, msgs, framed in st["out"]:
            chunk = OutChunk(bytes.fromhex(data), msgs, framed)
            conn.out.append(chunk)
            conn.out_bytes += len(chunk.data)
        conn.out_off = st["out_off"]
        conn.out_bytes -= conn.out_off
        if conn.out:
            # The write deadline counts from when this process got the bytes
            # to write, not from the epoch (0.0 would time out at once).
            conn.write_stalled_since = now
        conn.pinged = st["pinged"]
        conn.quiet_waiting = st["quiet_waiting"]
        conn.tokens = st["tokens"]
        return conn


def _frames_ending_after(data: bytes, offset: int) -> int:
    """Frames in ``data`` whose last byte lies at or after ``offset``."""
    pos = count = 0
    while pos + 4 <= len(data):
        end = pos + 4 + int.from_bytes(data[pos:pos + 4], "big")
        if end > offset:
            count += 1
        pos = end
    return count


# --------------------------------------------------------------------------
# Server events, as bytes for a connection in either mode.
# --------------------------------------------------------------------------


def event_bytes(conn: Conn, ftype: FrameType, obj: dict[str, Any]) -> bytes:
    """A server event for ``conn``: a frame, or a ``* `` line in line mode."""
    if conn.mode != MODE_LINE:
        return encode_json_frame(ftype, obj)
    text = _line_text(conn, ftype, obj)
    return (text + "\n").encode("utf-8") if text is not None else b""


def _line_text(conn: Conn, ftype: FrameType, obj: dict[str, Any]) -> str | None:
    if ftype == FrameType.WAITING:
        if conn.quiet_waiting:  # "* bob left (bye); waiting for a partner" said it already
            conn.quiet_waiting = False
            return None
        room = obj.get("room")
        return "* waiting for a partner" + (f" in room {sanitize_name(room)}" if room else "")
    if ftype == FrameType.PAIRED:
        return f"* paired with {sanitize_name(obj['peer'])}"
    if ftype == FrameType.PEER_LEFT:
        conn.quiet_waiting = True
        return f"* {sanitize_name(obj['peer'])} left ({obj['reason']}); waiting for a partner"
    if ftype == FrameType.NOTICE:
        return "* " + sanitize(str(obj.get("message", "")), keep_newlines=False)
    if ftype == FrameType.ERROR:
        return "* error: " + sanitize(str(obj.get("message", "")), keep_newlines=False)
    return None  # WELCOME, PING, PONG have no line form


def line_msg_bytes(sender_name: str, text: str) -> bytes:
    """A partner's message for a line-mode client: one ``name: `` line per line."""
    name = sanitize_name(sender_name)
    lines = sanitize(text).split("\n")
    return "".join(f"{name}: {line}\n" for line in lines).encode("utf-8")
