"""Frames: the event types, the encoders and the frame decoder (sans-IO).

The decoder follows h11's convention: ``feed(b"")`` means end of stream and
``next_event()`` returns a :class:`Frame`, :class:`EndOfStream` or
:data:`~chatpair.proto.wire.NEED_DATA`. Errors the *peer* made raise
:class:`~chatpair.proto.wire.ProtocolError` carrying the wire error code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from chatpair.proto.wire import (
    DEFAULT_MAX_FRAME,
    HEADER,
    MAX_FRAME_CEILING,
    MAX_PING_PAYLOAD,
    NEED_DATA,
    ErrorCode,
    FrameType,
    ProtocolError,
    _NeedData,
    check_header,
    check_length,
)


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


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def encode_frame(ftype: int, payload: bytes = b"") -> bytes:
    """One frame on the wire: header plus payload."""
    return HEADER.pack(len(payload) + 1, ftype) + payload


#: One decoder made once (``json.loads`` looks up its default one per call).
_JSON_DECODER: Final = json.JSONDecoder()
#: One encoder made once: ``json.dumps`` with options builds a new encoder per call.
_JSON_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


#: JSON text of one string, as the encoder above writes it (the C function it uses itself).
_quote: Final = json.encoder.encode_basestring  # type: ignore[attr-defined]


def encode_json_frame(ftype: int, obj: dict[str, Any]) -> bytes:
    """A control frame whose payload is a compact UTF-8 JSON object."""
    return encode_frame(ftype, _flat_json(obj) or _JSON_ENCODER.encode(obj).encode())


def _flat_json(obj: dict[str, Any]) -> bytes | None:
    """``obj`` as the encoder writes it, if every value is a string or null; else None.

    Most server events (WAITING, PAIRED, PEER_LEFT, NOTICE) are such objects,
    and the encoder's set-up per call costs more than the quoting: a new
    client costs two of these, so they are written here directly.
    """
    parts = []
    for key, value in obj.items():
        if value is None:
            parts.append(_quote(key) + ":null")
        elif value.__class__ is str:
            parts.append(_quote(key) + ":" + _quote(value))
        else:
            return None
    return ("{" + ",".join(parts) + "}").encode()


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


def encode_error(code: str | ErrorCode, message: str) -> bytes:
    code = code.value if isinstance(code, ErrorCode) else code
    return encode_json_frame(FrameType.ERROR, {"code": code, "message": message})


def encode_notice(code: str, message: str) -> bytes:
    return encode_json_frame(FrameType.NOTICE, {"code": code, "message": message})


def decode_json(payload: bytes) -> dict[str, Any]:
    """A control payload: a UTF-8 JSON object, else ProtocolError bad_frame."""
    try:
        obj = _JSON_DECODER.decode(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: b"[" * 1000
        raise ProtocolError(ErrorCode.BAD_FRAME, "a control frame must carry a JSON object") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a control frame must carry a JSON object")
    return obj


# --------------------------------------------------------------------------
# Decoding
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
        have = len(buf)
        if have >= 4:
            if have >= 5:
                length, ftype = HEADER.unpack_from(buf)
                check_header(length, ftype, self.max_frame)
            else:
                length = int.from_bytes(buf[:4], "big")
                check_length(length, self.max_frame)
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
        check_header(len(frame.payload) + 1, t, MAX_FRAME_CEILING)
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


