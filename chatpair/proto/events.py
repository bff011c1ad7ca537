"""What a client hears from a server, as events (frozen dataclasses).

:class:`chatpair.proto.clientside.ClientProtocol` turns the server's bytes
into these; pipe mode, the curses UI and anything else that talks to a
server as a client (a bot, the bench) consume them. Strings in them are the
server's (or the partner's) exactly as sent: untrusted, to be sanitized
(:mod:`chatpair.proto.sanitize`) before they reach a terminal.

An event with a ``reason`` or ``message`` is written for a person; the
``code`` fields are the wire's (docs/protocol.md).

Resuming (PROTOCOL.md section 6) adds :class:`PeerAway`, :class:`PeerBack`
and :class:`Resumed`, which come from the server, and two that the client
itself makes while it keeps a conversation going over a new connection:
:class:`Reconnecting` and :class:`ResumeFailed`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Welcome:
    """The server accepted our HELLO (WELCOME); ``banner`` is the banner's text."""

    server: str
    max_frame: int
    ping_interval: float
    idle_timeout: float
    banner: str


@dataclass(frozen=True)
class Waiting:
    """Queued for a partner (WAITING), in the open lobby when ``room`` is None."""

    room: str | None


@dataclass(frozen=True)
class Paired:
    """A partner was found (PAIRED)."""

    peer: str
    room: str | None


@dataclass(frozen=True)
class Message:
    """A MSG from the partner; ``peer`` is who we were paired with when it came."""

    peer: str
    text: str


@dataclass(frozen=True)
class PeerLeft:
    """The partner is gone (PEER_LEFT); ``reason`` is the wire's: bye, next, disconnected..."""

    peer: str
    reason: str


@dataclass(frozen=True)
class _CodedMessage:
    """What NOTICE and ERROR carry: the wire's ``code``, and a ``message`` for a person."""

    code: str
    message: str


@dataclass(frozen=True)
class Notice(_CodedMessage):
    """Something to tell the user that ends nothing (NOTICE), e.g. ``undelivered``."""


@dataclass(frozen=True)
class PeerAway(Notice):
    """NOTICE ``peer_away``: the partner's connection dropped; the server waits for them to return."""


@dataclass(frozen=True)
class PeerBack(Notice):
    """NOTICE ``peer_back``: the partner is back on a new connection."""


@dataclass(frozen=True)
class ServerError(_CodedMessage):
    """ERROR from the server; the connection is closed right after it."""


@dataclass(frozen=True)
class Pong:
    """Answer to one of our PINGs: round-trip time in seconds."""

    rtt: float


@dataclass(frozen=True)
class Closed:
    """The connection ended without an ERROR (server gone, network lost, broken server)."""

    reason: str


@dataclass(frozen=True)
class Resumed:
    """RESUMED: the conversation goes on over a new connection.

    ``peer`` is the partner we had when the connection dropped (None if we
    were waiting), ``resent`` how many of our MSG frames were sent again.
    """

    peer: str | None
    room: str | None
    resent: int


@dataclass(frozen=True)
class Reconnecting:
    """Made by the client: the connection of a resumable session was lost; trying to resume it."""

    reason: str


@dataclass(frozen=True)
class ResumeFailed:
    """Made by the client: the server could not resume the session (``message``: why); starting afresh.

    ``unconfirmed``: how many of our messages the server never acknowledged
    (they may or may not have reached the partner).
    """

    message: str
    unconfirmed: int


Event = (Welcome | Waiting | Paired | Message | PeerLeft | Notice | ServerError | Pong | Closed | Resumed
         | Reconnecting | ResumeFailed)
#: The events after which nothing more comes from this connection.
FINAL_EVENTS = (ServerError, Closed)
