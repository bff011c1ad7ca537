"""The client's side of a connection, sans-IO: the server's bytes in, events out.

:class:`ClientProtocol` is everything a frame-mode client must know about a
server, without a socket or a clock, so that pipe mode, the curses UI and a
bot can share it and tests can feed it exact bytes (h11's style)::

    proto = ClientProtocol("alice", None, label="example.org:7878")
    proto.receive_data(data, now)      # b"": the server closed its side
    for ev in proto.events():          # Welcome, Paired, Message, ... (chatpair.proto.events)
        ...
    n = sock.send(proto.outbox)        # what we owe the server: HELLO, PONGs, our frames
    proto.sent(n)

The states, each entered once, in this order (any of them may end in CLOSED)::

    BANNER --banner line checked, HELLO queued--> HANDSHAKE --WELCOME--> OPEN
        --send_bye()--> LEAVING --the server closes--> CLOSED

What it guards against, because a server is trusted no more than a partner
(docs/client.md, "A broken or hostile server"): a banner that is not
chatpair's, a frame over the limit (refused from its 4 length bytes), a
WELCOME whose ``max_frame`` is absurd, and floods of frames that carry
nothing for the user (PINGs, unasked PONGs, reserved types): their answers
never grow the outbox past :data:`PONG_ROOM`, and past :data:`PING_RATE` a
second :meth:`ClientProtocol.read_pause` tells the owner to read more slowly.
Every ``reason`` in a :class:`~chatpair.proto.events.Closed` is one line for
a person and names the server by the ``label`` given.

Resuming (PROTOCOL.md section 6): with ``resume=True`` HELLO asks for it;
a WELCOME with a ``session`` token starts a :class:`ClientSession`, which
outlives the connection. Given to the protocol of the next connection, it
makes it send RESUME instead of HELLO, hold our MSGs until RESUMED, then
send again every MSG past the server's count. Within a session the protocol
counts the server's MSGs and ACKs them (:meth:`ClientProtocol.tick` and the
end of each batch read), keeps our MSGs until ACKed, and watches for a dead
connection: after ``ping_after`` seconds without a byte from the server it
PINGs, after ``dead_after`` it gives up (:func:`keepalive_times`).
"""

from __future__ import annotations

import enum
from typing import Any, Final

from chatpair.proto.clientsession import ClientSession, first_frame
from chatpair.proto.events import FINAL_EVENTS, Closed, Event, Message, Notice, Paired, PeerAway, PeerBack
from chatpair.proto.events import PeerLeft, Pong, ServerError, Waiting, Welcome
from chatpair.proto.frames import EndOfStream, Frame, FrameDecoder, encode_frame, encode_msg, split_utf8
from chatpair.proto.handshake import check_banner
from chatpair.proto.sanitize import sanitize
from chatpair.proto.wire import BANNER_PREFIX, DEFAULT_MAX_FRAME, MAX_BANNER, MAX_FRAME_CEILING, MAX_PING_PAYLOAD
from chatpair.proto.wire import NEED_DATA, ErrorCode, FrameType, ProtocolError, _NeedData

#: The frame types a server may send; anything else is ignored (forward compatibility).
SERVER_TYPES: Final = frozenset({FrameType.MSG, FrameType.PING, FrameType.PONG, FrameType.WELCOME,
                                 FrameType.WAITING, FrameType.PAIRED, FrameType.PEER_LEFT, FrameType.NOTICE,
                                 FrameType.ERROR})
#: A WELCOME announcing a ``max_frame`` below this (or one that is not an
#: integer up to MAX_FRAME_CEILING) comes from a broken server: no useful
#: message fits, so the client says so and leaves instead of guessing.
#: (chatpair's own server allows 1,024 at least.)
MIN_SERVER_MAX_FRAME: Final = 64
#: PONGs are answered only while less than this waits to be sent. A server
#: that PINGs without reading our answers gets one coalesced PONG (for its
#: latest PING) once it reads again, so a PING flood never grows the outbox.
#: A PONG is not a message; the user's own messages are never held back.
PONG_ROOM: Final = 4096
#: A server PINGs a few times a minute. Past this many frames a second that
#: carry nothing for the user (after a burst of as many), reading pauses
#: until the rate is back under it, so a PING flood cannot pin a CPU. Frames
#: the user sees (MSG...) have no such budget: they are the work itself, and
#: the server's flow control paces them.
PING_RATE: Final = 100.0
#: The longest read pause such a flood causes at a time (and so the most a
#: message queued behind it is delayed per read).
PING_PAUSE_MAX: Final = 1.0
#: Our PINGs whose PONG has not come: only the most recent are remembered.
MAX_PINGS_KEPT: Final = 16
#: The code of a ProtocolError for a server that is not a chatpair server (as in check_banner).
_NOT_CHATPAIR: Final = "not_chatpair"
_NOTICES: Final = {"peer_away": PeerAway, "peer_back": PeerBack}


