"""Presentation, sans-IO: events in, what the user sees out.

* :class:`Presenter` turns events into display :class:`Line` s (``* paired
  with bob``, ``bob: hi``) and remembers who the partner is; every string
  that came from the network is sanitized here, in one place;
* :func:`event_json` is the ``--json`` form of an event (exact text: bots
  want it, and JSON escaping keeps stdout safe);
* :class:`Transcript` is ``--log FILE``.

Pipe mode and the curses UI both show what these return.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field
from typing import IO, Any

from chatpair.client.resuming import failed_line, lost_line
from chatpair.client.transport import os_reason
from chatpair.errors import ConfigError
from chatpair.proto import sanitize, sanitize_name
from chatpair.proto.events import Closed, Event, Message, Notice, Paired, PeerAway, PeerBack, PeerLeft, Pong
from chatpair.proto.events import Reconnecting, Resumed, ResumeFailed, ServerError, Waiting, Welcome


class LineStyle(str, enum.Enum):
    """How a line is shown (a str, so it compares equal to its value)."""

    NOTICE = "notice"  # "* ..." from the server or the client itself
    MESSAGE = "message"  # the partner's words
    OWN = "self"  # our own words
    ERROR = "error"  # the connection ended, or a local failure


@dataclass(frozen=True)
class Line:
    """One line to show, already sanitized; ``name`` is who spoke (messages only)."""

    kind: LineStyle
    text: str
    name: str = ""

    def plain(self) -> str:
        if self.kind in (LineStyle.MESSAGE, LineStyle.OWN):
            return f"{self.name}: {self.text}"
        return f"* {self.text}"


#: PEER_LEFT reasons as people say them; an unknown one is shown as sent (sanitized).
_LEFT_REASONS = {"bye": "bye", "next": "next", "disconnected": "disconnected",
                 "timeout": "timed out", "error": "protocol error"}


@dataclass
class Presenter:
    """Turns events into :class:`Line` s; remembers who the partner is.

    Every string that came from the network goes through ``sanitize`` here,
    in one place, so no partner or server can put an escape sequence on
    somebody's terminal.
    """

    me: str
    peer: str | None = None
    paired: bool = False
    #: The partner's connection dropped and the server waits for them (NOTICE peer_away).
    away: bool = False
    #: The next WAITING was already said (in a PEER_LEFT or /next line).
    _quiet_waiting: bool = field(default=False, repr=False)

    def lines(self, ev: Event) -> list[Line]:
        if isinstance(ev, (Waiting, Paired, PeerLeft, PeerBack, ServerError, Closed, Resumed, ResumeFailed)):
            self.away = False
        if isinstance(ev, Welcome):
            return []
        if isinstance(ev, Waiting):
            self.paired, self.peer = False, None
            if self._quiet_waiting:
                self._quiet_waiting = False
                return []
            where = f" in room {sanitize_name(ev.room)}" if ev.room else ""
            return [Line(LineStyle.NOTICE, f"waiting for a partner{where}")]
        if isinstance(ev, Paired):
            self.paired, self.peer = True, sanitize_name(ev.peer)
            return [Line(LineStyle.NOTICE, f"paired with {self.peer}")]
        if isinstance(ev, Message):
            name = sanitize_name(ev.peer)
            return [Line(LineStyle.MESSAGE, part, name) for part in sanitize(ev.text).split("\n")]
        if isinstance(ev, PeerLeft):
            self.paired, self.peer = False, None
            self._quiet_waiting = True
            reason = _LEFT_REASONS.get(ev.reason, sanitize_name(ev.reason))
            return [Line(LineStyle.NOTICE, f"{sanitize_name(ev.peer)} left ({reason}); waiting for a partner")]
        if isinstance(ev, (PeerAway, PeerBack, Resumed, Reconnecting, ResumeFailed)):
            return self._resume_lines(ev)
        if isinstance(ev, Notice):
            return [Line(LineStyle.NOTICE, sanitize(ev.message, False))]
        if isinstance(ev, ServerError):
            self.paired, self.peer = False, None
            return [Line(LineStyle.ERROR, f"error: {sanitize(ev.message, False)}")]
        if isinstance(ev, Pong):
            return [Line(LineStyle.NOTICE, f"round trip {format_rtt(ev.rtt)}")]
        if isinstance(ev, Closed):
            self.paired, self.peer = False, None
            return [Line(LineStyle.ERROR, sanitize(ev.reason, False))]
        return []

    def _resume_lines(self, ev: PeerAway | PeerBack | Resumed | Reconnecting | ResumeFailed) -> list[Line]:
        """The events of resuming (PROTOCOL.md section 6); the server's words where it gave some."""
        who = self.peer or "your partner"
        if isinstance(ev, PeerAway):
            self.away = True
            text = sanitize(ev.message, False) or f"{who} lost the connection; waiting for them to return"
            return [Line(LineStyle.NOTICE, text)]
        if isinstance(ev, PeerBack):
            return [Line(LineStyle.NOTICE, sanitize(ev.message, False) or f"{who} is back")]
        if isinstance(ev, Resumed):
            self.paired, self.peer = ev.peer is not None, None if ev.peer is None else sanitize_name(ev.peer)
            return [Line(LineStyle.NOTICE, "reconnected")]
        if isinstance(ev, Reconnecting):
            return [Line(LineStyle.ERROR, lost_line(ev.reason))]
        self.paired, self.peer = False, None
        return [Line(LineStyle.ERROR, failed_line(ev.message, ev.unconfirmed))]

    def left_by_us(self) -> list[Line]:
        """After /next: the server answers WAITING, which this line already covers."""
        who = self.peer or "your partner"
        self.paired, self.peer = False, None
        self._quiet_waiting = True
        return [Line(LineStyle.NOTICE, f"you left {who}; waiting for a partner")]

    def own(self, text: str) -> list[Line]:
        return [Line(LineStyle.OWN, part, self.me) for part in text.split("\n")]


