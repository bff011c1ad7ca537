"""Relay worker processes: how chatpair uses more than one core (POSIX).

With ``chatpair server --workers N`` the listener process starts N worker
processes. Each runs one :class:`~chatpair.server.relay.Relay` loop, exactly like a
relay thread, but with its own interpreter and so its own GIL.

Sockets move between processes over a Unix socket pair (the *channel*) with
``socket.send_fds`` semantics (SCM_RIGHTS): the listener sends a new pair's
two descriptors plus each client's state (:meth:`Conn.state`: name, room,
bytes already received, bytes queued to send); the worker sends back the one
who stays when a partner leaves, and both after NEXT. After a descriptor is
sent, the sender closes its copy: one owner at a time, across processes too.

One exception, for when a worker dies: the listener keeps a *duplicate* of
every descriptor it hands to a worker, never registered, never read, until
the worker reports that client gone or back (``PairEnd``). If the worker dies
(``kill -9``, a crash), the listener tells those clients through the
duplicates, forgets their pairs in the lobby and their per-IP counts, and
starts a new worker after a backoff (see :class:`WorkerHandle`).

Channel messages are ``uint32 length + JSON``; the descriptors a message
carries ride on its first byte, and the receiver keeps them in arrival
order, so the stream can be read in any chunks.
"""

from __future__ import annotations

import array
import json
import logging
import multiprocessing
import os
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from chatpair.server.conn import Conn
from chatpair.server.loop import EVENT_READ, EVENT_WRITE
from chatpair.server.relay import PairEnd, Relay

log = logging.getLogger("chatpair")

_LEN = struct.Struct(">I")
#: Descriptors one recvmsg() can take: a message carries at most two.
_MAX_FDS_PER_READ = 64
#: A worker that keeps dying is restarted, but not in a tight loop (the same
#: steps as the main process uses for the listener): the n-th death within
#: CRASH_WINDOW_SECONDS waits the n-th delay (the last one from then on).
RESTART_BACKOFF_SECONDS = (0.1, 0.5, 1.0, 2.0)
CRASH_WINDOW_SECONDS = 30.0


def workers_supported() -> bool:
    return hasattr(socket, "AF_UNIX") and hasattr(socket.socket, "sendmsg") and os.name == "posix"


