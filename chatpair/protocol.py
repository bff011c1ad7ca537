"""The chatpair wire protocol, version 1, sans-IO: bytes in, events out.

Nothing here touches a socket or a clock, so every rule can be tested exactly
(see tests/test_protocol.py) and shared by the server, the client and the
benchmark. ``docs/protocol.md`` is the same contract in prose.

Transport and banner
    TCP (or TLS). The server speaks first with one ASCII line of at most 200
    bytes: ``CHATPAIR/1 <software> <free text>\\r\\n``.

Mode
    The client's first byte picks the mode: ``0x00`` is frame mode (the first
    frame must be HELLO); anything else is line mode (netcat, telnet).

Frame mode
    ::

        +-------------------------+-----------+---------------------------+
        | length: uint32, big end | type: u8  | payload: length - 1 bytes |
        +-------------------------+-----------+---------------------------+

    ``1 <= length <= max_frame``; ``length`` counts the type byte. Because
    ``max_frame < 2**24`` the first byte of every frame is 0x00. MSG payloads
    are non-empty UTF-8; control payloads are JSON objects (see FrameType).

Line mode
    UTF-8 lines ending in ``\\n`` (a ``\\r`` before it is dropped, telnet IAC
    sequences are skipped). The first line is ``NAME`` or ``NAME ROOM``; later
    lines are messages or the commands ``/next``, ``/quit``, ``/help``.

Decoders follow h11's convention: ``feed(b"")`` means end of stream and
``next_event()`` returns an event or :data:`NEED_DATA`. Errors the *peer* made
raise :class:`ProtocolError` carrying the wire error code.
"""

from __future__ import annotations

import enum
import json
import struct
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

# --------------------------------------------------------------------------
# Limits, each with the reason it has the value it has.
# --------------------------------------------------------------------------

PROTOCOL_VERSION: Final = 1
BANNER_PREFIX: Final = b"CHATPAIR/1 "
#: The banner is one short line so a client can refuse a non-chatpair port
#: after reading at most this many bytes.
MAX_BANNER: Final = 200
DEFAULT_PORT: Final = 7878
#: Big enough for a long pasted message, small enough that one frame never
#: pins much memory. Announced in WELCOME so clients can split long text.
DEFAULT_MAX_FRAME: Final = 65_536
#: Hard ceiling: every frame must start with byte 0x00 (that is how the server
#: tells frame mode from line mode), so a length must stay below 2**24.
MAX_FRAME_CEILING: Final = 2**24 - 1
#: Before the handshake completes nobody has proven they speak chatpair, so
#: the server accepts nothing bigger than a generous HELLO or name line.
HANDSHAKE_MAX: Final = 1_024
#: PING payloads are opaque tokens (a timestamp, a counter), not data.
MAX_PING_PAYLOAD: Final = 64
MAX_NAME: Final = 32
MAX_ROOM: Final = 64
DEFAULT_PING_INTERVAL: Final = 30.0
DEFAULT_IDLE_TIMEOUT: Final = 90.0
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0

#: ``>IB``: the 5-byte frame header (length, type). One compiled Struct, so
#: parsing a header allocates nothing but the result tuple.
HEADER: Final = struct.Struct(">IB")
HEADER_SIZE: Final = HEADER.size


class FrameType(enum.IntEnum):
    """Frame type codes. 0x07-0x0F and 0x15-0x1E are reserved."""

    HELLO = 0x01
    MSG = 0x02
    NEXT = 0x03
    BYE = 0x04
    PING = 0x05
    PONG = 0x06
    WELCOME = 0x10
    WAITING = 0x11
    PAIRED = 0x12
    PEER_LEFT = 0x13
    NOTICE = 0x14
    ERROR = 0x1F


#: What a client may send after HELLO. Everything else is ``bad_frame``.
CLIENT_TYPES: Final = frozenset(
    {FrameType.MSG, FrameType.NEXT, FrameType.BYE, FrameType.PING, FrameType.PONG}
)

