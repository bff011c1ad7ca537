"""Relay worker processes: how chatpair uses more than one core (POSIX).

With ``chatpair server --workers N`` the listener process starts N worker
processes. Each runs one :class:`~chatpair.server.relay.Relay` loop, exactly like a
relay thread, but with its own interpreter and so its own GIL.

Sockets move between processes over a :class:`~chatpair.server.channel.Channel`
(a Unix socket pair, descriptors passed with ``socket.send_fds``): the
listener sends a new pair's two sockets plus each client's state
(:meth:`Conn.state`: name, room, bytes already received, bytes queued to
send); the worker sends back the one who stays when a partner leaves, and
both after NEXT. After a descriptor is sent, the sender closes its copy: one
owner at a time, across processes too. The messages (:class:`Op`)::

    listener -> worker   {"op": "pair", "a": state, "b": state}  + 2 sockets
    worker -> listener   {"op": "end", "a": cid, "b": cid, "next_by": cid | null,
                          "gone": [cid, ...], "back": [state, ...]}  + a socket per "back"
    listener -> worker   {"op": "resume", "new": state, "cid": cid, "received": n}  + the new socket
    worker -> listener   {"op": "bounce", "new": state, "cid": cid, "received": n}  + the new socket
    listener -> worker   {"op": "stop"}

A resumable client's session (PROTOCOL.md section 6) moves with its
connection, inside :meth:`Conn.state`. A client that is *away* has no socket
and never moves: it stays in its worker until it comes back - the listener
sends the RESUME's new socket to that worker ("resume"), which sends it
back ("bounce") if the session has left meanwhile - or its window ends.

One exception, for when a worker dies: the listener keeps a *duplicate* of
every descriptor it hands to a worker, never registered, never read, until
the worker reports that client gone or back (``PairEnd``). If the worker dies
(``kill -9``, a crash), the listener tells those clients through the
duplicates, forgets their pairs in the lobby and their per-IP counts, and
starts a new worker after a backoff (see :class:`WorkerHandle`).

This module has both sides: the worker process (:class:`WorkerRelay`,
:func:`relay_worker_main`) and the listener's handle on it
(:class:`WorkerHandle`).
"""

from __future__ import annotations

import enum
import logging
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatpair.server.busypoll import BusyPoll
from chatpair.server.channel import Channel, Message
from chatpair.server.config import ServerConfig
from chatpair.server.conn import Conn
from chatpair.server.poller import EVENT_READ, EVENT_WRITE, Poller
from chatpair.server.processes import (
    RESTART_BACKOFF_SECONDS,
    RestartBackoff,
    prepare_child_process,
)
from chatpair.server.relay import Bounce, PairEnd, Relay, Report
from chatpair.server.states import Mode

log = logging.getLogger("chatpair")


def workers_supported() -> bool:
    """Relay workers need Unix sockets that carry descriptors (POSIX)."""
    return hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds") and os.name == "posix"


class Op(str, enum.Enum):
    """What a channel message asks for (its ``"op"``)."""

    PAIR = "pair"  # listener -> worker: relay this new pair
    END = "end"  # worker -> listener: a pair ended; who is gone, who comes back
    STOP = "stop"  # listener -> worker: tell your clients "shutdown" and exit
    RESUME = "resume"  # listener -> worker: a RESUME for a session you hold, on this new socket
    BOUNCE = "bounce"  # worker -> listener: that session is not here (any more)
    STATS = "stats"  # worker -> listener: its counters (server/stats.py), at most once a second


def _report_message(report: Report) -> tuple[dict[str, Any], list[socket.socket]]:
    if isinstance(report, Bounce):
        return ({"op": Op.BOUNCE.value, "new": report.new.state(), "cid": report.cid,
                 "received": report.received}, [report.new.sock])
    return (
        {"op": Op.END.value, "a": report.a, "b": report.b, "next_by": report.next_by, "gone": report.gone,
         "back": [c.state() for c in report.back], "unpair": report.unpair},
        [c.sock for c in report.back],
    )


def _conns_from(states: list[dict[str, Any]], socks: list[socket.socket], max_line: int) -> list[Conn]:
    """Rebuild the connections a message carried, each on its socket."""
    now = time.monotonic()
    conns = []
    for st, sock in zip(states, socks):
        sock.setblocking(False)
        conns.append(Conn.from_state(sock, st, now, max_line))
    return conns


