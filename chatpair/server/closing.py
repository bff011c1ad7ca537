"""Leaving and closing: the polite close that makes sure a client reads why it was closed.

Closing a socket that still has unread input makes the kernel send RST,
which can destroy the ERROR frame in flight. So a loop closes a client in
steps: write the last bytes (ERROR, or nothing after BYE), shut down our
side for writing, read and discard until the client closes its side (or
:data:`LINGER_SECONDS` pass), and only then close. Meanwhile the
connection is in :attr:`Phase.CLOSING`, in the loop's ``closing`` set, and
no longer read as a client.

This is a mixin of :class:`~chatpair.server.loop.ConnLoop`: subclasses
(the listener, the relays, tests) override :meth:`CloseMixin.detach`,
:meth:`CloseMixin.on_closed` and :meth:`CloseMixin.fail`.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from chatpair.proto import ErrorCode, FrameType
from chatpair.server.conn import Conn
from chatpair.server.render import event_bytes
from chatpair.server.states import Phase
from chatpair.server.stats import LoopStats
from chatpair.server.tls import WOULD_BLOCK

if TYPE_CHECKING:
    from chatpair.netutil import Waker
    from chatpair.server.poller import Poller

log = logging.getLogger("chatpair")

#: How long a closing connection gets to take its last bytes (ERROR, BYE).
LINGER_SECONDS = 2.0

_CLOSING = Phase.CLOSING


class CloseMixin:
    """Leaving (:meth:`detach`, :meth:`drop`, :meth:`fail`) and closing (:meth:`finish`).

    Needs from the loop: ``now``, ``conns``, ``closing``, ``_dead``,
    :meth:`send`, :meth:`update_interest`, :meth:`_unregister`.
    """

    if TYPE_CHECKING:  # provided by ConnLoop
        now: float
        stats: LoopStats
        conns: set[Conn]
        closing: set[Conn]
        sessions: dict[int, Conn]
        _dead: list[Conn]
        poller: Poller
        waker: Waker

        def drop_away(self) -> None: ...

        def send(self, conn: Conn, data: bytes | memoryview, msgs: int = 0, framed: bool = True) -> None: ...
        def update_interest(self, conn: Conn) -> None: ...
        def _unregister(self, conn: Conn) -> None: ...

    def detach(self, conn: Conn, reason: str) -> None:
        """``conn`` is leaving (``reason`` as in PEER_LEFT): update pairing state."""

    def drop(self, conn: Conn, reason: str) -> None:
        """The connection is gone or must go now, without a goodbye."""
        self.detach(conn, reason)
        self._close_now(conn)

    def fail(self, conn: Conn, code: str | ErrorCode, message: str, reason: str = "error") -> None:
        """Tell the client what it did wrong, then close."""
        code = code.value if isinstance(code, ErrorCode) else code
        log.info("%s: error %s: %s", conn.label, code, message)
        self.stats.error(code)
        self.detach(conn, reason)
        self.finish(conn, event_bytes(conn, FrameType.ERROR, {"code": code, "message": message}))

    def finish(self, conn: Conn, last: bytes = b"") -> None:
        """Close politely: write ``last``, shut our side, drain theirs, then close."""
        if conn.phase is _CLOSING:
            return
        if conn.session is not None:
            conn.session.ended = True  # BYE or an error: the session ends with the connection
            self.sessions.pop(conn.cid, None)
        conn.paused = False
        if last:
            self.send(conn, last)
        self.conns.discard(conn)
        conn.phase = _CLOSING
        conn.close_at = self.now + LINGER_SECONDS
        self.closing.add(conn)
        if not conn.out:
            self._shutdown_write(conn)
        self.update_interest(conn)

    def drain_closing(self, conn: Conn) -> None:
        """A closing client sent something: discard it; its end of stream ends the close."""
        try:
            data = conn.sock.recv(65536)
        except WOULD_BLOCK:
            return
        except OSError:
            data = b""
        if not data:
            self._close_now(conn)

    def close_lingering(self, now: float) -> None:
        """Close every closing connection whose client has not closed in time."""
        for conn in [c for c in self.closing if now >= c.close_at]:
            self._close_now(conn)

    def _shutdown_write(self, conn: Conn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now(conn)

    def _close_now(self, conn: Conn) -> None:
        if conn.session is not None:
            conn.session.ended = True
            self.sessions.pop(conn.cid, None)
        self.on_closed(conn)
        self._unregister(conn)
        self.conns.discard(conn)
        self.closing.discard(conn)
        conn.phase = _CLOSING  # closed is closing for good: nothing reads it as a client again
        try:
            conn.sock.close()
        except OSError:
            pass

    def on_closed(self, conn: Conn) -> None:
        """The socket is about to be closed by this loop (may be called twice)."""

    def close_all(self) -> None:
        """The loop ends: close every socket it still owns, then the selector and its waker."""
        self.drop_away()
        for conn in list(self.conns) + list(self.closing):
            self._close_now(conn)
        self.poller.close()
        self.waker.close()

    def _bury_dead(self) -> None:
        """Drop the connections whose socket failed during this batch of events."""
        dead, self._dead = self._dead, []
        for conn in dead:
            if conn.owner is not self:
                continue  # moved to another loop since: its failure is that loop's to see
            if conn in self.conns:
                self.drop(conn, "disconnected")
            elif conn.phase is _CLOSING:
                self._close_now(conn)
