"""One connection before the load: what must hold for every client, checked once.

Every run probes each target first: a bench of a thousand pairs aimed at
the wrong port, or at a TLS server without ``--tls``, would otherwise fail
two thousand times with the same reason, or wait for pairs that never come.
:func:`probe_server` opens one connection the way ``chatpair client`` does
(:func:`chatpair.client.transport.open_socket`: the same TLS checks, the same
one-line errors naming ``host:port`` and what to try), reads the banner -
a server silent for a second is spoken to first and named by what it answers,
as the client does (:mod:`chatpair.client.greeting`: "is an HTTP server, not
a chatpair server") - says HELLO in a room of its own, reads WELCOME, says
BYE and closes. It returns the WELCOME; a server that does not offer resume
(``--resume``), a largest frame smaller than ``--size`` or an ERROR is one
:class:`ChatpairError`.
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import time
from typing import Any

from chatpair.bench.config import BenchConfig
from chatpair.client.config import ClientConfig
from chatpair.client.greeting import silent, stranger
from chatpair.client.session import SPEAK_AFTER  # a silent server is spoken to first, as the client does
from chatpair.client.transport import open_socket, os_reason, speaks_tls
from chatpair.errors import ChatpairError, ConfigError, ConnectError
from chatpair.netutil import format_hostport
from chatpair.proto import BANNER_PREFIX, HEADER, MAX_BANNER, FrameType, encode_frame

#: Seconds for connect, TLS, banner and WELCOME together.
PROBE_TIMEOUT = 10.0


class _Reader:
    """Blocking reads with one deadline for the whole probe."""

    def __init__(self, sock: socket.socket, label: str, deadline: float) -> None:
        self.sock = sock
        self.label = label
        self.deadline = deadline
        self.buf = b""

    def read(self, until: float | None = None) -> bool | None:
        """Read more: True (data), False (closed), None (``until`` or the deadline passed, if ``until``
        was given; without it, the deadline passing is the error)."""
        end = self.deadline if until is None else min(until, self.deadline)
        left = end - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
        except TimeoutError:
            if until is not None:
                return None
            raise ConnectError(f"{self.label} did not answer within {PROBE_TIMEOUT:g} s") from None
        except (OSError, ssl.SSLError) as err:
            reason = os_reason(err) if isinstance(err, OSError) else str(err)
            raise ConnectError(f"connection to {self.label} lost: {reason}") from None
        self.buf += chunk
        return bool(chunk)

    def _more(self) -> None:
        if not self.read():
            raise ConnectError(f"{self.label} closed the connection")

    def frame(self) -> tuple[int, bytes]:
        while len(self.buf) < HEADER.size:
            self._more()
        length, ftype = HEADER.unpack_from(self.buf)
        while len(self.buf) < 4 + length:
            self._more()
        payload, self.buf = self.buf[HEADER.size:4 + length], self.buf[4 + length:]
        return ftype, payload


def _client_config(cfg: BenchConfig, host: str, port: int) -> ClientConfig:
    """How ``chatpair client`` would connect (``--insecure``: TCP only, :func:`_open` wraps it)."""
    return ClientConfig(name="benchprobe", host=host, port=port, tls=cfg.tls and not cfg.insecure,
                        cafile=cfg.cafile, fingerprint=cfg.fingerprint, timeout=PROBE_TIMEOUT)


def _open(cfg: BenchConfig, host: str, port: int) -> socket.socket:
    """TCP (+TLS) as ``chatpair client`` connects; ``--insecure`` wraps without checks."""
    sock = open_socket(_client_config(cfg, host, port))
    if cfg.tls and cfg.insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            sock = ctx.wrap_socket(sock, server_hostname=host)
        except (OSError, ssl.SSLError) as err:
            sock.close()
            raise ConnectError(f"TLS handshake with {format_hostport(host, port)} failed: {err} "
                               "(is it a TLS server? try without --tls)") from None
    return sock


def probe_server(cfg: BenchConfig, host: str, port: int) -> dict[str, Any]:
    """Connect once as the load will; return the server's WELCOME (see the module docstring)."""
    label = format_hostport(host, port)
    sock = _open(cfg, host, port)
    try:
        reader = _Reader(sock, label, time.monotonic() + PROBE_TIMEOUT)
        hello: dict[str, Any] = {"version": 1, "name": "benchprobe", "room": "probe" + secrets.token_hex(6)}
        if cfg.resume:
            hello["resume"] = True
        if not _banner(reader, json.dumps(hello).encode(), cfg, host, port):
            sock.sendall(encode_frame(FrameType.HELLO, json.dumps(hello).encode()))
        ftype, payload = reader.frame()
        if ftype == FrameType.ERROR:
            raise ChatpairError(f"{label} refused the bench: {_message(payload)}")
        if ftype != FrameType.WELCOME:
            raise ConnectError(f"{label} answered HELLO with frame type 0x{ftype:02x}, not WELCOME")
        try:
            welcome = json.loads(payload)
        except ValueError:
            raise ConnectError(f"{label} sent a WELCOME that is not JSON") from None
        try:
            sock.sendall(encode_frame(FrameType.BYE))
        except OSError:
            pass
    finally:
        sock.close()
    max_frame = welcome.get("max_frame")
    if isinstance(max_frame, int) and cfg.size + 1 > max_frame:
        raise ConfigError(f"--size {cfg.size} does not fit the server's largest frame ({max_frame} bytes): "
                          f"use --size {max_frame - 1} or less")
    if cfg.resume and not welcome.get("session"):
        raise ChatpairError(f"--resume: {label} does not offer resume (its WELCOME has no session); "
                            "run without --resume, or start the server with resume on")
    welcome.pop("session", None)  # a bearer secret: never in a report
    return welcome


