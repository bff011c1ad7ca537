"""Getting a dropped conversation back (PROTOCOL.md section 6): what counts as a drop, when to retry.

The protocol side of resuming (counting, ACKs, the retransmit buffer, the
keepalive) lives in :mod:`chatpair.proto.clientsession`; pipe mode and the
chat screen share what is here:

* :func:`is_drop` - a connection's final event that a resume can repair
  (end of stream, reset, a cut in the middle of a frame, no answer to our
  keepalive, the server's ERROR ``timeout``), as opposed to one that ends
  the conversation (any other ERROR, BYE);
* :class:`ResumePlan` - the attempts for one lost connection: 0.2, 0.5, 1,
  then every 2 seconds, until the server's resume window has passed (each
  attempt's handshake is bounded by what is left of the window);
* :func:`is_expired` - the server has forgotten the session: start afresh.

No sockets and no clock here (``now`` is passed in).
"""

from __future__ import annotations

import dataclasses
from typing import Final

from chatpair.client.config import ClientConfig
from chatpair.errors import ChatpairError, ConnectError, RefusedError
from chatpair.proto import sanitize
from chatpair.proto.clientsession import ClientSession
from chatpair.proto.events import Closed, Event, ServerError
from chatpair.proto.wire import ErrorCode

#: Seconds before each attempt after a drop; the last one repeats.
BACKOFF: Final = (0.2, 0.5, 1.0, 2.0)
#: The shortest handshake timeout an attempt gets, even at the window's end.
MIN_ATTEMPT_TIMEOUT: Final = 1.0


def is_drop(session: ClientSession | None, ev: Event) -> bool:
    """True if ``ev``, the final event of a connection of ``session``, is a drop a RESUME can repair."""
    if session is None:
        return False
    return isinstance(ev, Closed) or (isinstance(ev, ServerError) and ev.code == ErrorCode.TIMEOUT.value)


def is_expired(err: ChatpairError) -> bool:
    """The server answered our RESUME with ``session_expired``: the conversation is gone."""
    return isinstance(err, RefusedError) and err.code == ErrorCode.SESSION_EXPIRED.value


def expired_message(err: ChatpairError, label: str) -> str:
    """The server's own words for an expired session, without our ``host:port refused:`` prefix."""
    text = str(err)
    for prefix in (f"{label} refused: ", f"{label}: "):
        text = text.removeprefix(prefix)
    return sanitize(text, False)


def lost_line(reason: str) -> str:
    """What the user is told when a resumable connection drops."""
    return f"connection lost: {sanitize(reason, False)}; reconnecting..."


def failed_line(message: str, unconfirmed: int) -> str:
    """What the user is told when the server could not resume the session."""
    text = f"the conversation could not be resumed: {sanitize(message, False)}; starting afresh"
    if unconfirmed:
        text += (f" ({unconfirmed} message{'s' if unconfirmed != 1 else ''} you sent may not have "
                 "reached your partner)")
    return text


class ResumePlan:
    """The attempts to resume one lost connection: when the next is due, and when to stop."""

    def __init__(self, session: ClientSession, now: float) -> None:
        self.session = session
        self.lost_at = now
        #: After this the server has dropped the session; no more attempts start.
        self.give_up_at = now + session.window
        self.tries = 0
        self.retry_at = now + BACKOFF[0]

    def failed(self, now: float) -> bool:
        """An attempt failed: plan the next one. False once the window has passed (stop trying)."""
        self.tries += 1
        self.retry_at = now + BACKOFF[min(self.tries, len(BACKOFF) - 1)]
        return self.retry_at < self.give_up_at

    def attempt_config(self, config: ClientConfig, now: float) -> ClientConfig:
        """``config`` for the next attempt: its handshake ends with the window (at least 1 s)."""
        timeout = max(MIN_ATTEMPT_TIMEOUT, min(config.timeout, self.give_up_at - now))
        return dataclasses.replace(config, timeout=timeout)

    def gave_up(self, label: str, err: ChatpairError) -> ConnectError:
        """The error a pipe ends with when the window passed without the server back."""
        return ConnectError(f"connection to {label} lost and not back within the server's "
                            f"{self.session.window:g} s to resume it: {err}")
