"""The handshake: the banner, names and rooms, HELLO and the first line.

A connection starts with the server's banner line; the client's first byte
picks frame mode (``0x00``: the first frame must be HELLO) or line mode (the
first line is ``NAME`` or ``NAME ROOM``). Both end in a :class:`Hello`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

from chatpair.proto.frames import Frame, decode_json, encode_json_frame
from chatpair.proto.wire import (
    BANNER_PREFIX,
    MAX_BANNER,
    MAX_NAME,
    MAX_ROOM,
    PROTOCOL_VERSION,
    ErrorCode,
    FrameType,
    ProtocolError,
)


@dataclass(frozen=True, slots=True)
class Hello:
    """A validated HELLO (frame mode) or first line (line mode)."""

    name: str
    room: str | None
    #: HELLO asked for a resumable session (PROTOCOL.md section 6); never in line mode
    resume: bool = False


def encode_hello(name: str, room: str | None = None, resume: bool = False) -> bytes:
    obj: dict[str, Any] = {"version": PROTOCOL_VERSION, "name": name, "room": room}
    if resume:
        obj["resume"] = True
    return encode_json_frame(FrameType.HELLO, obj)


def make_banner(software: str, text: str = "type your name and press Enter") -> bytes:
    """The server's first line; trimmed so it never exceeds MAX_BANNER bytes."""
    line = f"CHATPAIR/1 {software} {text}".encode("ascii", "replace")[: MAX_BANNER - 2]
    return line + b"\r\n"


def check_banner(line: bytes) -> str:
    """Return the banner's text after the prefix, or raise ProtocolError."""
    if not line.startswith(BANNER_PREFIX):
        raise ProtocolError("not_chatpair", "not a chatpair server")
    return line[len(BANNER_PREFIX):].decode("ascii", "replace").strip()


NAME_RULE: Final = "a name is 1-32 characters: letters, digits, '_', '-' or '.'"
ROOM_RULE: Final = "a room is 1-64 characters: letters, digits, '_', '-' or '.'"
_EXTRA_NAME_CHARS: Final = frozenset("_-.")


#: The ASCII part of the rule, for the common case (checked with one regex,
#: no per-character Unicode lookups): letters, digits, ``_ - .``.
_ASCII_TOKEN: Final = re.compile(r"[A-Za-z0-9_.\-]+")


def _valid_token(text: object, max_len: int) -> bool:
    if not isinstance(text, str) or not 1 <= len(text) <= max_len:
        return False
    if text.isascii():
        return _ASCII_TOKEN.fullmatch(text) is not None
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


def first_frame_json(frame: Frame, name: str) -> dict[str, Any]:
    """The JSON object of a first frame (HELLO or RESUME), its version checked.

    ``bad_hello`` if it is not a JSON object with ``"version"``;
    ``unsupported_version`` for a version this side does not speak.
    """
    try:
        obj = decode_json(frame.payload)
    except ProtocolError:
        raise ProtocolError(ErrorCode.BAD_HELLO, f"{name} must carry a JSON object") from None
    version = obj.get("version")
    if type(version) is not int:
        raise ProtocolError(ErrorCode.BAD_HELLO, f'{name} needs "version": 1')
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this server speaks version {PROTOCOL_VERSION}",
        )
    return obj


def parse_hello(frame: Frame) -> Hello:
    """Validate the first frame of a frame-mode connection."""
    if frame.type != FrameType.HELLO:
        raise ProtocolError(ErrorCode.BAD_HELLO, "the first frame must be HELLO")
    obj = first_frame_json(frame, "HELLO")
    # Only a literal true asks for resume: unknown or odd values are ignored,
    # as section 3 asks of unknown keys.
    return Hello(validate_name(obj.get("name")), validate_room(obj.get("room")), obj.get("resume") is True)


def parse_name_line(line: str) -> Hello:
    """Validate the first line of a line-mode connection: ``NAME`` or ``NAME ROOM``."""
    parts = line.split()
    if not parts:
        raise ProtocolError(ErrorCode.BAD_HELLO, f"type your name first: {NAME_RULE}")
    if len(parts) > 2:
        raise ProtocolError(ErrorCode.BAD_HELLO, f"the first line is NAME or NAME ROOM; {NAME_RULE}")
    name = validate_name(parts[0])
    if len(parts) == 1:
        return Hello(name, None)
    try:
        room = validate_room(parts[1])
    except ProtocolError as err:
        # "bad name!" reads as a name to the person who typed it: say that the
        # second word was taken as a room code.
        raise ProtocolError(err.code, f"the first line is NAME or NAME ROOM, and {parts[1]!r} is not a "
                                      f"room code: {ROOM_RULE}") from None
    return Hello(name, room)


