"""Small operating-system helpers that the server, the client and the bench share.

It imports nothing of chatpair but :mod:`chatpair.errors`, so any package may
use it: one way to write ``host:port``, one way to read it, one wake-up
socket for a selector loop, one way to raise the descriptor limit.
"""

from __future__ import annotations

import socket
from typing import Any

from chatpair.errors import ConfigError


def format_hostport(host: str, port: int) -> str:
    """``host:port`` as people write it: IPv6 in brackets (``[::1]:7878``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_addr(addr: Any) -> str:
    """A socket address (tuple, or a Unix path) for a log line."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return format_hostport(str(addr[0]), int(addr[1]))
    return str(addr)


def parse_port(text: str, where: str) -> int:
    """A TCP port 1-65535; ConfigError naming ``where`` it came from otherwise."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"bad port in {where!r}: a port is a number from 1 to 65535")
    return int(text)


def parse_hostport(text: str) -> tuple[str | None, int | None]:
    """``HOST``, ``HOST:PORT``, ``[V6]``, ``[V6]:PORT`` or a bare IPv6 address -> (host, port).

    A missing part is None; a malformed address is a ConfigError.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if not rest:
            return host or None, None
        if not rest.startswith(":"):
            raise ConfigError(f"bad address {text!r}")
        return host or None, parse_port(rest[1:], text)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host or None, parse_port(port, text)
    return text or None, None  # a host name, IPv4, or a bare IPv6 address


class Waker:
    """Lets other threads wake a selector loop: register :attr:`fileno`, call :meth:`wake`.

    A socketpair rather than a pipe because it works on every platform
    (Windows selectors take sockets only). Many wakes before the loop runs
    collapse into one.
    """

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    @property
    def reader(self) -> socket.socket:
        """The end to register for EVENT_READ."""
        return self._r

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        """Any thread: make the loop's select() return."""
        try:
            self._w.send(b"\0")
        except OSError:
            pass  # a wake-up is already pending (buffer full), or we are closing

    def drain(self) -> None:
        """The loop's thread: consume pending wake-ups."""
        try:
            while self._r.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


def raise_fd_limit() -> None:
    """Use every descriptor the system allows this process (POSIX only; no-op elsewhere)."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
