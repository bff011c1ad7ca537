"""A frame-mode conversation over a socket: :func:`connect`, :class:`Connection`, :class:`SocketWatch`.

:class:`Connection` owns the socket and feeds what it reads to a
:class:`~chatpair.proto.clientside.ClientProtocol`, which owns every rule
of the protocol; this module adds only what needs a socket or a clock: the
handshake's deadline, non-blocking sends from the protocol's outbox, reads
that turn OS errors into :class:`~chatpair.proto.events.Closed` events, and
a polite BYE. :func:`connect` turns every way a handshake can fail into one
:class:`~chatpair.errors.ChatpairError` whose message names ``host:port``.
Given a :class:`~chatpair.proto.clientsession.ClientSession`, it resumes
that session instead of saying hello (PROTOCOL.md section 6).
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from typing import Any, Callable

from chatpair.client.config import ClientConfig
from chatpair.client.greeting import silent, stranger
from chatpair.client.transport import open_socket, os_reason, speaks_tls
from chatpair.client.trust import Ask
from chatpair.errors import ChatpairError, ConnectError, RefusedError
from chatpair.proto import sanitize
from chatpair.proto.clientside import ClientProtocol, ClientState, greeting, speak_first
from chatpair.proto.clientsession import ClientSession
from chatpair.proto.events import FINAL_EVENTS, Closed, Event, Notice, ServerError, Welcome

#: After BYE, how long to wait for the server to close before we do. The
#: server closes at once; this only bounds a dead or slow network.
BYE_DRAIN_TIMEOUT = 3.0
#: At most this much is offered to one ``send`` call.
SEND_CHUNK = 1 << 18
RECV_SIZE = 65536
#: A chatpair server greets at once; one silent this long is spoken to first
#: (HELLO before the banner) to find out what it is (:mod:`.greeting`).
SPEAK_AFTER = 1.0


def connect(config: ClientConfig, heard: list[Event] | None = None,
            session: ClientSession | None = None, ask: Ask | None = None) -> Connection:
    """Open a connection and complete the handshake, or raise ChatpairError.

    Returns once WELCOME is in; frames that came with it (WAITING, PAIRED)
    are returned by the first :meth:`Connection.receive`. If the handshake
    fails, what the server said before (a NOTICE) is appended to ``heard``,
    in order, so the caller can show it before the error. With ``session``
    it sends RESUME: RefusedError ``session_expired`` if the server has
    forgotten it (RESUMED is then the first event). ``ask``: how to ask a
    person about an unknown certificate (:mod:`.trust`; None: never asks);
    the time spent answering does not count against ``config.timeout``.
    """
    asked: list[bool] = []

    def asking(*args: str) -> bool:
        asked.append(True)
        return ask(*args) if ask is not None else False

    start = time.monotonic()
    sock = open_socket(config, asking if ask is not None else None)
    if asked:
        start = time.monotonic()
    conn = Connection(sock, config, session=session)
    try:
        conn.handshake(start + config.timeout, start)
    except BaseException:
        if heard is not None:
            heard += conn.early
        conn.close()
        raise
    return conn


def final_error(label: str, ev: ServerError | Closed) -> ChatpairError:
    """The error a session ends with after its final event (exit code 3 for ERROR, 2 otherwise)."""
    if isinstance(ev, ServerError):
        return RefusedError(ev.code, f"{label}: {sanitize(ev.message, False)}")
    return ConnectError(sanitize(ev.reason, False))


class Connection:
    """A frame-mode connection. Non-blocking sends, event reads.

    Not thread-safe: one owner (the pipe loop or the TUI loop) calls
    everything. ``fileno()`` lets that owner wait on it with a selector; call
    :meth:`receive` when it is readable and :meth:`flush` when it is
    writable (while :attr:`wants_write`). Before waiting to read, the owner
    checks :meth:`read_pause`: a server flooding PINGs is read more slowly.

    ``banner``: its text if the caller already read the banner and sent
    HELLO; otherwise :meth:`handshake` does both.
    """

    def __init__(self, sock: socket.socket, config: ClientConfig, banner: str | None = None,
                 session: ClientSession | None = None) -> None:
        self.sock = sock
        self.config = config
        self.label = config.label
        self.proto = ClientProtocol(config.name, config.room, self.label, banner, resume=config.resume,
                                    session=session)
        #: Events of the handshake not returned yet: the first receive() returns them.
        self.early: list[Event] = []
        #: True once the socket failed or was closed by us (the protocol may not know).
        self._down = False
        #: Why a send failed where nobody could be told at once (a PONG).
        self._lost: str | None = None
        #: The handshake: when a silent server is spoken to first, the time allowed, whether it was.
        self._speak_at, self._waited, self._spoke = 0.0, 0.0, False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self._down or self.proto.state is ClientState.CLOSED

    @property
    def session(self) -> ClientSession | None:
        """The resumable session (None: the server offers none, or ``--no-resume``)."""
        return self.proto.session

    @property
    def can_send(self) -> bool:
        """False while flow control holds our messages back (too much unacknowledged)."""
        return self.proto.session is None or not self.proto.session.blocked

    def deadline(self) -> float | None:
        """When :meth:`tick` has work if nothing else happens (None: no timers)."""
        session = self.proto.session
        return None if session is None or self.proto.state is not ClientState.OPEN else session.deadline()

    def tick(self, now: float | None = None) -> list[Event]:
        """Run the session's timers (ACK, keepalive PING); [Closed] once the server went silent."""
        idle = not self.outbox
        ev = self.proto.tick(time.monotonic() if now is None else now)
        return [ev] if ev is not None else self._take_events(idle)

    @property
    def outbox(self) -> bytearray:
        """Bytes not yet taken by the kernel.

        Sends never block (after the handshake): the owner keeps reading
        while the server slows us down, so two clients piping big inputs at
        each other cannot deadlock with both stuck in sendall. A send is
        tried at once only when the outbox was empty; otherwise the kernel
        said "full" and the owner flushes when the socket is writable
        (never a busy loop).
        """
        return self.proto.outbox

    # -- handshake ---------------------------------------------------------

    def handshake(self, deadline: float, start: float | None = None) -> Welcome:
        """Read the banner, send HELLO and wait for WELCOME (ERROR -> RefusedError).

        Every frame that came with the WELCOME in the same read (WAITING,
        PAIRED, a NOTICE, even an ERROR or a broken frame) is kept, in
        order, for the first :meth:`receive`; so is a NOTICE before it. If
        the handshake fails, :attr:`early` holds what came before. A silent
        server is spoken to first (:func:`_handshake_wait`).
        """
        start = time.monotonic() if start is None else start
        self._speak_at, self._waited = start + min(SPEAK_AFTER, (deadline - start) / 3), deadline - start
        events = self._take_events(flush_due=True)
        while True:
            for i, ev in enumerate(events):
                if isinstance(ev, Welcome):
                    self.early += events[i:]
                    self.sock.setblocking(False)
                    return ev
                if isinstance(ev, ServerError):
                    raise RefusedError(ev.code, f"{self.label} refused: {sanitize(ev.message, False)}")
                if isinstance(ev, Closed):
                    raise _closed_in_handshake(self, ev)
                assert isinstance(ev, Notice)  # the protocol closes on anything else before WELCOME
                self.early.append(ev)
            events = self._handshake_read(deadline)

    def _handshake_read(self, deadline: float) -> list[Event]:
        """Wait (within the deadline) for more of the banner or the WELCOME."""
        in_banner = self.proto.state is ClientState.BANNER
        left = _handshake_wait(self, deadline)
        pause = self.read_pause()
        if pause:  # a PING flood before WELCOME: read it slowly, within the deadline
            time.sleep(min(pause, left))
            return []
        self.sock.settimeout(left)
        try:
            data = self._recv()
        except TimeoutError:
            return []
        except ssl.SSLError as err:
            raise ConnectError(f"TLS error from {self.label}: {err.reason or err}") from None
        except OSError as err:
            how = "failed" if in_banner else "lost during the handshake"
            raise ConnectError(f"connection to {self.label} {how}: {os_reason(err)}") from None
        flush_due = not self.outbox
        self.proto.receive_data(data, time.monotonic())
        return self._take_events(flush_due)

    # -- receiving ---------------------------------------------------------

    def receive(self) -> list[Event]:
        """Read what is there (blocks only until something arrives) -> events.

        A ``Closed`` or ``ServerError`` event is always the last one.
        """
        if self.early:
            early, self.early = self.early, []
            return early
        if self.closed:
            return [Closed(self._lost or f"connection to {self.label} closed")]
        try:
            data = self._recv()
        except (ssl.SSLWantReadError, BlockingIOError):
            return []
        except TimeoutError:
            self._down = True
            return [Closed(f"{self.label} stopped answering")]
        except OSError as err:
            self._down = True
            return [Closed(f"connection to {self.label} lost: {os_reason(err)}")]
        flush_due = not self.outbox
        self.proto.receive_data(data, time.monotonic())
        return self._take_events(flush_due)

    def read_pause(self, now: float | None = None) -> float:
        """Seconds to wait before reading again (0: read now); see ClientProtocol.read_pause."""
        return self.proto.read_pause(time.monotonic() if now is None else now)

    def _recv(self) -> bytes:
        data = self.sock.recv(RECV_SIZE)
        # TLS may hold decrypted bytes the selector cannot see: take them now.
        while data and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            data += self.sock.recv(self.sock.pending())
        return data

    def _take_events(self, flush_due: bool) -> list[Event]:
        """The protocol's events; what it queued into an empty outbox (PONGs, HELLO) goes in one send."""
        events = self.proto.events()
        if flush_due and self.outbox:
            self.flush(quiet=True)
            if self._lost and not (events and isinstance(events[-1], FINAL_EVENTS)):
                events.append(Closed(self._lost))
        return events

    # -- sending -----------------------------------------------------------

    @property
    def wants_write(self) -> bool:
        """True while bytes wait for the socket to become writable."""
        return bool(self.outbox) and not self.closed

    def flush(self, quiet: bool = False) -> None:
        """Send what the kernel takes now; the rest waits for writability.

        A failed send is ConnectError, or with ``quiet`` reported by the
        next :meth:`receive`.
        """
        while self.outbox and not self.closed:
            try:
                with memoryview(self.outbox) as view, view[:SEND_CHUNK] as chunk:
                    n = self.sock.send(chunk)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            except OSError as err:  # ssl.SSLError is one too
                self._down = True
                self.outbox.clear()
                self._lost = f"connection to {self.label} lost: {os_reason(err)}"
                if quiet:
                    return
                raise ConnectError(self._lost) from None
            self.proto.sent(n)

    def _send(self, queue: Callable[..., None], *args: Any) -> None:
        """Queue frames with the protocol; send at once if nothing was waiting."""
        idle = not self.outbox
        queue(*args)
        if idle:
            self.flush()

    def send_msg(self, text: str) -> None:
        """Send text as MSG frames (split if longer than the server's limit)."""
        self._send(self.proto.send_msg, text)

    def send_next(self) -> None:
        self._send(self.proto.send_next)

    def send_ping(self) -> None:
        """PING with a token; the matching PONG becomes a :class:`Pong` event."""
        self._send(self.proto.send_ping, time.monotonic())

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
        self.proto.send_bye()
        try:
            self.sock.settimeout(BYE_DRAIN_TIMEOUT)
            self.sock.sendall(self.outbox)
            self.proto.sent(len(self.outbox))
            if not isinstance(self.sock, ssl.SSLSocket):
                self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + BYE_DRAIN_TIMEOUT
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.sock.recv(RECV_SIZE)
                self.proto.receive_data(data, time.monotonic())
                events += [ev for ev in self.proto.events() if not isinstance(ev, Closed)]
                if not data or self.closed:
                    break
        except OSError:  # ssl.SSLError is one too: the server is gone, which is what we asked for
            pass
        self.close()
        return events

    def close(self) -> None:
        self._down = True
        try:
            self.sock.close()
        except OSError:
            pass