def split_message(text: str, max_bytes: int) -> list[str]:
    """Cut text into pieces of at most ``max_bytes`` UTF-8 bytes, at character boundaries.

    ``max_bytes`` must be at least 4 (one character may take 4 bytes):
    below that some text cannot be cut at all, and ValueError is raised
    rather than sending a character whole into a frame too small for it.
    """
    if max_bytes < 4:
        raise ValueError(f"cannot split text into pieces of {max_bytes} bytes: a character may take 4")
    return [piece.decode("utf-8") for piece in split_utf8(text, max_bytes)] or [text]


class ClientState(enum.Enum):
    """Where a client connection is (see the module docstring)."""

    BANNER = "banner"  # waiting for the server's banner line
    HANDSHAKE = "handshake"  # HELLO sent, waiting for WELCOME
    OPEN = "open"  # welcomed: chatting
    LEAVING = "leaving"  # BYE sent: reading what is left until the server closes
    CLOSED = "closed"  # ERROR, end of stream or a broken server: nothing more comes


class ChatterBudget:
    """A token bucket for frames that carry nothing for the user.

    Full at the start (:data:`PING_RATE` frames may come at once); each
    such frame takes a token, tokens come back at ``rate`` a second; below
    zero, reading pauses until the bucket would be back at zero (at most
    ``max_pause`` seconds of debt is kept).
    """

    def __init__(self, rate: float = PING_RATE, max_pause: float = PING_PAUSE_MAX) -> None:
        self.rate = rate
        self.max_pause = max_pause
        self._tokens = rate
        self._clock: float | None = None  # when tokens were last counted
        self._paused_until = 0.0

    def spend(self, now: float) -> None:
        """Count one such frame, received at ``now``."""
        elapsed = 0.0 if self._clock is None else now - self._clock
        tokens = min(self.rate, self._tokens + elapsed * self.rate) - 1
        self._clock = now
        self._tokens = max(tokens, -self.rate * self.max_pause)
        if tokens < 0:
            self._paused_until = now - self._tokens / self.rate

    def pause(self, now: float) -> float:
        """Seconds to wait before reading again (0: read now)."""
        return max(0.0, self._paused_until - now)


