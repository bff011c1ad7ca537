"""What the client needs to reach a server, and every default of it, once.

:class:`ClientConfig` is built by the CLI from the command line with the
helpers here: :func:`resolve_target` for ``[HOST[:PORT]] [PORT]`` (or
``chatpair://HOST[:PORT]``) with ``--host``, ``--port`` and their
environment variables, :func:`default_name`, :func:`parse_fingerprint`.
Nothing here touches the network.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import unicodedata
from dataclasses import dataclass
from typing import TypeVar

from chatpair.errors import ConfigError
from chatpair.netutil import format_hostport, parse_hostport, parse_port
from chatpair.proto import DEFAULT_PORT, MAX_NAME

DEFAULT_HOST = "127.0.0.1"
#: Seconds for connect + TLS + banner + WELCOME, one deadline for all of it,
#: so a port that accepts and then says nothing (a TLS port, a tarpit) fails
#: in bounded time with a clear message.
DEFAULT_TIMEOUT = 10.0
#: A name when the login name has nothing a name may have.
FALLBACK_NAME = "guest"

_T = TypeVar("_T", str, int)


@dataclass(frozen=True)
class ClientConfig:
    """Everything needed to reach a server and say hello."""

    name: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    room: str | None = None
    tls: bool = False
    cafile: str | None = None
    #: SHA-256 of the server certificate (DER); when set, CA and hostname
    #: checks are skipped and only this pin counts (trust on first use).
    fingerprint: bytes | None = None
    timeout: float = DEFAULT_TIMEOUT
    #: Ask the server to keep the conversation over a dropped connection
    #: (PROTOCOL.md section 6); a server without it just ignores the ask.
    resume: bool = True
    #: The ``known_servers`` file for trust on first use (:mod:`chatpair.client.trust`);
    #: None: a certificate no CA vouches for is refused, as without the file.
    known_servers: str | None = None

    @property
    def label(self) -> str:
        """``host:port`` as people write it (IPv6 in brackets)."""
        return format_hostport(self.host, self.port)


#: The URL-ish form of an address: ``chatpair://HOST[:PORT]``.
SCHEME = "chatpair://"


def split_address(text: str) -> tuple[str | None, int | None]:
    """``HOST[:PORT]``, ``[V6][:PORT]``, a bare IPv6 address or ``chatpair://`` + any of them -> (host, port).

    A missing part is None. Another scheme, or a path, user or query after a
    ``chatpair://`` address, is a :class:`ConfigError`.
    """
    if text[:len(SCHEME)].lower() == SCHEME:
        rest = text[len(SCHEME):]
        rest = rest.removesuffix("/")
        if any(ch in rest for ch in "/?#@"):
            raise ConfigError(f"bad address {text!r}: expected chatpair://HOST[:PORT] and nothing more")
        return parse_hostport(rest)
    if "://" in text:
        raise ConfigError(f"bad address {text!r}: the only scheme is chatpair://")
    return parse_hostport(text)


def _split_host_option(host: str | None) -> tuple[str | None, int | None]:
    """``--host``: a host, or (like the positional) ``HOST:PORT``, ``[V6]:PORT``, ``chatpair://...``."""
    if not host:
        return None, None
    if host.startswith("[") or host.count(":") == 1 or "://" in host:
        return split_address(host)
    return host, None  # a host name, IPv4, or a bare IPv6 address


def resolve_target(target: str | None, host: str | None, port: int | None, port_arg: str | None = None,
                   *, env_host: str | None = None, env_port: int | None = None) -> tuple[str, int]:
    """Combine ``[HOST[:PORT]] [PORT]`` with ``--host``/``--port`` into (host, port).

    ``target`` may also be ``chatpair://HOST[:PORT]``; ``[::1]:7878`` and a
    bare ``::1`` are IPv6; ``--host HOST:PORT`` means the same as the
    positional ``HOST:PORT``, and ``HOST PORT`` (``port_arg``, as for
    ``nc``) the same as ``HOST:PORT``. Given twice with different values is a
    :class:`ConfigError` rather than a silent choice. ``env_host`` and
    ``env_port`` (from ``CHATPAIR_CLIENT_HOST``/``_PORT``) only fill in what
    the command line left out: the command line beats the environment.
    """
    o_host, o_host_port = _split_host_option(host)
    port = _agree("ports", o_host_port, "--host ...:", port, "--port ")
    t_host, t_port = split_address(target) if target else (None, None)
    if port_arg is not None:
        if not target:
            raise ConfigError("a PORT argument needs a HOST before it (or use --port)")
        arg_port = parse_port(port_arg.strip(), port_arg)
        if t_port is not None and t_port != arg_port:
            raise ConfigError(f"two different ports given: {target} and {port_arg}")
        t_port = arg_port
    final_host = _agree("hosts", t_host, "", o_host, "--host ")
    final_port = _agree("ports", t_port, "", port, "--port ")
    if final_host is None or final_port is None:
        e_host, e_host_port = _split_host_option(env_host)
        e_port = _agree("ports", e_host_port, "CHATPAIR_CLIENT_HOST=...:", env_port, "CHATPAIR_CLIENT_PORT=")
        final_host = final_host if final_host is not None else e_host
        final_port = final_port if final_port is not None else e_port
    return final_host or DEFAULT_HOST, DEFAULT_PORT if final_port is None else final_port


def _agree(what: str, first: _T | None, first_how: str, second: _T | None, second_how: str) -> _T | None:
    """The one value given (either may be None); two different ones are a ConfigError."""
    if first is not None and second is not None and first != second:
        raise ConfigError(f"two different {what} given: {first_how}{first} and {second_how}{second}")
    return first if first is not None else second


def make_valid_name(raw: str) -> str:
    """Drop characters a name may not have, truncate, fall back to ``guest``."""
    keep = [ch for ch in raw if ch in "_-." or unicodedata.category(ch)[0] == "L"
            or unicodedata.category(ch) == "Nd"]
    return "".join(keep)[:MAX_NAME] or FALLBACK_NAME


def default_name() -> str:
    """The login name made valid (``getpass.getuser()`` can fail in containers)."""
    try:
        raw = getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry: any error means "unknown"
        raw = ""
    return make_valid_name(raw)


def parse_fingerprint(text: str) -> bytes:
    """``SHA256:<hex>`` (colons allowed) or ``SHA256:<base64>`` -> 32 bytes."""
    body = text.strip()
    if body.upper().startswith("SHA256:"):
        body = body[7:]
    hexits = body.replace(":", "")
    if len(hexits) == 64:
        try:
            return bytes.fromhex(hexits)
        except ValueError:
            pass  # 64 characters that are not hex: maybe base64
    try:
        digest = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 32:
        raise ConfigError(
            f"bad fingerprint {text!r}: expected SHA256: and 64 hex digits (or SSH-style base64)"
        )
    return digest


def format_fingerprint(digest: bytes) -> str:
    """How a fingerprint is shown: ``SHA256:`` and 64 hex digits (the server prints the same)."""
    return "SHA256:" + digest.hex()
