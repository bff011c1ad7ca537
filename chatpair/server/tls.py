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

Python built without OpenSSL has no TLS; everything else works.
"""

from __future__ import annotations

import selectors
import socket
from typing import Any

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
