"""The selector loop shared by the listener and the relay threads.

Both the pairing listener (handshakes and waiting clients) and every room
relay (paired clients) are one thread running one :class:`ConnLoop`: a
``selectors`` loop over non-blocking sockets. This module holds what they do
alike - reading frames and lines, answering PING, queueing output with flow
control, keepalive, idle and write deadlines, and the polite close that makes
sure a final ERROR is read before the socket goes away. Subclasses decide what
a message means (forward it, or answer "undelivered") and what leaving does.

The read path is the hot path of the whole server. For frame mode it reads
into one scratch buffer per loop, walks the frame headers, and hands *runs* of
consecutive MSG frames on as one memoryview slice: one UTF-8 check and one
``send`` per run, not per message. Only control frames are decoded.
"""

from __future__ import annotations

import heapq
import logging
import selectors
import socket
import time
from typing import Any

try:
    import ssl

    _SSL_WANT: tuple[type[BaseException], ...] = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
except ImportError:  # Python built without OpenSSL: no TLS, the rest works
    ssl = None  # type: ignore[assignment]
    _SSL_WANT = ()

from chatpair.netutil import Waker
from chatpair.server.config import Limits
from chatpair.server.conn import MODE_FRAME, MODE_LINE, Conn, OutChunk, event_bytes
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

log = logging.getLogger("chatpair")

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

#: Stop reading from a client while this much is queued for it or its
#: partner: a slow reader slows the sender down instead of growing memory.
HIGH_WATER = 256 * 1024
#: ...and read again once the backlog is below this.
LOW_WATER = 64 * 1024
#: How long a closing connection gets to take its last bytes (ERROR, BYE).
LINGER_SECONDS = 2.0
#: Timer resolution: handshake deadlines and lingering closes are checked this often.
TICK_SECONDS = 0.25
#: Keepalive, idle and write deadlines walk every connection, so they run less
#: often: with 20,000 idle connections a walk costs milliseconds, and these
#: timeouts are tens of seconds.
SWEEP_SECONDS = 1.0
#: One read takes at most this much; big enough to batch thousands of small frames.
SCRATCH_SIZE = 256 * 1024

#: "Try again later" from a non-blocking socket, plain or TLS.
WOULD_BLOCK: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError, *_SSL_WANT)
#: While a client is rate limited, one read takes at most this many bytes per
#: message it may still send, so a burst cannot overshoot by a whole buffer.
_THROTTLED_READ_PER_TOKEN = 128

_UNPACK_HEADER = HEADER.unpack_from
_MSG = int(FrameType.MSG)
_UTF8 = "utf-8"

HELP_LINE = "* commands: /next (new partner), /quit (leave), /help; start a line with // to send one starting with /"


