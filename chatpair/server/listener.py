"""The pairing listener process: accept, banner, handshake, lobby, hand-over.

``listener_main`` is the entry point of the process the server starts (spawn-
safe: a top-level function whose arguments all pickle, sockets included). In
that process one thread, :class:`Listener`, runs a selector loop that

1. accepts connections (:class:`~chatpair.server.accept.Acceptor`), checks
   them against the limits (:class:`~chatpair.server.admission.Admission`)
   and sends the banner (:class:`~chatpair.server.reception.Reception`);
   a frame-mode client's WAITING (with WELCOME, and with the banner when its
   HELLO came with the connect) leaves at the end of the batch of events, so
   that a partner arriving in the same batch adds PAIRED to the same write;
2. runs every handshake without blocking the others (``Reception`` again,
   with the rules in :mod:`~chatpair.server.handshake`): each connection has
   one absolute deadline, and before HELLO nothing over 1,024 bytes is accepted;
3. keeps waiting clients (keepalive, NOTICE ``undelivered`` for their
   messages) and asks the :class:`~chatpair.server.lobby.Lobby` whom to pair;
4. hands each new pair to a room relay (:class:`~chatpair.server.relay_pool.RelayPool`:
   a thread of this process, into which it adopts the pair itself while the
   relay sleeps, holding the relay's turn lock; or a relay worker process)
   and takes clients back when their partner leaves.

A connection belongs to exactly one loop at a time; handing it over means
unregistering it here before the relay registers it there.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from chatpair.proto import ErrorCode, FrameType
from chatpair.server.accept import Acceptor
from chatpair.server.admission import Admission
from chatpair.server.config import ServerConfig
from chatpair.server.conn import Conn
from chatpair.server.lobby import Lobby, Matched, RoomFull
from chatpair.server.loop import ConnLoop
from chatpair.server.operations import Operations
from chatpair.server.poller import EVENT_READ
from chatpair.server.processes import (
    prepare_child_process,
    stop_resource_tracker,
    tell_ready,
)
from chatpair.server.reception import Reception
from chatpair.server.relay import Bounce, Report
from chatpair.server.relay_pool import RelayPool
from chatpair.server.render import event_bytes, room_full_text, undelivered_notices
from chatpair.server.resume_desk import ResumeDesk
from chatpair.server.states import Mode, Phase
from chatpair.server.workers import Stranded

if TYPE_CHECKING:
    from chatpair.server.cluster_desk import ClusterDesk

log = logging.getLogger("chatpair")

_FRAME = Mode.FRAME

#: ERROR ``shutdown`` to the clients of a relay worker that died (see handle_worker_lost).
WORKER_LOST_MESSAGE = "the relay serving you stopped unexpectedly; reconnect to chat again"


class Listener(ConnLoop):
    """The listener's selector loop (one thread): the lobby and the hand-overs.

    The parts with a concern of their own are objects it holds: ``acceptor``
    (the listening socket), ``admission`` (connection limits), ``reception``
    (a new connection up to its HELLO), ``lobby`` (pairing rules) and
    ``relays`` (who relays each pair).
    """

    name = "listener"

    def __init__(self, listen_sock: socket.socket, control: socket.socket | None, config: ServerConfig) -> None:
        super().__init__(config.limits())
        self.config = config
        self.control = control
        self.lobby = Lobby()
        self.waiting: dict[int, Conn] = {}  # cid -> conn, queued in the lobby and owned here
        self._held: dict[Conn, bytes] = {}  # greetings written at the end of this batch of events (_queue)
        self._ended: deque[Report] = deque()  # from relay threads
        self.admission = Admission(config.effective_max_clients(), config.max_per_ip, config.per_ip_loopback)
        self.resumes = ResumeDesk(self, self.admission)  # where each RESUME goes (server/resume_desk.py)
        self.registry = self.resumes.registry
        self.reception = Reception(self, config, self.admission, self._queue, self.resumes.on_resume)
        self.ops = Operations(self, config)  # the deny list, status lines, /metrics (server/operations.py)
        self.acceptor = self.reception.attach(Acceptor(listen_sock, self.poller, self.reception.new_connection, self.ops.deny))
        if control is not None:
            control.setblocking(False)
            self.poller.register(control, EVENT_READ, None)
        self.cluster: ClusterDesk | None = None  # --cluster: the lobby in Redis (server/cluster_desk.py)
        if config.cluster:
            from chatpair.server.cluster_desk import ClusterDesk

            self.cluster = ClusterDesk(self, config)  # threads stopped and joined by finish() in listener_main
            self.reception.make_token = self.cluster.sessions.new_token
            self.resumes.elsewhere = self.cluster.sessions.resume_elsewhere
        self.relays = RelayPool(config, self.post_pair_end, self.handle_worker_lost, self.poller,
                                self.cluster.make_relay if self.cluster is not None else None, watched=self)

    # -- sockets that are not clients -----------------------------------------------------

    def on_special(self, fileobj: Any) -> None:
        if fileobj is self.acceptor.sock:
            self.acceptor.on_readable(self.now)
        elif fileobj is self.control:
            self.ops.on_control(fileobj)
        elif not self.relays.on_channel(fileobj):
            super().on_special(fileobj)

    # -- new connections: the reception's ----------------------------------------------------

    def send(self, conn: Conn, data: bytes | memoryview, msgs: int = 0, framed: bool = True) -> None:
        held = self._held.pop(conn, None) if self._held else None  # a greeting held (_queue) goes first
        super().send(conn, data if held is None else held + data, msgs, framed)

    def release_conn(self, conn: Conn) -> None:
        held = self._held.pop(conn, None) if self._held else None
        if held is not None:  # written here, before the connection moves on
            super().send(conn, held)
        super().release_conn(conn)

    def after_events(self) -> None:
        if self._held:
            held, self._held = self._held, {}
            for conn, greeting in held.items():
                if conn in self.conns:  # (not if it closed meanwhile)
                    super().send(conn, greeting)
            if self._dead:  # a greeting that could not be written: gone before anyone is paired with it
                self._bury_dead()
        if self.cluster is not None:
            self.cluster.after_events()  # (first: the pairs its answers make go in this flush)
        self.relays.flush()  # pairs made in this batch: one wake-up per relay

    def on_tls_ready(self, conn: Conn) -> None:
        self.reception.on_tls_ready(conn)

    def on_handshake_readable(self, conn: Conn) -> None:
        self.reception.on_readable(conn)

    def on_closed(self, conn: Conn) -> None:
        self.reception.on_closed(conn)

    def _queue(self, conn: Conn, first: bytes = b"", requeued: bool = False) -> None:
        """Join the lobby; ``first`` is sent ahead of WAITING in the same write."""
        if self.cluster is not None:
            self.cluster.queue(conn, first, requeued)
            return
        if conn.session is not None and not requeued:
            self.registry.add(conn.session.token, conn.cid)
        result = self.lobby.join(conn.cid, conn.room, requeued=requeued)
        if isinstance(result, RoomFull):
            self.send(conn, first)
            self.fail(conn, ErrorCode.ROOM_FULL, room_full_text(conn.room))
            return
        self.waiting[conn.cid] = conn
        waiting = first + event_bytes(conn, FrameType.WAITING, {"room": conn.room})
        if isinstance(result, Matched):
            self._pair(self.waiting[result.waiter], conn, newcomer_first=waiting)
        else:
            self.reception.joins.joined(conn, requeued)
            if not requeued and conn.mode is _FRAME and not conn.pending:
                # Nothing to act on: its greeting waits for the end of this batch of events. If
                # its partner comes in the same batch, it leaves with PAIRED in one write (1.05x).
                self._held[conn] = waiting
                return
            self.send(conn, waiting)
            self.process_buffered(conn)

    def _pair(self, a: Conn, b: Conn, newcomer_first: bytes = b"") -> None:
        relay = self.relays.pick()
        for me, peer, first in ((a, b, b""), (b, a, newcomer_first)):
            del self.waiting[me.cid]
            self.send(me, first + event_bytes(me, FrameType.PAIRED, {"peer": peer.name, "room": me.room}))
            self.release_conn(me)
            self.registry.moved(me.cid, relay)
        log.info("paired %s with %s%s", a.label, b.label, f" in room {a.room}" if a.room else "")
        relay.submit_pair(a, b)

    def detach(self, conn: Conn, reason: str) -> None:
        self.reception.leave(conn)
        self.registry.forget(conn.cid)
        if self.waiting.pop(conn.cid, None) is not None:
            log.info("%s: left while waiting (%s)", conn.label, reason)
        if self.cluster is not None:
            self.cluster.leave(conn)
        elif conn.cid in self.lobby:
            self.lobby.leave(conn.cid)

    def on_msg_run(self, conn: Conn, view: memoryview, start: int, end: int, count: int) -> None:
        self.send(conn, undelivered_notices(conn, count, "you have no partner right now"))

    def on_line_msg(self, conn: Conn, text: str) -> None:
        self.send(conn, undelivered_notices(conn, 1, "you have no partner right now"))

    def on_next(self, conn: Conn) -> None:
        # Already waiting: NEXT changes nothing, but say where the client stands.
        self.send_event(conn, FrameType.WAITING, {"room": conn.room})

    # -- clients coming back from relays -------------------------------------------------------

    def post_pair_end(self, end: Report) -> None:
        """Called from relay threads (or the worker channel): queue it and wake up."""
        self._ended.append(end)
        self.wake()

    def on_wake(self) -> None:
        while self._ended:
            self.handle_pair_end(self._ended.popleft())
        if self.cluster is not None:
            self.cluster.on_wake()

    def handle_pair_end(self, end: Report) -> None:
        if self.cluster is not None:
            self.cluster.pair_end(end)
            return
        if isinstance(end, Bounce):
            self.resumes.on_bounce(end)
            return
        if end.unpair:
            self.lobby.unpair(end.a, end.b, next_by=end.next_by)
        for cid in end.gone:
            self.lobby.leave(cid)
            self.forget_gone(cid)
        for conn in end.back:
            if self.take_back(conn):
                self._queue(conn, requeued=True)

    def forget_gone(self, cid: int) -> None:
        """A client gone for good: its place in the limits and its session token are free."""
        self.admission.forget(cid)
        self.registry.forget(cid)

    def take_back(self, conn: Conn) -> bool:
        """Own again a client a relay handed back; False if we are stopping (it is told ``shutdown``)."""
        self.registry.moved(conn.cid, None)
        self.adopt_conn(conn)
        if not self.running:
            self.fail(conn, ErrorCode.SHUTDOWN, "the server is shutting down", reason="shutdown")
            self.lobby.leave(conn.cid)  # (harmless in cluster mode, whose lobby is in Redis)
            return False
        return True

    def handle_worker_lost(self, stranded: list[Stranded]) -> None:
        """A relay worker died: each of its clients gets ERROR ``shutdown``; their pairs and counts are freed.

        (Both partners of a pair live in the same worker, so no PEER_LEFT is owed
        elsewhere; docs/protocol.md records why the code is ``shutdown``.)"""
        for held in stranded:
            if self.lobby.partner_of(held.cid) == held.partner:
                self.lobby.unpair(held.cid, held.partner)  # the room is free again
        for held in stranded:
            self.lobby.leave(held.cid)
            self.forget_gone(held.cid)  # a RESUME for it hears session_expired
            if held.sock is None:
                continue
            # Through our duplicate of the descriptor, closed politely so the ERROR is read, not a
            # reset. Best effort: if the worker died while writing a frame, what follows is
            # misframed, and the client sees a broken stream - which is the truth of it.
            conn = Conn(held.sock, held.cid, held.addr, self.now)
            conn.mode, conn.name, conn.phase = held.mode, held.name, Phase.CHATTING
            self.adopt_conn(conn)
            self.fail(conn, ErrorCode.SHUTDOWN, WORKER_LOST_MESSAGE)

    # -- resumable sessions (PROTOCOL.md section 6) ----------------------------------------------

    def on_away(self, conn: Conn) -> None:
        if conn.cid in self.waiting:
            if self.cluster is not None:
                self.cluster.sessions.set_away(conn)
            else:
                self.lobby.set_away(conn.cid)  # keeps its place; never paired while away

    def on_resumed(self, conn: Conn) -> None:
        if self.cluster is not None:
            self.cluster.sessions.on_resumed(conn)
        elif conn.cid in self.waiting:
            matched = self.lobby.back(conn.cid)
            if matched is not None:
                self._pair(self.waiting[matched.waiter], conn)

    def on_session_ended(self, conn: Conn) -> None:
        self.admission.forget(conn.cid)

    # -- stopping and timers -----------------------------------------------------------------------

    def begin_stop(self) -> None:
        if not self.running:
            return
        log.info("stopping: telling every client (%d not in a pair) the server is shutting down", len(self.conns))
        self.running = False
        self.reception.joins.say_waiting(self.waiting)
        self.drop_away()
        self.acceptor.stop()
        for conn in list(self.conns):
            if conn.mode:
                self.fail(conn, ErrorCode.SHUTDOWN, "the server is shutting down", reason="shutdown")
            else:
                self.drop(conn, "disconnected")
        self.relays.stop()

    def busy(self) -> bool:
        return self.relays.busy()

    def tick(self, now: float) -> None:
        self.acceptor.tick(now)
        self.reception.tick(now, self.waiting)
        self.relays.tick(now)
        self.ops.tick(now)
        if self.cluster is not None:
            self.cluster.sessions.tick(now)
        super().tick(now)


def listener_main(listen_sock: socket.socket, control: socket.socket, config: ServerConfig,
                  metrics_sock: socket.socket | None = None) -> None:
    """Entry point of the listener process."""
    # Ctrl-C, a hang-up or SIGTERM to the whole process group reach us too; the
    # main process decides when we stop and tells us through ``control``. The
    # worker processes we start inherit the ignoring.
    prepare_child_process(config.log_level, config.log_format)
    listener = Listener(listen_sock, control, config)
    listener.ops.serve_metrics(metrics_sock)  # a thread of ours, stopped and joined by ops.close()
    if listener.cluster is None:  # a cluster node serves once it has joined: ClusterDesk says so then
        tell_ready(control)
    try:
        listener.run()
    finally:
        listener.ops.close()
        listener.relays.join()
        if listener.cluster is not None:
            listener.cluster.finish(listener._ended)  # then its threads are stopped and joined
        listen_sock.close()
        control.close()
        # Workers share the main process's resource tracker; only if it had died
        # did starting them launch one of ours, which must not outlive us.
        stop_resource_tracker()