class BannerDecoder:
    """The server's banner line, checked as its bytes arrive.

    ``feed(b"")`` means end of stream. :meth:`next_event` returns the
    banner's text (after ``CHATPAIR/1 ``) or NEED_DATA, and raises
    ProtocolError as soon as the bytes cannot become a banner: no waiting
    for a line from a server that speaks another protocol. Its message
    reads after the server's name (``"<host:port> is not a chatpair server
    ..."``). Afterwards :attr:`rest` holds the bytes that came after the line.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.eof = False
        self.rest = b""

    def feed(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self.eof = True

    def next_event(self) -> str | _NeedData:
        buf = self._buf
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > MAX_BANNER or not BANNER_PREFIX.startswith(bytes(buf[:len(BANNER_PREFIX)])):
                raise self._not_chatpair()
            if self.eof:
                raise self._not_chatpair() if buf else ProtocolError(
                    _NOT_CHATPAIR, "closed the connection before its banner: not a chatpair server?")
            return NEED_DATA
        try:
            text = check_banner(bytes(buf[:end]))  # the protocol's one banner check
        except ProtocolError:
            raise self._not_chatpair() from None
        if end + 1 > MAX_BANNER:
            raise ProtocolError(_NOT_CHATPAIR, "is not a chatpair server (banner too long)")
        self.rest = bytes(buf[end + 1:])
        buf.clear()
        return text

    def _not_chatpair(self) -> ProtocolError:
        return ProtocolError(_NOT_CHATPAIR, f"is not a chatpair server (it sent {bytes(self._buf[:40])!r})")


class ClientProtocol:
    """One client connection's protocol state; see the module docstring.

    For callers: :meth:`receive_data`, :meth:`next_event` / :meth:`events`,
    :attr:`outbox` and :meth:`sent`, the ``send_*`` methods (they queue
    frames in :attr:`outbox`), :meth:`read_pause`, and the read-only
    :attr:`state`, :attr:`welcome`, :attr:`max_frame`, :attr:`peer`.

    ``banner``: the banner's text when the caller has already read the
    banner and sent HELLO itself; the protocol then starts in HANDSHAKE.
    ``resume``: HELLO asks for a session; ``session``: an earlier one, to resume.
    """

    def __init__(self, name: str, room: str | None, label: str, banner: str | None = None, *,
                 resume: bool = False, session: ClientSession | None = None) -> None:
        self.name = name
        self.room = room
        #: How the server is named in every reason and message (``host:port``).
        self.label = label
        self.state = ClientState.BANNER if banner is None else ClientState.HANDSHAKE
        self.banner = banner or ""
        self._banner = BannerDecoder()
        #: What we accept: the default until WELCOME, then the server's own
        #: limit, never less than the default (a server with a small limit may
        #: still send longer control frames, e.g. an ERROR message).
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        #: What we may send: the server's ``max_frame`` once WELCOME says it.
        self.max_frame = DEFAULT_MAX_FRAME
        self.welcome: Welcome | None = None
        self.peer: str | None = None
        #: Bytes to send, oldest first; the owner sends them and calls :meth:`sent`.
        self.outbox = bytearray()
        #: The latest PING not answered yet because PONG_ROOM was used up
        #: (the server is not reading us): answered once it reads again.
        self._pong_owed: bytes | None = None
        self._pings: dict[bytes, float] = {}  # our PING tokens -> when sent
        self._ping_seq = 0
        self._chatter = ChatterBudget()
        self._now, self._spoke = 0.0, False  # when the bytes being decoded arrived; see speak_first()
        self.resume = resume or session is not None
        self.session = session  # None: a plain v1 connection, or not welcomed yet

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the server, received at ``now`` (``b""``: it closed its side)."""
        self._now = now
        if self.state is ClientState.CLOSED:
            return  # after a final event nothing the server says counts
        if data and self.session is not None:
            self.session.heard(now)
        if self.state is ClientState.BANNER:
            self._banner.feed(data)
        else:
            self.decoder.feed(data)

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA. After a ServerError or Closed, always NEED_DATA."""
        while self.state is not ClientState.CLOSED:
            if self.state is ClientState.BANNER:
                banner_end = self._read_banner()
                if banner_end is not None:
                    return banner_end
                continue
            try:
                item = self.decoder.next_event()
            except ProtocolError as err:
                return self._close(self._broken(err))
            if isinstance(item, _NeedData):
                if self.session is not None and self.state is ClientState.OPEN:
                    self.outbox += self.session.ack(self._now)  # one ACK for a whole batch read
                return item
            if isinstance(item, EndOfStream):
                during = "" if self.welcome is not None else " during the handshake"
                return self._close(f"{self.label} closed the connection{during}")
            ev = self._on_frame(item)
            if ev is None:
                continue
            if self.state is ClientState.HANDSHAKE and not isinstance(ev, (Welcome, Notice, *FINAL_EVENTS)):
                return self._close(f"{self.label} is not a chatpair server (no WELCOME)")
            if isinstance(ev, FINAL_EVENTS):
                self.state = ClientState.CLOSED
            return ev
        return NEED_DATA

    def events(self) -> list[Event]:
        """Every event now buffered, in order; a ServerError or Closed is always the last."""
        out: list[Event] = []
        while not isinstance(ev := self.next_event(), _NeedData):
            out.append(ev)
        return out

    def read_pause(self, now: float) -> float:
        """Seconds to wait before reading again (0: read now).

        Non-zero only while the server sends more frames with nothing for
        the user than PING_RATE a second: the owner stops watching for
        readability meanwhile, so a flood costs little CPU.
        """
        return self._chatter.pause(now)

    def tick(self, now: float) -> Closed | None:
        """A session's timers (ACK, keepalive PING; when: ``session.deadline()``); Closed: the server went silent."""
        session = self.session
        if session is None or self.state is not ClientState.OPEN:
            return None
        due = session.timers(now)
        if due is None:
            return self._close(f"{self.label} stopped answering (nothing for {session.dead_after:g} s)")
        self.outbox += due
        return None

    def _close(self, reason: str) -> Closed:
        self.state = ClientState.CLOSED
        return Closed(reason)

    def _read_banner(self) -> Closed | _NeedData | None:
        """Check the banner line; None once it is good (HELLO is then queued)."""
        try:
            text = self._banner.next_event()
        except ProtocolError as err:
            return self._close(f"{self.label} {err.message}")
        if isinstance(text, _NeedData):
            return text
        self.banner = text
        self.state = ClientState.HANDSHAKE
        self.outbox += b"" if self._spoke else first_frame(self.name, self.room, self.resume, self.session)
        if self._banner.rest:
            self.decoder.feed(self._banner.rest)
        if self._banner.eof:
            self.decoder.feed(b"")
        return None

    def _broken(self, err: ProtocolError) -> str:
        """The one line for a server that broke the framing."""
        return _broken_reason(self.label, err, self.decoder, self.max_frame if self.welcome else None)

    def _on_frame(self, frame: Frame) -> Event | None:
        t = frame.type
        if t == FrameType.MSG:
            if self.session is not None:
                self.session.clock.received_msgs(1, self._now)
            return Message(self.peer or "?", frame.payload.decode("utf-8", "replace"))
        if t in (FrameType.ACK, FrameType.RESUMED) and self.session is not None and self.welcome is not None:
            return self._on_session_frame(frame)
        if t == FrameType.PING:
            self._chatter.spend(self._now)
            if self.state is not ClientState.LEAVING:  # after BYE our side is shut for writing
                self._pong(frame.payload[:MAX_PING_PAYLOAD])
            return None
        if t == FrameType.PONG:
            sent = self._pings.pop(frame.payload, None)
            if sent is None:
                self._chatter.spend(self._now)
                return None
            return Pong(self._now - sent)
        if t not in SERVER_TYPES:
            self._chatter.spend(self._now)
            return None  # reserved or unknown types: ignored, for forward compatibility
        try:
            obj = frame.json()
        except ProtocolError:
            obj = {}  # a control frame without JSON still means what its type says
        return self._on_control(t, obj)

    def _on_control(self, t: int, obj: dict[str, Any]) -> Event | None:
        if t == FrameType.WELCOME:
            return self._on_welcome(obj)
        ev = control_event(t, obj)
        if isinstance(ev, (Waiting, Paired, PeerLeft)):
            self.peer = ev.peer if isinstance(ev, Paired) else None
        return ev

    def _on_welcome(self, obj: dict[str, Any]) -> Welcome | Closed | None:
        if self.welcome is not None:
            self._chatter.spend(self._now)
            return None  # one WELCOME per connection: a second one changes nothing
        max_frame = obj.get("max_frame")
        if type(max_frame) is not int or not MIN_SERVER_MAX_FRAME <= max_frame <= MAX_FRAME_CEILING:
            return self._close(_bad_max_frame(self.label, obj))
        self.max_frame = max_frame
        self.decoder.max_frame = max(max_frame, DEFAULT_MAX_FRAME)
        self.welcome = Welcome(_text(obj, "server"), max_frame, _number(obj.get("ping_interval")),
                               _number(obj.get("idle_timeout")), self.banner)
        if self.state is ClientState.HANDSHAKE:
            self.state = ClientState.OPEN
        if self.session is not None:
            self.session.attach(self._now)  # a RESUME was welcomed: RESUMED comes next
        elif self.resume:
            self.session = ClientSession.offered(obj, self.welcome.ping_interval, self._now)
        return self.welcome

    def _on_session_frame(self, frame: Frame) -> Event | None:
        """ACK (forget what it covers) or RESUMED (send again what the server lacks)."""
        assert self.session is not None
        try:
            resumed, again = self.session.on_frame(frame)
        except ProtocolError as err:
            return self._close(f"{self.label} broke the protocol: {err.message}")
        for frames in again:
            self.outbox += frames
        if resumed is not None:
            self.peer = resumed.peer
        return resumed

    # -- sending -------------------------------------------------------------

    def sent(self, n: int) -> None:
        """The first ``n`` bytes of :attr:`outbox` were sent."""
        del self.outbox[:n]
        if self._pong_owed is not None and len(self.outbox) < PONG_ROOM:
            self.outbox += encode_frame(FrameType.PONG, self._pong_owed)
            self._pong_owed = None

    def _pong(self, payload: bytes) -> None:
        """Answer a PING, unless the server is not reading what we already queued."""
        if len(self.outbox) >= PONG_ROOM:
            self._pong_owed = payload  # only the latest one is answered, later
            return
        self.outbox += encode_frame(FrameType.PONG, payload)

    def send_msg(self, text: str) -> None:
        """Queue text as MSG frames, split if longer than the server's limit; empty text sends nothing."""
        if not text:
            return
        pieces = split_message(text, self.max_frame - 1)
        frames = b"".join(encode_msg(piece) for piece in pieces)
        if self.session is None or self.session.record(frames, len(pieces)):
            self.outbox += frames

    def send_next(self) -> None:
        """Queue NEXT: leave the partner (the server answers WAITING)."""
        self.peer = None
        self.outbox += encode_frame(FrameType.NEXT)

    def send_ping(self, now: float) -> None:
        """Queue a PING with a fresh token; its PONG becomes a :class:`Pong` event."""
        self._ping_seq += 1
        token = self._ping_seq.to_bytes(8, "big")
        self._pings[token] = now
        if len(self._pings) > MAX_PINGS_KEPT:  # never answered: forget the oldest
            self._pings.pop(next(iter(self._pings)))
        self.outbox += encode_frame(FrameType.PING, token)

    def send_bye(self) -> None:
        """Queue BYE; from now on PINGs are not answered (our side shuts for writing)."""
        if self.state is not ClientState.CLOSED:
            self.state = ClientState.LEAVING
        self._pong_owed = None
        self.outbox += encode_frame(FrameType.BYE)


