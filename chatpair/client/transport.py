"""Reaching a server: TCP, TLS (verified by CAs, or pinned like SSH), OS errors in words.

:func:`open_socket` turns every way a TCP connect or TLS handshake can fail
into one :class:`~chatpair.errors.ConnectError` whose message names
``host:port`` and, where it helps, what to try next (``--tls``, pinning the
fingerprint it saw). What is said over the socket is
:mod:`chatpair.client.session`'s business.
"""

from __future__ import annotations

import hashlib
import socket
import ssl

from chatpair.client.config import ClientConfig, format_fingerprint
from chatpair.errors import ConfigError, ConnectError

#: How long fetching a certificate just to show its fingerprint may take.
FINGERPRINT_PROBE_TIMEOUT = 5.0


def os_reason(err: OSError) -> str:
    """``connection refused`` rather than ``[Errno 111] Connection refused``."""
    if isinstance(err, TimeoutError):  # socket.timeout is the same class
        return "timed out"
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


def open_socket(config: ClientConfig) -> socket.socket:
    """A connected TCP socket (TLS-wrapped with ``config.tls``), or ConnectError."""
    label = config.label
    try:
        sock: socket.socket = socket.create_connection((config.host, config.port), timeout=config.timeout)
    except socket.gaierror as err:
        raise ConnectError(f"cannot connect to {label}: unknown host ({err.strerror})") from None
    except OSError as err:
        raise ConnectError(f"cannot connect to {label}: {os_reason(err)}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # chat lines are small and latency-bound
        if config.tls:
            sock = _wrap_tls(sock, config)
    except BaseException:
        sock.close()
        raise
    return sock


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _tls_context(config: ClientConfig) -> ssl.SSLContext:
    if config.fingerprint is not None:
        # Pinning (like SSH): the certificate is trusted because its hash is
        # the one we were told, not because a CA signed it for this name.
        return _unverified_context()
    try:
        return ssl.create_default_context(cafile=config.cafile)
    except (OSError, ssl.SSLError) as err:
        reason = os_reason(err) if isinstance(err, OSError) else str(err)
        raise ConfigError(f"cannot load --cafile {config.cafile}: {reason}") from None


def _peer_fingerprint(config: ClientConfig) -> str | None:
    """The server certificate's fingerprint, fetched without verification.

    Only used to make a verification error actionable ("if you trust it,
    pin it with --fingerprint ...").
    """
    ctx = _unverified_context()
    try:
        timeout = min(config.timeout, FINGERPRINT_PROBE_TIMEOUT)
        with socket.create_connection((config.host, config.port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=config.host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return format_fingerprint(hashlib.sha256(der).digest()) if der else None


def _wrap_tls(sock: socket.socket, config: ClientConfig) -> ssl.SSLSocket:
    label = config.label
    ctx = _tls_context(config)
    try:
        tls = ctx.wrap_socket(sock, server_hostname=config.host)
    except ssl.SSLCertVerificationError as err:
        reason = err.verify_message or err.reason or str(err)
        seen = _peer_fingerprint(config)
        hint = f"; its fingerprint is {seen} (pin it with --fingerprint if you trust it)" if seen else ""
        raise ConnectError(f"TLS certificate of {label} not trusted: {reason}{hint}") from None
    except ssl.SSLError as err:
        reason = err.reason or str(err)
        raise ConnectError(
            f"TLS handshake with {label} failed: {reason.lower().replace('_', ' ')} "
            "(is it a TLS server? try without --tls)"
        ) from None
    except OSError as err:
        raise ConnectError(f"TLS handshake with {label} failed: {os_reason(err)}") from None
    if config.fingerprint is not None:
        der = tls.getpeercert(binary_form=True) or b""
        got = hashlib.sha256(der).digest()
        if got != config.fingerprint:
            tls.close()
            raise ConnectError(
                f"TLS certificate of {label} does not match the pinned fingerprint: "
                f"expected {format_fingerprint(config.fingerprint)}, got {format_fingerprint(got)}"
            )
    return tls
