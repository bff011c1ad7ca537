"""Line mode (netcat, telnet): the line decoder and what a typed line means.

UTF-8 lines ending in ``\\n``; a ``\\r`` before it is dropped, telnet IAC
sequences are skipped, bytes that are not UTF-8 become U+FFFD. Later lines
are messages or the commands ``/next``, ``/quit``, ``/help``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from chatpair.proto.frames import EndOfStream
from chatpair.proto.wire import NEED_DATA, ErrorCode, ProtocolError, _NeedData

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


class LineKind(str, enum.Enum):
    """What a typed line is (a str enum: ``LineKind.MSG == "msg"``, for scripts and tests)."""

    MSG = "msg"  # text to send
    NEXT = "next"
    QUIT = "quit"
    HELP = "help"
    PING = "ping"  # chatpair client only: measure the round trip
    UNKNOWN = "unknown"  # "/something" that is not a command here
    EMPTY = "empty"  # nothing but white space: ignored


@dataclass(frozen=True, slots=True)
class LineCommand:
    """What a line-mode line means: a message, a command, or nothing."""

    kind: LineKind
    text: str = ""  # the message (MSG) or the command as typed (UNKNOWN)


#: The commands a line-mode (netcat) user may type.
LINE_COMMANDS: Final = frozenset({LineKind.NEXT, LineKind.QUIT, LineKind.HELP})
_BY_WORD: Final = {kind.value: kind for kind in LineKind if kind not in (LineKind.MSG, LineKind.UNKNOWN, LineKind.EMPTY)}


def parse_client_line(line: str, commands: frozenset[LineKind] = LINE_COMMANDS) -> LineCommand:
    """Interpret one typed line: ``/command``, ``//x`` (sends ``/x``), a message, or nothing.

    The server knows LINE_COMMANDS; ``chatpair client`` passes its own set
    (it adds ``/ping``).
    """
    if not line.strip():
        return LineCommand(LineKind.EMPTY)
    if line.startswith("//"):
        return LineCommand(LineKind.MSG, line[1:])
    if line.startswith("/"):
        kind = _BY_WORD.get(line.strip().lower()[1:])
        if kind is not None and kind in commands:
            return LineCommand(kind)
        return LineCommand(LineKind.UNKNOWN, line.strip().split()[0])
    return LineCommand(LineKind.MSG, line)
