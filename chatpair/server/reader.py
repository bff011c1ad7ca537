"""Input: read a client's frames or lines, act on each, and pace the reading.

The read path is the hot path of the whole server. For frame mode,
:meth:`ReadMixin.read_frames` reads into the loop's one scratch buffer and

* hands the commonest read of a chat - exactly one complete MSG - straight on
  (one header unpack, one UTF-8 check);
* otherwise lets the pure scanner (:func:`chatpair.server.scanner.scan`) find
  the runs of MSG frames and the control frames, and acts on them in order:
  a run goes on as one memoryview slice (one ``send`` per run, not per
  message); only control frames are decoded.

Line mode (netcat, telnet) goes through the protocol's line decoder and
typed commands. Under ``--rate`` every message read is charged to the
client's token bucket (:mod:`chatpair.server.ratelimit`); one over its rate
is read later.

This is a mixin of :class:`~chatpair.server.loop.ConnLoop` rather than a
helper object: ``read_frames`` runs once per readable socket and its
callbacks (``on_msg_run``, ``send``) once per run, so each must stay a
single method call, and the listener, the relays and tests override them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from chatpair.proto import (
    HEADER,
    NEED_DATA,
    EndOfStream,
    ErrorCode,
    Frame,
    FrameType,
    LineCommand,
    LineKind,
    ProtocolError,
    check_client_frame,
    encode_frame,
    parse_client_line,
)
from chatpair.server.conn import Conn
from chatpair.server.render import BYE_LINE, HELP_LINE, unknown_command_line
from chatpair.server.scanner import scan
from chatpair.server.states import Mode, Phase
from chatpair.server.tls import WOULD_BLOCK, has_pending

if TYPE_CHECKING:
    from chatpair.server.config import Limits
    from chatpair.server.ratelimit import RateLimiter

log = logging.getLogger("chatpair")

_UNPACK_HEADER = HEADER.unpack_from
_MSG = int(FrameType.MSG)
_ACK = int(FrameType.ACK)
_UTF8 = "utf-8"
_CHATTING = Phase.CHATTING
_CLOSING = Phase.CLOSING
_HANDSHAKE = Phase.HANDSHAKE
_PROXY_HEADER = Phase.PROXY_HEADER
_FRAME = Mode.FRAME
_LINE = Mode.LINE
#: A line-mode read takes at most this much (lines are at most max_frame - 1 bytes anyway).
LINE_READ_SIZE = 65536


class ReadMixin:
    """Reading and acting on what clients send, for :class:`~chatpair.server.loop.ConnLoop`.

    Subclasses decide what a message means: :meth:`on_msg_run`,
    :meth:`on_line_msg`, :meth:`on_next`, :meth:`on_handshake_readable`
    (and may override :meth:`on_bye`). For callers: :meth:`process_buffered`.
    """

    if TYPE_CHECKING:  # provided by ConnLoop
        now: float
        limits: Limits
        max_frame: int
        limiter: RateLimiter
        scratch: bytearray
        scratch_view: memoryview
        conns: set[Conn]
        _again: list[Conn]

        def owns(self, conn: Conn) -> bool: ...
        def update_interest(self, conn: Conn) -> None: ...
        def send(self, conn: Conn, data: bytes | memoryview, msgs: int = 0, framed: bool = True) -> None: ...
        def send_line(self, conn: Conn, text: str) -> None: ...
        def detach(self, conn: Conn, reason: str) -> None: ...
        def drop(self, conn: Conn, reason: str) -> None: ...
        def fail(self, conn: Conn, code: str | ErrorCode, message: str, reason: str = "error") -> None: ...
        def finish(self, conn: Conn, last: bytes = b"") -> None: ...
        def tls_step(self, conn: Conn) -> None: ...
        def drain_closing(self, conn: Conn) -> None: ...
        def count_received(self, conn: Conn, msgs: int) -> None: ...
        def on_ack(self, conn: Conn, payload: bytes) -> None: ...

    def on_readable(self, conn: Conn) -> None:
        """Dispatch on the phase (and, chatting, on the mode): the hot case is tested first."""
        phase = conn.phase
        if phase is _CHATTING:  # past the handshake, so the mode is known
            if conn.mode is _FRAME:
                self.read_frames(conn)
            else:
                self.read_lines(conn)
        elif phase is _HANDSHAKE or phase is _PROXY_HEADER:
            # The first byte fixed the mode, but the HELLO or name line may
            # arrive in several pieces (telnet sends a key at a time), and
            # every piece belongs to the handshake (as does a PROXY header).
            self.on_handshake_readable(conn)
        elif phase is _CLOSING:
            self.drain_closing(conn)
        else:
            self.tls_step(conn)

    # -- frame mode ----------------------------------------------------------------------

    def read_frames(self, conn: Conn) -> None:
        """Read what is there and act on every complete frame."""
        pending = conn.pending
        rate_limited = self.limits.rate
        try:
            if pending:
                have = len(pending)
                self.scratch[:have] = pending
                space = len(self.scratch) - have
                n = conn.sock.recv_into(self.scratch_view[have:],
                                        self.limiter.read_budget(conn, space, self.now) if rate_limited else space)
            else:
                have = 0
                if rate_limited:
                    n = conn.sock.recv_into(self.scratch_view,
                                            self.limiter.read_budget(conn, len(self.scratch), self.now))
                else:
                    n = conn.sock.recv_into(self.scratch_view)
        except WOULD_BLOCK:
            return
        except OSError:
            n = 0
        if not n:
            self.drop(conn, "disconnected")
            return
        conn.last_rx = self.now
        conn.pinged = False
        msgs = -1
        if not have and n > 5:
            # The commonest read of a chat: exactly one message. The test is
            # the scanner's common case (a MSG with 1 < length <= max_frame,
            # which check_header accepts; here length + 4 == n > 5); anything
            # else, and bad UTF-8, goes to the scanner, which says what is wrong.
            length, ftype = _UNPACK_HEADER(self.scratch, 0)
            if ftype == _MSG and length + 4 == n and length <= self.max_frame:
                try:
                    str(self.scratch_view[5:n], _UTF8)
                except UnicodeDecodeError:
                    pass
                else:
                    self.on_msg_run(conn, self.scratch_view, 0, n, 1)
                    msgs = 1
        if msgs < 0:
            msgs = self.scan_frames(conn, have + n)
        if msgs and conn.session is not None:
            self.count_received(conn, msgs)
        if rate_limited and conn in self.conns:
            self.charge(conn, msgs)
        if conn.tls and conn in self.conns and has_pending(conn.sock):
            self._again.append(conn)  # decrypted bytes select() cannot see: read again this round

    def scan_frames(self, conn: Conn, end: int) -> int:
        """Act on the frames in ``scratch[:end]``; keep an incomplete tail in ``conn.pending``.

        Stops as soon as ``conn`` is no longer this loop's to read (BYE, NEXT,
        an error), keeping the rest for its next owner. Returns how many MSG
        frames were handed on (for the rate limit).
        """
        view = self.scratch_view
        items, stop, error = scan(view, end, self.max_frame)
        conns = self.conns  # "conn in conns" is owns(), without a call per item
        total = 0
        for start, fend, count in items:
            if count:
                self.on_msg_run(conn, view, start, fend, count)
                total += count
            else:
                self.on_control(conn, view[start + 4], bytes(view[start + 5:fend]))
            if conn not in conns:
                conn.pending = bytes(view[fend:end])
                return total
        if error is not None:
            self.fail(conn, error.code, error.message)
        else:
            conn.pending = bytes(view[stop:end]) if stop < end else b""
        return total

    def on_control(self, conn: Conn, ftype: int, payload: bytes) -> None:
        """A frame that is not a MSG: checked by the protocol's rules, then acted on."""
        if ftype == _ACK and conn.session is not None:
            self.on_ack(conn, payload)
            return
        try:
            check_client_frame(Frame(ftype, payload))
        except ProtocolError as err:
            self.fail(conn, err.code, err.message)
            return
        if ftype == FrameType.PING:
            self.send(conn, encode_frame(FrameType.PONG, payload))
        elif ftype == FrameType.NEXT:
            self.on_next(conn)
        elif ftype == FrameType.BYE:
            self.on_bye(conn)
        # a PONG needs nothing more: receiving any frame already counts as alive

    def process_buffered(self, conn: Conn) -> None:
        """Act on input received before this loop owned ``conn``.

        Bytes that came with the handshake, or were read before a hand-over,
        will not make the socket readable again, so the new owner processes
        them as soon as it adopts the connection.
        """
        if not self.owns(conn):
            return
        if conn.mode is _FRAME and len(conn.pending) >= 5:
            pending = conn.pending
            self.scratch[: len(pending)] = pending
            msgs = self.scan_frames(conn, len(pending))
            if msgs and conn.session is not None:
                self.count_received(conn, msgs)
            if self.limits.rate and conn in self.conns:
                self.charge(conn, msgs)
        elif conn.mode is _LINE:
            self.process_lines(conn)

    # -- line mode ----------------------------------------------------------------------

    def read_lines(self, conn: Conn) -> None:
        """Read what is there into the line decoder, then act on the complete lines."""
        size = self.limiter.read_budget(conn, LINE_READ_SIZE, self.now) if self.limits.rate else LINE_READ_SIZE
        try:
            data: bytes | None = conn.sock.recv(size)
        except WOULD_BLOCK:
            data = None
        except OSError:
            data = b""
        if data is not None:
            conn.last_rx = self.now
            conn.decoder.feed(data)  # type: ignore[union-attr]
            if data and conn.tls and has_pending(conn.sock):
                self._again.append(conn)
        self.process_lines(conn)

    def process_lines(self, conn: Conn) -> None:
        """Act on every complete line buffered for a line-mode client (until it is throttled)."""
        decoder = conn.decoder
        while self.owns(conn) and not conn.throttled_until:
            try:
                item = decoder.next_line()  # type: ignore[union-attr]
            except ProtocolError as err:
                self.fail(conn, err.code, err.message)
                return
            if item is NEED_DATA:
                return
            if isinstance(item, EndOfStream):
                self.drop(conn, "disconnected")
                return
            cmd = parse_client_line(item)  # type: ignore[arg-type]
            self.on_line(conn, cmd)
            if cmd.kind is LineKind.MSG:
                self.charge(conn, 1)

    def on_line(self, conn: Conn, cmd: LineCommand) -> None:
        """One typed line: a message, or a command (answered in ``* `` lines)."""
        kind = cmd.kind
        if kind is LineKind.MSG:
            self.on_line_msg(conn, cmd.text)
        elif kind is LineKind.NEXT:
            self.on_next(conn)
        elif kind is LineKind.QUIT:
            self.send_line(conn, BYE_LINE)
            self.on_bye(conn)
        elif kind is LineKind.HELP:
            self.send_line(conn, HELP_LINE)
        elif kind is LineKind.UNKNOWN:
            self.send_line(conn, unknown_command_line(cmd.text))

    # -- the rate limit: slow the sender down, never drop ------------------------------------

    def charge(self, conn: Conn, msgs: int) -> None:
        """Take ``msgs`` from the client's bucket; over its rate, stop reading it for a while."""
        if not msgs or not self.limits.rate or conn.phase is _CLOSING:
            return
        if self.limiter.take(conn, msgs, self.now):
            self.update_interest(conn)

    # -- what subclasses decide ----------------------------------------------------------

    def on_handshake_readable(self, conn: Conn) -> None:
        """A handshaking client sent something (the listener parses HELLO or the name line)."""
        raise NotImplementedError

    def on_msg_run(self, conn: Conn, view: memoryview, start: int, end: int, count: int) -> None:
        """``count`` valid MSG frames from ``conn``, in ``view[start:end]``."""
        raise NotImplementedError

    def on_line_msg(self, conn: Conn, text: str) -> None:
        """One message typed by a line-mode client."""
        raise NotImplementedError

    def on_next(self, conn: Conn) -> None:
        """NEXT (or ``/next``): the client wants a new partner."""
        raise NotImplementedError

    def on_bye(self, conn: Conn) -> None:
        """BYE (or ``/quit``): leave and close."""
        log.debug("%s: bye", conn.label)  # INFO: detach says "left (bye)", one line per leaving
        self.detach(conn, "bye")
        self.finish(conn)
