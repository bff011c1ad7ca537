"""The chatpair client library, and pipe (script) mode.

What lives here, top to bottom:

* :class:`ClientConfig` and helpers for the command line: ``HOST[:PORT]``
  parsing, the default name, TLS fingerprints;
* :func:`connect` - TCP (or TLS), the banner check, HELLO, WELCOME - which
  turns every way a connection can fail into one :class:`ChatpairError` with
  a message that names ``host:port``;
* :class:`Connection` - a handshaken frame-mode connection: ``receive()``
  returns events (frozen dataclasses), ``send_*`` sends frames, server PINGs
  are answered with PONG on the spot;
* :class:`Presenter` - sans-IO: events in, display lines out (``* paired
  with bob``, ``bob: hi``), every untrusted string sanitized. The pipe mode
  and the curses UI (:mod:`chatpair.tui`) both use it;
* :func:`run_pipe` - pipe/script mode: lines from stdin are messages or
  commands, held until paired, events go to stdout as text or JSON.

Nothing here imports click (the CLI does) or curses (the TUI does).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import collections
import datetime
import getpass
import hashlib
import json
import os
import queue
import selectors
import socket
import ssl
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from typing import IO, Any, Union

from chatpair.errors import ChatpairError, ConfigError, ConnectError, RefusedError
from chatpair.protocol import (
    BANNER_PREFIX,
    DEFAULT_MAX_FRAME,
    DEFAULT_PORT,
    MAX_BANNER,
    MAX_FRAME_CEILING,
    MAX_NAME,
    MAX_PING_PAYLOAD,
    NEED_DATA,
    EndOfStream,
    Frame,
    FrameDecoder,
    FrameType,
    LineCommand,
    ProtocolError,
    encode_frame,
    encode_hello,
    parse_client_line,
    sanitize,
    sanitize_name,
)

#: The frame types a server may send; anything else is ignored.
_SERVER_TYPES = frozenset({FrameType.MSG, FrameType.PING, FrameType.PONG, FrameType.WELCOME, FrameType.WAITING,
                           FrameType.PAIRED, FrameType.PEER_LEFT, FrameType.NOTICE, FrameType.ERROR})

DEFAULT_HOST = "127.0.0.1"
#: Seconds for connect + TLS + banner + WELCOME, one deadline for all of it,
#: so a port that accepts and then says nothing (a TLS port, a tarpit) fails
#: in bounded time with a clear message.
DEFAULT_TIMEOUT = 10.0
#: After BYE, how long to wait for the server to close before we do. The
#: server closes at once; this only bounds a dead or slow network.
BYE_DRAIN_TIMEOUT = 3.0
#: Stop reading stdin while this much is waiting to be sent: the server is
#: slowing us down (flood control), so reading more would only use memory.
OUTBOX_HIGH = 1 << 20
SEND_CHUNK = 1 << 18
#: A WELCOME announcing a ``max_frame`` below this (or one that is not an
#: integer up to MAX_FRAME_CEILING) comes from a broken server: no useful
#: message fits, so the client says so and leaves instead of guessing.
#: (chatpair's own server allows 1,024 at least.)
MIN_SERVER_MAX_FRAME = 64
#: PONGs are answered only while less than this waits to be sent. A server
#: that PINGs without reading our answers gets one coalesced PONG (for its
#: latest PING) once it reads again, so a PING flood never grows the outbox.
#: A PONG is not a message; the user's own messages are never held back.
PONG_ROOM = 4096
#: A server PINGs a few times a minute. Past this many frames a second that
#: carry nothing for the user (PINGs, PONGs we did not ask for, reserved
#: types; after a burst of as many), reading from the server pauses until
#: the rate is back under it, so a PING flood cannot pin a CPU. Frames the
#: user sees (MSG...) have no such budget: they are the work itself, and the
#: server's flow control paces them.
PING_RATE = 100.0
#: The longest read pause such a flood causes at a time (and so the most a
#: message queued behind it is delayed per 64 KiB read).
PING_PAUSE_MAX = 1.0

HELP_TEXT = (
    "commands: /next (leave your partner, find a new one), /quit (leave), "
    "/ping (round-trip time), /help (this text); start a message with // to send a leading /"
)


# --------------------------------------------------------------------------
# Configuration helpers
# --------------------------------------------------------------------------


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

    @property
    def label(self) -> str:
        """``host:port`` as people write it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(target: str | None, host: str | None, port: int | None) -> tuple[str, int]:
    """Combine ``[HOST[:PORT]]`` with ``--host``/``--port`` into (host, port).

    ``[::1]:7878`` and a bare ``::1`` are IPv6. Given twice with different
    values is a :class:`ConfigError` rather than a silent choice.
    """
    if host and (host.startswith("[") or host.count(":") == 1):
        # --host HOST:PORT means the same as the positional HOST:PORT
        host, host_port = parse_target(host, None, None)
        if port is not None and port != host_port:
            raise ConfigError(f"two different ports given: --host ...:{host_port} and --port {port}")
        port = host_port
    t_host: str | None = None
    t_port: int | None = None
    if target:
        if target.startswith("["):
            end = target.find("]")
            if end < 0:
                raise ConfigError(f"bad address {target!r}: missing ']'")
            t_host, rest = target[1:end], target[end + 1:]
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(f"bad address {target!r}")
                t_port = _parse_port(rest[1:], target)
        elif target.count(":") == 1:
            h, p = target.split(":")
            t_host, t_port = h or None, _parse_port(p, target)
        else:
            t_host = target  # a host name, IPv4, or a bare IPv6 address
    if t_host and host and t_host != host:
        raise ConfigError(f"two different hosts given: {t_host} and --host {host}")
    if t_port is not None and port is not None and t_port != port:
        raise ConfigError(f"two different ports given: {t_port} and --port {port}")
    final_port = t_port if t_port is not None else port if port is not None else DEFAULT_PORT
    return (t_host or host or DEFAULT_HOST), final_port


