"""Output: write what the socket takes now, queue the rest, and slow down whoever fills a queue.

Every byte the server writes to a client goes through :meth:`OutputMixin.send`:
it writes at once when nothing is queued (the common case: one ``send``
per run of messages), and otherwise queues a copy in the connection's
:class:`~chatpair.server.conn.OutQueue`, written when the socket is
writable again.

Flow control keeps memory bounded without dropping anything: once
:data:`HIGH_WATER` bytes are queued for a client, the loop stops reading
whoever feeds that queue (the client itself; in a relay, its partner too),
and reads them again once it is below :data:`LOW_WATER`. The sender's bytes
then wait in the kernel, and TCP slows the sender down.

This is a mixin of :class:`~chatpair.server.loop.ConnLoop`, not a helper
object, because ``send`` runs once per run of messages and must stay one
method call, and because subclasses (and tests) override ``send``,
``on_backlog``, ``on_drained`` and ``may_read``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chatpair.proto import FrameType
from chatpair.server.conn import Conn, OutChunk
from chatpair.server.render import event_bytes
from chatpair.server.session import SESSION_HIGH_WATER, Session
from chatpair.server.states import Mode, Phase
from chatpair.server.tls import WOULD_BLOCK

#: Stop reading from a client while this much is queued for it or its
#: partner: a slow reader slows the sender down instead of growing memory.
HIGH_WATER = 256 * 1024
#: ...and read again once the backlog is below this.
LOW_WATER = 64 * 1024

_CLOSING = Phase.CLOSING
_AWAY = Phase.AWAY
_LINE = Mode.LINE


class OutputMixin:
    """Output queues and flow control for :class:`~chatpair.server.loop.ConnLoop`.

    For callers: :meth:`send`, :meth:`enqueue`, :meth:`send_event`,
    :meth:`send_line`. May be overridden: :meth:`on_backlog`,
    :meth:`on_drained`, :meth:`may_read`. Needs from the loop: ``now``,
    ``_dead``, :meth:`update_interest`, :meth:`_shutdown_write`.
    """

    if TYPE_CHECKING:  # provided by ConnLoop
        now: float
        _dead: list[Conn]

        def update_interest(self, conn: Conn) -> None: ...

        def _shutdown_write(self, conn: Conn) -> None: ...

    def send(self, conn: Conn, data: bytes | memoryview, msgs: int = 0, framed: bool = True) -> None:
        """Write now what the socket takes; queue the rest (copied) for later.

        ``msgs`` is how many partner MSGs ``data`` carries (for NOTICE
        undelivered if the client vanishes before they are written);
        ``framed`` is false for line-mode text.
        """
        if not data:
            return
        session = conn.session
        if session is not None and self.hold_for_session(conn, session, data, msgs):
            return
        out = conn.out
        if out:  # behind what is queued already: order first
            chunk = OutChunk(bytes(data), msgs, framed)
            out.append(chunk)  # (OutQueue.push, inline: this runs once per run of messages)
            out.unsent += len(chunk.data)
            if out.unsent > HIGH_WATER:  # a high backlog pauses whoever feeds it
                self.on_backlog(conn)
            return
        try:
            sent = conn.sock.send(data)
        except WOULD_BLOCK:
            sent = 0
        except OSError:
            sent = 0
            self._dead.append(conn)
        if sent == len(data):
            return
        chunk = OutChunk(bytes(data), msgs, framed)
        out.append(chunk)
        out.first_sent = sent
        out.unsent += len(chunk.data) - sent
        out.last_progress = self.now
        self.update_interest(conn)
        if out.unsent > HIGH_WATER:
            self.on_backlog(conn)

    def enqueue(self, conn: Conn, data: bytes) -> None:
        """Queue ``data`` behind what is queued, without writing now.

        For a connection about to move to another loop: the new owner writes
        it, after it has done what the bytes announce.
        """
        if data:
            session = conn.session
            if session is not None and self.hold_for_session(conn, session, data, 0):
                return
            out = conn.out
            if not out:
                out.last_progress = self.now
            out.push(OutChunk(bytes(data)))

    def hold_for_session(self, conn: Conn, session: Session, data: bytes | memoryview, msgs: int) -> bool:
        """Keep ``data`` in a resumable session's replay log; true if the client is away (nothing to write).

        Unacknowledged bytes count towards flow control (PROTOCOL.md section
        6): past :data:`SESSION_HIGH_WATER` the partner feeding them is no
        longer read. It is read again when an ACK (or the client's return)
        brings the log below the low-water mark.
        """
        session.record(data, msgs)
        if session.log_bytes > SESSION_HIGH_WATER and conn.partner is not None:
            self.pause(conn.partner)
        return conn.phase is _AWAY

    def send_event(self, conn: Conn, ftype: FrameType, obj: dict[str, Any]) -> None:
        """A server event, as a frame or a ``* `` line as ``conn``'s mode wants."""
        self.send(conn, event_bytes(conn, ftype, obj))

    def send_line(self, conn: Conn, text: str) -> None:
        """A ``* `` line for a line-mode client (nothing in frame mode)."""
        if conn.mode is _LINE:
            self.send(conn, (text + "\n").encode("utf-8"))

    def write_queued(self, conn: Conn) -> None:
        """The socket is writable: write what is queued; finish a polite close once all is out."""
        out = conn.out
        sock = conn.sock
        while out:
            chunk = out[0]
            off = out.first_sent
            try:
                sent = sock.send(memoryview(chunk.data)[off:] if off else chunk.data)
            except WOULD_BLOCK:
                break
            except OSError:
                self._dead.append(conn)
                return
            out.last_progress = self.now
            out.unsent -= sent
            if off + sent < len(chunk.data):
                out.first_sent = off + sent
                break
            out.popleft()
            out.first_sent = 0
        if conn.phase is _CLOSING and not out:
            self._shutdown_write(conn)
        self.update_interest(conn)
        if out.unsent < LOW_WATER:
            self.on_drained(conn)

    # -- flow control ---------------------------------------------------------------

    def on_backlog(self, conn: Conn) -> None:
        """``conn`` has too much queued: stop reading from it (subclasses add its partner)."""
        self.pause(conn)

    def on_drained(self, conn: Conn) -> None:
        """``conn``'s backlog went low: resume whoever was paused for it."""
        self.resume(conn)

    def pause(self, conn: Conn) -> None:
        if not conn.paused and conn.phase is not _CLOSING:
            conn.paused = True
            self.update_interest(conn)

    def resume(self, conn: Conn) -> None:
        if conn.paused and conn.phase is not _CLOSING and self.may_read(conn):
            conn.paused = False
            conn.last_rx = self.now  # time spent paused was ours, not the client's idleness
            self.update_interest(conn)

    def may_read(self, conn: Conn) -> bool:
        """May ``conn`` be read again? (A relay also asks about its partner's backlog.)"""
        return conn.out.unsent < LOW_WATER
