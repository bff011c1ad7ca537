"""The listener's listening socket: accept in batches, rest when out of descriptors.

The main process binds the socket and hands it to the listener process;
:class:`Acceptor` registers it in the listener's selector and turns every
readable event into up to :data:`ACCEPT_BATCH` new connections. Running out
of descriptors (EMFILE and friends) is not an error to spin on: the acceptor
leaves the selector for :data:`ACCEPT_BACKOFF_SECONDS`, pairs already
chatting go on, and new clients wait in the kernel's backlog.

Two things happen here before anything else is spent on a connection:

* on a dual-stack socket an IPv4 client's address arrives IPv4-mapped
  (``::ffff:10.0.0.5``); it is turned back into ``10.0.0.5`` for every
  later use (logs, per-address limits, loopback exemption);
* an address in the :class:`~chatpair.server.deny.DenyList` is closed at
  once, with one log line: no banner, no handshake, no counts.

Behind a load balancer (``--proxy-protocol``) the socket's address is the
balancer's: the reception reads the real one from the PROXY header and asks
:meth:`Acceptor.denied_network` then (``deny_at_accept`` is off), and
:func:`real_address` unmaps it the same way.
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

from chatpair.netutil import format_addr
from chatpair.server.deny import DenyList, client_address
from chatpair.server.poller import EVENT_READ, Poller

log = logging.getLogger("chatpair")

#: How long accept() rests after running out of file descriptors.
ACCEPT_BACKOFF_SECONDS = 0.5
#: Connections taken per readable event, so a burst of connects cannot starve
#: the clients already connected.
ACCEPT_BATCH = 256
#: accept() errors that mean "out of descriptors or memory": rest, then retry.
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_MAPPED = "::ffff:"


class AcceptState(enum.Enum):
    ACCEPTING = "accepting"  # registered in the selector
    RESTING = "resting"  # out of descriptors: unregistered until the backoff ends
    STOPPED = "stopped"  # the server stops: never registered again


def tune_socket(sock: socket.socket) -> None:
    """Low latency (no Nagle) and TCP keepalive, which finds dead line-mode peers."""
    for level, opt, value in (
        (socket.IPPROTO_TCP, getattr(socket, "TCP_NODELAY", None), 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), 60),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 15),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 4),
    ):
        if opt is None:
            continue
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass


def unmap_addr(addr: Any) -> Any:
    """``('::ffff:10.0.0.5', port, flow, scope)`` -> ``('10.0.0.5', port)``; any other address as it is."""
    if type(addr) is tuple and len(addr) == 4 and addr[0].startswith(_MAPPED) and "." in addr[0]:
        return (addr[0][len(_MAPPED):], addr[1])
    return addr


def real_address(source: tuple[str, int]) -> tuple[str, int]:
    """A PROXY header's source as the acceptor would have given it: IPv4 unmapped.

    Not by text, as :func:`unmap_addr` does for the kernel's dotted form: the
    header's address is written by :mod:`ipaddress`, which (before Python
    3.13) gives ``::ffff:a00:5`` for ``::ffff:10.0.0.5``.
    """
    host, port = source
    addr = client_address(host)
    return (str(addr) if addr is not None else host, port)


class Acceptor:
    """The listening socket in a selector loop; new connections go to ``on_connection``.

    ``on_connection(sock, addr)`` gets a non-blocking, tuned socket, and its
    address with IPv4 unmapped; addresses in ``deny`` never get there. The
    owner calls :meth:`on_readable` when the socket is readable, :meth:`tick`
    from its timer, and :meth:`stop` when the server stops. :attr:`accepted`
    and :attr:`denied` count connections (for status and metrics). With
    :attr:`deny_at_accept` off (``--proxy-protocol``) the deny list is not
    asked at accept; whoever learns the real address asks
    :meth:`denied_network` and closes the connection itself.
    """

    def __init__(self, sock: socket.socket, poller: Poller,
                 on_connection: Callable[[socket.socket, Any], None], deny: DenyList | None = None) -> None:
        self.sock = sock
        self._poller = poller
        self._on_connection = on_connection
        self.deny = deny
        self.accepted = 0  # connections accepted, denied ones included
        self.denied = 0
        self.state = AcceptState.ACCEPTING
        self.deny_at_accept = True  # False behind a load balancer: the address here is the balancer's
        self._resume_at = 0.0
        self._fd_warning_logged = False  # say "out of descriptors" once, not every backoff
        sock.setblocking(False)
        # Linux copies these options from the listening socket to every accepted
        # one: set them once here instead of five syscalls per connection.
        tune_socket(sock)
        self._tune_each = not sys.platform.startswith("linux")
        poller.register(sock, EVENT_READ, None)

    def on_readable(self, now: float) -> None:
        if self.state is not AcceptState.ACCEPTING:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in _RESOURCE_ERRNOS:
                    self._rest(err, now)
                else:
                    log.warning("accept failed: %s", err)
                return
            self.accepted += 1
            addr = unmap_addr(addr)
            if self.deny and self.deny_at_accept and self._denied(sock, addr):
                continue
            sock.setblocking(False)
            if self._tune_each:
                tune_socket(sock)
            self._on_connection(sock, addr)

    def _denied(self, sock: socket.socket, addr: Any) -> bool:
        """Close ``sock`` (one log line) if its address is denied."""
        if self.denied_network(addr) is None:
            return False
        sock.close()
        return True

    def denied_network(self, addr: Any) -> str | None:
        """The deny-list network ``addr`` is in (counted, one log line), or None.

        The caller closes the connection at once, without a word.
        """
        if not self.deny or not isinstance(addr, tuple):
            return None
        network = self.deny.match(str(addr[0]))
        if network is None:
            return None
        self.denied += 1
        log.info("%s: denied (%s); closed", format_addr(addr), network,
                 extra={"fields": {"event": "denied", "addr": format_addr(addr), "network": network}})
        return network

    def _rest(self, err: OSError, now: float) -> None:
        """Out of descriptors: rest instead of spinning; pairs already chatting go on."""
        if not self._fd_warning_logged:
            log.warning("cannot accept more connections (%s); new ones wait until descriptors free up",
                        err.strerror)
            self._fd_warning_logged = True
        self.state = AcceptState.RESTING
        self._resume_at = now + ACCEPT_BACKOFF_SECONDS
        self._unregister()

    def tick(self, now: float) -> None:
        if self.state is AcceptState.RESTING and now >= self._resume_at:
            self.state = AcceptState.ACCEPTING
            self._poller.register(self.sock, EVENT_READ, None)

    def stop(self) -> None:
        """Accept no more (the socket stays open: the main process owns it)."""
        if self.state is AcceptState.ACCEPTING:
            self._unregister()
        self.state = AcceptState.STOPPED

    def _unregister(self) -> None:
        try:
            self._poller.unregister(self.sock)
        except (KeyError, ValueError):
            pass