class Channel:
    """Non-blocking message channel over a Unix stream socket, carrying descriptors."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._rbuf = bytearray()
        self._fds: deque[int] = deque()
        # queued: [bytes still to send, fds to attach to the first byte or None, sockets to close after]
        self._out: deque[list[Any]] = deque()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def send(self, obj: dict[str, Any], socks: list[socket.socket] = ()) -> None:  # type: ignore[assignment]
        obj["nfds"] = len(socks)
        data = json.dumps(obj, separators=(",", ":")).encode()
        self._out.append([_LEN.pack(len(data)) + data, [s.fileno() for s in socks] or None, list(socks)])
        self.flush()

    def flush(self) -> None:
        while self._out:
            item = self._out[0]
            data, fds, socks = item
            try:
                if fds is not None:
                    sent = self.sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                    item[1] = None
                    for s in socks:  # the kernel holds duplicates in flight now
                        s.close()
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.closed = True
                return
            if sent < len(data):
                item[0] = data[sent:]
                return
            self._out.popleft()

    def receive(self) -> list[tuple[dict[str, Any], list[socket.socket]]]:
        """Read what is there; return complete messages with their sockets."""
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                262144, socket.CMSG_SPACE(_MAX_FDS_PER_READ * array.array("i").itemsize)
            )
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
                self._fds.extend(fds)
        if not data:
            self.closed = True
            return []
        self._rbuf += data
        out = []
        while len(self._rbuf) >= 4:
            (length,) = _LEN.unpack_from(self._rbuf, 0)
            if len(self._rbuf) < 4 + length:
                break
            obj = json.loads(self._rbuf[4:4 + length])
            del self._rbuf[:4 + length]
            socks = [socket.socket(fileno=self._fds.popleft()) for _ in range(obj.get("nfds", 0))]
            out.append((obj, socks))
        return out

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        # Descriptors that never made it across are still ours to close: a
        # message whose send failed (the other side died), or the descriptors
        # of a message the other side did not finish sending.
        for _data, fds, socks in self._out:
            if fds is not None:
                for s in socks:
                    s.close()
        self._out.clear()
        while self._fds:
            try:
                os.close(self._fds.popleft())
            except OSError:
                pass


def _end_to_dict(end: PairEnd) -> tuple[dict[str, Any], list[socket.socket]]:
    return (
        {"op": "end", "a": end.a, "b": end.b, "next_by": end.next_by, "gone": end.gone,
         "back": [c.state() for c in end.back]},
        [c.sock for c in end.back],
    )


def _conns_from(states: list[dict[str, Any]], socks: list[socket.socket], max_line: int) -> list[Conn]:
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

    def __init__(self, channel: Channel, config: Any, index: int) -> None:
        super().__init__(config.limits(), index, self._send_end)
        self.channel = channel
        self.max_line = config.max_frame - 1
        self._channel_events = EVENT_READ
        self.sel.register(channel.sock, EVENT_READ, None)

    def _send_end(self, end: PairEnd) -> None:
        obj, socks = _end_to_dict(end)
        self.channel.send(obj, socks)
        self._channel_interest()

    def _channel_interest(self) -> None:
        want = EVENT_READ | (EVENT_WRITE if self.channel.has_output else 0)
        if want != self._channel_events and not self.channel.closed:
            self.sel.modify(self.channel.sock, want, None)
            self._channel_events = want

    def on_special(self, fileobj: Any) -> None:
        if fileobj is not self.channel.sock:
            super().on_special(fileobj)
            return
        self.channel.flush()
        for obj, socks in self.channel.receive():
            if obj["op"] == "pair":
                a, b = _conns_from([obj["a"], obj["b"]], socks, self.max_line)
                self.adopt_pair(a, b)
            elif obj["op"] == "stop":
                self.stop()
        if self.channel.closed and self.running:
            # The listener is gone (crashed or killed): nobody can requeue our
            # clients, so tell them and finish.
            self.sel.unregister(self.channel.sock)
            self.stop()
        else:
            self._channel_interest()

    def after_events(self) -> None:
        super().after_events()
        if not self.channel.closed:
            self._channel_interest()


def worker_main(channel_sock: socket.socket, config: Any, index: int) -> None:
    """Entry point of a relay worker process (spawn-safe)."""
    from chatpair.netutil import raise_fd_limit
    from chatpair.server.config import setup_logging
    from chatpair.server.main import ignore_stop_signals

    # Signals to the whole process group are the main process's to act on; we
    # stop on {"op": "stop"} or the channel's end of file.
    ignore_stop_signals()
    setup_logging(config.log_level)
    raise_fd_limit()
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
    mode: int
    name: str
    addr: str


class WorkerHandle:
    """The listener's handle on one worker slot: starts, watches, restarts and joins its process.

    Life of a slot: *running* (process started, channel open) until the
    channel breaks - end of file because the process died, or an error
    writing to it. Then the slot is *dead*: every pair it held is handed to
    ``on_lost`` (the listener tells those clients and forgets them), the
    process is killed if it still lives and reaped (no zombie), and after a
    backoff a new process starts in the same slot with a new channel. A dead
    slot is never chosen for a new pair (:attr:`available`).

    Everything here runs in the listener's loop thread.
    """

    def __init__(self, config: Any, index: int, on_pair_end: Callable[[PairEnd], None],
                 on_lost: Callable[[list[Stranded]], None], sel: Any) -> None:
        self.index = index
        self.config = config
        self._on_pair_end = on_pair_end
        self._on_lost = on_lost
        self._sel = sel
        self.process: multiprocessing.process.BaseProcess | None = None
        self.channel: Channel | None = None
        self.pairs = 0
        #: cid -> the client as the listener handed it over, with a duplicate of its
        #: socket; from submit_pair until the worker reports it gone or back.
        self._held: dict[int, Stranded] = {}
        self._events = 0
        self._stopping = False
        self._dead = False
        self._deaths: list[float] = []  # when it died, within the last CRASH_WINDOW_SECONDS
        self._restart_at = 0.0  # 0: no restart scheduled

    # -- state -------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """May a new pair be handed to this worker?

        A process that was started but has not reached its loop yet counts:
        the pair waits in the channel, and if the process dies instead, the
        pair is told like any other of its pairs.
        """
        return not self._dead and self.channel is not None and not self.channel.closed

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
        process = ctx.Process(target=worker_main, args=(theirs, self.config, self.index),
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
        self._dead = False
        self._restart_at = 0.0
        self._events = EVENT_READ
        self._sel.register(ours, EVENT_READ, None)

    def _interest(self) -> None:
        if self.channel is None or self.channel.closed:
            return
        want = EVENT_READ | (EVENT_WRITE if self.channel.has_output else 0)
        if want != self._events:
            self._sel.modify(self.channel.sock, want, None)
            self._events = want

    # -- pairs ----------------------------------------------------------------------------

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
        self.channel.send({"op": "pair", "a": a.state(), "b": b.state()}, [a.sock, b.sock])
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
            for obj, socks in messages:
                if obj["op"] == "end":
                    self.pairs -= 1
                    self._release(obj["a"])
                    self._release(obj["b"])
                    back = _conns_from(obj["back"], socks, self.config.max_frame - 1)
                    self._on_pair_end(PairEnd(obj["a"], obj["b"], obj["next_by"], obj["gone"], back))
            # A broken channel is read to its end first: a pair the worker
            # ended just before it died comes back as usual, not as lost.
            if not (channel.closed and messages):
                break
        if channel.closed:
            self._lose()
        else:
            self._interest()

    # -- death and restart -------------------------------------------------------------------

    def _lose(self) -> None:
        """The channel is broken: hand every pair here to the listener, reap, schedule a restart."""
        assert self.channel is not None and self.process is not None
        if self._events:
            try:
                self._sel.unregister(self.channel.sock)
            except (KeyError, ValueError, OSError):
                pass
            self._events = 0
        self.channel.close()
        self._dead = True
        stranded = list(self._held.values())
        self._held.clear()
        lost, self.pairs = self.pairs, 0
        if self._stopping:
            # The worker was told to stop and has told its clients "shutdown"
            # itself; it exits on its own and join() reaps it. (If it was
            # killed before it could, its clients are closed without a word:
            # they were about to be told the server stops anyway.)
            for held in stranded:
                if held.sock is not None:
                    held.sock.close()
            return
        # Reap it now, so that the log says how it ended and no zombie is
        # left. A process whose channel has hit end of file is exiting: this
        # waits a few milliseconds at most. One still alive after that (a
        # failed write on our side, or a hang) could be handed no pair and
        # give none back: end it, so its clients hear one story, ours.
        killed = False
        self.process.join(0.1)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            killed = True
        code = self.process.exitcode
        self.process.close()
        self.process = None
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < CRASH_WINDOW_SECONDS] + [now]
        delay = RESTART_BACKOFF_SECONDS[min(len(self._deaths), len(RESTART_BACKOFF_SECONDS)) - 1]
        self._restart_at = now + delay
        if killed:
            how = "its channel broke; killed it"
        elif code is not None and code < 0:
            how = f"signal {-code}"
        else:
            how = f"exit code {code}"
        log.error("relay worker %d died (%s); %d pair%s disconnected; restarting it in %.1fs",
                  self.index, how, lost, "" if lost == 1 else "s", delay)
        if stranded:
            self._on_lost(stranded)

    def tick(self, now: float) -> None:
        """Called by the listener's timer: notice a death the channel did not show; restart when due."""
        if self._stopping:
            return
        if not self._dead:
            if self.channel is not None and (self.channel.closed or not self.alive()):
                # Dead, or a write failed, and the channel has not shown it yet:
                # read what the worker sent before that, then bury it.
                self.on_channel_event()
                if not self._dead:
                    self._lose()
            return
        if self._restart_at and now >= self._restart_at:
            try:
                self.start()
            except OSError as err:  # no descriptors or processes to spare: try again later
                self._restart_at = now + RESTART_BACKOFF_SECONDS[-1]
                log.error("relay worker %d could not be restarted (%s); trying again in %.1fs",
                          self.index, err.strerror or err, RESTART_BACKOFF_SECONDS[-1])
            else:
                log.info("relay worker %d restarted", self.index)

    # -- stopping -------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping = True
        self._restart_at = 0.0
        if self.available:
            self.channel.send({"op": "stop"})  # type: ignore[union-attr]
            self._interest()

    def join(self, timeout: float | None = None) -> None:
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        if self._events:
            try:
                self._sel.unregister(self.channel.sock)  # type: ignore[union-attr]
            except (KeyError, ValueError, OSError):
                pass
            self._events = 0
        if self.channel is not None:
            self.channel.close()
        for held in self._held.values():  # the worker told them "shutdown" and is gone
            if held.sock is not None:
                held.sock.close()
        self._held.clear()


def start_workers(config: Any, on_pair_end: Callable[[PairEnd], None],
                  on_lost: Callable[[list[Stranded]], None], sel: Any) -> list[WorkerHandle]:
    return [WorkerHandle(config, i, on_pair_end, on_lost, sel) for i in range(config.workers)]


__all__ = ["Channel", "Stranded", "WorkerHandle", "start_workers", "worker_main", "workers_supported"]
