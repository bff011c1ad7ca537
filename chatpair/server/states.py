"""The named states of a client connection: its mode and its phase. Data only.

Every loop decides what to do with a readable or writable socket by these
two, so they are compared with ``is`` on the hot path (one pointer compare).

Mode - how the client speaks, fixed by its first byte (PROTOCOL.md section 2)::

    UNKNOWN --first byte 0x00--> FRAME
            --any other byte---> LINE

Phase - where the connection is in its life::

    PROXY_HEADER --header read, address admitted--> TLS_HANDSHAKE or HANDSHAKE
         |
         +--bad or no header, denied, refused in a flood--> CLOSING

    TLS_HANDSHAKE --TLS done--> HANDSHAKE --HELLO or name line--> CHATTING
          |                         |                                |
          +-------------------------+----------> CLOSING <-----------+

A resumable connection (PROTOCOL.md section 6) whose socket drops goes from
CHATTING to AWAY instead of ending: no socket, kept by the loop that owned
it; a RESUME brings it back to CHATTING on a new socket, and the end of the
resume window ends it like a disconnect.

A connection starts in TLS_HANDSHAKE if its socket is a TLS socket, else in
HANDSHAKE (:class:`~chatpair.server.conn.Conn` decides once, when it is
made) - except behind a load balancer (``--proxy-protocol``): there it
starts in PROXY_HEADER, nothing is sent to it, and only the bytes of
HAProxy's header are read; the real client address it names is what the
deny list and the limits judge, and then the connection goes on to TLS or
the banner as any other (:class:`~chatpair.server.reception.Reception`); one handed over from a relay worker starts in CHATTING. CHATTING
covers waiting for a partner and being paired: either way every frame or
line is read as a message or a command. CLOSING is the polite close (our
last bytes out, the client's side drained) and also the closed socket: no
loop reads a closing connection as a client again.
"""

from __future__ import annotations

import enum


class Mode(enum.IntEnum):
    """Frame mode (chatpair clients) or line mode (netcat, telnet).

    An ``IntEnum`` whose UNKNOWN is 0, so ``if conn.mode:`` reads "the mode is
    known" and :meth:`Conn.state` carries it across processes as a plain int.
    """

    UNKNOWN = 0
    FRAME = 1
    LINE = 2


class Phase(enum.Enum):
    """Where a connection is in its life (see the module docstring for the transitions)."""

    PROXY_HEADER = "proxy header"  # --proxy-protocol: reading HAProxy's header; nothing sent yet
    TLS_HANDSHAKE = "tls handshake"  # wants what ``Conn.tls_want`` says, nothing else
    HANDSHAKE = "handshake"  # banner sent; reading HELLO or the name line, with one deadline
    CHATTING = "chatting"  # past the handshake: waiting for a partner, or paired
    CLOSING = "closing"  # our side done; reading only to see the client close
    AWAY = "away"  # resumable session whose socket dropped: no socket, kept for the resume window
