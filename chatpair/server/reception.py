"""A connection's first seconds in the listener: admitted or refused, banner, handshake.

:class:`Reception` takes each socket the :class:`~chatpair.server.accept.Acceptor`
accepts, checks it against the limits (:class:`~chatpair.server.admission.Admission`),
wraps it in TLS if the server speaks TLS, sends the banner and reads the
handshake as it trickles in - every connection with one absolute deadline,
none blocking another. A valid HELLO (or name line) goes to ``on_hello``:
the listener queues the client in the lobby.

Behind a load balancer (``--proxy-protocol``) every connection first sends
HAProxy's PROXY protocol header (v1 or v2, :mod:`chatpair.server.proxyproto`)
naming the real client. Such a connection starts in ``Phase.PROXY_HEADER``:
nothing is sent to it, and exactly the header's bytes are read
(:func:`take_proxy_header` peeks, then consumes no more than the header, so
a TLS ClientHello or a HELLO that came in the same segment stays in the
kernel for the next phase). Then the real address is judged - deny list,
per-address limits - and is the one the log names; then TLS or the banner,
as for any connection. The handshake deadline counts from accept, header
included. A bad header is one log line and a close, without a banner; a
LOCAL header (the balancer's own health check) or an UNKNOWN/UNSPEC family
keeps the socket's own peer address.

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
from chatpair.proto import NEED_DATA, ErrorCode, Hello, ProtocolError
from chatpair.proto.resume import Resume
from chatpair.server.accept import Acceptor, real_address
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
from chatpair.server.proxyproto import (
    MAX_V2_PAYLOAD,
    V2_HEADER,
    ProxyHeader,
    ProxyHeaderError,
    parse_proxy_header,
)
from chatpair.server.session import Session, new_token
from chatpair.server.states import Mode, Phase

log = logging.getLogger("chatpair")

#: The most bytes a PROXY header can take (a v2 header with the largest
#: payload we accept; a v1 line is refused after 107 bytes without CRLF).
PROXY_HEADER_MAX = V2_HEADER.size + MAX_V2_PAYLOAD


def take_proxy_header(sock: socket.socket, so_far: bytes) -> tuple[ProxyHeader | object, bytes]:
    """Read the next bytes of a PROXY header from ``sock``, never a byte past its end.

    ``so_far``: the header's bytes read before. Returns ``(ProxyHeader, header
    bytes)`` once it is whole, or ``(NEED_DATA, header bytes so far)``. Peeks
    first, and consumes only what the parser says belongs to the header, so
    the client's own first bytes stay unread. Raises ProxyHeaderError for a
    bad header and EOFError when the connection ends (or fails) before it.
    """
    try:
        peeked = sock.recv(PROXY_HEADER_MAX - len(so_far), socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return NEED_DATA, so_far
    except OSError as err:
        raise EOFError(str(err)) from None
    if not peeked:
        raise EOFError("end of stream")
    result = parse_proxy_header(so_far + peeked)
    take = len(peeked) if result is NEED_DATA else result.length - len(so_far)  # type: ignore[union-attr]
    try:
        taken = sock.recv(take)  # bytes already there: never blocks, never short
    except OSError as err:
        raise EOFError(str(err)) from None
    if len(taken) != take:
        raise EOFError("the header's bytes vanished between a peek and a read")
    return result, so_far + taken


class _AwaitingHeader:
    """A connection in PROXY_HEADER: the socket's own peer address, and the header so far."""

    __slots__ = ("peer", "so_far")

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.so_far = b""


