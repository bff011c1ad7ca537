"""Room relay threads: move messages between two partners, both ways at once.

The teaching demo this grew from ran one thread per chat room that let the
partners speak in strict turns. chatpair keeps "a room is relayed by a
thread" but makes it real:

* **full duplex** - each relay thread runs a selector loop (:class:`Relay`),
  so both partners of every room it serves can send at any time;
* **many rooms per thread** - a thread blocked in ``select()`` costs nothing,
  and a few threads over many rooms do not fight over the GIL the way two
  blocked threads per room do (``docs/performance.md`` has the numbers);
* **verbatim** - a run of MSG frames goes to the partner with one ``send`` of
  a memoryview slice, byte for byte; frame <-> line translation only happens
  when the partners speak different modes.

A relay owns the sockets of the pairs it serves. When a partner leaves, the
relay tells the one who stays (PEER_LEFT) and hands it back to the listener,
which queues it again. Hand-backs go through a callback, so the same class
serves in a thread of the listener process and in a relay worker process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from chatpair.proto import ErrorCode, FrameType, encode_frame, split_utf8
from chatpair.server.config import Limits
from chatpair.server.conn import Conn
from chatpair.server.loop import ConnLoop
from chatpair.server.output import LOW_WATER
from chatpair.server.render import event_bytes, line_msg_bytes, undelivered_notices
from chatpair.server.session import SESSION_LOW_WATER
from chatpair.server.states import Mode, Phase

log = logging.getLogger("chatpair")

_FRAME = Mode.FRAME
_AWAY = Phase.AWAY


@dataclass(slots=True)
class PairEnd:
    """What a relay reports when a pair ends (who left, who comes back), or a lone client does.

    ``unpair`` is false for a client the relay kept after its pair ended
    because it was away (resume): it comes back, or its session ends, later
    and alone (then ``a == b``).
    """

    a: int
    b: int
    next_by: int | None = None
    gone: list[int] = field(default_factory=list)  # connections closed (sessions ended)
    back: list[Conn] = field(default_factory=list)  # connections to queue again
    unpair: bool = True
    #: cluster mode, a pair across nodes ended here: (our client's cid, its partner's cid, reason)
    remote: tuple[str, str, str] | None = None
    #: cluster mode: the (resumed) session moved to another node; nothing to tell the cluster
    moved: bool = False


@dataclass(slots=True)
class Bounce:
    """A RESUME handed to a relay that no longer holds the session: the listener looks again."""

    new: Conn  # the new connection, its RESUME read
    cid: int  # the session's client id
    received: int  # the count its RESUME said


Report = PairEnd | Bounce


class Relay(ConnLoop):
    """One relay loop: serves any number of pairs, in one thread."""

    def __init__(self, limits: Limits, index: int, on_pair_end: Callable[[Report], None]) -> None:
        super().__init__(limits)
        self.index = index
        self.name = f"relay-{index}"
        self._on_pair_end = on_pair_end
        self._inbox: deque[tuple[str, object]] = deque()  # filled by other threads
        self._ended: list[Report] = []
        self.pairs = 0

    # -- commands from the listener (any thread) -------------------------------------

    def submit_pair(self, a: Conn, b: Conn, wake: bool = True) -> None:
        """Any thread: relay ``a`` and ``b`` from now on (``wake=False``: the caller wakes us later)."""
        self._inbox.append(("pair", (a, b)))
        if wake:
            self.wake()

    def adopt_pair_now(self, a: Conn, b: Conn) -> bool:
        """Any thread: adopt ``a`` and ``b`` at once, acting as this loop while it sleeps.

        Saves the relay a wake-up per batch of pairs, and the two threads the
        GIL hand-overs that come with it: connect+pair 1.10x (docs/performance.md).
        False, with nothing done, when the relay is awake (its inbox, read
        after its batch of events, is as quick, and the caller must not wait
        for it), when commands wait in the inbox (they come first), when the
        relay is winding down, or when its poller would not see a socket
        registered during a wait already in progress (``select``-based ones):
        then :meth:`submit_pair`.
        """
        if not self.poller.live_registration or not self.turn.acquire(blocking=False):
            return False
        try:
            if self._inbox or not self.running:
                return False
            before = self.pending_work()
            self.now = time.monotonic()
            try:
                self.adopt_pair(a, b)
            except Exception:  # a bug must not take the listener down with this relay
                log.exception("relay %d: taking a pair failed; it stops", self.index)
                self.stop()
                self.wake()
                return True
            if self.pending_work() != before:
                self.wake()
            return True
        finally:
            self.turn.release()

    def pending_work(self) -> tuple[object, ...]:
        """What the loop would find to do after poll() besides socket events.

        Whoever acts as the loop while it sleeps compares this before and
        after, and wakes the loop if it changed: a write that failed, bytes
        left inside TLS, a pair that ended at once, a timer set sooner.
        """
        heap = self.limiter.heap
        return (len(self._dead), len(self._again), len(self._ended), self.due, heap[0][0] if heap else None)

    def submit_resume(self, new: Conn, cid: int, received: int) -> None:
        """Any thread: ``new`` sent RESUME for the session of client ``cid``, which we relay."""
        self._inbox.append(("resume", (new, cid, received)))
        self.wake()

    def submit_stop(self) -> None:
        self._inbox.append(("stop", None))
        self.wake()

    def on_wake(self) -> None:
        while self._inbox:
            what, arg = self._inbox.popleft()
            if what == "pair":
                self.adopt_pair(*arg)  # type: ignore[misc]
            elif what == "resume":
                self.take_resume(*arg)  # type: ignore[misc]
            elif what == "stop":
                self.stop()
            else:
                self.on_command(what, arg)

    def on_command(self, what: str, arg: object) -> None:
        """Another command from :meth:`submit` (subclasses: cluster mode's remote pairs)."""

    def submit(self, what: str, arg: object, wake: bool = True) -> None:
        """Any thread: queue a command for :meth:`on_command` (``wake=False``: the caller wakes us later)."""
        self._inbox.append((what, arg))
        if wake:
            self.wake()

    def adopt_pair(self, a: Conn, b: Conn) -> None:
        """Start relaying between ``a`` and ``b`` (PAIRED was already queued to both)."""
        if not self.running:
            for conn in (a, b):
                self.adopt_conn(conn)
                self.fail(conn, ErrorCode.SHUTDOWN, "the server is shutting down", reason="shutdown")
            return
        a.partner, b.partner = b, a
        self.pairs += 1
        self.stats.pair_started(a.cid, b.cid, self.now)
        for conn in (a, b):
            self.adopt_conn(conn)
        for conn in (a, b):
            self.process_buffered(conn)

    def take_resume(self, new: Conn, cid: int, received: int) -> None:
        """A RESUME for a session here: carry it on on ``new``, or send it back if it is not ours."""
        self.adopt_conn(new)
        conn = self.sessions.get(cid)
        if conn is None:
            # It left for the listener (or ended) while the RESUME was on its way.
            self.release_conn(new)
            self._ended.append(Bounce(new, cid, received))
        elif not self.running:
            self.fail(new, ErrorCode.SHUTDOWN, "the server is shutting down", reason="shutdown")
        else:
            self.attach_resume(new, conn, received)

    def on_resumed(self, conn: Conn) -> None:
        if conn.partner is None:
            # Its partner left while it was away: it has heard PEER_LEFT (in
            # the replay); now it is the listener's to queue again.
            self.release_conn(conn)
            self._ended.append(PairEnd(conn.cid, conn.cid, back=[conn], unpair=False))

    def stop(self) -> None:
        """Tell every client ``shutdown`` (no PEER_LEFT: everyone hears the same) and wind down."""
        self.running = False
        self.drop_away()
        for conn in list(self.conns):
            conn.partner = None
            self.fail(conn, ErrorCode.SHUTDOWN, "the server is shutting down", reason="shutdown")

    def after_events(self) -> None:
        if self._ended:
            ended, self._ended = self._ended, []
            for end in ended:
                self._on_pair_end(end)

    # -- messages -----------------------------------------------------------------------

    def on_msg_run(self, conn: Conn, view: memoryview, start: int, end: int, count: int) -> None:
        partner = conn.partner
        if partner is None:
            self.send(conn, undelivered_notices(conn, count, "you have no partner right now"))
            return
        stats = self.stats  # for status and /metrics (server/stats.py)
        stats.msgs += count
        stats.bytes += end - start
        if partner.mode is _FRAME:
            self.send(partner, view[start:end], count)
        else:
            pos = start
            while pos < end:
                fend = pos + 4 + int.from_bytes(view[pos:pos + 4], "big")
                self.send(partner, line_msg_bytes(conn.name, str(view[pos + 5:fend], "utf-8")), 1, False)
                pos = fend

    def on_line_msg(self, conn: Conn, text: str) -> None:
        partner = conn.partner
        if partner is not None:  # for status and /metrics (server/stats.py)
            self.stats.msgs += 1
            self.stats.bytes += len(text.encode("utf-8", "replace")) + 1
        if partner is None:
            self.send(conn, undelivered_notices(conn, 1, "you have no partner right now"))
        elif partner.mode is _FRAME:
            # A line is at most max_frame - 1 bytes as typed, but each invalid
            # byte became U+FFFD (3 bytes): cut it into MSG frames that fit.
            data = text.encode("utf-8")
            if len(data) < self.limits.max_frame:
                self.send(partner, encode_frame(FrameType.MSG, data), 1)
            else:
                for piece in split_utf8(text, self.limits.max_frame - 1):
                    self.send(partner, encode_frame(FrameType.MSG, piece), 1)
        else:
            self.send(partner, line_msg_bytes(conn.name, text), 1, False)

    # -- flow control: a partner's backlog pauses the sender ---------------------------------

    def on_backlog(self, conn: Conn) -> None:
        self.pause(conn)
        if conn.partner is not None:
            self.pause(conn.partner)

    def on_drained(self, conn: Conn) -> None:
        self.resume(conn)
        if conn.partner is not None:
            self.resume(conn.partner)

    def may_read(self, conn: Conn) -> bool:
        partner = conn.partner
        if partner is None:
            return conn.out.unsent < LOW_WATER
        held = partner.session  # what the partner has not acknowledged counts too
        return (conn.out.unsent < LOW_WATER and partner.out.unsent < LOW_WATER
                and (held is None or held.log_bytes < SESSION_LOW_WATER))

    # -- leaving ----------------------------------------------------------------------------

    def on_next(self, conn: Conn) -> None:
        partner = conn.partner
        if partner is None:
            return
        log.info("%s: next (leaves %s)", conn.label, partner.label)
        self._end_pair(conn, "next", closing=False)

    def detach(self, conn: Conn, reason: str) -> None:
        if conn.partner is not None:
            log.info("%s: left (%s); %s is queued again", conn.label, reason, conn.partner.label)
            self._end_pair(conn, reason, closing=True)
        elif conn.session is not None and not conn.session.ended and self.running:
            # Kept here while away after its pair ended, and now gone for good.
            self._ended.append(PairEnd(conn.cid, conn.cid, gone=[conn.cid], unpair=False))

    def _end_pair(self, leaver: Conn, reason: str, closing: bool) -> None:
        stayer = leaver.partner
        assert stayer is not None
        leaver.partner = stayer.partner = None
        self.pairs -= 1
        self.stats.pair_ended(leaver.cid, stayer.cid, self.now)
        if leaver.phase is _AWAY:
            # Its window passed: what it never acknowledged may never have
            # reached it, and the server cannot know; it says so (section 6).
            lost = leaver.session.unacked  # type: ignore[union-attr]
        else:
            lost = leaver.undelivered_msgs() if closing else 0
        # Queued, not written: the listener writes these after it has put the
        # stayer back in the lobby, so whoever hears "bob left" and reacts
        # (a newcomer told by the stayer, say) finds the lobby already updated.
        if lost:
            self.enqueue(stayer, undelivered_notices(stayer, lost, f"{leaver.name} left"))
        self.enqueue(stayer, event_bytes(stayer, FrameType.PEER_LEFT, {"peer": leaver.name, "reason": reason}))
        end = PairEnd(leaver.cid, stayer.cid, next_by=None if closing else leaver.cid)
        for conn in (stayer,) if closing else (stayer, leaver):
            if conn.phase is _AWAY:
                continue  # stays here, events kept for it, until it comes back or its window ends
            self.release_conn(conn)
            end.back.append(conn)
        if closing:
            end.gone.append(leaver.cid)
        self._ended.append(end)


class RelayThread:
    """A :class:`Relay` running in its own thread; the listener owns and joins it."""

    def __init__(self, limits: Limits, index: int, on_pair_end: Callable[[Report], None],
                 relay: Relay | None = None) -> None:
        self.relay = relay if relay is not None else Relay(limits, index, on_pair_end)
        self.thread = threading.Thread(target=self._run, name=f"chatpair-relay-{index}", daemon=True)
        self._wake_owed = False  # pairs submitted since the last flush()

    def _run(self) -> None:
        try:
            self.relay.run()
        except Exception:  # a bug must not pass silently, nor take the process down
            log.exception("relay %d crashed", self.relay.index)

    def start(self) -> None:
        self.thread.start()

    @property
    def load(self) -> int:
        return self.relay.pairs

    def alive(self) -> bool:
        return self.thread.is_alive()

    def submit_pair(self, a: Conn, b: Conn) -> None:
        if self.relay.adopt_pair_now(a, b):
            return
        # Waking a thread is a system call: the listener pairs many clients in
        # one batch of events and wakes each relay once, in flush().
        self.relay.submit_pair(a, b, wake=False)
        self._wake_owed = True

    def submit_remote(self, conn: Conn, peer: object) -> None:
        """Cluster mode: relay ``conn`` with its partner on another node (woken in flush())."""
        self.relay.submit("remote", (conn, peer), wake=False)
        self._wake_owed = True

    def flush(self) -> None:
        """Wake the relay if pairs were submitted since the last flush (listener's thread)."""
        if self._wake_owed:
            self._wake_owed = False
            self.relay.wake()

    def submit_resume(self, new: Conn, cid: int, received: int) -> None:
        self.relay.submit_resume(new, cid, received)

    def stop(self) -> None:
        self.relay.submit_stop()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)
