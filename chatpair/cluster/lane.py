"""A relay loop's own Redis connections: the cross-node message path without thread hand-overs.

redis-py's calls block, so the cluster's Redis work runs on the node's own
threads (:mod:`chatpair.cluster.node`). For the message path that costs two
hand-overs between threads per hop (relay -> I/O thread on the sending node,
inbox reader -> relay on the receiving one), each a wake-up of a sleeping
thread, most of a cross-node message's time on a small machine. A *lane*
is instead a plain non-blocking socket to Redis that a relay loop watches
in its own poller, speaking RESP itself (:func:`pack`, replies parsed by
hiredis):

* :class:`InboxLane`: XREAD BLOCK on the node's inbox stream, answered in the
  relay's loop, which hands the entries on as the reader thread would
  (:meth:`ClusterNode.dispatch`) and writes its own clients' messages at
  once;
* :class:`OutboxLane`: the node's outbox written by the relay's loop (its
  clients' messages, with whatever else is queued), one batch of XADDs
  (:meth:`Outbox.packed`) per turn of the loop, the next once Redis has
  answered them all.

A lane never connects, retries or waits: the node's reader thread opens the
socket (:func:`open_socket`, blocking, with the connect timeout) and hands
it over; when the lane fails (Redis closed it, an error reply, no answer in
time) its loop closes it and the reader thread opens the next one, while
Redis is unreachable every :data:`RETRY_SECONDS`. TLS (``rediss://``) and a
missing hiredis keep the reader thread doing the reading itself.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any

from chatpair.cluster.entries import Entry, Gap
from chatpair.cluster.inbox import Inbox, note_refused
from chatpair.cluster.resp import RespConn, error_reply, pack


def lanes_possible(client: Any) -> bool:
    """Can a relay read for this redis-py client? (hiredis installed; not TLS.)"""
    try:
        import hiredis  # noqa: F401 - the cluster extra installs it
    except ImportError:
        return False
    kwargs = client.connection_pool.connection_kwargs
    return "path" in kwargs or ("host" in kwargs and "ssl_context" not in kwargs
                                and client.connection_pool.connection_class.__name__ == "Connection")


def open_socket(client: Any, timeout: float) -> tuple[socket.socket, list[bytes]]:
    """A connected non-blocking socket to ``client``'s Redis, and the commands that log it in.

    Blocks up to ``timeout`` (call it off the relay loops); raises OSError.
    """
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(kwargs["path"])
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection((kwargs["host"], kwargs["port"]), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    login = []
    if kwargs.get("password"):
        user = kwargs.get("username")
        login.append(pack("AUTH", *([user] if user else []), kwargs["password"]))
    if kwargs.get("db"):
        login.append(pack("SELECT", kwargs["db"]))
    return sock, login


class InboxLane:
    """XREAD BLOCK on this node's inbox, for a relay loop: one command out, its answer in, again."""

    def __init__(self, sock: socket.socket, login: list[bytes], inbox: Inbox, block_ms: int,
                 patience: float, now: float) -> None:
        """``patience``: seconds beyond ``block_ms`` an answer may take before the lane counts as failed."""
        self.conn = RespConn(sock)
        self.events = 0  # what its loop's poller watches it for (the loop's to keep)
        self.inbox = inbox
        self.block_ms = block_ms
        self.patience = block_ms / 1000 + patience
        self._awaiting: deque[str] = deque("login" for _ in login)
        self.answered = False  # the XREAD was answered; the next one is not sent yet
        self.asked_at = now
        self._ask(b"".join(login), now)

    @property
    def sock(self) -> socket.socket:
        return self.conn.sock

    def _ask(self, first: bytes, now: float, trim: bool = False) -> None:
        inbox = self.inbox
        if trim:
            first += pack(*inbox.xtrim_args())
            self._awaiting.append("trim")
        self._awaiting.append("read")
        self.asked_at = now
        self.conn.send(first + pack(*inbox.xread_args(self.block_ms)))

    def on_readable(self) -> list[Entry | Gap]:
        """What arrived, checked as :meth:`Inbox.read` checks it; LaneBroken if the lane failed.

        Once the XREAD is answered, call :meth:`read_on` (after handing the
        entries on: the clients get their messages before that system call).
        """
        out: list[Entry | Gap] = []
        awaiting = self._awaiting
        for reply in self.conn.replies():
            if awaiting.popleft() == "read":
                out += self.inbox.accept(reply)
                self.answered = True
        return out

    def read_on(self, now: float) -> None:
        """The XREAD was answered: the next one (after dropping what was read, when that is due)."""
        if self.answered:
            self.answered = False
            self._ask(b"", now, trim=self.inbox.trim_owed and self.inbox.trim_due())

    def overdue(self, now: float) -> bool:
        """No answer for longer than a BLOCK and the patience: Redis is not there any more."""
        return now - self.asked_at > self.patience

    def close(self) -> None:
        self.conn.close()


class OutboxLane:
    """The outbox's batches, written by a relay loop (:meth:`Outbox.take`): XADDs out, replies counted."""

    def __init__(self, sock: socket.socket, login: list[bytes], patience: float, now: float) -> None:
        self.conn = RespConn(sock)
        self.events = 0  # what its loop's poller watches it for (the loop's to keep)
        self.patience = patience
        self.unanswered = len(login)
        self.sent_at = now
        if login:
            self.conn.send(b"".join(login))

    @property
    def sock(self) -> socket.socket:
        return self.conn.sock

    def send(self, commands: bytes, count: int, now: float) -> None:
        """``count`` commands, packed; LaneBroken if the connection failed."""
        if not self.unanswered:
            self.sent_at = now
        self.unanswered += count
        self.conn.send(commands)

    def on_readable(self) -> bool:
        """Count the replies that came; True when everything sent has been answered."""
        replies = self.conn.replies()
        for reply in replies:
            if type(reply) is list:  # EXEC's: a reply per XADD, errors among them
                not_now = note_refused(reply)
                if not_now is not None:
                    raise error_reply(not_now)  # the batch goes back to the outbox, for the I/O thread
        self.unanswered -= len(replies)
        return not self.unanswered

    def overdue(self, now: float) -> bool:
        return bool(self.unanswered) and now - self.sent_at > self.patience

    def close(self) -> None:
        self.conn.close()