def _parse_port(text: str, target: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"bad port in {target!r}: a port is 1-65535")
    return int(text)


def make_valid_name(raw: str) -> str:
    """Drop characters a name may not have, truncate, fall back to ``guest``."""
    keep = [ch for ch in raw if ch in "_-." or unicodedata.category(ch)[0] == "L"
            or unicodedata.category(ch) == "Nd"]
    return "".join(keep)[:MAX_NAME] or "guest"


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
            pass
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
    return "SHA256:" + digest.hex()


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Welcome:
    server: str
    max_frame: int
    ping_interval: float
    idle_timeout: float
    banner: str


@dataclass(frozen=True)
class Waiting:
    room: str | None


@dataclass(frozen=True)
class Paired:
    peer: str
    room: str | None


@dataclass(frozen=True)
class Message:
    peer: str
    text: str


@dataclass(frozen=True)
class PeerLeft:
    peer: str
    reason: str


@dataclass(frozen=True)
class Notice:
    code: str
    message: str


@dataclass(frozen=True)
class ServerError:
    """ERROR from the server; the connection is closed right after it."""

    code: str
    message: str


@dataclass(frozen=True)
class Pong:
    """Answer to one of our PINGs: round-trip time in seconds."""

    rtt: float


@dataclass(frozen=True)
class Closed:
    """The connection ended without an ERROR (server gone, network lost)."""

    reason: str


Event = Union[Welcome, Waiting, Paired, Message, PeerLeft, Notice, ServerError, Pong, Closed]


# --------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------


def _os_reason(err: OSError) -> str:
    """``connection refused`` rather than ``[Errno 111] Connection refused``."""
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timed out"
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


def _tls_context(config: ClientConfig) -> ssl.SSLContext:
    if config.fingerprint is not None:
        # Pinning (like SSH): the certificate is trusted because its hash is
        # the one we were told, not because a CA signed it for this name.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=config.cafile)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"cannot load --cafile {config.cafile}: {_os_reason(err) if isinstance(err, OSError) else err}") from None


