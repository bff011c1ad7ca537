"""Frames out of a load process: flood batches, single frames, control frames.

The third layer of a load process (see :mod:`chatpair.bench.load`):
:class:`LoadSending` writes whole batches of MSG frames while a flood
sender's socket takes them (:meth:`~LoadSending.fill`), and single frames
and control frames queued behind whatever is being written. A frame is
never cut by another: control frames wait for the next frame boundary.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from chatpair.bench.load_accounts import LoadSpec
from chatpair.bench.load_connect import LoadConnections
from chatpair.bench.load_state import CLOSED, Client
from chatpair.bench.messages import BATCH, MessageFactory
from chatpair.bench.poller import Poller


class LoadSending(LoadConnections):
    """Writing: queued frames, and flood batches made as the socket takes them.

    For subclasses: :meth:`send_ctrl`, :meth:`queue`, :meth:`flush`,
    :meth:`fill`; the hook :meth:`on_send_done` may be overridden.
    """

    def __init__(self, spec: LoadSpec, progress: Any = None) -> None:
        super().__init__(spec, progress)
        self.msgs = MessageFactory(spec.config.size)
        self.deadline_ns = 0  # stop making new messages (duration runs)
        #: Flood: how far a sender may be ahead of its partner's reading (0: no limit).
        self.window = 0

    def send_ctrl(self, c: Client, frame: bytes) -> None:
        """A control frame (PONG, BYE): written at the next frame boundary."""
        c.ctrl += frame
        if c.off >= len(c.out):
            self.flush(c)

    def queue(self, c: Client, data: bytes) -> None:
        """Write ``data`` after whatever is pending (it must be whole frames)."""
        if c.off >= len(c.out):
            if c.ctrl:
                data = bytes(c.ctrl) + data
                c.ctrl.clear()
            c.out, c.off = data, 0
            c.outmv = memoryview(data)
            self.flush(c)
        else:
            c.ctrl += data

    def send_some(self, c: Client, sock: socket.socket) -> bool:
        """One ``send`` of ``c.out`` from ``c.off``; True when all of it is written.

        False when the socket is full (the rest waits for writability) or the
        send failed (``c`` is closed then). Every MSG and control frame of the
        bench goes out here, except a ping-pong turn written straight away.
        """
        try:
            c.off += sock.send(c.outmv[c.off:])
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            return False
        except OSError as err:
            self.fail_client(c, f"send: {err}")
            return False
        return c.off >= len(c.out)

    def flush(self, c: Client) -> None:
        """Write pending bytes; poll for writability while some are left."""
        sock = c.sock
        if sock is None or c.state == CLOSED:
            return
        while True:
            if c.off >= len(c.out):
                if not c.ctrl:
                    break
                c.out = bytes(c.ctrl)
                c.outmv = memoryview(c.out)
                c.off = 0
                c.ctrl.clear()
            if not self.send_some(c, sock):
                break
        if c.off >= len(c.out) and not c.ctrl:
            if c.events & Poller.WRITE:
                self.set_events(c, Poller.READ)
        elif not c.events & Poller.WRITE:
            self.set_events(c, Poller.READ | Poller.WRITE)

    def fill(self, c: Client) -> None:
        """Flood: keep the socket full of new batches until the sender is done."""
        sock = c.sock
        assert sock is not None
        build = self.msgs.build
        while True:
            if c.off >= len(c.out):
                if c.ctrl:
                    c.out = bytes(c.ctrl)
                    c.ctrl.clear()
                elif c.send_done:
                    self.set_events(c, Poller.READ)
                    self.on_send_done(c)
                    return
                else:
                    now = time.monotonic_ns()
                    n = BATCH - c.sent % BATCH
                    if c.total >= 0:
                        n = min(n, c.total - c.sent)
                    elif now >= self.deadline_ns:
                        n = 0
                    if n <= 0:
                        c.send_done = True
                        continue
                    if self.window and c.sent - c.peer.expect >= self.window:  # type: ignore[union-attr]
                        c.blocked = True
                        self.set_events(c, Poller.READ)
                        return
                    c.out = build(c.sent, n, now)
                    c.sent += n
                    if c.sent == c.total:
                        c.send_done = True
                c.outmv = memoryview(c.out)
                c.off = 0
            if not self.send_some(c, sock):
                return

    def on_send_done(self, c: Client) -> None:
        """A flood/churn sender wrote its last message."""