def speak_first(proto: ClientProtocol) -> None:
    """Queue the first frame before the banner, once: a silent server is made to answer.

    Its JSON ends in CRLF (whitespace JSON allows), so a server that waits
    for a request line (HTTP) answers too; :func:`greeting` is what it said.
    """
    if proto.state is ClientState.BANNER and not proto._spoke:
        proto._spoke = True
        frame = first_frame(proto.name, proto.room, proto.resume, proto.session)
        proto.outbox += encode_frame(frame[4], frame[5:] + b"\r\n")


def greeting(proto: ClientProtocol) -> bytes:
    """What the server sent instead of a banner (when it is not a chatpair server)."""
    return bytes(proto._banner._buf[:MAX_BANNER])


def control_event(t: int, obj: dict[str, Any]) -> Event | None:
    """The event of a server's control frame other than WELCOME (None: not one)."""
    if t == FrameType.WAITING:
        return Waiting(_room(obj))
    if t == FrameType.PAIRED:
        return Paired(_text(obj, "peer", "?"), _room(obj))
    if t == FrameType.PEER_LEFT:
        return PeerLeft(_text(obj, "peer", "?"), _text(obj, "reason", "disconnected"))
    if t == FrameType.NOTICE:
        code = _text(obj, "code")
        return _NOTICES.get(code, Notice)(code, _text(obj, "message"))
    if t == FrameType.ERROR:
        return ServerError(_text(obj, "code"), _text(obj, "message", "error"))
    return None


