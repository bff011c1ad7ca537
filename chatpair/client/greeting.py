"""Naming what answered when it is not a chatpair server.

A chatpair server speaks first, at once (its banner). What else may be on
the other end, and what the user is told (one line, after ``host:port``):

=========================  ============================================================
it sent                    the line
=========================  ============================================================
``HTTP/...`` or HTML       ``is an HTTP server, not a chatpair server (it said: HTTP/1.0 400 ...)``
a TLS record (0x15/0x16)   ``speaks TLS: try --tls`` (not said with ``--tls`` on; also
                           when it closed at our HELLO and a TLS handshake works)
a chatpair ERROR frame     ``refused: <its message>`` (chatpair's TLS port: "use --tls")
anything else              ``is not a chatpair server (it said: SSH-2.0-OpenSSH_9.6)``
nothing, then closed       ``closed the connection before its banner: not a chatpair server``
nothing at all             ``sent no chatpair banner in time: not a chatpair server (...)``
=========================  ============================================================

HTTP and TLS servers say nothing until spoken to, so after a short silence
the client speaks first (:func:`~chatpair.proto.clientside.speak_first`):
its HELLO ends in CRLF, which an HTTP server takes for a request line and
answers with ``HTTP/1.x 400``; a TLS server answers our 0x00 with an alert or
closes; a slow chatpair server just reads the HELLO after its banner. What
was received is sanitized before it is shown.
"""

from __future__ import annotations

from chatpair.proto import HEADER, FrameType, ProtocolError, decode_json, sanitize

#: At most this much of what the server said is shown.
SHOWN = 60


def first_line(data: bytes) -> str:
    """The first line of ``data`` as safe text (controls made visible), at most SHOWN characters."""
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    text = sanitize(line.decode("utf-8", "replace"), False)
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


def _error_frame_message(data: bytes) -> str | None:
    """The message of a chatpair ERROR frame at the start of ``data`` (None: not one)."""
    if len(data) < HEADER.size:
        return None
    size, ftype = HEADER.unpack_from(data)
    if ftype != FrameType.ERROR:
        return None
    try:
        message = decode_json(data[HEADER.size:4 + size]).get("message")
    except ProtocolError:
        return None
    return sanitize(message, False) if isinstance(message, str) else None


def stranger(label: str, data: bytes, *, tls: bool, speaks_tls: bool = False) -> str:
    """The one line for a server whose first bytes (``data``) are not a chatpair banner.

    ``speaks_tls``: it closed without a word when spoken to, and a TLS
    handshake with it (:func:`~chatpair.client.transport.speaks_tls`) worked.
    """
    if not data:
        if speaks_tls and not tls:
            return f"{label} speaks TLS: try --tls"
        return f"{label} closed the connection before its banner: not a chatpair server"
    if data.startswith(b"HTTP/") or data[:15].lower().startswith((b"<!doctype html", b"<html")):
        kind = "an HTTPS" if tls else "an HTTP"
        return f"{label} is {kind} server, not a chatpair server (it said: {first_line(data)})"
    if not tls and len(data) >= 2 and data[0] in (0x15, 0x16) and data[1] == 0x03:
        return f"{label} speaks TLS: try --tls"
    message = _error_frame_message(data)
    if message is not None:
        return f"{label} refused: {message}"
    return f"{label} is not a chatpair server (it said: {first_line(data)})"


def silent(label: str, waited: float, spoke: bool) -> str:
    """The one line for a server that sent nothing at all before the deadline."""
    also = ", also when spoken to" if spoke else ""
    return (f"{label} sent no chatpair banner in time: not a chatpair server "
            f"(nothing in {waited:g} s{also}; a chatpair server greets at once)")
