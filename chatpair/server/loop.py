"""The selector loop shared by the listener and the relay threads.

Both the pairing listener (handshakes and waiting clients) and every room
relay (paired clients) are one thread running one :class:`ConnLoop`: a
``selectors`` loop over non-blocking sockets. What they do alike is split by
concern:

==============  ===================================================================
``loop``        here: the selector, who owns which connection, the timers
``reader``      reading frames and lines and acting on them, paced by the rate limit
``scanner``     the fast frame scanner, a pure function
``output``      writing, output queues, flow control
``closing``     leaving, and the polite close that makes sure a final ERROR is read
``resuming``    resumable sessions: ACKs, a dropped client kept away, RESUME, expiry
``timers``      keepalive PING, idle timeout, write deadline: who is due, decided purely
``ratelimit``   token buckets and the timetable of throttled clients
``tls``         the non-blocking TLS handshake, and bytes select() cannot see
``render``      server events as bytes for a frame- or line-mode client
``conn``,       one client's connection, and its named states (mode, phase)
``states``
==============  ===================================================================

Subclasses decide what a message means (forward it, or answer
"undelivered") and what leaving does: the hooks are listed on :class:`ConnLoop`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from chatpair.netutil import Waker
from chatpair.proto import ErrorCode, FrameType, encode_frame
from chatpair.server.busypoll import BusyPoll
from chatpair.server.closing import CloseMixin
from chatpair.server.config import Limits
from chatpair.server.conn import Conn
from chatpair.server.logs import flush_logs
from chatpair.server.output import OutputMixin
from chatpair.server.poller import (
    EVENT_READ,
    EVENT_WRITE,
    READ_READY,
    WRITE_READY,
    make_poller,
)
from chatpair.server.ratelimit import RateLimiter
from chatpair.server.reader import ReadMixin
from chatpair.server.resuming import ResumeMixin
from chatpair.server.states import Mode, Phase
from chatpair.server.stats import LoopStats
from chatpair.server.timers import TICK_SECONDS, Expired, sweep, sweep_interval
from chatpair.server.tls import TlsMixin

log = logging.getLogger("chatpair")

#: One read takes at most this much; big enough to batch thousands of small frames.
SCRATCH_SIZE = 256 * 1024

_TLS_HANDSHAKE = Phase.TLS_HANDSHAKE
_CHATTING = Phase.CHATTING
_CLOSING = Phase.CLOSING
_AWAY = Phase.AWAY
_LINE = Mode.LINE


class ConnLoop(ResumeMixin, ReadMixin, OutputMixin, CloseMixin, TlsMixin):
    """A selector loop owning a set of connections. Run it in exactly one thread.

    For other threads: :meth:`wake`, or act as the loop while holding
    :attr:`turn` (see there). For the owner thread: :meth:`run`,
    :meth:`adopt_conn`, :meth:`release_conn`, :meth:`owns`, :meth:`fail`,
    :meth:`finish`, :meth:`drop`, and from the mixins ``send``, ``enqueue``,
    ``send_event``, ``send_line``, ``process_buffered``. Hooks for subclasses:
    :meth:`on_special`, :meth:`on_wake`, :meth:`after_events`, :meth:`on_due`, :meth:`busy`,
    :meth:`tick` (call super), :meth:`detach`, :meth:`on_tls_ready`,
    :meth:`on_closed`, and the reader's ``on_msg_run``, ``on_line_msg``,
    ``on_next``, ``on_handshake_readable``.
    """

    name = "loop"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.max_frame = limits.max_frame
        self.limiter = RateLimiter(limits.rate, limits.burst)
        self.poller = make_poller()
        self.conns: set[Conn] = set()  # owned and not closing
        self.closing: set[Conn] = set()
        self.running = True
        self.now = time.monotonic()
        self._dead: list[Conn] = []  # a write failed: dropped after this batch of events
        self._again: list[Conn] = []  # TLS: decrypted bytes left inside the SSL object
        self._next_sweep = 0.0
        #: A subclass's own timer: :meth:`on_due` runs once this time has come (then it is unset).
        self.due = float("inf")
        size = max(SCRATCH_SIZE, 2 * (limits.max_frame + 8))
        self.scratch = bytearray(size)
        self.scratch_view = memoryview(self.scratch)
        #: Held by the loop's thread whenever it is not asleep in poll(). Another
        #: thread that takes it may act as this loop in the meantime (the
        #: listener adopts a pair into a sleeping relay: no wake-up, no GIL
        #: ping-pong); it must wake the loop if it leaves work the loop only finds
        #: after poll() (``Relay.pending_work`` tells).
        self.turn = threading.Lock()
        # Other threads (the listener handing over a pair) wake select() with it.
        self.waker = Waker()
        self.poller.register(self.waker.reader, EVENT_READ, None)
        self.init_resume()
        #: Busy polling (server/busypoll.py), for loops added to a BusyPoll before they run.
        self.busy_poll = BusyPoll(0.0)
        self.spin_seconds = 0.0
        self.spin_ok = False  # the last wait was short: busy-poll before the next sleep
        self.stats = LoopStats()  # for the status line and /metrics; written only by whoever holds the turn

    def wake(self) -> None:
        """Wake ``select()`` from another thread (after putting work in an inbox)."""
        self.waker.wake()

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        """Serve until :attr:`running` goes false and the closing sockets are done."""
        poll = self.poller.poll
        owners, specials = self.poller.data, self.poller.files  # fd -> Conn, fd -> socket of our own
        throttled = self.limiter.heap
        turn = self.turn
        next_tick = 0.0
        wait = self.busy_poll.wait  # sleep in poll(), or busy-poll first (server/busypoll.py)
        turn.acquire()
        try:
            while self.running or self.closing or self.conns or self.busy():
                wake_at = min(self.due, next_tick)  # a subclass's timer, or the tick
                if throttled and throttled[0][0] < wake_at:
                    wake_at = throttled[0][0]
                events = wait(self, poll, wake_at)  # sets self.now; our turn is released while asleep
                for fd, ready in events:
                    conn = owners.get(fd)
                    if conn is None:  # a socket of the loop's own (wake-up, listening socket)
                        if fd in specials:
                            self.on_special(specials[fd])
                        continue
                    # An event may be stale (an earlier one handed the conn on, or closed it): ask
                    # ownership and what it waits for now. A stale event on a reused fd reads or
                    # writes nothing: the sockets are non-blocking.
                    if ready & WRITE_READY and conn.owner is self and conn.events & EVENT_WRITE:
                        if conn.phase is _TLS_HANDSHAKE:
                            self.tls_step(conn)
                        else:
                            self.write_queued(conn)
                    if ready & READ_READY and conn.owner is self and conn.events & EVENT_READ:
                        self.on_readable(conn)
                while self._again:
                    again, self._again = self._again, []
                    for conn in again:
                        if conn.owner is self and conn.phase is not _CLOSING:
                            self.on_readable(conn)
                if throttled and throttled[0][0] <= self.now:
                    self.end_throttles()
                if self._dead:
                    self._bury_dead()
                self.after_events()
                if self.now >= self.due:
                    self.due = float("inf")
                    self.on_due(self.now)
                if self.now >= next_tick:
                    self.tick(self.now)
                    # Log lines are buffered (logs.BatchedStderrHandler):
                    # written out here, at most a tick after the event.
                    flush_logs()
                    next_tick = self.now + TICK_SECONDS
                if not self.running and not self.conns and not self.closing and not self.busy():
                    break
        finally:
            try:
                self.close_all()
                flush_logs()
            finally:
                turn.release()

    def on_special(self, fileobj: Any) -> None:
        """Readable socket that is not a client (wake-up, listening socket)."""
        if fileobj is self.waker.reader:
            self.waker.drain()
            self.on_wake()

    def on_wake(self) -> None:
        """Another thread asked for attention (commands in an inbox)."""

    def after_events(self) -> None:
        """Called after each batch of events (post hand-overs here)."""

    def on_due(self, now: float) -> None:
        """The time set in :attr:`due` has come."""

    def busy(self) -> bool:
        """Something besides our own sockets still needs the loop (e.g. relays winding down)."""
        return False

    # -- ownership and registration ------------------------------------------------

    def adopt_conn(self, conn: Conn, register: bool = True) -> None:
        """Own ``conn`` and register it with this loop's selector (``register=False``: the caller acts
        first, then calls :meth:`update_interest` if it is still ours). Only a connection nobody owns
        can be adopted: its previous owner must have called :meth:`release_conn`, on its own thread."""
        if conn.owner is not None:
            raise RuntimeError(f"{conn!r} is still owned by {conn.owner!r}; it must be released first")
        conn.owner = self
        conn.events = 0
        if conn.phase is _AWAY:  # a session without a socket (cluster mode hands these over)
            return self.adopt_away(conn)
        self.conns.add(conn)
        if conn.session is not None:
            self.track_session(conn)
        if conn.throttled_until:
            # Over its rate when it moved here: this loop must end the pause.
            self.limiter.throttle(conn, conn.throttled_until)
        if register:
            self.update_interest(conn)

    def release_conn(self, conn: Conn) -> None:
        """Give up ownership without closing (the conn moves to another loop).

        After this returns, this loop never touches ``conn`` again: stale
        selector events and queued timers for it are skipped because
        ``conn.owner`` is no longer this loop.
        """
        if conn.owner is not self:
            raise RuntimeError(f"{self!r} cannot release {conn!r}: it is owned by {conn.owner!r}")
        conn.paused = False  # flow control is this loop's bookkeeping; the next owner starts afresh
        self._unregister(conn)
        self.conns.discard(conn)
        self.away.discard(conn)
        if conn.session is not None:
            self.untrack_session(conn)
        conn.owner = None

    def owns(self, conn: Conn) -> bool:
        """Still ours to read? (False once it closes or moves to another loop.)"""
        return conn in self.conns

    def _unregister(self, conn: Conn) -> None:
        if conn.events:
            try:
                self.poller.unregister(conn.fd)
            except (KeyError, ValueError, OSError):
                pass
            conn.events = 0

    def update_interest(self, conn: Conn) -> None:
        """Register for what the connection needs now: read unless held back, write if backlog."""
        phase = conn.phase
        if phase is _TLS_HANDSHAKE:
            want = conn.tls_want
        elif phase is _AWAY:
            return  # no socket: nothing to register
        elif phase is _CLOSING:
            want = EVENT_READ | (EVENT_WRITE if conn.out else 0)
        else:
            want = 0 if conn.paused or conn.throttled_until else EVENT_READ
            if conn.out:
                want |= EVENT_WRITE
        have = conn.events
        if want == have:
            return
        try:
            if not have:
                self.poller.register(conn.fd, want, conn)
            elif not want:
                self.poller.unregister(conn.fd)
            else:
                self.poller.modify(conn.fd, want, conn)
        except (KeyError, ValueError, OSError):
            self._dead.append(conn)
            return
        conn.events = want

    # -- timers --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Lingering closes; every sweep interval, keepalive, idle timeout and write deadline."""
        self.close_lingering(now)
        self.tick_sessions(now)
        if now < self._next_sweep:
            return
        self._next_sweep = now + sweep_interval(self.limits)
        ping, expired = sweep(self.conns, now, self.limits)
        if ping:
            payload = encode_frame(FrameType.PING, b"keepalive")
            for conn in ping:
                conn.pinged = True
                self.send(conn, payload)
        for conn, why in expired:
            if conn not in self.conns:
                continue
            if why is Expired.WRITE:
                log.info("%s: not reading for %.0fs; dropped", conn.label, self.limits.write_timeout)
                self.drop(conn, "timeout")
            else:
                self.fail(conn, ErrorCode.TIMEOUT,
                          f"no frame from you for {self.limits.idle_timeout:g} seconds", reason="timeout")

    def end_throttles(self) -> None:
        """Read again every client whose throttle has run out."""
        for conn in self.limiter.due(self.now):
            # A client that moved to another loop meanwhile is that loop's to wake.
            if conn.throttled_until and conn.owner is self and conn in self.conns:
                conn.throttled_until = 0.0
                conn.last_rx = self.now  # the pause was ours, not the client's idleness
                self.update_interest(conn)
                if conn.mode is _LINE:
                    self.process_lines(conn)  # lines already buffered come first