def _peer_fingerprint(config: ClientConfig) -> str | None:
    """The server certificate's fingerprint, fetched without verification.

    Only used to make a verification error actionable ("if you trust it,
    pin it with --fingerprint ...").
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((config.host, config.port), timeout=min(config.timeout, 5)) as raw:
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
        sock.close()
        reason = err.verify_message or err.reason or str(err)
        hint = ""
        seen = _peer_fingerprint(config)
        if seen:
            hint = f"; its fingerprint is {seen} (pin it with --fingerprint if you trust it)"
        raise ConnectError(f"TLS certificate of {label} not trusted: {reason}{hint}") from None
    except ssl.SSLError as err:
        sock.close()
        reason = err.reason or str(err)
        raise ConnectError(
            f"TLS handshake with {label} failed: {reason.lower().replace('_', ' ')} "
            "(is it a TLS server? try without --tls)"
        ) from None
    except (OSError, socket.timeout) as err:
        sock.close()
        raise ConnectError(f"TLS handshake with {label} failed: {_os_reason(err)}") from None
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


def _read_banner(sock: socket.socket, label: str, deadline: float, tls: bool) -> tuple[str, bytes]:
    """Read the banner line; return its text and any bytes read after it."""
    buf = b""
    while b"\n" not in buf:
        if len(buf) >= len(BANNER_PREFIX) and not buf.startswith(BANNER_PREFIX) or len(buf) > MAX_BANNER:
            raise ConnectError(f"{label} is not a chatpair server (it sent {buf[:40]!r})")
        left = deadline - time.monotonic()
        if left <= 0:
            hint = "" if tls else " (a TLS server? try --tls)"
            raise ConnectError(f"{label} sent no chatpair banner in time: not a chatpair server{hint}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(MAX_BANNER + 1)
        except socket.timeout:
            continue
        except ssl.SSLError as err:
            raise ConnectError(f"TLS error from {label}: {err.reason or err}") from None
        except OSError as err:
            raise ConnectError(f"connection to {label} failed: {_os_reason(err)}") from None
        if not chunk:
            if buf:
                raise ConnectError(f"{label} is not a chatpair server (it sent {buf[:40]!r})")
            raise ConnectError(f"{label} closed the connection before its banner: not a chatpair server?")
        buf += chunk
        if not BANNER_PREFIX.startswith(buf[: len(BANNER_PREFIX)]):
            raise ConnectError(f"{label} is not a chatpair server (it sent {buf[:40]!r})")
    line, rest = buf.split(b"\n", 1)
    if len(line) + 1 > MAX_BANNER:
        raise ConnectError(f"{label} is not a chatpair server (banner too long)")
    return line[len(BANNER_PREFIX):].decode("ascii", "replace").strip(), rest


def connect(config: ClientConfig) -> "Connection":
    """Open a connection and complete the handshake, or raise ChatpairError.

    Returns once WELCOME is in; frames that came with it (WAITING, PAIRED)
    are returned by the first :meth:`Connection.receive`.
    """
    label = config.label
    deadline = time.monotonic() + config.timeout
    try:
        sock: socket.socket = socket.create_connection((config.host, config.port), timeout=config.timeout)
    except socket.gaierror as err:
        raise ConnectError(f"cannot connect to {label}: unknown host ({err.strerror})") from None
    except OSError as err:
        raise ConnectError(f"cannot connect to {label}: {_os_reason(err)}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # chat lines are small and latency-bound
        if config.tls:
            sock = _wrap_tls(sock, config)
        banner, rest = _read_banner(sock, label, deadline, config.tls)
        conn = Connection(sock, config, banner, rest)
        conn.handshake(deadline)
        return conn
    except BaseException:
        sock.close()
        raise


# --------------------------------------------------------------------------
# A connection
# --------------------------------------------------------------------------


def split_message(text: str, max_bytes: int) -> list[str]:
    """Cut text into pieces of at most ``max_bytes`` UTF-8 bytes, at character boundaries.

    ``max_bytes`` must be at least 4 (one character may take 4 bytes):
    below that some text cannot be cut at all, and ValueError is raised
    rather than looping.
    """
    if max_bytes < 4:
        raise ValueError(f"cannot split text into pieces of {max_bytes} bytes: a character may take 4")
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return [text]
    pieces: list[str] = []
    start = 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # never cut inside a character
            end -= 1
        # start is at a character boundary and max_bytes >= 4, so end > start.
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    return pieces


class Connection:
    """A frame-mode connection after the banner. Blocking sends, event reads.

    Not thread-safe: one owner (the pipe loop or the TUI loop) calls
    everything. ``fileno()`` lets that owner wait on it with a selector; call
    :meth:`receive` when it is readable and :meth:`flush` when it is
    writable (while :attr:`wants_write`). Before waiting to read, the owner
    checks :meth:`read_pause`: a server flooding PINGs is read more slowly.
    """

    def __init__(self, sock: socket.socket, config: ClientConfig, banner: str, rest: bytes = b"") -> None:
        self.sock = sock
        self.config = config
        self.label = config.label
        self.banner = banner
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        if rest:
            self.decoder.feed(rest)
        self.max_frame = DEFAULT_MAX_FRAME
        self.peer: str | None = None
        self.welcome: Welcome | None = None
        self.closed = False
        self._pings: dict[bytes, float] = {}
        self._ping_seq = 0
        self._early: list[Event] = []
        #: Bytes not yet taken by the kernel. Sends never block (after the
        #: handshake): the owner keeps reading while the server slows us
        #: down, so two clients piping big inputs at each other cannot
        #: deadlock with both stuck in sendall. A send is tried at once only
        #: when the outbox was empty; otherwise the kernel said "full" and
        #: the owner flushes when the socket is writable (never a busy loop).
        self.outbox = bytearray()
        self._leaving = False
        #: The latest PING payload not answered yet because PONG_ROOM was
        #: used up (the server is not reading us): answered once it is.
        self._pong_owed: bytes | None = None
        self._flush_due = False
        #: Token bucket for frames that carry nothing for the user (PINGs,
        #: PONGs we did not ask for, reserved types).
        self._chatter_tokens = PING_RATE
        self._chatter_clock = time.monotonic()
        self._read_paused_until = 0.0
        #: Why a send failed where nobody could be told at once (a PONG).
        self._lost: str | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- handshake ---------------------------------------------------------

    def handshake(self, deadline: float) -> Welcome:
        """Send HELLO and wait for WELCOME (or ERROR -> RefusedError).

        Every frame that came with the WELCOME in the same read (WAITING,
        PAIRED, a NOTICE, even an ERROR or a broken frame) is kept, in
        order, for the first :meth:`receive`. A NOTICE before WELCOME is
        kept too; if the handshake then fails, the raised error carries the
        events seen so far in ``early`` so the caller can show them first.
        """
        self._send(encode_hello(self.config.name, self.config.room))
        events = self._drain()  # frames that arrived together with the banner
        while True:
            for i, ev in enumerate(events):
                if isinstance(ev, Welcome):
                    self._early += events[i:]
                    self.sock.setblocking(False)
                    return ev
                if isinstance(ev, ServerError):
                    raise self._failed(RefusedError(ev.code, f"{self.label} refused: {sanitize(ev.message, False)}"))
                if isinstance(ev, Closed):
                    raise self._failed(ConnectError(sanitize(ev.reason, False)))
                if not isinstance(ev, Notice):
                    raise self._failed(ConnectError(f"{self.label} is not a chatpair server (no WELCOME)"))
                self._early.append(ev)
            events = []
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._failed(ConnectError(f"{self.label} did not answer our hello in time"))
            pause = self.read_pause()
            if pause:  # a PING flood before WELCOME: read it slowly, within the deadline
                time.sleep(min(pause, left))
                continue
            self.sock.settimeout(left)
            try:
                data = self._recv()
            except socket.timeout:
                continue
            except ssl.SSLError as err:
                raise self._failed(ConnectError(f"TLS error from {self.label}: {err.reason or err}")) from None
            except OSError as err:
                raise self._failed(ConnectError(
                    f"connection to {self.label} lost during the handshake: {_os_reason(err)}")) from None
            events = self._decode(data)

    def _failed(self, err: ChatpairError) -> ChatpairError:
        err.early = list(self._early)  # type: ignore[attr-defined]
        return err

    # -- receiving ---------------------------------------------------------

    def receive(self) -> list[Event]:
        """Read what is there (blocks only until something arrives) -> events.

        A ``Closed`` or ``ServerError`` event is always the last one.
        """
        if self._early:
            early, self._early = self._early, []
            return early
        if self.closed:
            return [Closed(self._lost or f"connection to {self.label} closed")]
        return self._read_events()

    def read_pause(self, now: float | None = None) -> float:
        """Seconds to wait before reading again (0: read now).

        Non-zero only while the server sends more PINGs (and other frames
        with nothing for the user) than PING_RATE a second: the owner stops
        watching for readability meanwhile, so a flood costs little CPU.
        """
        if now is None:
            now = time.monotonic()
        return max(0.0, self._read_paused_until - now)

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        # TLS may hold decrypted bytes the selector cannot see: take them now.
        while data and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            data += self.sock.recv(self.sock.pending())
        return data

    def _read_events(self) -> list[Event]:
        try:
            data = self._recv()
        except (ssl.SSLWantReadError, BlockingIOError):
            return []
        except socket.timeout:
            self.closed = True
            return [Closed(f"{self.label} stopped answering")]
        except OSError as err:
            self.closed = True
            return [Closed(f"connection to {self.label} lost: {_os_reason(err)}")]
        return self._decode(data)

    def _decode(self, data: bytes) -> list[Event]:
        self.decoder.feed(data)
        return self._drain()

    def _drain(self) -> list[Event]:
        """Every event buffered, in order; stops after the first ERROR or end."""
        events: list[Event] = []
        while True:
            try:
                item = self.decoder.next_event()
            except ProtocolError as err:
                self.closed = True
                events.append(Closed(self._broken(err)))
                break
            if item is NEED_DATA:
                break
            if isinstance(item, EndOfStream):
                self.closed = True
                during = "" if self.welcome is not None else " during the handshake"
                events.append(Closed(f"{self.label} closed the connection{during}"))
                break
            assert isinstance(item, Frame)
            ev = self._on_frame(item)
            if ev is not None:
                events.append(ev)
                if isinstance(ev, (ServerError, Closed)):
                    self.closed = True
                    break
        if self._flush_due:  # PONGs of this read: one send for all of them
            self._flush_due = False
            self.flush(quiet=True)
            if self._lost and not (events and isinstance(events[-1], (ServerError, Closed))):
                events.append(Closed(self._lost))
        return events

    def _broken(self, err: ProtocolError) -> str:
        """The one line for a server that broke the framing."""
        if err.code == "frame_too_large":
            size = int.from_bytes(self.decoder.buffered[:4], "big")
            if self.welcome is not None:
                return (f"{self.label} sent a frame of {size:,} bytes, over its own limit of "
                        f"{self.max_frame:,} (a broken server?)")
            return (f"{self.label} sent a frame of {size:,} bytes before its WELCOME, over the limit of "
                    f"{self.decoder.max_frame:,}: not a working chatpair server")
        return f"{self.label} broke the protocol: {err.message}"

    def _chatter(self) -> None:
        """Count one frame that carries nothing for the user; pause reading past the budget."""
        now = time.monotonic()
        tokens = min(PING_RATE, self._chatter_tokens + (now - self._chatter_clock) * PING_RATE) - 1
        self._chatter_clock = now
        self._chatter_tokens = max(tokens, -PING_RATE * PING_PAUSE_MAX)
        if tokens < 0:
            self._read_paused_until = now - self._chatter_tokens / PING_RATE

    def _on_frame(self, frame: Frame) -> Event | None:
        t = frame.type
        if t == FrameType.MSG:
            return Message(self.peer or "?", frame.payload.decode("utf-8", "replace"))
        if t == FrameType.PING:
            self._chatter()
            if not self._leaving:  # after BYE our side is shut for writing
                self._pong(frame.payload[:MAX_PING_PAYLOAD])
            return None
        if t == FrameType.PONG:
            sent = self._pings.pop(frame.payload, None)
            if sent is None:
                self._chatter()
                return None
            return Pong(time.monotonic() - sent)
        if t not in _SERVER_TYPES:
            self._chatter()
            return None  # reserved or unknown types: ignored, for forward compatibility
        try:
            obj = frame.json()
        except ProtocolError:
            obj = {}
        return self._on_control(t, obj)

    def _pong(self, payload: bytes) -> None:
        """Answer a PING, unless the server is not reading what we already sent."""
        if len(self.outbox) >= PONG_ROOM:
            self._pong_owed = payload  # only the latest one is answered, later
            return
        if not self.outbox:
            self._flush_due = True
        self.outbox += encode_frame(FrameType.PONG, payload)

    def _on_control(self, t: int, obj: dict[str, Any]) -> Event | None:
        def s(key: str, default: str = "") -> str:
            value = obj.get(key, default)
            return value if isinstance(value, str) else str(value)

        def room() -> str | None:
            value = obj.get("room")
            return value if isinstance(value, str) else None

        if t == FrameType.WELCOME:
            if self.welcome is not None:
                self._chatter()
                return None  # one WELCOME per connection: a second one changes nothing
            max_frame = obj.get("max_frame")
            if type(max_frame) is not int or not MIN_SERVER_MAX_FRAME <= max_frame <= MAX_FRAME_CEILING:
                shown = sanitize(repr(max_frame)[:40], False) if "max_frame" in obj else "missing"
                return Closed(f"{self.label} sent a WELCOME with max_frame {shown}; a working server announces "
                              f"a whole number from {MIN_SERVER_MAX_FRAME} to {MAX_FRAME_CEILING:,} "
                              "(a broken server?)")
            self.max_frame = max_frame
            # What we accept: the server's limit, but never less than the
            # default (a server with a small limit may still send longer
            # control frames, e.g. an ERROR message).
            self.decoder.max_frame = max(max_frame, DEFAULT_MAX_FRAME)
            self.welcome = Welcome(s("server"), self.max_frame, _num(obj.get("ping_interval")),
                                   _num(obj.get("idle_timeout")), self.banner)
            return self.welcome
        if t == FrameType.WAITING:
            self.peer = None
            return Waiting(room())
        if t == FrameType.PAIRED:
            self.peer = s("peer", "?")
            return Paired(self.peer, room())
        if t == FrameType.PEER_LEFT:
            self.peer = None
            return PeerLeft(s("peer", "?"), s("reason", "disconnected"))
        if t == FrameType.NOTICE:
            return Notice(s("code"), s("message"))
        if t == FrameType.ERROR:
            return ServerError(s("code"), s("message", "error"))
        return None

    # -- sending -----------------------------------------------------------

    def _send(self, data: bytes, quiet: bool = False) -> None:
        idle = not self.outbox
        self.outbox += data
        if idle:
            self.flush(quiet)

    @property
    def wants_write(self) -> bool:
        """True while bytes wait for the socket to become writable."""
        return bool(self.outbox) and not self.closed

    def flush(self, quiet: bool = False) -> None:
        """Send what the kernel takes now; the rest waits for writability."""
        while self.outbox and not self.closed:
            try:
                with memoryview(self.outbox) as view, view[:SEND_CHUNK] as chunk:
                    n = self.sock.send(chunk)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            except (OSError, ssl.SSLError) as err:
                self.closed = True
                self.outbox.clear()
                reason = _os_reason(err) if isinstance(err, OSError) else str(err)
                self._lost = f"connection to {self.label} lost: {reason}"
                if quiet:
                    return  # the next receive() reports the loss
                raise ConnectError(self._lost) from None
            del self.outbox[:n]
            if self._pong_owed is not None and len(self.outbox) < PONG_ROOM:
                self.outbox += encode_frame(FrameType.PONG, self._pong_owed)
                self._pong_owed = None

    def send_msg(self, text: str) -> None:
        """Send text as MSG frames (split if longer than the server's limit)."""
        if not text:
            return
        for piece in split_message(text, self.max_frame - 1):
            self._send(encode_frame(FrameType.MSG, piece.encode("utf-8")))

    def send_next(self) -> None:
        self.peer = None
        self._send(encode_frame(FrameType.NEXT))

    def send_ping(self) -> None:
        """PING with a token; the matching PONG becomes a :class:`Pong` event."""
        self._ping_seq += 1
        token = self._ping_seq.to_bytes(8, "big")
        self._pings[token] = time.monotonic()
        if len(self._pings) > 16:  # unanswered pings: keep only the recent ones
            self._pings.pop(next(iter(self._pings)))
        self._send(encode_frame(FrameType.PING, token))

    def bye(self) -> list[Event]:
        """Send BYE, let the server close first, then close. Never raises.

        Closing while the server's frames sit unread in our buffer would make
        the kernel send RST, which can destroy messages we just sent; so we
        half-close and read until the server's close. What arrives meanwhile
        was delivered to us, so it is returned (pipe mode prints it).
        """
        events: list[Event] = []
        if self.closed:
            self.close()
            return events
        self._leaving = True
        try:
            self.outbox += encode_frame(FrameType.BYE)
            self.sock.settimeout(BYE_DRAIN_TIMEOUT)
            self.sock.sendall(bytes(self.outbox))
            self.outbox.clear()
            if not isinstance(self.sock, ssl.SSLSocket):
                self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + BYE_DRAIN_TIMEOUT
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.sock.recv(65536)
                events += [ev for ev in self._decode(data) if not isinstance(ev, Closed)]
                if not data or self.closed:
                    break
        except (OSError, ssl.SSLError):
            pass
        self.close()
        return events

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def _num(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


# --------------------------------------------------------------------------
# Presenting events (shared by pipe mode and the TUI)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One line to show. ``kind``: notice, message (partner), self, error."""

    kind: str
    text: str
    name: str = ""

    def plain(self) -> str:
        if self.kind in ("message", "self"):
            return f"{self.name}: {self.text}"
        return f"* {self.text}"


_LEFT_REASONS = {"bye": "bye", "next": "next", "disconnected": "disconnected",
                 "timeout": "timed out", "error": "protocol error"}


@dataclass
class Presenter:
    """Turns events into :class:`Line` s; remembers who the partner is.

    Every string that came from the network goes through ``sanitize`` here,
    in one place, so no partner or server can put an escape sequence on
    somebody's terminal.
    """

    me: str
    peer: str | None = None
    paired: bool = False
    _quiet_waiting: bool = field(default=False, repr=False)

    def lines(self, ev: Event) -> list[Line]:
        if isinstance(ev, Welcome):
            return []
        if isinstance(ev, Waiting):
            self.paired, self.peer = False, None
            if self._quiet_waiting:  # already said in the PEER_LEFT or /next line
                self._quiet_waiting = False
                return []
            where = f" in room {sanitize_name(ev.room)}" if ev.room else ""
            return [Line("notice", f"waiting for a partner{where}")]
        if isinstance(ev, Paired):
            self.paired, self.peer = True, sanitize_name(ev.peer)
            return [Line("notice", f"paired with {self.peer}")]
        if isinstance(ev, Message):
            name = sanitize_name(ev.peer)
            return [Line("message", part, name) for part in sanitize(ev.text).split("\n")]
        if isinstance(ev, PeerLeft):
            self.paired, self.peer = False, None
            self._quiet_waiting = True
            reason = _LEFT_REASONS.get(ev.reason, sanitize_name(ev.reason))
            return [Line("notice", f"{sanitize_name(ev.peer)} left ({reason}); waiting for a partner")]
        if isinstance(ev, Notice):
            return [Line("notice", sanitize(ev.message, False))]
        if isinstance(ev, ServerError):
            self.paired, self.peer = False, None
            return [Line("error", f"error: {sanitize(ev.message, False)}")]
        if isinstance(ev, Pong):
            return [Line("notice", f"round trip {format_rtt(ev.rtt)}")]
        if isinstance(ev, Closed):
            self.paired, self.peer = False, None
            return [Line("error", sanitize(ev.reason, False))]
        return []

    def left_by_us(self) -> list[Line]:
        """After /next: the server answers WAITING, which this line already covers."""
        who = self.peer or "your partner"
        self.paired, self.peer = False, None
        self._quiet_waiting = True
        return [Line("notice", f"you left {who}; waiting for a partner")]

    def own(self, text: str) -> list[Line]:
        return [Line("self", part, self.me) for part in text.split("\n")]


def format_rtt(rtt: float) -> str:
    ms = rtt * 1000
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def event_json(ev: Event) -> dict[str, Any]:
    """The ``--json`` form of an event: ``{"event": name, ...fields}``.

    Text is not sanitized here (bots want the real text); json.dumps with
    ensure_ascii escapes every control character, so stdout stays safe.
    """
    if isinstance(ev, Welcome):
        return {"event": "welcome", "server": ev.server, "banner": ev.banner, "max_frame": ev.max_frame}
    if isinstance(ev, Waiting):
        return {"event": "waiting", "room": ev.room}
    if isinstance(ev, Paired):
        return {"event": "paired", "peer": ev.peer, "room": ev.room}
    if isinstance(ev, Message):
        return {"event": "message", "from": ev.peer, "text": ev.text}
    if isinstance(ev, PeerLeft):
        return {"event": "peer_left", "peer": ev.peer, "reason": ev.reason}
    if isinstance(ev, Notice):
        return {"event": "notice", "code": ev.code, "message": ev.message}
    if isinstance(ev, ServerError):
        return {"event": "error", "code": ev.code, "message": ev.message}
    if isinstance(ev, Pong):
        return {"event": "pong", "rtt_ms": round(ev.rtt * 1000, 3)}
    if isinstance(ev, Closed):
        return {"event": "closed", "reason": ev.reason}
    return {"event": "unknown"}


class Transcript:
    """``--log FILE``: every shown line with a timestamp, sanitized, appended."""

    def __init__(self, path: str | None) -> None:
        self.fh: IO[str] | None = None
        if path:
            try:
                self.fh = open(path, "a", encoding="utf-8", buffering=1)
            except OSError as err:
                raise ConfigError(f"cannot open log file {path}: {_os_reason(err)}") from None

    def write(self, line: Line) -> None:
        if self.fh is None:
            return
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.fh.write(f"{stamp} {line.plain()}\n")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


# --------------------------------------------------------------------------
# Typed lines: messages and commands
# --------------------------------------------------------------------------


#: What one typed line means (``kind``: msg, next, quit, help, ping, unknown, empty).
Input = LineCommand

COMMANDS = ("next", "quit", "help", "ping")


def parse_input(line: str) -> Input:
    """``/next`` etc. are commands, ``//x`` sends ``/x``, anything else is a message."""
    return parse_client_line(line, COMMANDS)


# --------------------------------------------------------------------------
# Pipe (script) mode
# --------------------------------------------------------------------------


class LineReader:
    """Non-blocking-friendly line splitter for a byte stream (stdin).

    Bytes that are not UTF-8 become U+FFFD; a ``\\r`` before ``\\n`` is dropped.
    """

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""

    def feed(self, data: bytes) -> list[str]:
        """Complete lines in ``data``; ``b""`` (EOF) flushes a last unterminated line."""
        text = self._partial + self._dec.decode(data, final=not data)
        parts = text.split("\n")
        self._partial = parts.pop()
        if not data and self._partial:
            parts.append(self._partial)
            self._partial = ""
        return [p[:-1] if p.endswith("\r") else p for p in parts]


class StdinSource:
    """Lines from a file descriptor, waited on with a selector.

    POSIX ``select`` works for terminals, pipes, sockets and regular files.
    Where it does not (Windows consoles and pipes), a reader thread owned by
    this object feeds a queue and wakes the selector through a socketpair;
    :meth:`close` stops waiting for it and joins it if it has finished (a
    thread blocked in a console read cannot be interrupted: it ends at the
    next line or at exit).
    """

    def __init__(self, fd: int, sel: selectors.BaseSelector) -> None:
        self.fd = fd
        self.sel = sel
        self.reader = LineReader()
        self.eof = False
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[bytes] = queue.Queue()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._registered = False
        try:
            sel.register(fd, selectors.EVENT_READ, self)
            self._registered = True
        except (OSError, ValueError):
            self._start_thread()

    def set_paused(self, paused: bool) -> None:
        """Stop (or resume) reading while the connection cannot take more."""
        if self._thread is not None or self.eof or paused != self._registered:
            return
        if paused:
            self.sel.unregister(self.fd)
        else:
            self.sel.register(self.fd, selectors.EVENT_READ, self)
        self._registered = not paused

    def _start_thread(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self)
        self._thread = threading.Thread(target=self._pump, name="chatpair-stdin", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                data = b""
            self._queue.put(data)
            try:
                assert self._wake_w is not None
                self._wake_w.send(b"x")
            except OSError:
                return
            if not data:
                return

    def read_lines(self) -> list[str]:
        """Call when the selector says readable; sets ``eof`` at end of input."""
        if self._thread is None:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return []
            except OSError:
                data = b""
            chunks = [data]
        else:
            assert self._wake_r is not None
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
            chunks = []
            while not self._queue.empty():
                chunks.append(self._queue.get_nowait())
        lines: list[str] = []
        for data in chunks:
            lines += self.reader.feed(data)
            if not data:
                self._at_eof()
                break
        return lines

    def _at_eof(self) -> None:
        self.eof = True
        self._unregister()

    def _unregister(self) -> None:
        self._registered = False
        for obj in (self.fd, self._wake_r):
            if obj is None:
                continue
            try:
                self.sel.unregister(obj)
            except (KeyError, ValueError, OSError):
                pass

    def close(self) -> None:
        self._unregister()
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        if self._thread is not None:
            self._thread.join(timeout=0.1)


class SocketWatch:
    """What a selector watches a connection for, changed only when it changes.

    A mask of 0 (reading paused, nothing to write) unregisters the socket:
    selectors refuse an empty mask, and watching for readability while not
    reading would make ``select`` return at once, again and again.
    """

    def __init__(self, conn: Connection, data: Any = None) -> None:
        self.conn = conn
        self.data = conn if data is None else data
        self.mask = 0

    def set(self, sel: selectors.BaseSelector, mask: int) -> None:
        if mask == self.mask:
            return
        if not mask:
            sel.unregister(self.conn.sock)
        elif not self.mask:
            sel.register(self.conn.sock, mask, self.data)
        else:
            sel.modify(self.conn.sock, mask, self.data)
        self.mask = mask

    def clear(self, sel: selectors.BaseSelector) -> None:
        """Stop watching (before the socket is closed)."""
        if self.mask:
            try:
                sel.unregister(self.conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        self.mask = 0


def _new_selector() -> selectors.BaseSelector:
    # select() handles regular files (always readable) where epoll refuses them,
    # and we only ever watch two or three descriptors.
    return selectors.SelectSelector()


class PipeClient:
    """Pipe/script mode: stdin lines in, events out on stdout.

    Lines (and commands) are kept in order in ``pending``. A message waits
    at the head of the queue until we are paired, so ``printf 'hi\\n' |
    chatpair client`` delivers ``hi`` once a partner arrives. End of input
    becomes a final /quit in the same queue: BYE goes out only after every
    held line was sent. If nothing is held, end of input quits at once.
    """

    def __init__(self, conn: Connection, out: IO[bytes], json_mode: bool = False,
                 transcript: Transcript | None = None, stdin_fd: int = 0) -> None:
        self.conn = conn
        self.out = out
        self.json_mode = json_mode
        self.transcript = transcript or Transcript(None)
        self.stdin_fd = stdin_fd
        self.presenter = Presenter(conn.config.name)
        self.pending: collections.deque[Input] = collections.deque()
        self.done = False
        #: A /ping holds the queue until its PONG: a script's "/ping" then
        #: end of input should print the round trip before leaving.
        self.awaiting_pong = False

    # -- output --------------------------------------------------------------

    def emit_lines(self, lines: list[Line]) -> None:
        for line in lines:
            self.transcript.write(line)
            if not self.json_mode and line.kind != "self":
                self._write(line.plain())

    def emit_json(self, obj: dict[str, Any]) -> None:
        if self.json_mode:
            self._write(json.dumps(obj, ensure_ascii=True))

    def _write(self, text: str) -> None:
        self.out.write(text.encode("utf-8", "replace") + b"\n")
        self.out.flush()

    # -- input ---------------------------------------------------------------

    def take_line(self, line: str) -> None:
        cmd = parse_input(line)
        if cmd.kind == "empty":
            return
        if cmd.kind == "unknown":
            self.say(f"unknown command {cmd.text}; {HELP_TEXT}", code="unknown_command")
            return
        if cmd.kind == "help":
            self.say(HELP_TEXT, code="help")
            return
        self.pending.append(cmd)

    def say(self, text: str, code: str = "info") -> None:
        self.emit_lines([Line("notice", text)])
        self.emit_json({"event": "notice", "code": code, "message": text, "local": True})

    def flush_pending(self) -> None:
        """Send queued inputs in order, stopping at a message while unpaired."""
        while self.pending and not self.done and not self.awaiting_pong:
            cmd = self.pending[0]
            if cmd.kind == "msg" and not self.presenter.paired:
                return
            self.pending.popleft()
            if cmd.kind == "msg":
                self.conn.send_msg(cmd.text)
                self.emit_lines(self.presenter.own(cmd.text))
                self.emit_json({"event": "sent", "text": cmd.text})
            elif cmd.kind == "next":
                self.conn.send_next()
                self.emit_lines(self.presenter.left_by_us())
                self.emit_json({"event": "next"})
            elif cmd.kind == "ping":
                self.conn.send_ping()
                self.awaiting_pong = True
            elif cmd.kind == "quit":
                self.done = True

    # -- events --------------------------------------------------------------

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, Pong):
            self.awaiting_pong = False
        self.emit_json(event_json(ev))
        self.emit_lines(self.presenter.lines(ev))
        if isinstance(ev, ServerError):
            raise RefusedError(ev.code, f"{self.conn.label}: {sanitize(ev.message, False)}")
        if isinstance(ev, Closed):
            raise ConnectError(sanitize(ev.reason, False))

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        sel = _new_selector()
        stdin = StdinSource(self.stdin_fd, sel)
        watch = SocketWatch(self.conn)
        try:
            for ev in self.conn.receive():  # WELCOME (and maybe more) from the handshake
                self.on_event(ev)
            while True:
                self.flush_pending()
                if self.done and not self.conn.wants_write:
                    break  # everything held was sent (or at least handed to the kernel)
                pause = self.conn.read_pause()
                watch.set(sel, (0 if pause else selectors.EVENT_READ)
                          | (selectors.EVENT_WRITE if self.conn.wants_write else 0))
                stdin.set_paused(self.done or len(self.conn.outbox) > OUTBOX_HIGH)
                for key, mask in sel.select(pause or None):
                    if key.data is self.conn:
                        if mask & selectors.EVENT_WRITE:
                            self.conn.flush()
                        if mask & selectors.EVENT_READ:
                            for ev in self.conn.receive():
                                self.on_event(ev)
                    else:
                        for line in stdin.read_lines():
                            self.take_line(line)
                        if stdin.eof:
                            self.pending.append(Input("quit"))
            for ev in self.conn.bye():  # what the server sent before it saw our BYE
                self.emit_json(event_json(ev))
                self.emit_lines(self.presenter.lines(ev))
                if isinstance(ev, ServerError):  # refused (room full...) as we were leaving
                    raise RefusedError(ev.code, f"{self.conn.label}: {sanitize(ev.message, False)}")
            self.emit_json({"event": "bye"})
            return 0
        except KeyboardInterrupt:
            self.conn.bye()  # Ctrl-C still says goodbye, so the partner sees "left (bye)"
            return 130
        finally:
            stdin.close()
            sel.close()
            self.conn.close()


def run_pipe(config: ClientConfig, json_mode: bool = False, log_path: str | None = None,
             stdin_fd: int = 0, out: IO[bytes] | None = None) -> int:
    """Connect and run pipe mode; returns the exit code (errors raise ChatpairError)."""
    transcript = Transcript(log_path)
    out = out or sys.stdout.buffer
    try:
        try:
            conn = connect(config)
        except ChatpairError as err:
            show_early(err, out, config.name, json_mode, transcript)
            raise
        client = PipeClient(conn, out, json_mode, transcript, stdin_fd)
        return client.run()
    finally:
        transcript.close()


def show_early(err: ChatpairError, out: IO[bytes], name: str, json_mode: bool = False,
               transcript: Transcript | None = None) -> None:
    """Print what the server said before a failed handshake (a NOTICE), in order.

    The error itself stays the one line on stderr the caller prints.
    """
    presenter = Presenter(name)
    for ev in getattr(err, "early", ()):
        if json_mode:
            out.write(json.dumps(event_json(ev), ensure_ascii=True).encode() + b"\n")
        for line in presenter.lines(ev):
            if transcript is not None:
                transcript.write(line)
            if not json_mode:
                out.write(line.plain().encode("utf-8", "replace") + b"\n")
    out.flush()


def run_client(config: ClientConfig, *, json_mode: bool = False, log_path: str | None = None,
               color: bool | None = None, reconnect: bool = True, interactive: bool | None = None) -> int:
    """Entry point for ``chatpair client``: pick the curses UI or pipe mode."""
    if interactive is None:
        interactive = is_interactive()
    if interactive and not json_mode:
        from chatpair import tui

        if tui.available():
            return tui.run_tui(config, log_path=log_path, color=color, reconnect=reconnect)
    return run_pipe(config, json_mode=json_mode, log_path=log_path)


def is_interactive() -> bool:
    """Both ends are terminals and the terminal can do more than print lines."""
    try:
        ttys = os.isatty(sys.stdin.fileno()) and os.isatty(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return ttys and os.environ.get("TERM", "") not in ("", "dumb")


__all__ = [
    "ClientConfig", "Connection", "connect", "run_client", "run_pipe", "Presenter", "Line",
    "parse_target", "default_name", "parse_fingerprint", "parse_input", "split_message",
    "Welcome", "Waiting", "Paired", "Message", "PeerLeft", "Notice", "ServerError", "Pong", "Closed",
]