class ConnLoop:
    """A selector loop owning a set of connections. Run it in exactly one thread."""

    name = "loop"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.sel = selectors.DefaultSelector()
        self.conns: set[Conn] = set()  # owned and not closing
        self.closing: set[Conn] = set()
        self.running = True
        self.now = time.monotonic()
        self._dead: list[Conn] = []
        self._again: list[Conn] = []  # TLS: decrypted bytes left inside the SSL object
        self._throttled: list[tuple[float, int, Conn]] = []  # heap of (resume time, cid, conn)
        self._next_sweep = 0.0
        size = max(SCRATCH_SIZE, 2 * (limits.max_frame + 8))
        self.scratch = bytearray(size)
        self.scratch_view = memoryview(self.scratch)
        # Other threads (the listener handing over a pair) wake select() with it.
        self.waker = Waker()
        self.sel.register(self.waker.reader, EVENT_READ, None)

    # -- waking the loop from another thread ----------------------------------

    def wake(self) -> None:
        self.waker.wake()

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        """Serve until :attr:`running` goes false and the closing sockets are done."""
        sel = self.sel
        next_tick = 0.0
        try:
            while self.running or self.closing or self.conns or self.busy():
                wake_at = next_tick
                if self._throttled and self._throttled[0][0] < wake_at:
                    wake_at = self._throttled[0][0]
                events = sel.select(max(0.0, wake_at - self.now))
                self.now = time.monotonic()
                for key, mask in events:
                    conn = key.data
                    if conn is None:
                        self.on_special(key.fileobj)  # type: ignore[arg-type]
                        continue
                    # An event of this batch may be stale: handling an earlier
                    # one can hand this connection to another loop (or close
                    # it). Only the owner may touch it, so ask ownership, not
                    # "registered somewhere" - the new owner may already have
                    # registered it in its own selector.
                    if mask & EVENT_WRITE and conn.owner is self and conn.events:
                        self._on_writable(conn)
                    if mask & EVENT_READ and conn.owner is self and conn.events:
                        self._on_readable(conn)
                while self._again:
                    again, self._again = self._again, []
                    for conn in again:
                        if conn.owner is self and not conn.closing:
                            self._on_readable(conn)
                if self._throttled and self._throttled[0][0] <= self.now:
                    self._end_throttles()
                if self._dead:
                    self._bury_dead()
                self.after_events()
                if self.now >= next_tick:
                    self.tick(self.now)
                    next_tick = self.now + TICK_SECONDS
                if not self.running and not self.conns and not self.closing and not self.busy():
                    break
        finally:
            self.close_all()

    def on_special(self, fileobj: Any) -> None:
        """Readable socket that is not a client (wake-up, listening socket)."""
        if fileobj is self.waker.reader:
            self.waker.drain()
            self.on_wake()

    def on_wake(self) -> None:
        """Another thread asked for attention (commands in an inbox)."""

    def after_events(self) -> None:
        """Called after each batch of events (post hand-overs here)."""

    def busy(self) -> bool:
        """Something besides our own sockets still needs the loop (e.g. relays winding down)."""
        return False

    def close_all(self) -> None:
        for conn in list(self.conns) + list(self.closing):
            self._close_now(conn)
        self.sel.close()
        self.waker.close()

    # -- registration -----------------------------------------------------------

    def adopt_conn(self, conn: Conn) -> None:
        """Take ownership of ``conn`` (register it with this loop's selector).

        Only a connection nobody owns can be adopted: the previous owner must
        have called :meth:`release_conn` first, on its own thread.
        """
        if conn.owner is not None:
            raise RuntimeError(f"{conn!r} is still owned by {conn.owner!r}; it must be released first")
        conn.owner = self
        conn.events = 0
        self.conns.add(conn)
        if conn.throttled_until:
            # Over its rate when it moved here: this loop must end the pause.
            heapq.heappush(self._throttled, (conn.throttled_until, conn.cid, conn))
        self.update_interest(conn)

    def release_conn(self, conn: Conn) -> None:
        """Give up ownership without closing (the conn moves to another loop).

        After this returns, this loop never touches ``conn`` again: stale
        selector events and queued timers for it are skipped because
        ``conn.owner`` is no longer this loop.
        """
        if conn.owner is not self:
            raise RuntimeError(f"{self!r} cannot release {conn!r}: it is owned by {conn.owner!r}")
        conn.paused = False  # flow control is this loop's bookkeeping; the next owner starts afresh
        self._unregister(conn)
        self.conns.discard(conn)
        conn.owner = None

    def _unregister(self, conn: Conn) -> None:
        if conn.events:
            try:
                self.sel.unregister(conn.fd)
            except (KeyError, ValueError, OSError):
                pass
            conn.events = 0

    def update_interest(self, conn: Conn) -> None:
        """Register for what the connection needs now: read unless paused, write if backlog."""
        if conn.tls_state:
            want = EVENT_WRITE if conn.tls_state == 2 else EVENT_READ
        elif conn.closing:
            want = EVENT_READ | (EVENT_WRITE if conn.out else 0)
        else:
            want = 0 if conn.paused or conn.throttled_until else EVENT_READ
            if conn.out:
                want |= EVENT_WRITE
        have = conn.events
        if want == have:
            return
        try:
            if not have:
                self.sel.register(conn.fd, want, conn)
            elif not want:
                self.sel.unregister(conn.fd)
            else:
                self.sel.modify(conn.fd, want, conn)
        except (KeyError, ValueError, OSError):
            self._dead.append(conn)
            return
        conn.events = want

    # -- output -------------------------------------------------------------------

    def send(self, conn: Conn, data: bytes | memoryview, msgs: int = 0, framed: bool = True) -> None:
        """Write now what the socket takes; queue the rest (copied) for later."""
        if not data:
            return
        if conn.out:
            chunk = OutChunk(bytes(data), msgs, framed)
            conn.out.append(chunk)
            conn.out_bytes += len(chunk.data)
            self.check_backlog(conn)
            return
        try:
            sent = conn.sock.send(data)
        except WOULD_BLOCK:
            sent = 0
        except OSError:
            sent = 0
            self._dead.append(conn)
        if sent == len(data):
            return
        chunk = OutChunk(bytes(data), msgs, framed)
        conn.out.append(chunk)
        conn.out_off = sent
        conn.out_bytes += len(chunk.data) - sent
        conn.write_stalled_since = self.now
        self.update_interest(conn)
        self.check_backlog(conn)

    def enqueue(self, conn: Conn, data: bytes) -> None:
        """Queue ``data`` behind what is queued, without writing now.

        For a connection about to move to another loop: the new owner writes
        it, after it has done what the bytes announce.
        """
        if data:
            if not conn.out:
                conn.write_stalled_since = self.now
            conn.out.append(OutChunk(bytes(data)))
            conn.out_bytes += len(data)

    def send_event(self, conn: Conn, ftype: FrameType, obj: dict[str, Any]) -> None:
        self.send(conn, event_bytes(conn, ftype, obj))

    def send_line(self, conn: Conn, text: str) -> None:
        """A ``* `` line for a line-mode client (nothing in frame mode)."""
        if conn.mode == MODE_LINE:
            self.send(conn, (text + "\n").encode("utf-8"))

    def _on_writable(self, conn: Conn) -> None:
        if conn.tls_state:
            self._tls_handshake(conn)
            return
        out = conn.out
        sock = conn.sock
        while out:
            chunk = out[0]
            off = conn.out_off
            try:
                sent = sock.send(memoryview(chunk.data)[off:] if off else chunk.data)
            except WOULD_BLOCK:
                break
            except OSError:
                self._dead.append(conn)
                return
            conn.write_stalled_since = self.now
            conn.out_bytes -= sent
            if off + sent < len(chunk.data):
                conn.out_off = off + sent
                break
            out.popleft()
            conn.out_off = 0
        if conn.closing and not out:
            self._shutdown_write(conn)
        self.update_interest(conn)
        if conn.out_bytes < LOW_WATER:
            self.on_drained(conn)

    def check_backlog(self, conn: Conn) -> None:
        """Pause reading from whoever feeds ``conn`` once its backlog is high."""
        if conn.out_bytes > HIGH_WATER:
            self.on_backlog(conn)

    def on_backlog(self, conn: Conn) -> None:
        """``conn`` has too much queued: stop reading from it (subclasses add its partner)."""
        self.pause(conn)

    def on_drained(self, conn: Conn) -> None:
        """``conn``'s backlog went low: resume whoever was paused for it."""
        self.resume(conn)

    def pause(self, conn: Conn) -> None:
        if not conn.paused and not conn.closing:
            conn.paused = True
            self.update_interest(conn)

    def resume(self, conn: Conn) -> None:
        if conn.paused and not conn.closing and self.may_read(conn):
            conn.paused = False
            conn.last_rx = self.now  # time spent paused was ours, not the client's idleness
            self.update_interest(conn)

    def may_read(self, conn: Conn) -> bool:
        return conn.out_bytes < LOW_WATER

    # -- TLS -------------------------------------------------------------------------

    def _tls_handshake(self, conn: Conn) -> None:
        """Drive a non-blocking TLS handshake one step; on success, :meth:`on_tls_ready`."""
        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            conn.tls_state = 1
        except ssl.SSLWantWriteError:
            conn.tls_state = 2
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            log.info("%s: TLS handshake failed: %s", conn.label, getattr(err, "reason", None) or err)
            self.drop(conn, "disconnected")
            return
        else:
            conn.tls_state = 0
            self.update_interest(conn)
            self.on_tls_ready(conn)
            return
        self.update_interest(conn)

    def on_tls_ready(self, conn: Conn) -> None:
        """The TLS handshake finished (the listener sends the banner now)."""

    def _note_tls_pending(self, conn: Conn) -> None:
        pending = getattr(conn.sock, "pending", None)
        if pending is not None and pending():
            self._again.append(conn)

    # -- rate limit: slow the sender down, never drop -------------------------------------

    def charge(self, conn: Conn, msgs: int) -> None:
        """Take ``msgs`` from the client's bucket; over its rate, stop reading it for a while."""
        rate = self.limits.rate
        if not rate or not msgs or conn.closing:
            return
        now = self.now
        conn.tokens = min(float(self.limits.burst), conn.tokens + (now - conn.token_time) * rate) - msgs
        conn.token_time = now
        if conn.tokens < 0 and not conn.throttled_until:
            conn.throttled_until = now + (-conn.tokens) / rate
            heapq.heappush(self._throttled, (conn.throttled_until, conn.cid, conn))
            self.update_interest(conn)

    def read_budget(self, conn: Conn, space: int) -> int:
        """How many bytes one read may take (less while the client is rate limited)."""
        if not self.limits.rate:
            return space
        tokens = min(float(self.limits.burst), conn.tokens + (self.now - conn.token_time) * self.limits.rate)
        return max(1024, min(space, int(max(tokens, 1.0) * _THROTTLED_READ_PER_TOKEN)))

    def _end_throttles(self) -> None:
        heap = self._throttled
        while heap and heap[0][0] <= self.now:
            _, _, conn = heapq.heappop(heap)
            # A client that moved to another loop meanwhile is that loop's to wake.
            if conn.throttled_until and conn.owner is self and conn in self.conns:
                conn.throttled_until = 0.0
                conn.last_rx = self.now  # the pause was ours, not the client's idleness
                self.update_interest(conn)
                if conn.mode == MODE_LINE:
                    self.process_lines(conn)  # lines already buffered come first

    # -- closing --------------------------------------------------------------------

    def finish(self, conn: Conn, last: bytes = b"") -> None:
        """Close politely: write ``last``, shut our side, drain theirs, then close.

        Closing a socket with unread input makes the kernel send RST, which can
        destroy the ERROR frame in flight; draining first means the client
        reads why it was closed.
        """
        if conn.closing:
            return
        conn.paused = False
        if last:
            self.send(conn, last)
        self.conns.discard(conn)
        conn.closing = True
        conn.close_at = self.now + LINGER_SECONDS
        self.closing.add(conn)
        if not conn.out:
            self._shutdown_write(conn)
        self.update_interest(conn)

    def _shutdown_write(self, conn: Conn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now(conn)

    def _close_now(self, conn: Conn) -> None:
        self.on_closed(conn)
        self._unregister(conn)
        self.conns.discard(conn)
        self.closing.discard(conn)
        conn.closing = True
        try:
            conn.sock.close()
        except OSError:
            pass

    def on_closed(self, conn: Conn) -> None:
        """The socket is about to be closed by this loop (may be called twice)."""

    def _bury_dead(self) -> None:
        dead, self._dead = self._dead, []
        for conn in dead:
            if conn.owner is not self:
                continue  # moved to another loop since: its failure is that loop's to see
            if conn in self.conns:
                self.drop(conn, "disconnected")
            elif conn.closing:
                self._close_now(conn)

    # -- what subclasses decide ---------------------------------------------------------

    def detach(self, conn: Conn, reason: str) -> None:
        """``conn`` is leaving (``reason`` as in PEER_LEFT): update pairing state."""

    def drop(self, conn: Conn, reason: str) -> None:
        """The connection is gone or must go now, without a goodbye."""
        self.detach(conn, reason)
        self._close_now(conn)

    def fail(self, conn: Conn, code: str | ErrorCode, message: str, reason: str = "error") -> None:
        """Tell the client what it did wrong, then close."""
        code = code.value if isinstance(code, ErrorCode) else code
        log.info("%s: error %s: %s", conn.label, code, message)
        self.detach(conn, reason)
        self.finish(conn, event_bytes(conn, FrameType.ERROR, {"code": code, "message": message}))

    def on_msg_run(self, conn: Conn, view: memoryview, start: int, end: int, count: int) -> None:
        """``count`` valid MSG frames from ``conn``, in ``view[start:end]``."""
        raise NotImplementedError

    def on_line_msg(self, conn: Conn, text: str) -> None:
        """One message typed by a line-mode client."""
        raise NotImplementedError

    def on_next(self, conn: Conn) -> None:
        raise NotImplementedError

    def on_bye(self, conn: Conn) -> None:
        log.info("%s: bye", conn.label)
        self.detach(conn, "bye")
        self.finish(conn)

    def owns(self, conn: Conn) -> bool:
        """Still ours to read? (False once it closes or moves to another loop.)"""
        return conn in self.conns

    # -- reading -----------------------------------------------------------------------

    def _on_readable(self, conn: Conn) -> None:
        if conn.tls_state:
            self._tls_handshake(conn)
        elif conn.closing:
            self._drain_closing(conn)
        elif conn.deadline:
            # Still handshaking: the first byte fixed the mode, but the HELLO
            # or name line may arrive in several pieces (telnet sends a key
            # at a time), and every piece belongs to the handshake.
            self.on_handshake_readable(conn)
        elif conn.mode == MODE_FRAME:
            self.read_frames(conn)
        elif conn.mode == MODE_LINE:
            self.read_lines(conn)
        else:
            self.on_handshake_readable(conn)

    def on_handshake_readable(self, conn: Conn) -> None:
        raise NotImplementedError

    def _drain_closing(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except WOULD_BLOCK:
            return
        except OSError:
            data = b""
        if not data:
            self._close_now(conn)

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
                                        self.read_budget(conn, space) if rate_limited else space)
            else:
                have = 0
                if rate_limited:
                    n = conn.sock.recv_into(self.scratch_view, self.read_budget(conn, len(self.scratch)))
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
            # Fast path for the commonest read of a chat: exactly one message.
            length, ftype = _UNPACK_HEADER(self.scratch, 0)
            if ftype == _MSG and length + 4 == n and length <= self.limits.max_frame:
                try:
                    str(self.scratch_view[5:n], _UTF8)
                except UnicodeDecodeError:
                    pass  # the general path below says what is wrong
                else:
                    self.on_msg_run(conn, self.scratch_view, 0, n, 1)
                    msgs = 1
        if msgs < 0:
            msgs = self.scan_frames(conn, have + n)
        if rate_limited and conn in self.conns:
            self.charge(conn, msgs)
        if conn.sock.__class__ is not socket.socket and conn in self.conns:
            self._note_tls_pending(conn)

    def scan_frames(self, conn: Conn, end: int) -> int:
        """Walk the frames in ``scratch[:end]``; keep an incomplete tail in ``conn.pending``.

        Returns how many MSG frames were handed on (for the rate limit).
        """
        buf = self.scratch
        view = self.scratch_view
        max_frame = self.limits.max_frame
        pos = run = seg = count = total = 0
        while end - pos >= 5:
            length, ftype = _UNPACK_HEADER(buf, pos)
            if ftype == _MSG and 1 < length <= max_frame:
                fend = pos + 4 + length
                if fend > end:
                    break
                if length > 127:
                    # This header has a byte >= 0x80, so it cannot sit inside
                    # a run that is checked as one UTF-8 string: check the run
                    # so far, then this payload alone.
                    if not self._utf8_ok(view, seg, pos) or not self._utf8_ok(view, pos + 5, fend):
                        return total + self._bad_run(conn, view, run, fend)
                    seg = fend
                count += 1
                pos = fend
                continue
            # Not a plain MSG: first hand on the run before it, in order.
            if count:
                if seg < pos and not self._utf8_ok(view, seg, pos):
                    return total + self._bad_run(conn, view, run, pos)
                self.on_msg_run(conn, view, run, pos, count)
                total += count
                count = 0
                if not self.owns(conn):
                    conn.pending = bytes(view[pos:end])
                    return total
            if length > max_frame:
                self.fail(conn, ErrorCode.FRAME_TOO_LARGE,
                          f"frame of {length} bytes is over the limit of {max_frame}")
                return total
            if length == 0:
                self.fail(conn, ErrorCode.BAD_FRAME, "frame length 0 (it must count the type byte)")
                return total
            if ftype == _MSG:  # length 1: no text
                self.fail(conn, ErrorCode.BAD_FRAME, "a message cannot be empty")
                return total
            fend = pos + 4 + length
            if fend > end:
                break
            self.on_control(conn, ftype, bytes(view[pos + 5:fend]))
            pos = run = seg = fend
            if not self.owns(conn):
                conn.pending = bytes(view[pos:end])
                return total
        if count:
            if seg < pos and not self._utf8_ok(view, seg, pos):
                return total + self._bad_run(conn, view, run, pos)
            self.on_msg_run(conn, view, run, pos, count)
            total += count
            if not self.owns(conn):
                conn.pending = bytes(view[pos:end])
                return total
        if end - pos >= 4:
            length = int.from_bytes(view[pos:pos + 4], "big")
            if length == 0:
                self.fail(conn, ErrorCode.BAD_FRAME, "frame length 0 (it must count the type byte)")
                return total
            if length > max_frame:
                self.fail(conn, ErrorCode.FRAME_TOO_LARGE,
                          f"frame of {length} bytes is over the limit of {max_frame}")
                return total
        conn.pending = bytes(view[pos:end]) if pos < end else b""
        return total

    @staticmethod
    def _utf8_ok(view: memoryview, start: int, end: int) -> bool:
        try:
            str(view[start:end], _UTF8)
        except UnicodeDecodeError:
            return False
        return True

    def _bad_run(self, conn: Conn, view: memoryview, start: int, end: int) -> int:
        """A run failed the UTF-8 check: deliver the good messages before the bad one, then refuse."""
        pos = start
        good = 0
        while pos < end:
            length = int.from_bytes(view[pos:pos + 4], "big")
            fend = pos + 4 + length
            if not self._utf8_ok(view, pos + 5, fend):
                break
            good += 1
            pos = fend
        if good:
            self.on_msg_run(conn, view, start, pos, good)
            if not self.owns(conn):
                return good
        self.fail(conn, ErrorCode.BAD_FRAME, "a message must be valid UTF-8 text")
        return good

    def on_control(self, conn: Conn, ftype: int, payload: bytes) -> None:
        """A frame that is not a MSG: checked by the protocol's rules, then acted on."""
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

    def read_lines(self, conn: Conn) -> None:
        try:
            data: bytes | None = conn.sock.recv(self.read_budget(conn, 65536))
        except WOULD_BLOCK:
            data = None
        except OSError:
            data = b""
        if data is not None:
            conn.last_rx = self.now
            conn.decoder.feed(data)  # type: ignore[union-attr]
            if data and conn.sock.__class__ is not socket.socket:
                self._note_tls_pending(conn)
        self.process_lines(conn)

    def process_buffered(self, conn: Conn) -> None:
        """Act on input received before this loop owned ``conn``.

        Bytes that came with the handshake, or were read before a hand-over,
        will not make the socket readable again, so the new owner processes
        them as soon as it adopts the connection.
        """
        if not self.owns(conn):
            return
        if conn.mode == MODE_FRAME and len(conn.pending) >= 5:
            pending = conn.pending
            self.scratch[: len(pending)] = pending
            msgs = self.scan_frames(conn, len(pending))
            if self.limits.rate and conn in self.conns:
                self.charge(conn, msgs)
        elif conn.mode == MODE_LINE:
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
        kind = cmd.kind
        if kind is LineKind.MSG:
            self.on_line_msg(conn, cmd.text)
        elif kind is LineKind.NEXT:
            self.on_next(conn)
        elif kind is LineKind.QUIT:
            self.send_line(conn, "* bye")
            self.on_bye(conn)
        elif kind is LineKind.HELP:
            self.send_line(conn, HELP_LINE)
        elif kind is LineKind.UNKNOWN:
            self.send_line(conn, f"* unknown command {cmd.text}: type /help for the commands (nothing was sent)")

    # -- timers --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Keepalive, idle timeout, write deadline, lingering closes."""
        for conn in [c for c in self.closing if now >= c.close_at]:
            self._close_now(conn)
        if now < self._next_sweep:
            return
        lim = self.limits
        # ...but never coarser than a quarter of the shortest of those timeouts.
        self._next_sweep = now + max(TICK_SECONDS, min(
            SWEEP_SECONDS, lim.ping_interval / 4, lim.idle_timeout / 4, lim.write_timeout / 4))
        ping_payload = None
        expired: list[tuple[Conn, str]] = []
        for conn in self.conns:
            if conn.out and now - conn.write_stalled_since > lim.write_timeout:
                expired.append((conn, "write"))
                continue
            if conn.mode != MODE_FRAME or conn.paused or conn.throttled_until or conn.deadline:
                continue  # line mode cannot answer PING; a paused or handshaking client is not idle
            idle = now - conn.last_rx
            if idle > lim.idle_timeout:
                expired.append((conn, "idle"))
            elif idle > lim.ping_interval and not conn.pinged:
                if ping_payload is None:
                    ping_payload = encode_frame(FrameType.PING, b"keepalive")
                conn.pinged = True
                self.send(conn, ping_payload)
        for conn, why in expired:
            if conn not in self.conns:
                continue
            if why == "write":
                log.info("%s: not reading for %.0fs; dropped", conn.label, lim.write_timeout)
                self.drop(conn, "timeout")
            else:
                self.fail(conn, ErrorCode.TIMEOUT,
                          f"no frame from you for {lim.idle_timeout:g} seconds", reason="timeout")
