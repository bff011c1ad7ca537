"""One connection before the load: what must hold for every client, checked once.

With ``--tls`` (or ``--fingerprint``) or ``--resume``, a bench of a
thousand pairs would otherwise fail two thousand times with the same reason.
:func:`probe_server` opens one connection the way ``chatpair client`` does
(:func:`chatpair.client.transport.open_socket`: the same TLS checks, the same
one-line errors naming ``host:port`` and what to try), reads the banner,
says HELLO in a room of its own, reads WELCOME, says BYE and closes. It
returns the WELCOME; a server that does not offer resume, a largest frame
smaller than ``--size`` or an ERROR is one :class:`ChatpairError`.
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
from chatpair.client.transport import open_socket, os_reason
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

    def _more(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ConnectError(f"{self.label} did not answer within {PROBE_TIMEOUT:g} s")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise ConnectError(f"{self.label} did not answer within {PROBE_TIMEOUT:g} s") from None
        except (OSError, ssl.SSLError) as err:
            reason = os_reason(err) if isinstance(err, OSError) else str(err)
            raise ConnectError(f"connection to {self.label} lost: {reason}") from None
        if not chunk:
            raise ConnectError(f"{self.label} closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_BANNER:
                break
            self._more()
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def frame(self) -> tuple[int, bytes]:
        while len(self.buf) < HEADER.size:
            self._more()
        length, ftype = HEADER.unpack_from(self.buf)
        while len(self.buf) < 4 + length:
            self._more()
        payload, self.buf = self.buf[HEADER.size:4 + length], self.buf[4 + length:]
        return ftype, payload


def _open(cfg: BenchConfig, host: str, port: int) -> socket.socket:
    """TCP (+TLS) as ``chatpair client`` connects; ``--insecure`` wraps without checks."""
    verified = cfg.tls and not cfg.insecure
    client_cfg = ClientConfig(name="benchprobe", host=host, port=port, tls=verified, cafile=cfg.cafile,
                              fingerprint=cfg.fingerprint, timeout=PROBE_TIMEOUT)
    sock = open_socket(client_cfg)
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
        banner = reader.line()
        if not banner.startswith(BANNER_PREFIX):
            hint = " (a TLS server? try --tls)" if not cfg.tls and banner[:1] == b"\x15" else ""
            raise ConnectError(f"{label} is not a chatpair server: it sent {banner[:60]!r}{hint}")
        hello: dict[str, Any] = {"version": 1, "name": "benchprobe", "room": "probe" + secrets.token_hex(6)}
        if cfg.resume:
            hello["resume"] = True
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


def _message(payload: bytes) -> str:
    try:
        obj = json.loads(payload)
        return str(obj.get("message") or obj.get("code"))
    except (ValueError, AttributeError):
        return repr(payload[:100])
