"""TLS on a non-blocking server socket: the handshake one step at a time, and what it hides.

Two things make a TLS socket differ from a plain one inside a selector loop:

* the handshake runs without blocking, and may want the socket readable or
  writable before its next step (:func:`handshake_step`);
* a read can leave decrypted bytes inside the SSL object, where ``select()``
  cannot see them: after reading, the loop asks :func:`has_pending` and reads
  again if so.

Which of the two kinds a socket is gets decided once per connection
(:func:`is_tls`, when the :class:`~chatpair.server.conn.Conn` is made), so
the read path tests a boolean rather than the socket's class.

A client that speaks plaintext to the TLS port is told so at once instead
of at the handshake deadline: before the first handshake step the loop
peeks at the first byte (:func:`peek_first_byte`). A TLS client's first
byte is a handshake record (0x16); a chatpair frame-mode client's is 0x00
and a person's with netcat is what they typed. For those the socket drops
its TLS layer (:func:`plain_socket`, nothing of TLS was read or written)
and the loop answers in plaintext, as an ERROR frame or a ``* error:``
line, :data:`PLAINTEXT_MESSAGE`.

:class:`TlsMixin` is the loop's side: it drives a connection's handshake.
Python built without OpenSSL has no TLS; everything else works.
"""

from __future__ import annotations

import logging
import selectors
import socket
from typing import TYPE_CHECKING, Any

from chatpair.proto import ErrorCode
from chatpair.server.states import Mode, Phase

log = logging.getLogger("chatpair")

try:
    import ssl

    _SSL_WANT: tuple[type[BaseException], ...] = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
    _SSL_SOCKET: tuple[type, ...] = (ssl.SSLSocket,)
except ImportError:  # no OpenSSL: no TLS socket can exist
    ssl = None  # type: ignore[assignment]
    _SSL_WANT = ()
    _SSL_SOCKET = ()

#: "Try again later" from a non-blocking socket, plain or TLS.
WOULD_BLOCK: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError, *_SSL_WANT)
#: The first byte of every TLS connection: a handshake record (the ClientHello).
TLS_HANDSHAKE_RECORD = 0x16
#: What a plaintext client on the TLS port is told (its first byte decides frame or line).
PLAINTEXT_MESSAGE = "this server speaks TLS: use --tls"


def is_tls(sock: socket.socket | Any) -> bool:
    """Is this a TLS socket (decided once per connection, not per read)?"""
    return isinstance(sock, _SSL_SOCKET)


def handshake_step(sock: Any) -> int:
    """Drive a non-blocking server-side TLS handshake one step.

    Returns 0 once the handshake is complete, else the selector event
    (``EVENT_READ`` or ``EVENT_WRITE``) to wait for before the next step.
    A failed handshake raises ``OSError`` (``ssl.SSLError`` is one) or
    ``ValueError``.
    """
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return selectors.EVENT_READ
    except ssl.SSLWantWriteError:
        return selectors.EVENT_WRITE
    return 0


def has_pending(sock: Any) -> bool:
    """Decrypted bytes left in the SSL object, which ``select()`` will not report?"""
    pending = getattr(sock, "pending", None)
    return pending is not None and bool(pending())


def peek_first_byte(sock: Any) -> int | None:
    """The first byte a client sent, left unread; None if nothing has arrived yet (or end of stream).

    Only meaningful before the first TLS handshake step has read anything:
    peeks under the TLS layer, at the socket itself.
    """
    try:
        data = socket.socket.recv(sock, 1, socket.MSG_PEEK)
    except OSError:  # BlockingIOError included: nothing yet
        return None
    return data[0] if data else None


def plain_socket(sock: Any) -> socket.socket:
    """The same connection without its TLS layer (same descriptor: selector registrations hold)."""
    return socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())


def plaintext_on_tls(conn: Any) -> bool:
    """Before a TLS connection's handshake step: is its client speaking plaintext?

    Peeks at the first byte once (``conn.tls_started`` records that it was
    TLS). For plaintext, ``conn`` becomes a plain connection in the mode its
    first byte shows, in its handshake, ready for the loop to fail it with
    :data:`PLAINTEXT_MESSAGE`. False for TLS, and while nothing has arrived.
    """
    first = peek_first_byte(conn.sock)
    if first is None:
        return False
    if first == TLS_HANDSHAKE_RECORD:
        conn.tls_started = True
        return False
    conn.sock = plain_socket(conn.sock)
    conn.sock.setblocking(False)
    conn.tls = False
    conn.mode = Mode.FRAME if first == 0 else Mode.LINE
    conn.phase = Phase.HANDSHAKE
    return True


class TlsMixin:
    """For :class:`~chatpair.server.loop.ConnLoop`: a connection's TLS handshake, one step per event."""

    if TYPE_CHECKING:  # provided by ConnLoop
        def update_interest(self, conn: Any) -> None: ...
        def drop(self, conn: Any, reason: str) -> None: ...
        def fail(self, conn: Any, code: str | ErrorCode, message: str, reason: str = "error") -> None: ...

    def tls_step(self, conn: Any) -> None:
        """Drive the TLS handshake one step; when it is done, the handshake proper begins."""
        if not conn.tls_started and plaintext_on_tls(conn):  # told at once, in plaintext (see above)
            self.fail(conn, ErrorCode.BAD_HELLO, PLAINTEXT_MESSAGE)
            return
        try:
            want = handshake_step(conn.sock)
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            log.info("%s: TLS handshake failed: %s", conn.label, getattr(err, "reason", None) or err)
            self.drop(conn, "disconnected")
            return
        if want:
            conn.tls_want = want
            self.update_interest(conn)
            return
        conn.phase = Phase.HANDSHAKE
        self.update_interest(conn)
        self.on_tls_ready(conn)

    def on_tls_ready(self, conn: Any) -> None:
        """The TLS handshake finished (the listener sends the banner now)."""