def _broken_reason(label: str, err: ProtocolError, decoder: FrameDecoder, max_frame: int | None) -> str:
    """The one line for a server that broke the framing (``max_frame``: its own limit, once welcomed)."""
    if err.code == ErrorCode.FRAME_TOO_LARGE:
        size = int.from_bytes(decoder.buffered[:4], "big")
        if max_frame is not None:
            return f"{label} sent a frame of {size:,} bytes, over its own limit of {max_frame:,} (a broken server?)"
        return (f"{label} sent a frame of {size:,} bytes before its WELCOME, over the limit of "
                f"{decoder.max_frame:,}: not a working chatpair server")
    return f"{label} broke the protocol: {err.message}"


def _bad_max_frame(label: str, obj: dict[str, Any]) -> str:
    max_frame = obj.get("max_frame")
    shown = sanitize(repr(max_frame)[:40], False) if "max_frame" in obj else "missing"
    return (f"{label} sent a WELCOME with max_frame {shown}; a working server announces "
            f"a whole number from {MIN_SERVER_MAX_FRAME} to {MAX_FRAME_CEILING:,} (a broken server?)")


def _text(obj: dict[str, Any], key: str, default: str = "") -> str:
    """A string field of a control frame; anything else is shown as text, not trusted."""
    value = obj.get(key, default)
    return value if isinstance(value, str) else str(value)


def _room(obj: dict[str, Any]) -> str | None:
    value = obj.get("room")
    return value if isinstance(value, str) else None


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
