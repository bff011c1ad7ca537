"""Connecting, pairing and closing the clients of a load process.

The second layer of a load process (see :mod:`chatpair.bench.load`): it
opens both sockets of each pair (non-blocking, or blocking for TLS), sends
HELLO with the pair's own room, counts a pair as paired when both ends got
PAIRED, and closes clients. Frames are the next layer's business. With
several targets (``--target H1:P1,H2:P2``) client ``2i`` (A of pair ``i``)
connects to target ``2i mod N`` and its partner to ``(2i + 1) mod N``: with
two or more targets the two ends of every pair are on different servers.

Thousands of connections from one process spread over many loopback source
addresses where the kernel allows it (:func:`spread_sources_possible`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import ssl
import sys
import time
from collections.abc import Iterable
from typing import Any

from chatpair.bench.config import ACK_DELAY, CONNECT_WINDOW
from chatpair.bench.load_accounts import LoadAccounts, LoadSpec
from chatpair.bench.load_state import BANNER, CLOSED, Client, Pair
from chatpair.bench.poller import Poller
from chatpair.netutil import format_hostport
from chatpair.proto import FrameType, encode_frame
from chatpair.proto.resume import AckClock

#: Linux: bind() an address but leave the port to connect(), which then only
#: needs the 4-tuple to be unique (IP_BIND_ADDRESS_NO_PORT from <linux/in.h>).
_IP_BIND_ADDRESS_NO_PORT = 24
#: Connections per loopback source address (its own ephemeral port space).
_CONNECTS_PER_SOURCE = 2_000


def spread_sources_possible(host: str) -> bool:
    """True when connections to ``host`` can come from many loopback addresses.

    Thousands of connections to one address and port from 127.0.0.1 make the
    kernel search an ever fuller ephemeral port range; past about half of it
    each connect() costs hundreds of microseconds (measured here: 9,900 pairs
    paired at 1,200/s instead of 3,900/s). Linux routes all of 127.0.0.0/8 to
    loopback, so each load process spreads its clients over its own source
    addresses, each with a fresh port range.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return socket.inet_aton(host)[0] == 127
    except OSError:
        return False


