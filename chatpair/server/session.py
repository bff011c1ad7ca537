"""One client's resumable session (PROTOCOL.md section 6), as the server keeps it. No I/O.

A :class:`Session` hangs off a frame-mode :class:`~chatpair.server.conn.Conn`
whose HELLO asked for resume. It outlives the connection's socket: when the
connection drops, the loop that owns the ``Conn`` keeps it (the client is
*away*) until the client comes back with RESUME or the resume window passes.

What it keeps is the **replay log**: everything sent to the client that it
may not have seen, in the order it was sent - runs of MSG frames (counted,
numbered from 1 since the session began) and the events between them
(PAIRED, PEER_LEFT, WAITING, NOTICE). PING, PONG, ACK, WELCOME, RESUMED and
ERROR belong to one connection and are never replayed.

When can an entry be forgotten? TCP delivers a prefix of what was written.
The client's count ``r`` (ACK, or RESUME) says that prefix holds MSG ``r``
and not MSG ``r + 1``. So MSGs up to ``r`` and everything before them were
seen; everything after MSG ``r + 1`` was not; and an event written between
the two may or may not have been. Those are taken as seen (a "bob left"
shown twice is worse than the rare one lost, and :meth:`peer_at_replay`
gives the client the state after them in RESUMED anyway). Events not
written at all when the connection dropped were certainly missed. Hence
the *replay point*: the first MSG past the client's count, or the first
entry not written, whichever comes first; entries before it are dropped.

Byte offsets: :attr:`stream` counts every byte handed to the connection
since it began, and each entry remembers where it ends, so the loop can
tell what was written (``stream - out.unsent``) without tracking writes.
"""

from __future__ import annotations

import secrets
from collections import deque
from typing import Any, Final

from chatpair.proto import FrameType, decode_json
from chatpair.proto.resume import AckClock, check_ack, check_resume_count, frame_offset

#: The frames of one connection, never replayed (checked by type byte).
_NOT_LOGGED: Final = frozenset({
    FrameType.PING, FrameType.PONG, FrameType.ACK, FrameType.WELCOME, FrameType.RESUMED, FrameType.ERROR,
})
_MSG: Final = int(FrameType.MSG)
_PAIRED: Final = int(FrameType.PAIRED)
_PEER_LEFT: Final = int(FrameType.PEER_LEFT)

#: Stop reading a client's partner while this many bytes are held for the
#: client unacknowledged (PROTOCOL.md: unacknowledged MSGs count towards
#: flow control)... Big enough that a client acknowledging every 64 frames
#: of up to 64 KiB, as the spec allows, is never held back by it.
SESSION_HIGH_WATER: Final = 6 * 1024 * 1024
#: ...and read it again once it is below this.
SESSION_LOW_WATER: Final = 4 * 1024 * 1024

#: The server's ACKs are sent by a loop timer that ticks every 0.25 s: due
#: this long after an unacknowledged MSG, an ACK leaves within the spec's second.
ACK_DELAY: Final = 0.7

#: Said to a RESUME whose session cannot be resumed, whatever the reason
#: (never existed, ended with BYE or an error, window passed): the same words.
EXPIRED_MESSAGE: Final = "that conversation can no longer be resumed; start a new one"


def new_token() -> str:
    """An opaque bearer token: 192 random bits, 32 URL-safe characters."""
    return secrets.token_urlsafe(24)


class LogEntry:
    """Whole frames sent to the client: a run of ``msgs`` MSG frames, or events (``msgs == 0``)."""

    __slots__ = ("data", "end", "msgs", "peer_before")

    def __init__(self, data: bytes, msgs: int, end: int, peer_before: str | None) -> None:
        self.data = data
        self.msgs = msgs
        self.end = end  # stream offset just past its last byte
        self.peer_before = peer_before  # the client's partner before this entry


