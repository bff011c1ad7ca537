"""The server's side of the handshake, sans-IO: greetings out, HELLO in.

What the listener sends (the banner at once; WELCOME after a frame-mode
HELLO) and how it reads what comes back: the first byte picks the mode
(``0``: a frame, the high byte of a length; anything else: a name line
typed into ``nc``), and until a HELLO or name line is complete nothing over
``HANDSHAKE_MAX`` bytes is accepted. The listener feeds bytes as they
arrive, in any pieces; these functions never see a socket or a clock.
"""

from __future__ import annotations

from chatpair import __version__
from chatpair.proto import (
    HANDSHAKE_MAX,
    NEED_DATA,
    PROTOCOL_VERSION,
    EndOfStream,
    ErrorCode,
    FrameDecoder,
    FrameType,
    Hello,
    LineDecoder,
    ProtocolError,
    encode_json_frame,
    make_banner,
    parse_hello,
    parse_name_line,
)
from chatpair.proto.resume import Resume, parse_resume
from chatpair.server.config import Limits
from chatpair.server.states import Mode

#: How the server names itself in the banner and in WELCOME.
SERVER_SOFTWARE = f"chatpair/{__version__}"


def server_banner() -> bytes:
    """The line every client gets on connect, before it says anything."""
    return make_banner(SERVER_SOFTWARE)


def welcome_frame(limits: Limits, session: str | None = None) -> bytes:
    """WELCOME, the answer to a frame-mode HELLO (and to RESUME).

    The same bytes for every v1 client; a resumable session's WELCOME also
    carries its token and the resume window (PROTOCOL.md section 6).
    """
    obj = {
        "version": PROTOCOL_VERSION,
        "server": SERVER_SOFTWARE,
        "max_frame": limits.max_frame,
        "ping_interval": limits.ping_interval,
        "idle_timeout": limits.idle_timeout,
    }
    if session is not None:
        obj["session"] = session
        obj["resume_window"] = limits.resume_window
    return encode_json_frame(FrameType.WELCOME, obj)


def handshake_decoder(first_byte: int) -> tuple[Mode, FrameDecoder | LineDecoder]:
    """The mode the first byte shows, and a decoder for the handshake in that mode."""
    if first_byte == 0:
        return Mode.FRAME, FrameDecoder(HANDSHAKE_MAX)
    return Mode.LINE, LineDecoder(HANDSHAKE_MAX)


def read_hello(decoder: FrameDecoder | LineDecoder) -> Hello | Resume | None:
    """The HELLO, RESUME or name line in what was fed so far; None: not complete yet.

    Raises :class:`ProtocolError` for anything else: the first frame must be
    HELLO or RESUME; in line mode, blank lines before the name are skipped.
    """
    if isinstance(decoder, FrameDecoder):
        event = decoder.next_event()
        if event is NEED_DATA:
            return None
        if isinstance(event, EndOfStream):
            raise ProtocolError(ErrorCode.BAD_HELLO, "the first frame must be HELLO")
        if event.type == FrameType.RESUME:  # type: ignore[union-attr]
            return parse_resume(event)  # type: ignore[arg-type]
        return parse_hello(event)  # type: ignore[arg-type]
    while True:
        line = decoder.next_line()
        if line is NEED_DATA:
            return None
        if isinstance(line, EndOfStream):
            raise ProtocolError(ErrorCode.BAD_HELLO, "type your name first")
        if line.strip():  # type: ignore[union-attr]
            return parse_name_line(line)  # type: ignore[arg-type]
