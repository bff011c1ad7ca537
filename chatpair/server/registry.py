"""The listener's registry of resumable sessions: token -> client, and which loop holds it.

A RESUME arrives at the listener like any new connection, but the session
it names lives with its connection: in the listener while the client
waits, in a relay thread or relay worker while it is paired (and stays
there if it drops). The listener records every move it makes - a pair
handed to a relay, a client handed back - so it knows where to send the
RESUME. Where a report is still on its way, the relay sends the RESUME back
and the listener looks again (:class:`~chatpair.server.relay.Bounce`).

Tokens are bearer secrets: they are kept here and in the session, and never logged.
"""

from __future__ import annotations

from typing import Generic, TypeVar

#: Where a session is: None for the listener itself, else a relay handle.
Where = TypeVar("Where")


class SessionRegistry(Generic[Where]):
    """Live sessions by token, and where each one is held now."""

    def __init__(self) -> None:
        self._cid_of: dict[str, int] = {}
        self._token_of: dict[int, str] = {}
        self._where: dict[int, Where | None] = {}

    def __len__(self) -> int:
        return len(self._cid_of)

    def add(self, token: str, cid: int) -> None:
        """A new session, held by the listener."""
        self._cid_of[token] = cid
        self._token_of[cid] = token
        self._where[cid] = None

    def lookup(self, token: str) -> int | None:
        """The client holding ``token``, if its session is alive."""
        return self._cid_of.get(token)

    def where(self, cid: int) -> Where | None:
        return self._where.get(cid)

    def __contains__(self, cid: int) -> bool:
        return cid in self._token_of

    def moved(self, cid: int, where: Where | None) -> None:
        """The client (if it has a session) is now held by ``where`` (None: the listener)."""
        if cid in self._where:
            self._where[cid] = where

    def forget(self, cid: int) -> None:
        """The session ended (BYE, error, expiry, its relay died): its token is dead."""
        token = self._token_of.pop(cid, None)
        if token is not None:
            del self._cid_of[token]
            del self._where[cid]