def format_rtt(rtt: float) -> str:
    ms = rtt * 1000
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def event_json(ev: Event) -> dict[str, Any]:
    """The ``--json`` form of an event: ``{"event": name, ...fields}``.

    Text is not sanitized here (bots want the real text); json.dumps with
    ensure_ascii escapes every control character, so stdout stays safe.
    """
    if isinstance(ev, Welcome):
        return {"event": "welcome", "server": ev.server, "banner": ev.banner, "max_frame": ev.max_frame}
    if isinstance(ev, Waiting):
        return {"event": "waiting", "room": ev.room}
    if isinstance(ev, Paired):
        return {"event": "paired", "peer": ev.peer, "room": ev.room}
    if isinstance(ev, Message):
        return {"event": "message", "from": ev.peer, "text": ev.text}
    if isinstance(ev, PeerLeft):
        return {"event": "peer_left", "peer": ev.peer, "reason": ev.reason}
    if isinstance(ev, (PeerAway, PeerBack)):
        return {"event": ev.code, "message": ev.message}
    if isinstance(ev, Notice):
        return {"event": "notice", "code": ev.code, "message": ev.message}
    if isinstance(ev, Resumed):
        return {"event": "resumed", "peer": ev.peer, "room": ev.room, "resent": ev.resent}
    if isinstance(ev, Reconnecting):
        return {"event": "reconnecting", "reason": ev.reason}
    if isinstance(ev, ResumeFailed):
        return {"event": "resume_failed", "message": ev.message, "unconfirmed": ev.unconfirmed}
    if isinstance(ev, ServerError):
        return {"event": "error", "code": ev.code, "message": ev.message}
    if isinstance(ev, Pong):
        return {"event": "pong", "rtt_ms": round(ev.rtt * 1000, 3)}
    if isinstance(ev, Closed):
        return {"event": "closed", "reason": ev.reason}
    return {"event": "unknown"}


class Transcript:
    """``--log FILE``: every shown line with a timestamp, sanitized, appended."""

    def __init__(self, path: str | None) -> None:
        self.fh: IO[str] | None = None
        if path:
            try:
                self.fh = open(path, "a", encoding="utf-8", buffering=1)
            except OSError as err:
                raise ConfigError(f"cannot open log file {path}: {os_reason(err)}") from None

    def write(self, line: Line) -> None:
        if self.fh is None:
            return
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.fh.write(f"{stamp} {line.plain()}\n")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
