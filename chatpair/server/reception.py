"""A connection's first seconds in the listener: admitted or refused, banner, handshake.

:class:`Reception` takes each socket the :class:`~chatpair.server.accept.Acceptor`
accepts, checks it against the limits (:class:`~chatpair.server.admission.Admission`),
wraps it in TLS if the server speaks TLS, sends the banner and reads the
handshake as it trickles in - every connection with one absolute deadline,
none blocking another. A valid HELLO (or name line) goes to ``on_hello``:
the listener queues the client in the lobby.

It works on the listener's loop (``loop``), whose thread is the only one
that calls it: the loop owns the sockets, Reception decides what to do with
the new ones. The rules of the handshake itself are sans-IO, in
:mod:`chatpair.server.handshake`.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import Callable
from typing import Any

from chatpair.netutil import format_addr
from chatpair.proto import ErrorCode, Hello, ProtocolError
from chatpair.proto.resume import Resume
from chatpair.server.admission import Admission
from chatpair.server.config import ServerConfig
from chatpair.server.conn import Conn
from chatpair.server.handshake import (
    handshake_decoder,
    read_hello,
    server_banner,
    welcome_frame,
)
from chatpair.server.loop import ConnLoop
from chatpair.server.session import Session, new_token
from chatpair.server.states import Mode, Phase

log = logging.getLogger("chatpair")


class Reception:
    """Connections from accept() to a valid HELLO, on the listener's loop.

    The loop calls :meth:`new_connection` (via the acceptor),
    :meth:`on_tls_ready`, :meth:`on_readable` while a connection handshakes,
    :meth:`leave` and :meth:`on_closed` as it goes, and :meth:`expire` from
    its timer. ``on_hello(conn, first)`` gets each client that said hello,
    with the bytes to send it ahead of anything else (WELCOME in frame mode).
    """

    def __init__(self, loop: ConnLoop, config: ServerConfig, admission: Admission,
                 on_hello: Callable[[Conn, bytes], None], on_resume: Callable[[Conn, Resume], None]) -> None:
        self.loop = loop
        self.config = config
        self.admission = admission
        self._on_hello = on_hello
        self._on_resume = on_resume
        self.tls = config.tls_context()
        self.banner = server_banner()
        self.limits = config.limits()
        self.welcome = welcome_frame(self.limits)
        self.handshaking: set[Conn] = set()
        self._cids = itertools.count(1)

    def new_connection(self, sock: socket.socket, addr: Any) -> None:
        loop = self.loop
        label = format_addr(addr)
        ip = str(addr[0]) if isinstance(addr, tuple) else label
        admission = self.admission
        refusal = admission.check(ip)
        if refusal is not None and admission.refusals_full:
            sock.close()  # a flood: no more sockets spent on saying no
            return
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:
                sock.close()
                return
        conn = Conn(sock, next(self._cids), label, loop.now)
        conn.handshake_deadline = loop.now + self.config.handshake_timeout
        # DEBUG: the INFO log says who joined (below) or why a connection
        # ended before that - one line per client instead of two. A refusal
        # is said (and logged at INFO, by fail) once the first byte shows the mode.
        log.debug("%s: connected", label)
        if refusal is not None:
            conn.refusal = refusal
            admission.start_refusal()
            log.debug("%s: refused: %s", label, refusal[1])
        else:
            admission.admit(conn.cid, ip)
        self.handshaking.add(conn)
        loop.adopt_conn(conn)
        if self.tls is None:  # with TLS the banner waits for the TLS handshake (on_tls_ready)
            loop.send(conn, self.banner)

    def on_tls_ready(self, conn: Conn) -> None:
        self.loop.send(conn, self.banner)

    def on_readable(self, conn: Conn) -> None:
        """More of the handshake (or the first byte, which fixes the mode)."""
        loop = self.loop
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            log.info("%s: closed during the handshake", conn.label)
            loop.drop(conn, "disconnected")
            return
        decoder = conn.decoder
        if decoder is None:
            conn.mode, decoder = handshake_decoder(data[0])
            conn.decoder = decoder
        if conn.refusal is not None:  # said now that the mode is known
            loop.fail(conn, *conn.refusal)
            return
        decoder.feed(data)
        try:
            hello = read_hello(decoder)
        except ProtocolError as err:
            loop.fail(conn, err.code, err.message)
            return
        if hello is not None:
            self._complete(conn, hello)

    def _complete(self, conn: Conn, hello: Hello | Resume) -> None:
        conn.phase = Phase.CHATTING
        conn.tokens, conn.token_time = float(self.config.burst), self.loop.now
        self.handshaking.discard(conn)
        if conn.mode is Mode.FRAME:
            conn.pending = conn.decoder.buffered  # type: ignore[union-attr]
            conn.decoder = None
        else:
            conn.decoder.max_line = self.config.max_frame - 1  # type: ignore[union-attr]
        if isinstance(hello, Resume):
            self._on_resume(conn, hello)
            return
        conn.name, conn.room = hello.name, hello.room
        welcome = self.welcome
        if hello.resume and conn.mode is Mode.FRAME and self.config.resume_window > 0:
            conn.session = Session(new_token())
            self.loop.track_session(conn)
            welcome = welcome_frame(self.limits, conn.session.token)
        log.info("%s: joined%s (%s mode)", conn.label, f" room {conn.room}" if conn.room else "",
                 "frame" if conn.mode is Mode.FRAME else "line")
        # WELCOME goes out with WAITING (and PAIRED, if a partner is there) in
        # one send: fewer syscalls is most of what connect+pair costs.
        self._on_hello(conn, welcome if conn.mode is Mode.FRAME else b"")

    def leave(self, conn: Conn) -> None:
        """``conn`` is leaving (harmless if it finished its handshake)."""
        self.handshaking.discard(conn)

    def on_closed(self, conn: Conn) -> None:
        """The loop closes ``conn``: it no longer counts against the limits."""
        self.admission.forget(conn.cid)
        if conn.refusal is not None:
            conn.refusal = None
            self.admission.end_refusal()

    def expire(self, now: float) -> None:
        """Close the connections whose handshake deadline has passed."""
        loop = self.loop
        for conn in [c for c in self.handshaking if now >= c.handshake_deadline]:
            if conn.mode:
                loop.fail(conn, ErrorCode.HANDSHAKE_TIMEOUT,
                          f"no valid hello within {self.config.handshake_timeout:g} seconds")
            else:  # nothing arrived (or, with TLS, the TLS handshake did not finish)
                why = ("TLS handshake not finished" if conn.tls_started else
                       "no TLS hello (a client without --tls waits for a banner)" if conn.tls else "sent nothing")
                if conn.refusal is not None:
                    why = f"refused ({conn.refusal[1]}) and {why}"
                log.info("%s: %s; closed at the handshake deadline", conn.label, why)
                loop.drop(conn, "disconnected")
