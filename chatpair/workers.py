"""Relay worker processes: how chatpair uses more than one core (POSIX).

With ``chatpair server --workers N`` the listener process starts N worker
processes. Each runs one :class:`~chatpair.relay.Relay` loop, exactly like a
relay thread, but with its own interpreter and so its own GIL.

Sockets move between processes over a Unix socket pair (the *channel*) with
``socket.send_fds`` semantics (SCM_RIGHTS): the listener sends a new pair's
two descriptors plus each client's state (:meth:`Conn.state`: name, room,
bytes already received, bytes queued to send); the worker sends back the one
who stays when a partner leaves, and both after NEXT. After a descriptor is
sent, the sender closes its copy: one owner at a time, across processes too.

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
import signal
import socket
import struct
import time
from collections import deque
from typing import Any, Callable

from chatpair.conn import Conn
from chatpair.loop import EVENT_READ, EVENT_WRITE
from chatpair.relay import PairEnd, Relay

log = logging.getLogger("chatpair")

_LEN = struct.Struct(">I")
#: Descriptors one recvmsg() can take: a message carries at most two.
_MAX_FDS_PER_READ = 64


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
    from chatpair.listener import raise_fd_limit, setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
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


class WorkerHandle:
    """The listener's handle on one worker process (owns and joins it)."""

    def __init__(self, config: Any, index: int, on_pair_end: Callable[[PairEnd], None], sel: Any) -> None:
        self.index = index
        self.config = config
        self._on_pair_end = on_pair_end
        self._sel = sel
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel = Channel(ours)
        self._theirs = theirs
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(target=worker_main, args=(theirs, config, index),
                                   name=f"chatpair-relay-worker-{index}", daemon=False)
        self.pairs = 0
        self._events = 0
        self._stopping = False

    @property
    def load(self) -> int:
        return self.pairs if not self.channel.closed else 1 << 30

    def start(self) -> None:
        self.process.start()
        self._theirs.close()
        self._events = EVENT_READ
        self._sel.register(self.channel.sock, EVENT_READ, None)

    def alive(self) -> bool:
        return self.process.is_alive()

    def _interest(self) -> None:
        if self.channel.closed:
            return
        want = EVENT_READ | (EVENT_WRITE if self.channel.has_output else 0)
        if want != self._events:
            self._sel.modify(self.channel.sock, want, None)
            self._events = want

    def submit_pair(self, a: Conn, b: Conn) -> None:
        self.pairs += 1
        self.channel.send({"op": "pair", "a": a.state(), "b": b.state()}, [a.sock, b.sock])
        self._interest()

    def on_channel_event(self) -> None:
        self.channel.flush()
        for obj, socks in self.channel.receive():
            if obj["op"] == "end":
                self.pairs -= 1
                back = _conns_from(obj["back"], socks, self.config.max_frame - 1)
                self._on_pair_end(PairEnd(obj["a"], obj["b"], obj["next_by"], obj["gone"], back))
        if self.channel.closed:
            if self._events:
                self._sel.unregister(self.channel.sock)
                self._events = 0
            if self._stopping:
                log.debug("relay worker %d finished", self.index)
            else:
                log.error("relay worker %d is gone; its pairs were disconnected", self.index)
        else:
            self._interest()

    def stop(self) -> None:
        self._stopping = True
        if not self.channel.closed:
            self.channel.send({"op": "stop"})
            self._interest()

    def join(self, timeout: float | None = None) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        if self._events:
            try:
                self._sel.unregister(self.channel.sock)
            except (KeyError, ValueError, OSError):
                pass
        self.channel.sock.close()


def start_workers(config: Any, on_pair_end: Callable[[PairEnd], None], sel: Any) -> list[WorkerHandle]:
    return [WorkerHandle(config, i, on_pair_end, sel) for i in range(config.workers)]


__all__ = ["Channel", "WorkerHandle", "start_workers", "worker_main", "workers_supported"]
