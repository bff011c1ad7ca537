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
  once.

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

from chatpair.cluster.inbox import Entry, Gap, Inbox
from chatpair.cluster.redisconn import ClusterError

#: Bytes one read of a lane's socket takes at most.
READ_SIZE = 256 * 1024


class LaneBroken(ClusterError):
    """The lane's connection failed; the message says how (one line, for the log)."""


def pack(*args: Any) -> bytes:
    """One Redis command in RESP (arguments: bytes, str or int)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


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


class RespConn:
    """A non-blocking RESP connection for one selector loop: commands out, replies in order."""

    def __init__(self, sock: socket.socket) -> None:
        import hiredis

        self.sock = sock
        self._reader = hiredis.Reader()
        self._error = hiredis.ReplyError
        self._garbled = hiredis.ProtocolError
        self.out = bytearray()  # what the socket did not take yet (the owner waits for writable)

    def send(self, data: bytes) -> None:
        """Queue ``data`` and write what the socket takes now; LaneBroken if it failed."""
        out = self.out
        out += data
        try:
            sent = self.sock.send(out)
        except BlockingIOError:
            return
        except OSError as error:
            raise LaneBroken(f"Redis: {error.strerror or error}") from None
        del out[:sent]

    def flush(self) -> None:
        """The socket is writable: write more of what is queued."""
        if self.out:
            self.send(b"")

    def replies(self) -> list[Any]:
        """Every complete reply that arrived (an error reply raises LaneBroken)."""
        reader = self._reader
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except BlockingIOError:
                break
            except OSError as error:
                raise LaneBroken(f"Redis: {error.strerror or error}") from None
            if not data:
                raise LaneBroken("Redis closed the connection")
            reader.feed(data)
            if len(data) < READ_SIZE:
                break
        out = []
        while True:
            try:
                reply = reader.gets()
            except self._garbled as error:  # not Redis at the other end
                raise LaneBroken(f"Redis: unreadable reply ({error})") from None
            if reply is False:
                return out
            if isinstance(reply, self._error):
                raise LaneBroken(f"Redis: {reply}")
            out.append(reply)

    def close(self) -> None:
        self.sock.close()


class InboxLane:
    """XREAD BLOCK on this node's inbox, for a relay loop: one command out, its answer in, again."""

    def __init__(self, sock: socket.socket, login: list[bytes], inbox: Inbox, block_ms: int,
                 patience: float, now: float) -> None:
        """``patience``: seconds beyond ``block_ms`` an answer may take before the lane counts as failed."""
        self.conn = RespConn(sock)
        self.inbox = inbox
        self.block_ms = block_ms
        self.patience = block_ms / 1000 + patience
        self._awaiting: deque[str] = deque("login" for _ in login)
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

    def on_readable(self, now: float) -> list[Entry | Gap]:
        """What arrived, checked as :meth:`Inbox.read` checks it; LaneBroken if the lane failed."""
        out: list[Entry | Gap] = []
        answered = False
        awaiting = self._awaiting
        for reply in self.conn.replies():
            if awaiting.popleft() == "read":
                out += self.inbox.accept(reply)
                answered = True
        if answered:
            self._ask(b"", now, trim=bool(out) and self.inbox.trim_due())
        return out

    def overdue(self, now: float) -> bool:
        """No answer for longer than a BLOCK and the patience: Redis is not there any more."""
        return now - self.asked_at > self.patience

    def close(self) -> None:
        self.conn.close()
