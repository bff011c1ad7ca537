"""Frame types, error codes and limits: the numbers of the chatpair protocol.

Every limit is written here once, with the reason it has its value, and
every rule about a frame header lives in :func:`check_header`: the decoder
(:mod:`chatpair.proto.frames`) and the server's fast frame scanner both call
it, so the two can never disagree on what is too large or malformed.

::

    +-------------------------+-----------+---------------------------+
    | length: uint32, big end | type: u8  | payload: length - 1 bytes |
    +-------------------------+-----------+---------------------------+

Nothing in :mod:`chatpair.proto` touches a socket or a clock.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

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
    """Frame type codes. 0x09-0x0F and 0x16-0x1E are reserved.

    ACK, RESUME and RESUMED belong to the optional resume extension
    (PROTOCOL.md section 6): outside a resumable session they are
    ``bad_frame`` like any type a client may not send.
    """

    HELLO = 0x01
    MSG = 0x02
    NEXT = 0x03
    BYE = 0x04
    PING = 0x05
    PONG = 0x06
    ACK = 0x07
    RESUME = 0x08
    WELCOME = 0x10
    WAITING = 0x11
    PAIRED = 0x12
    PEER_LEFT = 0x13
    NOTICE = 0x14
    RESUMED = 0x15
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
    SESSION_EXPIRED = "session_expired"


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


def check_length(length: int, max_frame: int) -> None:
    """The rules that the 4 length bytes alone decide (the type byte not in yet).

    Over ``max_frame`` is refused before anything is buffered for the frame,
    so a hostile length costs nothing; 0 cannot count the type byte.
    Raises :class:`ProtocolError`.
    """
    if length > max_frame:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes is over the limit of {max_frame}")
    if length == 0:
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame length 0 (it must count the type byte)")


def check_header(length: int, ftype: int, max_frame: int) -> None:
    """Every rule about a frame header, once its 5 bytes are in (ProtocolError if broken)."""
    check_length(length, max_frame)
    if length == 1 and ftype == FrameType.MSG:
        raise ProtocolError(ErrorCode.BAD_FRAME, "a message cannot be empty")
