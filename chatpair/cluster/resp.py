"""RESP, the Redis wire protocol, for a non-blocking socket a selector loop watches.

redis-py blocks; a relay loop must not (:mod:`chatpair.cluster.lane`). What
it needs of RESP is small: :func:`pack` writes a command, :class:`RespConn`
queues what the socket does not take at once and parses replies with
hiredis (installed by the ``cluster`` extra), in order. Any failure -
the connection closed, an error reply, bytes that are not RESP - is a
:class:`LaneBroken` with one line to log.
"""

from __future__ import annotations

import socket
from typing import Any

from chatpair.cluster.redisconn import ClusterError

#: Bytes one read of a lane's socket takes at most.
READ_SIZE = 256 * 1024
#: Written bytes a connection's queue keeps (skipped) before it drops them.
COMPACT_AFTER = 1 << 20


class LaneBroken(ClusterError):
    """The lane's connection failed; the message says how (one line, for the log)."""


def broken(error: OSError) -> LaneBroken:
    """A socket error as the one line a lane's failure is logged with."""
    return LaneBroken(f"Redis: {error.strerror or error}")


def error_reply(reply: Exception) -> LaneBroken:
    """An error reply from Redis as the one line a lane's failure is logged with."""
    return LaneBroken(f"Redis: {reply}")


def bulk(arg: Any) -> bytes:
    """One argument of a command (bytes, str or int) in RESP."""
    if type(arg) is not bytes:
        arg = str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def pack_head(count: int, *first: Any) -> bytes:
    """The start of a command of ``count`` arguments: its first ones (the rest: :func:`bulk` each)."""
    return b"*%d\r\n" % count + b"".join(bulk(arg) for arg in first)


def pack(*args: Any) -> bytes:
    """One Redis command in RESP (arguments: bytes, str or int)."""
    return pack_head(len(args), *args)


class RespConn:
    """A non-blocking RESP connection for one selector loop: commands out, replies in order."""

    def __init__(self, sock: socket.socket) -> None:
        import hiredis

        self.sock = sock
        self._reader = hiredis.Reader()
        self._error = hiredis.ReplyError
        self._garbled = hiredis.ProtocolError
        self.out = bytearray()  # what the socket did not take yet (the owner waits for writable) ...
        self._out_at = 0  # ... from here on: written bytes are skipped, not moved (see _write)
        self._scratch = bytearray(READ_SIZE)

    def send(self, data: bytes) -> None:
        """Queue ``data`` and write what the socket takes now; LaneBroken if it failed."""
        if self.out:  # behind what waits already
            self.out += data
            self._write()
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            raise broken(error) from None
        if sent < len(data):
            self.out += memoryview(data)[sent:]

    def flush(self) -> None:
        """The socket is writable: write more of what is queued."""
        if self.out:
            self._write()

    def _write(self) -> None:
        # A batch can be megabytes (a flood's messages between two turns of the
        # loop) and the socket takes a few hundred KiB per wake-up: deleting
        # what was written each time moved the rest again and again. The
        # offset moves instead, and the buffer is emptied once all of it is
        # written (or compacted, should it never be).
        with memoryview(self.out) as view:
            try:
                sent = self.sock.send(view[self._out_at:])
            except BlockingIOError:
                return
            except OSError as error:
                raise broken(error) from None
        self._out_at += sent
        if self._out_at == len(self.out):
            self.out.clear()
            self._out_at = 0
        elif self._out_at > COMPACT_AFTER and self._out_at > len(self.out) // 2:
            del self.out[:self._out_at]  # (each byte is moved once at most, on average)
            self._out_at = 0

    def replies(self) -> list[Any]:
        """Every complete reply that arrived (an error reply raises LaneBroken)."""
        reader, scratch = self._reader, self._scratch
        while True:
            try:
                # Into a buffer kept for it: a fresh bytes of READ_SIZE per read is an
                # mmap and munmap each time (about 14 us here), more than the read itself.
                size = self.sock.recv_into(scratch)
            except BlockingIOError:
                break
            except OSError as error:
                raise broken(error) from None
            if not size:
                raise LaneBroken("Redis closed the connection")
            reader.feed(scratch, 0, size)
            if size < READ_SIZE:
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
                raise error_reply(reply)
            out.append(reply)

    def close(self) -> None:
        self.sock.close()
