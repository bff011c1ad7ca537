"""Reaching a server: TCP, TLS (verified by CAs, or pinned like SSH), OS errors in words.

:func:`open_socket` turns every way a TCP connect or TLS handshake can fail
into one :class:`~chatpair.errors.ConnectError` whose message names
``host:port`` and, where it helps, what to try next (``--tls``, pinning the
fingerprint it saw). Plain ``--tls`` with a ``known_servers`` file is trust
on first use (:mod:`.trust`): a remembered server must show the same
certificate, an unknown one whose certificate no CA vouches for is asked
about in a terminal. What is said over the socket is
:mod:`chatpair.client.session`'s business.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import ssl

from chatpair.client.config import ClientConfig, format_fingerprint
from chatpair.client.trust import Ask, KnownServers, changed_message, unknown_message
from chatpair.errors import ConfigError, ConnectError

#: How long fetching a certificate just to show its fingerprint may take.
FINGERPRINT_PROBE_TIMEOUT = 5.0


def os_reason(err: OSError) -> str:
    """``connection refused`` rather than ``[Errno 111] Connection refused``."""
    if isinstance(err, TimeoutError):  # socket.timeout is the same class
        return "timed out"
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


def open_socket(config: ClientConfig, ask: Ask | None = None) -> socket.socket:
    """A connected TCP socket (TLS-wrapped with ``config.tls``), or ConnectError.

    ``ask``: how to ask a person about a certificate no CA vouches for (trust
    on first use, :mod:`.trust`); None (pipe mode) never asks.
    """
    sock = _tcp(config)
    try:
        if config.tls:
            return _wrap_tls(sock, config, ask)
    except TrustedNow as trusted:  # said yes: the certificate is pinned, on a fresh connection
        sock.close()
        return open_socket(dataclasses.replace(config, fingerprint=trusted.digest))
    except BaseException:
        sock.close()
        raise
    return sock


def _tcp(config: ClientConfig) -> socket.socket:
    label = config.label
    try:
        sock: socket.socket = socket.create_connection((config.host, config.port), timeout=config.timeout)
    except socket.gaierror as err:
        raise ConnectError(f"cannot connect to {label}: unknown host ({err.strerror})") from None
    except OSError as err:
        raise ConnectError(f"cannot connect to {label}: {os_reason(err)}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # chat lines are small and latency-bound
    except OSError:
        pass
    return sock


class TrustedNow(Exception):
    """Internal: the person trusted the certificate with this digest (connect again, pinned)."""

    def __init__(self, digest: bytes) -> None:
        super().__init__()
        self.digest = digest


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _tls_context(config: ClientConfig, pinned: bool) -> ssl.SSLContext:
    if pinned:
        # Pinning (like SSH): the certificate is trusted because its hash is
        # the one we were told, not because a CA signed it for this name.
        return _unverified_context()
    try:
        return ssl.create_default_context(cafile=config.cafile)
    except (OSError, ssl.SSLError) as err:
        reason = os_reason(err) if isinstance(err, OSError) else str(err)
        raise ConfigError(f"cannot load --cafile {config.cafile}: {reason}") from None


def _peer_fingerprint(config: ClientConfig) -> bytes | None:
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
    return hashlib.sha256(der).digest() if der else None


def _known(config: ClientConfig) -> KnownServers | None:
    """The known_servers file, when it counts: plain ``--tls`` (no ``--fingerprint``, no ``--cafile``)."""
    if config.known_servers is None or config.fingerprint is not None or config.cafile is not None:
        return None
    return KnownServers(config.known_servers)


def speaks_tls(config: ClientConfig, timeout: float = FINGERPRINT_PROBE_TIMEOUT) -> bool:
    """Does a TLS handshake with the server work? (Only to name a server that is not chatpair.)"""
    try:
        with socket.create_connection((config.host, config.port), timeout=min(timeout, config.timeout)) as raw:
            with _unverified_context().wrap_socket(raw, server_hostname=config.host):
                return True
    except (OSError, ssl.SSLError):
        return False


def _wrap_tls(sock: socket.socket, config: ClientConfig, ask: Ask | None) -> ssl.SSLSocket:
    """The TLS handshake, then whichever check applies: pin, known_servers, or CAs."""
    label = config.label
    store = _known(config)
    known = store.lookup(config.host, config.port) if store is not None else []
    pinned = config.fingerprint is not None or bool(known)
    ctx = _tls_context(config, pinned)
    try:
        tls = ctx.wrap_socket(sock, server_hostname=config.host)
    except ssl.SSLCertVerificationError as err:
        reason = err.verify_message or err.reason or str(err)
        seen = _peer_fingerprint(config)
        if store is not None and seen is not None:
            _first_use(store, config, reason, seen, ask)  # raises TrustedNow, or ConnectError
        hint = f"; its fingerprint is {format_fingerprint(seen)} (pin it with --fingerprint if you trust it)" \
            if seen else ""
        raise ConnectError(f"TLS certificate of {label} not trusted: {reason}{hint}") from None
    except ssl.SSLError as err:
        reason = err.reason or str(err)
        raise ConnectError(
            f"TLS handshake with {label} failed: {reason.lower().replace('_', ' ')} "
            "(is it a TLS server? try without --tls)"
        ) from None
    except OSError as err:
        raise ConnectError(f"TLS handshake with {label} failed: {os_reason(err)}") from None
    if pinned:
        der = tls.getpeercert(binary_form=True) or b""
        got = hashlib.sha256(der).digest()
        if config.fingerprint is not None and got != config.fingerprint:
            tls.close()
            raise ConnectError(
                f"TLS certificate of {label} does not match the pinned fingerprint: "
                f"expected {format_fingerprint(config.fingerprint)}, got {format_fingerprint(got)}"
            )
        if config.fingerprint is None and all(got != k.digest for k in known):
            tls.close()
            assert store is not None
            raise ConnectError(changed_message(label, store.path, known, got))
    return tls


def _first_use(store: KnownServers, config: ClientConfig, reason: str, seen: bytes, ask: Ask | None) -> None:
    """An unknown server whose certificate no CA vouches for: ask (a terminal), or say how to trust it."""
    label, fingerprint = config.label, format_fingerprint(seen)
    if ask is None:
        raise ConnectError(unknown_message(label, reason, fingerprint, store.path))
    if not ask(label, fingerprint, reason, store.path):
        raise ConnectError(f"TLS certificate of {label} not trusted (you said no); not connecting")
    store.add(config.host, config.port, seen)
    raise TrustedNow(seen)