def _handshake_wait(conn: Connection, deadline: float) -> float:
    """How long the next handshake read may wait; past the deadline, the error.

    A server still silent at ``conn._speak_at`` is spoken to first (see
    :mod:`.greeting`): the next read then waits for its answer.
    """
    proto = conn.proto
    in_banner = proto.state is ClientState.BANNER
    now = time.monotonic()
    left = deadline - now
    if left <= 0:
        if not in_banner:
            raise ConnectError(f"{conn.label} did not answer our hello in time")
        if greeting(proto):  # a line that never ended: say what it began with
            raise ConnectError(stranger(conn.label, greeting(proto), tls=conn.config.tls))
        raise ConnectError(silent(conn.label, conn._waited, conn._spoke))
    if in_banner and not conn._spoke and not greeting(proto):
        if now < conn._speak_at:
            return min(left, conn._speak_at - now)
        conn._spoke = True  # silent so far: speak first, and see what answers
        speak_first(proto)
        conn.flush(quiet=True)
    return left


def _closed_in_handshake(conn: Connection, ev: Closed) -> ConnectError:
    """The error for a connection closed before WELCOME: without a banner, named by what answered."""
    proto = conn.proto
    if proto.banner or proto.welcome is not None:
        return ConnectError(sanitize(ev.reason, False))
    tls = not greeting(proto) and conn._spoke and not conn.config.tls and speaks_tls(conn.config)
    return ConnectError(stranger(conn.label, greeting(proto), tls=conn.config.tls, speaks_tls=tls))


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

    def follow(self, sel: selectors.BaseSelector, now: float | None = None) -> float:
        """Watch for what the connection needs now; return its read pause (0: reading)."""
        pause = self.conn.read_pause(now)
        self.set(sel, (0 if pause else selectors.EVENT_READ)
                 | (selectors.EVENT_WRITE if self.conn.wants_write else 0))
        return pause

    def clear(self, sel: selectors.BaseSelector) -> None:
        """Stop watching (before the socket is closed)."""
        if self.mask:
            try:
                sel.unregister(self.conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        self.mask = 0