class Reception:
    """Connections from accept() to a valid HELLO, on the listener's loop.

    The loop calls :meth:`new_connection` (via the acceptor),
    :meth:`on_tls_ready`, :meth:`on_readable` while a connection handshakes
    (or, with ``--proxy-protocol``, sends its PROXY header), :meth:`leave`
    and :meth:`on_closed` as it goes, and :meth:`tick` from its timer.
    ``on_hello(conn, first)`` gets each client that said hello, with the
    bytes to send it ahead of anything else (WELCOME in frame mode). The
    owner calls :meth:`attach` with the acceptor once both exist.
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
        self.joins = JoinLog()  # the log's "joined" lines, for clients who wait
        self.proxy_protocol = config.proxy_protocol
        self.acceptor: Acceptor | None = None  # its deny list judges the real address behind a balancer
        self._awaiting: dict[Conn, _AwaitingHeader] = {}  # connections in Phase.PROXY_HEADER
        self._cids = itertools.count(1)
        #: makes a resume token (cluster mode: one that names this node)
        self.make_token: Callable[[], str] = new_token

    def attach(self, acceptor: Acceptor) -> Acceptor:
        """The acceptor feeding us (returned); with ``--proxy-protocol`` its deny list is asked here, not at accept."""
        self.acceptor = acceptor
        if self.proxy_protocol:
            acceptor.deny_at_accept = False  # the address it sees is the balancer's
        return acceptor

    def new_connection(self, sock: socket.socket, addr: Any) -> None:
        loop = self.loop
        if self.proxy_protocol:
            conn = Conn(sock, next(self._cids), format_addr(addr), loop.now)
            conn.handshake_deadline = loop.now + self.config.handshake_timeout
            conn.phase = Phase.PROXY_HEADER
            self._awaiting[conn] = _AwaitingHeader(addr)
            self.handshaking.add(conn)
            loop.adopt_conn(conn)
            return
        self._receive(sock, addr, None)

    def _receive(self, sock: socket.socket, addr: Any, conn: Conn | None) -> None:
        """Admit or refuse a connection from ``addr``; then TLS or the banner.

        ``conn`` is None for a socket just accepted, or the connection (owned
        by the loop already) whose PROXY header named ``addr``.
        """
        loop = self.loop
        label = format_addr(addr)
        ip = str(addr[0]) if isinstance(addr, tuple) else label
        admission = self.admission
        refusal = admission.check(ip)
        if refusal is not None and admission.refusals_full:
            self._close(sock, conn)  # a flood: no more sockets spent on saying no
            return
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:
                self._close(sock, conn)
                return
        if conn is None:
            conn = Conn(sock, next(self._cids), label, loop.now)
            conn.handshake_deadline = loop.now + self.config.handshake_timeout
            owned = False
        else:  # the same descriptor (TLS wraps it in place), so the selector's registration holds
            conn.sock, conn.tls, conn.addr = sock, self.tls is not None, label
            conn.phase = Phase.TLS_HANDSHAKE if conn.tls else Phase.HANDSHAKE
            owned = True
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
        # A client may send its HELLO right behind its connect (chatpair
        # bench does, and a busy listener accepts late): read it at once,
        # before registering. If it is all there, the banner goes out in one
        # write with WELCOME and WAITING (the client sees the same bytes in
        # the same order), and a client paired straight away is handed to a
        # relay without ever entering this loop's selector.
        read_now = not owned and self.tls is None and refusal is None
        if owned:
            loop.update_interest(conn)
        else:
            self.handshaking.add(conn)
            loop.adopt_conn(conn, register=not read_now)
        if read_now:
            self.on_readable(conn, banner=self.banner)
            if conn.owner is loop:
                loop.update_interest(conn)
        elif self.tls is None:  # with TLS the banner waits for the TLS handshake (on_tls_ready)
            loop.send(conn, self.banner)

    def _close(self, sock: socket.socket, conn: Conn | None) -> None:
        if conn is None:
            sock.close()
        else:
            self.loop.drop(conn, "disconnected")

    def _on_proxy_header(self, conn: Conn) -> None:
        """More of a PROXY header; once it is whole, the real address is judged and let in."""
        awaiting = self._awaiting[conn]
        try:
            header, awaiting.so_far = take_proxy_header(conn.sock, awaiting.so_far)
        except ProxyHeaderError as err:
            log.info("%s: closed: %s", conn.label, err,
                     extra={"fields": {"event": "bad_proxy_header", "addr": conn.addr}})
            # Nothing is said (no banner: this may not be a client at all), but
            # the close is the polite one - the peer reads end of stream, not
            # a reset for the bytes it sent that nobody will read.
            self.loop.detach(conn, "disconnected")
            self.loop.finish(conn)
            return
        except EOFError:
            log.info("%s: closed %s its PROXY protocol header", conn.label,
                     "in the middle of" if awaiting.so_far else "before")
            self.loop.drop(conn, "disconnected")
            return
        if not isinstance(header, ProxyHeader):
            return
        del self._awaiting[conn]
        addr = real_address(header.source) if header.source is not None else awaiting.peer
        log.debug("%s: PROXY v%d header from %s%s", format_addr(addr), header.version, conn.addr,
                  " (LOCAL: the balancer itself)" if header.local else "")
        conn.addr = format_addr(addr)  # from here on the log names the real client
        if self.acceptor is not None and self.acceptor.denied_network(addr) is not None:
            self.loop.drop(conn, "disconnected")
            return
        self._receive(conn.sock, addr, conn)

    def on_tls_ready(self, conn: Conn) -> None:
        self.loop.send(conn, self.banner)

    def on_readable(self, conn: Conn, banner: bytes = b"") -> None:
        """More of the handshake (or the first byte, which fixes the mode; or the PROXY header).

        ``banner``: the banner is still owed (a read straight after accept),
        to be written ahead of anything else said to the client.
        """
        loop = self.loop
        if conn.phase is Phase.PROXY_HEADER:
            self._on_proxy_header(conn)
            return
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            loop.send(conn, banner)
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
            loop.send(conn, banner)
            loop.fail(conn, err.code, err.message)
            return
        if hello is not None:
            self._complete(conn, hello, banner)
        else:
            loop.send(conn, banner)

    def _complete(self, conn: Conn, hello: Hello | Resume, banner: bytes = b"") -> None:
        """A valid HELLO (or RESUME): on to the lobby (or the session), ``banner`` (if owed) first."""
        conn.phase = Phase.CHATTING
        conn.tokens, conn.token_time = float(self.config.burst), self.loop.now
        self.handshaking.discard(conn)
        if conn.mode is Mode.FRAME:
            conn.pending = conn.decoder.buffered  # type: ignore[union-attr]
            conn.decoder = None
        else:
            conn.decoder.max_line = self.config.max_frame - 1  # type: ignore[union-attr]
        if isinstance(hello, Resume):
            self.loop.send(conn, banner)
            self._on_resume(conn, hello)
            return
        conn.name, conn.room = hello.name, hello.room
        welcome = self.welcome
        if hello.resume and conn.mode is Mode.FRAME and self.config.resume_window > 0:
            conn.session = Session(self.make_token())
            self.loop.track_session(conn)
            welcome = welcome_frame(self.limits, conn.session.token)
        # WELCOME goes out with WAITING (and PAIRED, if a partner is there) in
        # one send: fewer syscalls is most of what connect+pair costs.
        self._on_hello(conn, banner + welcome if conn.mode is Mode.FRAME else banner)

    def leave(self, conn: Conn) -> None:
        """``conn`` is leaving (harmless if it finished its handshake)."""
        self.handshaking.discard(conn)
        self._awaiting.pop(conn, None)

    def on_closed(self, conn: Conn) -> None:
        """The loop closes ``conn``: it no longer counts against the limits."""
        self._awaiting.pop(conn, None)
        self.admission.forget(conn.cid)
        if conn.refusal is not None:
            conn.refusal = None
            self.admission.end_refusal()

    def tick(self, now: float, waiting: dict[int, Conn]) -> None:
        """Every timer tick: expired handshakes are closed; clients who joined and wait get their log line."""
        self.expire(now)
        self.joins.say_waiting(waiting)

    def expire(self, now: float) -> None:
        """Close the connections whose handshake deadline has passed."""
        loop = self.loop
        for conn in [c for c in self.handshaking if now >= c.handshake_deadline]:
            if conn.mode:
                loop.fail(conn, ErrorCode.HANDSHAKE_TIMEOUT,
                          f"no valid hello within {self.config.handshake_timeout:g} seconds")
            else:  # nothing arrived (or, with TLS, the TLS handshake did not finish)
                awaiting = self._awaiting.get(conn)
                why = ("PROXY protocol header not finished" if awaiting is not None and awaiting.so_far else
                       "no PROXY protocol header (--proxy-protocol: connect through the load balancer)"
                       if awaiting is not None else
                       "TLS handshake not finished" if conn.tls_started else
                       "no TLS hello (a client without --tls waits for a banner)" if conn.tls else "sent nothing")
                if conn.refusal is not None:
                    why = f"refused ({conn.refusal[1]}) and {why}"
                log.info("%s: %s; closed at the handshake deadline", conn.label, why)
                loop.drop(conn, "disconnected")


class JoinLog:
    """Who joined the lobby, in the log: a line for each client still waiting at the next timer tick.

    A client paired within a tick of its arrival gets no line of its own:
    the "paired A with B" line names both, with their addresses, and one
    line per pair instead of three is most of what the default log level
    costs a busy listener. A client queued again after its partner left
    is no news. The listener calls :meth:`joined` as a client starts to
    wait and :meth:`say_waiting` at every tick and when it stops.
    """

    def __init__(self) -> None:
        # Client ids, not connections: one that leaves within the tick is freed at once.
        self._pending: list[int] = []

    def joined(self, conn: Conn, requeued: bool = False) -> None:
        if not requeued and log.isEnabledFor(logging.INFO):
            self._pending.append(conn.cid)

    def say_waiting(self, waiting: dict[int, Conn]) -> None:
        """A line for each client who joined since the last call and is still in ``waiting``."""
        pending, self._pending = self._pending, []
        for cid in pending:
            conn = waiting.get(cid)
            if conn is not None:
                log_joined(conn)


def log_joined(conn: Conn, requeued: bool = False) -> None:
    """The log line for a client who finished its handshake and waits in the lobby (see :class:`JoinLog`)."""
    if requeued:
        return
    log.info("%s: joined%s (%s mode)", conn.label, f" room {conn.room}" if conn.room else "",
             "frame" if conn.mode is Mode.FRAME else "line")