def _banner(reader: _Reader, hello: bytes, cfg: BenchConfig, host: str, port: int) -> bool:
    """Read the banner line, or name what answered instead (one ConnectError); True: HELLO was sent early.

    A server silent for :data:`SPEAK_AFTER` is sent HELLO first, its JSON
    ending in CRLF: an HTTP server answers that with an error page, a TLS
    server with an alert or by closing, a slow chatpair server reads it
    after its banner (:mod:`chatpair.client.greeting`).
    """
    label, tls = reader.label, cfg.tls
    speak_at = time.monotonic() + SPEAK_AFTER
    spoke = False
    while b"\n" not in reader.buf and len(reader.buf) <= MAX_BANNER \
            and BANNER_PREFIX.startswith(reader.buf[:len(BANNER_PREFIX)]):
        got = reader.read(reader.deadline if spoke or reader.buf else speak_at)
        if got is False:
            break
        if got is None and time.monotonic() >= reader.deadline:
            if not reader.buf:
                raise ConnectError(silent(label, PROBE_TIMEOUT, spoke))
            break  # a line that never ended: named below by what it began with
        if got is None:  # silent so far: speak first, and see what answers
            spoke = True
            try:
                reader.sock.sendall(encode_frame(FrameType.HELLO, hello + b"\r\n"))
            except OSError:  # ssl.SSLError is one too
                break  # it closed on us: named below
    if not reader.buf.startswith(BANNER_PREFIX) or b"\n" not in reader.buf:
        first = reader.buf
        knows_tls = not first and spoke and not tls and speaks_tls(_client_config(cfg, host, port))
        raise ConnectError(stranger(label, first, tls=tls, speaks_tls=knows_tls))
    reader.buf = reader.buf.partition(b"\n")[2]
    return spoke


def _message(payload: bytes) -> str:
    try:
        obj = json.loads(payload)
        return str(obj.get("message") or obj.get("code"))
    except (ValueError, AttributeError):
        return repr(payload[:100])
