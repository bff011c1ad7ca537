"""The client's side of a resumable session (PROTOCOL.md section 6), sans-IO.

A :class:`ClientSession` starts with the first WELCOME that carries a
``session`` token and outlives the connection: the next connection's
:class:`~chatpair.proto.clientside.ClientProtocol` is given it, sends
RESUME instead of HELLO, and sends again what the server's RESUMED says it
lacks. It holds the two pieces of :mod:`chatpair.proto.resume` a client
needs (the :class:`~chatpair.proto.resume.AckClock` for what we receive, the
:class:`~chatpair.proto.resume.Outbox` for what we send), flow control, and
the keepalive that notices a dead connection (:func:`keepalive_times`). No
sockets, no clock: ``now`` is passed in. It lives apart from
:mod:`~chatpair.proto.clientside` only to keep each module small.
"""

from __future__ import annotations

from typing import Any, Final

from chatpair.proto.events import Resumed
from chatpair.proto.frames import Frame, encode_frame, encode_json_frame
from chatpair.proto.handshake import encode_hello
from chatpair.proto.resume import MAX_TOKEN, AckClock, Outbox, encode_ack, encode_resume, parse_ack
from chatpair.proto.wire import PROTOCOL_VERSION, ErrorCode, FrameType, ProtocolError

#: Flow control of a resumable session: no new MSG is sent while this many
#: bytes of ours are unacknowledged (the server ACKs within a second, so
#: this only bites when the server cannot keep up or the link is dying).
FLOW_LIMIT: Final = 4 << 20
#: We ACK half a second after an unacknowledged MSG (the spec allows 1 s):
#: room for a loop's timer resolution.
ACK_DELAY: Final = 0.5
#: Keepalive bounds (seconds): PING after at most KEEPALIVE_MAX of silence
#: from the server, then the connection is dead after DEAD_GRACE more.
KEEPALIVE_MAX: Final = 10.0
DEAD_GRACE: Final = (2.0, 5.0)
#: The payload of a keepalive PING: its PONG is an unasked one (no event).
KEEPALIVE_TOKEN: Final = b"keepalive"


def keepalive_times(ping_interval: float, window: float) -> tuple[float, float]:
    """(silence before our PING, silence before the connection counts as dead), in seconds.

    The server's ``ping_interval`` (capped at KEEPALIVE_MAX; 0 means unknown)
    and at most a third of the resume window, so a dead link is noticed
    while the server still keeps the session; then DEAD_GRACE (the PING's
    own wait: at least 2 s, at most 5 s).
    """
    ping_after = max(0.5, min(KEEPALIVE_MAX, ping_interval or KEEPALIVE_MAX, window / 3 or KEEPALIVE_MAX))
    return ping_after, ping_after + min(max(ping_after, DEAD_GRACE[0]), DEAD_GRACE[1])


def first_frame(name: str, room: str | None, resume: bool, session: ClientSession | None) -> bytes:
    """RESUME for a session; else HELLO, asking for resume or (exactly v1's bytes) not."""
    if session is not None:  # RESUME's count acknowledges as an ACK would
        return encode_resume(session.token, session.clock.take_ack())
    if resume:
        return encode_json_frame(FrameType.HELLO, {"version": PROTOCOL_VERSION, "name": name, "room": room,
                                                   "resume": True})
    return encode_hello(name, room)


class ClientSession:
    """A resumable session as the client keeps it across connections (PROTOCOL.md section 6).

    ``token`` and ``window`` are the first WELCOME's; ``clock`` counts the
    server's MSG frames and says when an ACK is due; ``sent`` keeps our MSG
    frames until an ACK covers them. Per connection (:meth:`attach`):
    ``resuming`` (RESUME sent, no RESUMED yet: our MSGs wait) and when a
    byte last came from the server (``heard_at``), for the keepalive.
    """

    def __init__(self, token: str, window: float, ping_interval: float, now: float) -> None:
        self.token = token
        self.window = window
        self.clock = AckClock(ACK_DELAY)
        self.sent = Outbox()
        self.ping_after, self.dead_after = keepalive_times(ping_interval, window)
        self.resuming = False
        self.heard_at = now
        self.pinged = False

    @classmethod
    def offered(cls, welcome: dict[str, Any], ping_interval: float, now: float) -> ClientSession | None:
        """The session a WELCOME offers (None: it offers none, the server is v1)."""
        token, window = welcome.get("session"), welcome.get("resume_window")
        if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN:
            return None
        ok = isinstance(window, (int, float)) and not isinstance(window, bool) and window > 0
        return cls(token, float(window) if ok else 0.0, ping_interval, now)  # type: ignore[arg-type]

    @property
    def blocked(self) -> bool:
        """Flow control: too much of what we sent is unacknowledged to send more now."""
        return self.sent.nbytes >= FLOW_LIMIT

    def attach(self, now: float) -> None:
        """A new connection was welcomed after our RESUME."""
        self.resuming, self.heard_at, self.pinged = True, now, False

    def heard(self, now: float) -> None:
        self.heard_at, self.pinged = now, False

    def deadline(self) -> float:
        """When :meth:`ClientProtocol.tick` has something to do if nothing else happens."""
        silence = self.heard_at + (self.dead_after if self.pinged else self.ping_after)
        ack = self.clock.deadline()
        return silence if ack is None else min(ack, silence)

    def record(self, frames: bytes, count: int) -> bool:
        """Keep our MSG frames until ACKed; True: send them now (False: RESUMED will)."""
        self.sent.record(frames, count)
        return not self.resuming

    def ack(self, now: float) -> bytes:
        """An ACK frame if one is due (else nothing)."""
        return encode_ack(self.clock.take_ack()) if self.clock.ack_due(now) else b""

    def timers(self, now: float) -> bytes | None:
        """What the timers want sent now (a keepalive PING, an ACK), or None: the connection is dead."""
        if now - self.heard_at >= self.dead_after:
            return None
        out = b""
        if not self.pinged and now - self.heard_at >= self.ping_after:
            self.pinged = True
            out = encode_frame(FrameType.PING, KEEPALIVE_TOKEN)
        return out + self.ack(now)

    def on_frame(self, frame: Frame) -> tuple[Resumed | None, list[bytes]]:
        """ACK or RESUMED from the server -> (the Resumed event, our frames to send again).

        ProtocolError if the server's count is impossible, or RESUMED answers no RESUME.
        """
        if frame.type == FrameType.ACK:
            self.sent.acknowledge(parse_ack(frame))
            return None, []
        obj = frame.json()
        received, peer, room = obj.get("received"), obj.get("peer"), obj.get("room")
        if not self.resuming or type(received) is not int:
            raise ProtocolError(ErrorCode.BAD_FRAME, "RESUMED must answer our RESUME, with a count")
        again = self.sent.since(received)
        self.resuming = False
        return Resumed(peer if isinstance(peer, str) else None, room if isinstance(room, str) else None,
                       self.sent.unacked), again