class Session:
    """The resumable state of one client (see the module docstring)."""

    __slots__ = (
        "acked",
        "away_until",
        "clock",
        "ended",
        "log",
        "log_bytes",
        "peer",
        "sent",
        "stream",
        "token",
        "written",
    )

    def __init__(self, token: str, ack_delay: float = ACK_DELAY) -> None:
        self.token = token
        self.sent = 0  # MSG frames sent to the client in this session
        self.acked = 0  # ...of which its ACK or RESUME covers this many
        self.log: deque[LogEntry] = deque()
        self.log_bytes = 0  # what flow control counts
        self.stream = 0  # bytes handed to the current connection
        self.written = 0  # when away: how many of them were written before the drop
        self.clock = AckClock(ack_delay)  # MSG frames received from the client
        self.peer: str | None = None  # the client's partner as of the end of the log
        self.away_until = 0.0  # away: when the window closes (0.0: connected)
        self.ended = False  # ended for good (BYE, error, expiry): never resumed

    @property
    def away(self) -> bool:
        return self.away_until > 0.0

    @property
    def unacked(self) -> int:
        """MSG frames sent to the client that it never acknowledged."""
        return self.sent - self.acked

    # -- sending ----------------------------------------------------------------------

    def record(self, data: bytes | memoryview, msgs: int) -> None:
        """``data`` (whole frames, ``msgs`` of them MSG) goes to the client now (or is held for it)."""
        self.stream += len(data)
        peer_before = self.peer
        if data[4] != _MSG:  # (a MSG run is MSG frames only; anything else is one frame or a few)
            data = self._events(data)
            if not data:
                return
        self.log.append(LogEntry(bytes(data), msgs, self.stream, peer_before))
        self.log_bytes += len(data)
        self.sent += msgs

    def _events(self, data: bytes | memoryview) -> bytes:
        """The frames of ``data`` worth replaying; :attr:`peer` follows PAIRED and PEER_LEFT.

        Events are rare, so they are parsed. One write may hold several
        (WELCOME, WAITING and PAIRED go out together): each is judged alone.
        """
        kept = []
        pos = 0
        while pos + 5 <= len(data):
            end = pos + 4 + int.from_bytes(data[pos:pos + 4], "big")
            ftype = data[pos + 4]
            if ftype in _NOT_LOGGED:
                pos = end
                continue
            if ftype == _PAIRED:
                peer = decode_json(bytes(data[pos + 5:end])).get("peer")
                self.peer = peer if isinstance(peer, str) else None
            elif ftype == _PEER_LEFT:
                self.peer = None
            kept.append(bytes(data[pos:end]))
            pos = end
        return b"".join(kept)

    # -- acknowledgements ------------------------------------------------------------

    def acknowledge(self, received: int, written: int) -> None:
        """An ACK from the client; ``written``: bytes of this connection written so far."""
        check_ack(received, self.acked, self.sent)
        self._trim(received, written)

    def _trim(self, received: int, written: int) -> None:
        """Drop what the client has seen: MSGs up to ``received``, written events before the next."""
        log = self.log
        while log:
            entry = log[0]
            if entry.msgs:
                n = received - self.acked
                if n <= 0:
                    break
                if entry.msgs > n:  # the count ends inside this run: cut it at a frame boundary
                    cut = frame_offset(entry.data, n)
                    entry.data = entry.data[cut:]
                    entry.msgs -= n
                    self.log_bytes -= cut
                    self.acked += n
                    break
                self.acked += entry.msgs
            elif entry.end > written:
                break  # an event not written yet: the client cannot have seen it
            log.popleft()
            self.log_bytes -= len(entry.data)

    # -- dropping and coming back ----------------------------------------------------------

    def go_away(self, written: int, until: float) -> None:
        """The connection dropped after ``written`` of its bytes were written; wait until ``until``."""
        self.written = written
        self.away_until = until
        self._trim(self.acked, written)

    def check_resume(self, received: int) -> None:
        """``bad_hello`` (the session left as it was) if the count is beyond what was sent, or goes back."""
        check_resume_count(received, self.acked, self.sent)

    def plan_resume(self, received: int) -> tuple[list[LogEntry], str | None]:
        """A RESUME saying ``received``: what to send again, and the partner to name in RESUMED.

        Call :meth:`check_resume` first, and :meth:`reconnected` before
        sending the entries: they are recorded again as they go out.
        """
        self.check_resume(received)
        self._trim(received, self.written)
        replay = list(self.log)
        peer = replay[0].peer_before if replay else self.peer
        return replay, peer

    def reconnected(self, replay: list[LogEntry]) -> None:
        """A new connection carries the session: its stream starts at 0; ``replay`` is sent again."""
        self.away_until = 0.0
        self.stream = self.written = 0
        self.log.clear()
        self.log_bytes = 0
        self.sent -= sum(entry.msgs for entry in replay)  # counted again as they are recorded
        if replay:
            self.peer = replay[0].peer_before

    # -- moving to another process ------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Plain data for a relay worker, or (cluster mode) for another node adopting an away session."""
        return {
            "token": self.token, "sent": self.sent, "acked": self.acked, "stream": self.stream,
            "log": [(e.data.hex(), e.msgs, e.end, e.peer_before) for e in self.log], "peer": self.peer,
            "received": self.clock.received, "ack_sent": self.clock.acked, "written": self.written,
        }

    @classmethod
    def from_state(cls, st: dict[str, Any], now: float) -> Session:
        session = cls(st["token"])
        session.sent, session.acked, session.stream = st["sent"], st["acked"], st["stream"]
        session.written = st.get("written", 0)
        session.peer = st["peer"]
        for data, msgs, end, peer_before in st["log"]:
            entry = LogEntry(bytes.fromhex(data), msgs, end, peer_before)
            session.log.append(entry)
            session.log_bytes += len(entry.data)
        session.clock.restore(st["received"], st["ack_sent"], now)
        return session