# --------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------


class WorkerRelay(Relay):
    """A relay loop in a worker process: pairs arrive and leave over the channel."""

    def __init__(self, channel: Channel, config: ServerConfig, index: int) -> None:
        super().__init__(config.limits(), index, self._send_end)
        self.channel = channel
        self.max_line = config.max_frame - 1
        self._channel_events = EVENT_READ  # what the channel is registered for
        self.poller.register(channel.sock, EVENT_READ, None)
        BusyPoll(config.busy_poll_us / 1e6).add(self)  # alone in its process: only the loop's own rules apply

    def _send_end(self, report: Report) -> None:
        obj, socks = _report_message(report)
        self.channel.send(obj, socks)
        self._channel_interest()

    def _channel_interest(self) -> None:
        want = EVENT_READ | (EVENT_WRITE if self.channel.has_output else 0)
        if want != self._channel_events and not self.channel.closed:
            self.poller.modify(self.channel.sock, want, None)
            self._channel_events = want

    def on_special(self, fileobj: Any) -> None:
        if fileobj is not self.channel.sock:
            super().on_special(fileobj)
            return
        self.channel.flush()
        for obj, socks in self.channel.receive():
            if obj["op"] == Op.PAIR:
                a, b = _conns_from([obj["a"], obj["b"]], socks, self.max_line)
                self.adopt_pair(a, b)
            elif obj["op"] == Op.RESUME:
                (new,) = _conns_from([obj["new"]], socks, self.max_line)
                self.take_resume(new, obj["cid"], obj["received"])
            elif obj["op"] == Op.STOP:
                self.stop()
        if self.channel.closed and self.running:
            # The listener is gone (crashed or killed): nobody can requeue our
            # clients, so tell them and finish.
            self.poller.unregister(self.channel.sock)
            self.stop()
        else:
            self._channel_interest()

    def after_events(self) -> None:
        super().after_events()
        if not self.channel.closed:
            report = self.stats.report_due(self.now)  # for the listener's status line and /metrics
            if report is not None:
                self.channel.send({"op": Op.STATS.value, "stats": report})
            self._channel_interest()


def relay_worker_main(channel_sock: socket.socket, config: ServerConfig, index: int) -> None:
    """Entry point of a relay worker process (spawn-safe)."""
    # Signals to the whole process group are the main process's to act on; we
    # stop on {"op": "stop"} or the channel's end of file.
    prepare_child_process(config.log_level, config.log_format)
    relay = WorkerRelay(Channel(channel_sock), config, index)
    try:
        relay.run()
    finally:
        relay.channel.close()


# --------------------------------------------------------------------------
# The listener's side
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Stranded:
    """A client of a worker that died, with the listener's duplicate of its socket."""

    cid: int
    partner: int
    sock: socket.socket | None  # None if no duplicate could be made (out of descriptors)
    mode: Mode
    name: str
    addr: str


class WorkerState(enum.Enum):
    """The life of a worker slot (see :class:`WorkerHandle`)."""

    NEW = "new"  # not started yet
    RUNNING = "running"  # process started, channel open (pairs may be handed to it)
    DEAD = "dead"  # channel broke, process reaped; a restart is due at restart_at
    STOPPING = "stopping"  # told to stop (or stopped while dead): never restarted