PEER_LEFT_REASONS: Final = ("bye", "next", "disconnected", "timeout", "error")


class ErrorCode(str, enum.Enum):
    """The error codes of ERROR frames (a client shows the message, not the code)."""

    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_HELLO = "bad_hello"
    UNSUPPORTED_VERSION = "unsupported_version"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    TIMEOUT = "timeout"
    ROOM_FULL = "room_full"
    SERVER_FULL = "server_full"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    SHUTDOWN = "shutdown"


class ProtocolError(Exception):
    """The peer broke the protocol. ``code`` is the wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = str(code.value if isinstance(code, ErrorCode) else code)
        self.message = message


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event()`` when more bytes are needed.
NEED_DATA: Final = _NeedData()


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: its type code and raw payload."""

    type: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object (control frames); ProtocolError if not."""
        return decode_json(self.payload)

    def text(self) -> str:
        """The payload of a MSG as text; ProtocolError if not valid UTF-8."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_FRAME, "a message must be valid UTF-8 text") from None


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer closed its side cleanly at a frame (or line) boundary."""


@dataclass(frozen=True, slots=True)
class Hello:
    """A validated HELLO (frame mode) or first line (line mode)."""

    name: str
    room: str | None


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def encode_frame(ftype: int, payload: bytes = b"") -> bytes:
    """One frame on the wire: header plus payload."""
    return HEADER.pack(len(payload) + 1, ftype) + payload


#: One encoder made once: ``json.dumps`` with options builds a new encoder per call.
_JSON_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode_json_frame(ftype: int, obj: dict[str, Any]) -> bytes:
    """A control frame whose payload is a compact UTF-8 JSON object."""
    return encode_frame(ftype, _JSON_ENCODER.encode(obj).encode())


def encode_msg(text: str) -> bytes:
    """A MSG frame. Raises ValueError for empty text (the server refuses it)."""
    data = text.encode("utf-8")
    if not data:
        raise ValueError("a message cannot be empty")
    return encode_frame(FrameType.MSG, data)


def split_utf8(text: str, max_bytes: int) -> list[bytes]:
    """``text`` as UTF-8 pieces of at most ``max_bytes`` bytes, cut between characters.

    Used where one text must become several MSG frames (a line-mode line
    whose invalid bytes became U+FFFD can be three times the line limit).
    Always makes progress: a character longer than ``max_bytes`` (only
    possible with ``max_bytes`` < 4) becomes a piece of its own.
    """
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return [data] if data else []
    pieces: list[bytes] = []
    start, size = 0, len(data)
    while start < size:
        end = min(start + max(1, max_bytes), size)
        while end < size and end > start and (data[end] & 0xC0) == 0x80:  # never inside a character
            end -= 1
        if end == start:  # one character wider than max_bytes: keep it whole
            end = start + 1
            while end < size and (data[end] & 0xC0) == 0x80:
                end += 1
        pieces.append(data[start:end])
        start = end
    return pieces


def encode_hello(name: str, room: str | None = None) -> bytes:
    return encode_json_frame(FrameType.HELLO, {"version": PROTOCOL_VERSION, "name": name, "room": room})


def encode_error(code: str | ErrorCode, message: str) -> bytes:
    code = code.value if isinstance(code, ErrorCode) else code
    return encode_json_frame(FrameType.ERROR, {"code": code, "message": message})


def encode_notice(code: str, message: str) -> bytes:
    return encode_json_frame(FrameType.NOTICE, {"code": code, "message": message})


def make_banner(software: str, text: str = "type your name and press Enter") -> bytes:
    """The server's first line; trimmed so it never exceeds MAX_BANNER bytes."""
    line = f"CHATPAIR/1 {software} {text}".encode("ascii", "replace")[: MAX_BANNER - 2]
    return line + b"\r\n"


