"""The lobby's scripts in batches: :class:`Scripts` by name, on a :class:`ScriptLine` where it can.

redis-py spends more than the round trip itself on a script call: a
pipeline object, a ``getpid`` and a ``poll`` (the pool's health check)
before every send, Python-level reply handling, and in a pipeline a
``SCRIPT EXISTS`` round trip first on every execute. The node's I/O thread
makes such a call for every client arriving (:meth:`ClusterLobby.join_many`),
and each system call there hands the GIL to the listener and back. A
:class:`ScriptLine` sends a batch of commands in one ``sendall`` and reads
the replies into a kept buffer, parsed by hiredis: one EVALSHA cost 43 us
of CPU this way against 96 us through redis-py, and the I/O threads of a
3-node cluster pairing 6,000 pairs went from 0.46-0.77 to 0.32-0.51
CPU-seconds (``docs/performance.md``).

A line is used where a relay's lanes could be (:func:`chatpair.cluster.lane.lanes_possible`:
hiredis installed, no TLS); otherwise :class:`Scripts` goes through
redis-py. A line connects lazily, and after any failure closes and raises
redis-py's ``ConnectionError`` or ``TimeoutError`` (what the I/O thread's
retry handles), so the next call connects afresh.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from typing import Any

from chatpair.cluster.lane import lanes_possible, open_socket
from chatpair.cluster.redisconn import error_text, not_now, redis_module
from chatpair.cluster.resp import pack

#: Bytes one read takes at most (the buffer is kept: see chatpair.cluster.resp).
READ_SIZE = 64 * 1024


class ScriptLine:
    """A blocking RESP connection for batches of commands (thread-safe: one batch at a time)."""

    def __init__(self, client: Any) -> None:
        """``client``: the redis-py client whose server, database, password and timeouts to use."""
        self.client = client
        kwargs = client.connection_pool.connection_kwargs
        self.timeout: float | None = kwargs.get("socket_timeout")
        self.connect_timeout: float | None = kwargs.get("socket_connect_timeout") or self.timeout
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._buffer = bytearray(READ_SIZE)
        self._lock = threading.Lock()
        import hiredis

        exceptions = redis_module().exceptions
        self._redis_failures = (exceptions.ConnectionError, exceptions.TimeoutError)
        self._failures = (OSError, hiredis.ProtocolError, *self._redis_failures)

    def call_many(self, commands: list[bytes]) -> list[Any]:
        """Send the packed ``commands`` at once; their replies, in order (error replies as
        redis-py ``ResponseError`` values, not raised). Unreachable: ConnectionError/TimeoutError."""
        with self._lock:
            try:
                if self._sock is None:
                    self._open()
                return self._send_read(commands)
            except self._failures as error:
                self.close()
                raise self._failure(error) from None
            except BaseException:  # (an interrupt mid-reply): a half-read socket is never used again
                self.close()
                raise

    def _open(self) -> None:
        import hiredis

        sock, login = open_socket(self.client, self.connect_timeout)  # (non-blocking: made blocking here)
        sock.settimeout(self.timeout)
        self._sock = sock
        self._reader = hiredis.Reader(replyError=redis_module().exceptions.ResponseError)
        if login:
            for reply in self._send_read(login):
                if isinstance(reply, Exception):
                    raise redis_module().exceptions.ConnectionError(f"Redis refused the login: {reply}")

    def _send_read(self, commands: list[bytes]) -> list[Any]:
        """Send ``commands`` at once; their replies, in order."""
        assert self._sock is not None
        self._sock.sendall(b"".join(commands))
        return self._read(len(commands))

    def _read(self, count: int) -> list[Any]:
        sock, reader, buffer = self._sock, self._reader, self._buffer
        assert sock is not None
        replies: list[Any] = []
        while len(replies) < count:
            size = sock.recv_into(buffer)
            if not size:
                raise ConnectionResetError(0, "Redis closed the connection")
            reader.feed(buffer, 0, size)
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        return replies

    def _failure(self, error: BaseException) -> BaseException:
        """``error`` as the exception the I/O thread's retry handles."""
        exceptions = redis_module().exceptions
        if isinstance(error, self._redis_failures):
            return error
        if isinstance(error, TimeoutError):  # socket.timeout
            return exceptions.TimeoutError("Timeout reading from Redis")
        if isinstance(error, OSError):
            return exceptions.ConnectionError(error.strerror or str(error))
        return exceptions.ConnectionError(f"unreadable reply ({error})")  # not Redis at the other end

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Scripts:
    """Lua scripts by name, called in batches of EVALSHA (one round trip each batch).

    On a :class:`ScriptLine` where one can be used, else through a redis-py
    pipeline (``execute_command``: redis-py's ``Script`` in a pipeline asks
    ``SCRIPT EXISTS`` first on every execute, a second round trip). A call
    Redis answers NOSCRIPT (it restarted, or its scripts were flushed) did
    nothing: the script is loaded and those calls sent again, in order.
    """

    def __init__(self, client: Any, sources: dict[str, str], *, script_line: bool = True) -> None:
        self.redis = client
        self._sources = sources
        self._shas = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in sources.items()}
        self._line = ScriptLine(client) if script_line and lanes_possible(client) else None

    def call_many(self, name: str, calls: list[list[str]]) -> list[Any]:
        """Script ``name`` once per argument list; the replies in order, error replies as
        redis-py ``ResponseError`` values. Redis unreachable: ConnectionError/TimeoutError."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            sha = self._shas[name]
            for i, reply in zip(todo, self._send([[b"EVALSHA", sha, 0, *calls[i]] for i in todo])):
                replies[i] = reply
            todo = [i for i in todo if _no_script(replies[i])]
            if not todo or attempt:
                break
            self._send([[b"SCRIPT", b"LOAD", self._sources[name]]])
        return replies

    def _send(self, commands: list[list[Any]]) -> list[Any]:
        if self._line is not None:
            replies = self._line.call_many([pack(*command) for command in commands])
        else:
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies = pipe.execute(raise_on_error=False)
        return _unless_not_ready(replies)

    def close(self) -> None:
        if self._line is not None:
            self._line.close()


def _unless_not_ready(replies: list[Any]) -> list[Any]:
    """``replies``, unless Redis said it cannot serve now (LOADING its data after a restart, BUSY
    with a script, OOM, ...): then the ConnectionError redis-py raises for LOADING, waited out alike."""
    exceptions = redis_module().exceptions
    for reply in replies:
        if isinstance(reply, exceptions.ResponseError) and not_now(reply):
            raise exceptions.BusyLoadingError(error_text(reply))
    return replies


def _no_script(reply: Any) -> bool:
    """Is ``reply`` Redis saying it does not have the script (NOSCRIPT)?"""
    exceptions = redis_module().exceptions
    return isinstance(reply, exceptions.NoScriptError) or (  # (redis-py's name for it; ours: the reply)
        isinstance(reply, exceptions.ResponseError) and str(reply).startswith("NOSCRIPT"))