class WorkerHandle:
    """The listener's handle on one worker slot: starts, watches, restarts and joins its process.

    Life of a slot: *running* (process started, channel open) until the
    channel breaks - end of file because the process died, or an error
    writing to it. Then the slot is *dead*: every pair it held is handed to
    ``on_lost`` (the listener tells those clients and forgets them), the
    process is killed if it still lives and reaped (no zombie), and after a
    backoff a new process starts in the same slot with a new channel. A dead
    slot is never chosen for a new pair (:attr:`available`). Once told to
    stop, a slot is *stopping* for good.

    Everything here runs in the listener's loop thread.
    """

    def __init__(self, config: ServerConfig, index: int, on_pair_end: Callable[[Report], None],
                 on_lost: Callable[[list[Stranded]], None], poller: Poller) -> None:
        self.index = index
        self.config = config
        self._on_pair_end = on_pair_end
        self._on_lost = on_lost
        self._poller = poller
        self.state = WorkerState.NEW
        self.process: multiprocessing.process.BaseProcess | None = None
        self.channel: Channel | None = None
        self.pairs = 0
        #: cid -> the client as the listener handed it over, with a duplicate of its
        #: socket; from submit_pair until the worker reports it gone or back.
        self._held: dict[int, Stranded] = {}
        self._events = 0  # what the channel is registered for in the selector; 0: not registered
        self._backoff = RestartBackoff()
        self.restart_at = 0.0  # DEAD: when to start a new process
        self.stats_report: dict[str, Any] = {}  # the worker's latest counters ({"op": "stats"})

    # -- state -------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """May a new pair be handed to this worker?

        A process that was started but has not reached its loop yet counts:
        the pair waits in the channel, and if the process dies instead, the
        pair is told like any other of its pairs.
        """
        return self.state is WorkerState.RUNNING and not self.channel.closed  # type: ignore[union-attr]

    @property
    def load(self) -> int:
        return self.pairs if self.available else 1 << 30

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def owns(self, fileobj: Any) -> bool:
        return self.channel is not None and fileobj is self.channel.sock

    # -- starting -----------------------------------------------------------------------

    def start(self) -> None:
        """Start a worker process on a new channel (the first time, and after each death)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ctx = multiprocessing.get_context("spawn")
        process = ctx.Process(target=relay_worker_main, args=(theirs, self.config, self.index),
                              name=f"chatpair-relay-worker-{self.index}", daemon=False)
        try:
            process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker has its own copy now; EOF on ours means it is gone
        self.process = process
        self.channel = Channel(ours)
        self.state = WorkerState.RUNNING
        self.restart_at = 0.0
        self._events = EVENT_READ
        self._poller.register(ours, EVENT_READ, None)

    def _interest(self) -> None:
        if self.channel is None or self.channel.closed:
            return
        want = EVENT_READ | (EVENT_WRITE if self.channel.has_output else 0)
        if want != self._events:
            self._poller.modify(self.channel.sock, want, None)
            self._events = want

    def _unregister(self) -> None:
        if self._events:
            try:
                self._poller.unregister(self.channel.sock)  # type: ignore[union-attr]
            except (KeyError, ValueError, OSError):
                pass
            self._events = 0

    # -- pairs ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Nothing to do: the channel is written whenever it is writable."""

    def submit_pair(self, a: Conn, b: Conn) -> None:
        assert self.channel is not None
        for me, peer in ((a, b), (b, a)):
            try:
                # Unregistered and never read: only for telling the client if the worker dies.
                dup: socket.socket | None = me.sock.dup()
            except OSError:
                dup = None  # out of descriptors: such a client would be closed without a word
            self._held[me.cid] = Stranded(me.cid, peer.cid, dup, me.mode, me.name, me.addr)
        self.pairs += 1
        # If the worker has just died, this send fails or lands in a channel
        # nobody reads; either way the end of file comes next, and then this
        # pair is told with the others (it is in _held already).
        self.channel.send({"op": Op.PAIR.value, "a": a.state(), "b": b.state()}, [a.sock, b.sock])
        self._interest()

    def submit_resume(self, new: Conn, cid: int, received: int) -> None:
        """A RESUME for a session this worker holds: send it the new socket."""
        assert self.channel is not None
        held = self._held.get(cid)
        if held is not None:
            # From now on the duplicate to tell the client through, should
            # this worker die, is the new socket's.
            if held.sock is not None:
                held.sock.close()
            try:
                held.sock = new.sock.dup()
            except OSError:
                held.sock = None
        self.channel.send({"op": Op.RESUME.value, "new": new.state(), "cid": cid, "received": received},
                          [new.sock])
        self._interest()

    def _release(self, cid: int) -> None:
        """The worker reported the client gone or back: the duplicate has served its purpose."""
        held = self._held.pop(cid, None)
        if held is not None and held.sock is not None:
            # The worker (or, for a client that came back, the listener's new
            # descriptor) holds the socket now: closing this copy never closes
            # the connection, and not closing it would keep it open after the
            # worker closes it.
            held.sock.close()

    def on_channel_event(self) -> None:
        channel = self.channel
        assert channel is not None
        channel.flush()
        while True:
            messages = channel.receive()
            for message in messages:
                self._on_message(message)
            # A broken channel is read to its end first: a pair the worker
            # ended just before it died comes back as usual, not as lost.
            if not (channel.closed and messages):
                break
        if channel.closed:
            self._lose()
        else:
            self._interest()

    def _on_message(self, message: Message) -> None:
        obj, socks = message
        max_line = self.config.max_frame - 1
        if obj["op"] == Op.END:
            if obj["unpair"]:
                self.pairs -= 1
            for cid in obj["gone"]:
                self._release(cid)
            back = _conns_from(obj["back"], socks, max_line)
            for conn in back:
                self._release(conn.cid)
            self._on_pair_end(PairEnd(obj["a"], obj["b"], obj["next_by"], obj["gone"], back, obj["unpair"]))
        elif obj["op"] == Op.BOUNCE:
            (new,) = _conns_from([obj["new"]], socks, max_line)
            self._on_pair_end(Bounce(new, obj["cid"], obj["received"]))
        elif obj["op"] == Op.STATS:
            self.stats_report = obj["stats"]

    # -- death and restart -------------------------------------------------------------------

    def _lose(self) -> None:
        """The channel is broken: hand every pair here to the listener, reap, schedule a restart."""
        assert self.channel is not None and self.process is not None
        self._unregister()
        self.channel.close()
        stranded = list(self._held.values())
        self._held.clear()
        lost, self.pairs = self.pairs, 0
        if self.state is WorkerState.STOPPING:
            # The worker was told to stop and has told its clients "shutdown"
            # itself; it exits on its own and join() reaps it. (If it was
            # killed before it could, its clients are closed without a word:
            # they were about to be told the server stops anyway.)
            for held in stranded:
                if held.sock is not None:
                    held.sock.close()
            return
        self.state = WorkerState.DEAD
        how = _reap(self.process)
        self.process = None
        now = time.monotonic()
        delay = self._backoff.record_death(now)
        self.restart_at = now + delay
        log.error("relay worker %d died (%s); %d pair%s disconnected; restarting it in %.1fs",
                  self.index, how, lost, "" if lost == 1 else "s", delay)
        if stranded:
            self._on_lost(stranded)

    def tick(self, now: float) -> None:
        """Called by the listener's timer: notice a death the channel did not show; restart when due."""
        if self.state is WorkerState.RUNNING:
            if self.channel.closed or not self.alive():  # type: ignore[union-attr]
                # Dead, or a write failed, and the channel has not shown it yet:
                # read what the worker sent before that, then bury it.
                self.on_channel_event()
                if self.state is WorkerState.RUNNING:
                    self._lose()
        elif self.state is WorkerState.DEAD and now >= self.restart_at:
            try:
                self.start()
            except OSError as err:  # no descriptors or processes to spare: try again later
                self.restart_at = now + RESTART_BACKOFF_SECONDS[-1]
                log.error("relay worker %d could not be restarted (%s); trying again in %.1fs",
                          self.index, err.strerror or err, RESTART_BACKOFF_SECONDS[-1])
            else:
                log.info("relay worker %d restarted", self.index)

    # -- stopping -------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.available:
            self.channel.send({"op": Op.STOP.value})  # type: ignore[union-attr]
            self._interest()
        self.state = WorkerState.STOPPING

    def join(self, timeout: float | None = None) -> None:
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._unregister()
        if self.channel is not None:
            self.channel.close()
        for held in self._held.values():  # the worker told them "shutdown" and is gone
            if held.sock is not None:
                held.sock.close()
        self._held.clear()


def _reap(process: multiprocessing.process.BaseProcess) -> str:
    """Wait for a dead worker process (kill it if it lingers); how it ended, for the log."""
    # Reap it now, so that the log says how it ended and no zombie is
    # left. A process whose channel has hit end of file is exiting: this
    # waits a few milliseconds at most. One still alive after that (a
    # failed write on our side, or a hang) could be handed no pair and
    # give none back: end it, so its clients hear one story, ours.
    killed = False
    process.join(0.1)
    if process.exitcode is None:
        process.kill()
        process.join()
        killed = True
    code = process.exitcode
    process.close()
    if killed:
        return "its channel broke; killed it"
    if code is not None and code < 0:
        return f"signal {-code}"
    return f"exit code {code}"
