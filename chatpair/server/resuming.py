"""Resumable sessions in a selector loop: ACKs both ways, a dropped client kept away, RESUME.

PROTOCOL.md section 6, as every loop (the listener, each relay thread, each
relay worker) carries it out for the connections it owns. The session's
bookkeeping is plain data (:mod:`chatpair.server.session`); this mixin is
what a loop does with it:

* **ACKs**: every MSG frame read from a resumable client is counted; the
  loop answers with ACK after 64 of them or within a second
  (:meth:`ResumeMixin.count_received`, and :meth:`ResumeMixin.send_due_acks`
  from the timer). An ACK from the client lets the session forget what it
  covers and may let the partner be read again (flow control).
* **Going away**: when a resumable client's socket drops (end of stream,
  reset, a write failing, the idle or write timeout), :meth:`drop` and
  :meth:`fail` keep the :class:`~chatpair.server.conn.Conn` instead of
  ending it: its socket is closed (through a throwaway *husk* connection
  when an ERROR ``timeout`` must still be written), the connection becomes
  :attr:`Phase.AWAY`, stays owned by this loop, and its partner hears NOTICE
  ``peer_away``. Messages for it go on into the session's replay log.
* **Coming back**: :meth:`attach_resume` carries the session on to the new
  socket of a RESUME: WELCOME, RESUMED, then the replay log; the partner
  hears ``peer_back``. A RESUME while the old socket still looks alive takes
  over silently.
* **Expiry**: a session away longer than the window ends as a disconnect
  would (:meth:`expire_away`, from the timer).

Subclass hooks: :meth:`on_away`, :meth:`on_resumed`, :meth:`on_session_ended`.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from chatpair.proto import ErrorCode, Frame, FrameType, ProtocolError
from chatpair.proto.resume import encode_ack, encode_resumed, parse_ack
from chatpair.server.conn import Conn
from chatpair.server.handshake import welcome_frame
from chatpair.server.render import event_bytes, presence_notice
from chatpair.server.session import EXPIRED_MESSAGE, SESSION_LOW_WATER
from chatpair.server.states import Phase

if TYPE_CHECKING:
    from chatpair.server.config import Limits

log = logging.getLogger("chatpair")

_CHATTING = Phase.CHATTING
_AWAY = Phase.AWAY
_TIMEOUT = ErrorCode.TIMEOUT.value


class ResumeMixin:
    """Resumable sessions for :class:`~chatpair.server.loop.ConnLoop` (see the module docstring)."""

    if TYPE_CHECKING:  # provided by ConnLoop and the other mixins
        now: float
        limits: Limits
        running: bool
        conns: set[Conn]
        _dead: list[Conn]

        def send(self, conn: Conn, data: bytes | memoryview, msgs: int = 0, framed: bool = True) -> None: ...
        def adopt_conn(self, conn: Conn) -> None: ...
        def finish(self, conn: Conn, last: bytes = b"") -> None: ...
        def detach(self, conn: Conn, reason: str) -> None: ...
        def update_interest(self, conn: Conn) -> None: ...
        def _unregister(self, conn: Conn) -> None: ...
        def on_drained(self, conn: Conn) -> None: ...
        def process_buffered(self, conn: Conn) -> None: ...

    def init_resume(self) -> None:
        #: resumable sessions owned by this loop, connected or away, by client id
        self.sessions: dict[int, Conn] = {}
        #: away: no socket, kept until their window closes (owned, not in ``conns``)
        self.away: set[Conn] = set()
        #: connections owed an ACK that is not due yet (looked at by the timer)
        self.acks_owed: set[Conn] = set()

    def track_session(self, conn: Conn) -> None:
        """``conn`` (owned here) has a session: adopted with one, or just given one."""
        self.sessions[conn.cid] = conn
        if conn.session.clock.deadline() is not None:  # type: ignore[union-attr]
            self.acks_owed.add(conn)  # an ACK owed by the previous owner is ours to send

    def adopt_away(self, conn: Conn) -> None:
        """``conn`` (owned here now) is away: kept until it comes back or its window passes."""
        self.away.add(conn)
        self.track_session(conn)

    def untrack_session(self, conn: Conn) -> None:
        """``conn`` moves to another loop, its session with it."""
        self.sessions.pop(conn.cid, None)
        self.acks_owed.discard(conn)

    def tick_sessions(self, now: float) -> None:
        """The loop's timer: ACKs that fell due, windows that passed."""
        if self.acks_owed:
            self.send_due_acks(now)
        if self.away:
            self.expire_away(now)

    # -- ACKs ------------------------------------------------------------------------------

    def count_received(self, conn: Conn, msgs: int) -> None:
        """``msgs`` MSG frames were read from a resumable client: ACK now if due, else remember."""
        clock = conn.session.clock  # type: ignore[union-attr]
        clock.received_msgs(msgs, self.now)
        if conn.phase is not _CHATTING:
            return
        if clock.ack_due(self.now):
            self.send(conn, encode_ack(clock.take_ack()))
            self.acks_owed.discard(conn)
        else:
            self.acks_owed.add(conn)

    def send_due_acks(self, now: float) -> None:
        for conn in [c for c in self.acks_owed if c.phase is not _CHATTING or c.owner is not self
                     or c.session.clock.ack_due(now)]:  # type: ignore[union-attr]
            self.acks_owed.discard(conn)
            if conn.phase is _CHATTING and conn.owner is self:
                self.send(conn, encode_ack(conn.session.clock.take_ack()))  # type: ignore[union-attr]

    def on_ack(self, conn: Conn, payload: bytes) -> None:
        """An ACK from the client: forget what it covers; the partner may be read again."""
        session = conn.session
        if session is None:
            self.fail(conn, ErrorCode.BAD_FRAME, "ACK is only for a resumable session (HELLO with resume)")
            return
        try:
            session.acknowledge(parse_ack(Frame(FrameType.ACK, payload)), session.stream - conn.out.unsent)
        except ProtocolError as err:
            self.fail(conn, err.code, err.message)
            return
        if session.log_bytes < SESSION_LOW_WATER:
            self.on_drained(conn)

    # -- a dropped socket: keep the session --------------------------------------------------

    def keeps_session(self, conn: Conn) -> bool:
        """Does a drop of ``conn`` keep its session (rather than end it)?"""
        session = conn.session
        return (session is not None and not session.ended and self.running and conn.phase is _CHATTING
                and conn.owner is self)

    def drop(self, conn: Conn, reason: str) -> None:
        if self.keeps_session(conn):
            self.go_away(conn)
        else:
            super().drop(conn, reason)  # type: ignore[misc]

    def fail(self, conn: Conn, code: str | ErrorCode, message: str, reason: str = "error") -> None:
        value = code.value if isinstance(code, ErrorCode) else code
        if value == _TIMEOUT and self.keeps_session(conn):
            # The idle timeout is a drop (section 6): ERROR timeout and close, as
            # in v1, but the session waits for the client to come back.
            log.info("%s: error timeout: %s", conn.label, message)
            self.go_away(conn, event_bytes(conn, FrameType.ERROR, {"code": value, "message": message}))
        else:
            super().fail(conn, code, message, reason)  # type: ignore[misc]

    def go_away(self, conn: Conn, last: bytes = b"", tell_partner: bool = True) -> None:
        """Close ``conn``'s socket (writing ``last`` first) but keep its session for the window."""
        session = conn.session
        assert session is not None
        window = self.limits.resume_window
        session.go_away(session.stream - conn.out.unsent, self.now + window)
        self._unregister(conn)
        self.conns.discard(conn)
        self.acks_owed.discard(conn)
        while conn in self._dead:
            # A failed write on the old socket, due to be buried after this
            # batch: this is its burial. Left in, it would close the new socket.
            self._dead.remove(conn)
        old = conn.sock
        if last:
            # A husk: the old socket alone, closed politely so the client reads
            # the ERROR. Id 0 is nobody's: it counts against no limit.
            husk = Conn(old, 0, conn.addr, self.now)
            husk.mode, husk.name, husk.phase = conn.mode, conn.name, _CHATTING
            self.adopt_conn(husk)
            self.finish(husk, last)
        else:
            try:
                # shutdown, not just close: another process may hold a duplicate
                # of this descriptor (relay workers), and the old connection must
                # end now all the same.
                old.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            old.close()
        conn.fd = -1
        conn.out = type(conn.out)()  # what was queued is in the replay log
        conn.pending = b""
        conn.paused = False
        conn.throttled_until = 0.0
        conn.phase = _AWAY
        self.away.add(conn)
        partner = conn.partner
        if tell_partner:
            log.info("%s: lost the connection; keeping the session for %gs", conn.label, window)
            if partner is not None:
                self.send(partner, presence_notice(partner, "peer_away", conn.name, window))
        if partner is not None:
            self.on_drained(conn)  # its queue is gone: a partner held back by it may be read again
        self.on_away(conn)

    # -- RESUME: the session goes on on a new socket -------------------------------------------

    def attach_resume(self, new: Conn, conn: Conn, received: int) -> None:
        """``new`` (owned here, its RESUME read) carries ``conn``'s session from now on."""
        session = conn.session
        assert session is not None
        if session.ended:  # BYE or an error on the old connection, still closing
            self.fail(new, ErrorCode.SESSION_EXPIRED, EXPIRED_MESSAGE)
            return
        try:
            session.check_resume(received)
        except ProtocolError as err:
            self.fail(new, err.code, err.message)  # the session stays as it was
            return
        was_away = conn.phase is _AWAY
        if not was_away:
            # The old connection is dead but not noticed yet (or a second
            # device took over): it is closed without a word to anyone.
            self.go_away(conn, tell_partner=False)
        replay, peer = session.plan_resume(received)
        self._unregister(new)
        self.conns.discard(new)
        new.owner = None
        conn.take_socket(new)
        self.away.discard(conn)
        self.conns.add(conn)
        session.reconnected(replay)
        self.send(conn, welcome_frame(self.limits, session.token)
                  + encode_resumed(session.clock.received, peer, conn.room))
        for entry in replay:
            self.send(conn, entry.data, entry.msgs)
        self.update_interest(conn)
        again = sum(entry.msgs for entry in replay)
        log.info("%s: resumed%s (%d message%s sent again)", conn.label, "" if was_away else ", taking over",
                 again, "" if again == 1 else "s")
        partner = conn.partner
        if was_away and partner is not None:
            self.send(partner, presence_notice(partner, "peer_back", conn.name))
        self.on_resumed(conn)
        self.process_buffered(conn)

    # -- the window closes -----------------------------------------------------------------------

    def expire_away(self, now: float) -> None:
        """End every session whose client did not come back within the window (as a disconnect)."""
        for conn in [c for c in self.away if now >= c.session.away_until]:  # type: ignore[union-attr]
            self.away.discard(conn)
            session = conn.session
            assert session is not None
            log.info("%s: did not come back within %gs; the session ended", conn.label,
                     self.limits.resume_window)
            self.detach(conn, "disconnected")  # the partner: NOTICE undelivered per unacked MSG, PEER_LEFT
            session.ended = True
            conn.phase = Phase.CLOSING
            self.sessions.pop(conn.cid, None)
            self.on_session_ended(conn)

    def drop_away(self) -> None:
        """Stopping: forget every away session (its client is told nothing: it has no socket)."""
        for conn in self.away:
            conn.session.ended = True  # type: ignore[union-attr]
            conn.phase = Phase.CLOSING
        self.away.clear()

    # -- hooks -----------------------------------------------------------------------------------

    def on_away(self, conn: Conn) -> None:
        """``conn`` went away (the listener takes it out of pairing)."""

    def on_resumed(self, conn: Conn) -> None:
        """``conn`` came back on a new socket."""

    def on_session_ended(self, conn: Conn) -> None:
        """An away session ended at the end of its window (after :meth:`detach`)."""