def check_banner(line: bytes) -> str:
    """Return the banner's text after the prefix, or raise ProtocolError."""
    if not line.startswith(BANNER_PREFIX):
        raise ProtocolError("not_chatpair", "not a chatpair server")
    return line[len(BANNER_PREFIX):].decode("ascii", "replace").strip()


def decode_json(payload: bytes) -> dict[str, Any]:
    """A control payload: a UTF-8 JSON object, else ProtocolError bad_frame."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: b"[" * 1000
        raise ProtocolError(ErrorCode.BAD_FRAME, "a control frame must carry a JSON object") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a control frame must carry a JSON object")
    return obj


# --------------------------------------------------------------------------
# Names and rooms
# --------------------------------------------------------------------------

NAME_RULE: Final = "a name is 1-32 characters: letters, digits, '_', '-' or '.'"
ROOM_RULE: Final = "a room is 1-64 characters: letters, digits, '_', '-' or '.'"
_EXTRA_NAME_CHARS: Final = frozenset("_-.")


def _valid_token(text: object, max_len: int) -> bool:
    if not isinstance(text, str) or not 1 <= len(text) <= max_len:
        return False
    for ch in text:
        if ch in _EXTRA_NAME_CHARS:
            continue
        cat = unicodedata.category(ch)
        if cat[0] != "L" and cat != "Nd":
            return False
    return True


def validate_name(name: object) -> str:
    if not _valid_token(name, MAX_NAME):
        raise ProtocolError(ErrorCode.BAD_HELLO, f"bad name: {NAME_RULE}")
    return name  # type: ignore[return-value]


def validate_room(room: object) -> str | None:
    if room is None:
        return None
    if not _valid_token(room, MAX_ROOM):
        raise ProtocolError(ErrorCode.BAD_HELLO, f"bad room: {ROOM_RULE}")
    return room  # type: ignore[return-value]


def parse_hello(frame: Frame) -> Hello:
    """Validate the first frame of a frame-mode connection."""
    if frame.type != FrameType.HELLO:
        raise ProtocolError(ErrorCode.BAD_HELLO, "the first frame must be HELLO")
    try:
        obj = decode_json(frame.payload)
    except ProtocolError:
        raise ProtocolError(ErrorCode.BAD_HELLO, "HELLO must carry a JSON object") from None
    version = obj.get("version")
    if type(version) is not int:
        raise ProtocolError(ErrorCode.BAD_HELLO, 'HELLO needs "version": 1')
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this server speaks version {PROTOCOL_VERSION}",
        )
    return Hello(validate_name(obj.get("name")), validate_room(obj.get("room")))


def parse_name_line(line: str) -> Hello:
    """Validate the first line of a line-mode connection: ``NAME`` or ``NAME ROOM``."""
    parts = line.split()
    if not parts:
        raise ProtocolError(ErrorCode.BAD_HELLO, f"type your name first: {NAME_RULE}")
    if len(parts) > 2:
        raise ProtocolError(ErrorCode.BAD_HELLO, f"the first line is NAME or NAME ROOM; {NAME_RULE}")
    return Hello(validate_name(parts[0]), validate_room(parts[1] if len(parts) == 2 else None))


# --------------------------------------------------------------------------
# Frame decoder
# --------------------------------------------------------------------------


class FrameDecoder:
    """Length-prefixed frame decoder; checks the size before buffering a frame.

    ``max_frame`` may be changed between frames (the server starts at
    HANDSHAKE_MAX and raises it after HELLO). A declared length over the limit
    raises ``frame_too_large`` as soon as its 4 length bytes are in, so a
    hostile length costs nothing.
    """

    __slots__ = ("max_frame", "_buf", "_eof")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._eof = False

    def feed(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
        else:
            self._buf += data

    @property
    def buffered(self) -> bytes:
        """Bytes received but not yet returned as frames (for hand-over)."""
        return bytes(self._buf)

    def next_event(self) -> Frame | EndOfStream | _NeedData:
        buf = self._buf
        if len(buf) >= 4:
            length = int.from_bytes(buf[:4], "big")
            if length > self.max_frame:
                raise ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame of {length} bytes is over the limit of {self.max_frame}",
                )
            if length == 0:
                raise ProtocolError(ErrorCode.BAD_FRAME, "frame length 0 (it must count the type byte)")
            end = 4 + length
            if len(buf) >= end:
                frame = Frame(buf[4], bytes(buf[5:end]))
                del buf[:end]
                return frame
        if self._eof:
            if buf:
                raise ProtocolError(ErrorCode.BAD_FRAME, "connection closed in the middle of a frame")
            return EndOfStream()
        return NEED_DATA

    def events(self) -> list[Frame | EndOfStream]:
        """Every complete event now buffered (stops before NEED_DATA)."""
        out: list[Frame | EndOfStream] = []
        while True:
            ev = self.next_event()
            if ev is NEED_DATA:
                return out
            out.append(ev)  # type: ignore[arg-type]
            if isinstance(ev, EndOfStream):
                return out


def check_client_frame(frame: Frame) -> None:
    """Server-side validation of a frame a client sent after HELLO."""
    t = frame.type
    if t == FrameType.MSG:
        if not frame.payload:
            raise ProtocolError(ErrorCode.BAD_FRAME, "a message cannot be empty")
        frame.text()
    elif t in (FrameType.PING, FrameType.PONG):
        if len(frame.payload) > MAX_PING_PAYLOAD:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"a PING or PONG payload is at most {MAX_PING_PAYLOAD} bytes")
    elif t in (FrameType.NEXT, FrameType.BYE):
        pass  # payload is ignored: "empty" in the spec, and being lenient costs nothing
    elif t == FrameType.HELLO:
        raise ProtocolError(ErrorCode.BAD_FRAME, "HELLO is only valid as the first frame")
    else:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame type 0x{t:02x} is not one a client may send")


# --------------------------------------------------------------------------
# Line mode
# --------------------------------------------------------------------------

_IAC = 0xFF
_SB, _SE = 250, 240
_WILL_WONT_DO_DONT = range(251, 255)


class LineDecoder:
    """Splits line-mode input into text lines.

    ``\\r`` before ``\\n`` is dropped, ``\\r\\0`` (telnet's Enter in character
    mode) ends a line too, telnet IAC sequences are skipped, bytes
    that are not UTF-8 become U+FFFD (people type; they are not refused for
    it). A line over ``max_line`` bytes raises ``frame_too_large`` as soon as
    that many bytes are buffered without a newline.
    """

    __slots__ = ("max_line", "_buf", "_eof", "_iac_state")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._eof = False
        # 0: data, 1: after IAC, 2: skip one option byte, 3: in SB, 4: IAC in SB
        self._iac_state = 0

    def feed(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        if _IAC in data or self._iac_state:
            data = self._strip_iac(data)
        if 0 in data:
            # telnet in character mode ends a line with CR NUL (RFC 854's
            # "bare carriage return"), never LF: treat it as the newline it
            # is to the person typing. The CR may have come in the last feed.
            start = max(0, len(self._buf) - 1)
            self._buf += data
            tail = self._buf[start:]
            if b"\r\0" in tail:
                self._buf[start:] = tail.replace(b"\r\0", b"\r\n")
            return
        self._buf += data

    def _strip_iac(self, data: bytes) -> bytes:
        out = bytearray()
        state = self._iac_state
        for b in data:
            if state == 0:
                if b == _IAC:
                    state = 1
                else:
                    out.append(b)
            elif state == 1:  # the command byte after IAC
                state = 2 if b in _WILL_WONT_DO_DONT else 3 if b == _SB else 0
            elif state == 2:  # option byte of WILL/WONT/DO/DONT
                state = 0
            elif state == 3:  # subnegotiation: skip until IAC SE
                if b == _IAC:
                    state = 4
            else:  # state 4: IAC inside SB
                state = 0 if b == _SE else 3
        self._iac_state = state
        return bytes(out)

    def next_line(self) -> str | EndOfStream | _NeedData:
        # The limit counts the line's bytes, not its "\r\n" or "\n" ending, so
        # telnet (CRLF) and netcat (LF) users get the same limit.
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            n = len(buf)
            if n > self.max_line + 1 or (n == self.max_line + 1 and buf[-1] != 0x0D):
                raise ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE, f"line longer than the limit of {self.max_line} bytes"
                )
            if self._eof:
                if buf:  # a last line without newline still counts
                    raw = bytes(buf)
                    buf.clear()
                    return self._finish(raw)
                return EndOfStream()
            return NEED_DATA
        raw = bytes(buf[:nl])
        del buf[: nl + 1]
        return self._finish(raw)

    def _finish(self, raw: bytes) -> str:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > self.max_line:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"line longer than the limit of {self.max_line} bytes")
        return raw.decode("utf-8", "replace")

    @property
    def buffered(self) -> bytes:
        return bytes(self._buf)


@dataclass(frozen=True, slots=True)
class LineCommand:
    """What a line-mode line means: a message, a command, or nothing."""

    kind: str  # "msg", "next", "quit", "help", "unknown", "empty"
    text: str = ""


#: The commands a line-mode (netcat) user may type.
LINE_COMMANDS: Final = ("next", "quit", "help")


def parse_client_line(line: str, commands: tuple[str, ...] = LINE_COMMANDS) -> LineCommand:
    """Interpret one typed line: ``/command``, ``//x`` (sends ``/x``), a message, or nothing.

    The server knows LINE_COMMANDS; ``chatpair client`` passes its own list
    (it adds ``/ping``).
    """
    if not line.strip():
        return LineCommand("empty")
    if line.startswith("//"):
        return LineCommand("msg", line[1:])
    if line.startswith("/"):
        cmd = line.strip().lower()
        if cmd[1:] in commands:
            return LineCommand(cmd[1:])
        return LineCommand("unknown", line.strip().split()[0])
    return LineCommand("msg", line)


# --------------------------------------------------------------------------
# Section 5: what reaches a terminal
# --------------------------------------------------------------------------

_BIDI_CONTROLS: Final = frozenset(
    [0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0x200E, 0x200F, 0x061C]
)
#: Line and paragraph separators would break a terminal line as well.
_LINE_BREAKERS: Final = frozenset([0x2028, 0x2029])


def _visible(cp: int) -> str:
    if cp < 0x20:
        return "^" + chr(cp + 0x40)  # caret notation: ESC -> ^[, BEL -> ^G
    if cp == 0x7F:
        return "^?"
    if cp < 0xA0:
        return f"\\x{cp:02x}"  # C1 controls, e.g. CSI 0x9b -> \x9b
    return f"<U+{cp:04X}>"


def _build_sanitize_table() -> dict[int, str]:
    table = {cp: _visible(cp) for cp in range(0x20) if cp not in (0x09, 0x0A)}
    table.update({cp: _visible(cp) for cp in range(0x7F, 0xA0)})
    table.update({cp: _visible(cp) for cp in _BIDI_CONTROLS | _LINE_BREAKERS})
    return table


_SANITIZE_TABLE: Final = _build_sanitize_table()


def sanitize(text: str, keep_newlines: bool = True) -> str:
    """Make untrusted text safe for a terminal (docs/protocol.md, section 5).

    Every C0/C1 control but tab and newline, DEL, and the bidirectional
    controls become visible text (``^[``, ``\\x9b``, ``<U+202E>``), so nobody
    can move a cursor, set a title, plant an OSC 8 link or reorder text.
    """
    out = text.translate(_SANITIZE_TABLE)
    if not keep_newlines:
        out = out.replace("\n", "^J")
    return out


def sanitize_name(name: str) -> str:
    """Names are validated by the server, but a client must not trust that."""
    return sanitize(name, keep_newlines=False).replace("\t", "^I")