def spread_source(sock: socket.socket, worker: int, n: int) -> None:
    """Bind ``sock`` to loopback source address number ``n // 2000`` of load process ``worker``."""
    k = n // _CONNECTS_PER_SOURCE
    try:
        sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.{100 + worker % 100}.{k // 250}.{1 + k % 250}", 0))
    except OSError:
        pass  # fall back to the kernel's choice of 127.0.0.1


class LoadConnections(LoadAccounts):
    """Sockets of a load process: connect, HELLO, pairing, close.

    For the entry point: :meth:`connect_all` (the pairing phase). For
    subclasses: :meth:`new_pair`, :meth:`fail_client`, :meth:`close_client`,
    :meth:`set_events`; :meth:`step` (the loop) must be defined, and the
    hooks :meth:`on_pair_ready` and :meth:`on_pair_closed` may be overridden.
    """

    def __init__(self, spec: LoadSpec, progress: Any = None) -> None:
        super().__init__(spec, progress)
        self.addrs = spec.targets
        self._spread = all(spread_sources_possible(host) for host, _ in spec.targets)
        self._connects = 0  # sockets opened so far (picks the source address)
        self.poller = Poller()
        self.clients: dict[int, Client] = {}  # by descriptor
        self.connecting = 0  # pairs connecting, not yet paired
        self.ssl_ctx: ssl.SSLContext | None = None
        cfg = spec.config
        if cfg.tls:
            ctx = ssl.create_default_context(cafile=cfg.cafile)
            if cfg.insecure or cfg.fingerprint is not None:
                # --insecure trusts anything; a pin is checked after the handshake instead.
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self.ssl_ctx = ctx
        # Names and rooms here are ASCII letters and digits: no JSON encoder needed.
        self._hello_extra = b',"resume":true' if cfg.resume else b""

    def connect_all(self, indices: Iterable[int]) -> None:
        """Connect and pair every pair in ``indices``, CONNECT_WINDOW at a time."""
        todo = list(indices)
        todo.reverse()
        self.report.t_connect0 = time.monotonic_ns()
        stall_limit = max(30.0, self.cfg.stall_timeout) * 1e9
        last_paired, last_change = 0, time.monotonic_ns()
        while todo or self.connecting > 0:
            if self.stopping():
                break
            while todo and self.connecting < CONNECT_WINDOW:
                i = todo.pop()
                pair = Pair(i, f"{self.spec.run_id}-{i}")
                self.pairs.append(pair)
                self.new_pair(pair)
            self.step(0.05)
            now = time.monotonic_ns()
            if self.paired != last_paired:
                last_paired, last_change = self.paired, now
                self.publish()
            elif now - last_change > stall_limit:
                self.error(f"pairing stalled: {self.connecting} pair(s) still not paired")
                break
        self.report.t_connected = time.monotonic_ns()
        self.publish()

    def step(self, timeout: float) -> None:
        """Wait up to ``timeout`` s and serve every client that is ready (the loop: a subclass's)."""
        raise NotImplementedError

    def new_pair(self, pair: Pair) -> None:
        """Start connecting both clients of ``pair``."""
        tag = f"{pair.index}" if pair.cycle == 0 else f"{pair.index}.{pair.cycle}"
        if pair.cycle:
            pair.room = f"{self.spec.run_id}-{pair.index}-{pair.cycle}"
        a, b = Client(pair, 0, f"a{tag}"), Client(pair, 1, f"b{tag}")
        a.peer, b.peer = b, a
        n = len(self.addrs)
        a.target, b.target = (2 * pair.index) % n, (2 * pair.index + 1) % n
        pair.a, pair.b, pair.closed = a, b, 0
        pair.pending = True
        self.connecting += 1
        for c in (a, b):
            self.connect(c)

    def connect(self, c: Client) -> None:
        """Open ``c``'s socket; HELLO goes out once it is connected."""
        c.t0 = time.monotonic_ns()
        addr = self.addrs[c.target]
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_ctx is not None:
            # TLS: a blocking connect and handshake keeps the hot loop free of
            # SSLWant* cases; throughput over TLS is not what this measures best.
            sock.settimeout(30)
            try:
                sock.connect(addr)
                sock = self.ssl_ctx.wrap_socket(sock, server_hostname=addr[0])
            except (OSError, ssl.SSLError) as err:
                sock.close()
                self.fail_client(c, f"connect: {err}")
                return
            pin = self.cfg.fingerprint
            if pin is not None and hashlib.sha256(sock.getpeercert(binary_form=True) or b"").digest() != pin:
                sock.close()
                self.fail_client(c, "TLS certificate does not match --fingerprint")
                return
            sock.setblocking(False)
            c.sock, c.fd = sock, sock.fileno()
            self.clients[c.fd] = c
            self.on_connected(c)
            return
        sock.setblocking(False)
        if self._spread:
            spread_source(sock, self.spec.index, self._connects)
        self._connects += 1
        err = sock.connect_ex(addr)
        c.sock, c.fd = sock, sock.fileno()
        self.clients[c.fd] = c
        if err == 0:
            self.on_connected(c)
        elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            c.events = Poller.WRITE
            self.poller.register(c.fd, Poller.WRITE)
        else:
            self.fail_client(c, f"connect: {os.strerror(err)}")

    def on_connected(self, c: Client) -> None:
        """Send HELLO and wait for the banner (sent before it, read after)."""
        assert c.sock is not None
        c.state = BANNER
        hello = encode_frame(FrameType.HELLO, b'{"version":1,"name":"%s","room":"%s"%s}'
                             % (c.name.encode(), c.pair.room.encode(), self._hello_extra))
        if self._hello_extra:
            c.ack_clock = AckClock(ACK_DELAY)
        try:
            c.sock.send(hello)  # a fresh socket takes ~70 bytes at once
        except OSError as err:
            self.fail_client(c, f"send hello: {err}")
            return
        if c.events:
            c.events = Poller.READ
            self.poller.modify(c.fd, Poller.READ)
        else:
            c.events = Poller.READ
            self.poller.register(c.fd, Poller.READ)

    def on_connect_writable(self, c: Client) -> None:
        assert c.sock is not None
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail_client(c, f"connect to {format_hostport(*self.addrs[c.target])}: {os.strerror(err)}")
            return
        self.on_connected(c)

    def fail_client(self, c: Client, why: str) -> None:
        self.error(f"{c.name}: {why}")
        self.close_client(c)

    def close_client(self, c: Client) -> None:
        """Close ``c`` (once); the second close of a pair calls :meth:`on_pair_closed`."""
        if c.state == CLOSED:
            return
        c.state = CLOSED
        if c.sock is not None:
            if c.events:
                self.poller.unregister(c.fd)
                c.events = 0
            self.clients.pop(c.fd, None)
            try:
                c.sock.close()
            except OSError:
                pass
        pair = c.pair
        pair.closed += 1
        if pair.pending:  # this pair will not be paired now: free its connect slot
            pair.pending = False
            self.connecting -= 1
        if pair.closed == 2:
            self.on_pair_closed(pair)

    def on_pair_closed(self, pair: Pair) -> None:
        """Both ends closed (churn starts the next cycle here)."""

    def set_events(self, c: Client, events: int) -> None:
        """Poll ``c`` for ``events`` (Poller.READ | Poller.WRITE) from now on."""
        if c.events != events and c.state != CLOSED:
            self.poller.modify(c.fd, events)
            c.events = events

    def on_pair_ready(self, pair: Pair, now: int) -> None:
        """Both clients of ``pair`` got PAIRED (a workload starts its traffic here)."""
        if pair.pending:
            pair.pending = False
            self.connecting -= 1
        self.paired += 1
