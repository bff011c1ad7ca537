"""Server events as the bytes one connection receives: a frame, or a ``* `` line.

A frame-mode client gets every event as a frame; a line-mode client (netcat,
telnet) gets the few that mean something to a person as one sanitized text
line (PROTOCOL.md section 4), and a partner's message as ``name: text``.
This is the one place that turns an event into bytes for a connection, so
the two forms cannot drift apart. No I/O: the loops send what this returns.

Everything here reads the connection's :class:`~chatpair.server.states.Mode`;
only :func:`event_bytes` also keeps one bit of line-mode state (``quiet_waiting``).
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from chatpair.proto import (
    FrameType,
    encode_json_frame,
    encode_notice,
    sanitize,
    sanitize_name,
)
from chatpair.server.states import Mode

#: The answer to ``/help``.
HELP_LINE = "* commands: /next (new partner), /quit (leave), /help; start a line with // to send one starting with /"
#: The answer to ``/quit``, before the close.
BYE_LINE = "* bye"

# (Enum members read through the class cost a lookup each time: read them once.)
_LINE = Mode.LINE


class Recipient(Protocol):
    """What rendering needs of a connection (a :class:`~chatpair.server.conn.Conn` is one)."""

    mode: Mode
    #: line mode: PEER_LEFT already said "waiting for a partner", so the WAITING after it is not shown
    quiet_waiting: bool


#: WAITING in the open lobby, the frame every frame-mode client gets at least once.
_WAITING_NO_ROOM: Final = encode_json_frame(FrameType.WAITING, {"room": None})


def room_full_text(room: str | None) -> str:
    """The words of ERROR ``room_full`` (a room holds one pair)."""
    return f"room {room} is full: a pair is already chatting there"


def presence_notice(conn: Recipient, code: str, name: str, window: float = 0.0) -> bytes:
    """NOTICE ``peer_away`` (``name`` lost the connection, may return within ``window`` s) or ``peer_back``."""
    message = (f"{name} lost the connection; waiting up to {window:g} s for them to return" if code == "peer_away"
               else f"{name} is back")
    return event_bytes(conn, FrameType.NOTICE, {"code": code, "message": message})


def event_bytes(conn: Recipient, ftype: FrameType, obj: dict[str, Any]) -> bytes:
    """A server event for ``conn``: a frame, or a ``* `` line in line mode (``b""`` if it has none)."""
    if conn.mode is not _LINE:
        if ftype is FrameType.WAITING and obj.get("room") is None:
            return _WAITING_NO_ROOM
        return encode_json_frame(ftype, obj)
    text = _line_text(conn, ftype, obj)
    return (text + "\n").encode("utf-8") if text is not None else b""


def _line_text(conn: Recipient, ftype: FrameType, obj: dict[str, Any]) -> str | None:
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


def undelivered_notices(conn: Recipient, count: int, why: str) -> bytes:
    """NOTICE ``undelivered`` once per message (one line for all of them in line mode)."""
    if conn.mode is _LINE:
        what = "1 message was" if count == 1 else f"{count} messages were"
        return f"* {what} not delivered: {why}\n".encode()
    return encode_notice("undelivered", f"message not delivered: {why}") * count


def unknown_command_line(command: str) -> str:
    """The answer to a line-mode command that does not exist (nothing was sent)."""
    return f"* unknown command {command}: type /help for the commands (nothing was sent)"
