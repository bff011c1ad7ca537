"""Frames in, checked exactly, and the loop of a load process.

The top layer of a load process (see :mod:`chatpair.bench.load`), on
:class:`~chatpair.bench.load_sending.LoadSending` (frames out) and
:class:`~chatpair.bench.load_acks.LoadAcking` (ACKs with --resume):
:class:`LoadTraffic` reads and runs the loop: each readable client gets
one big ``recv_into`` a shared buffer, and :meth:`~LoadTraffic.process`
checks the frames in it.

Verification (exact, not sampled)
    A receiver knows what the next frames *must* be: seq ``expect``,
    ``expect+1``, ... up to the end of the sender's batch, each with the send
    time written in the first of them. It builds those bytes the same way the
    sender did (:class:`~chatpair.bench.messages.MessageFactory`) and
    compares them with the received bytes in one ``bytearray.startswith`` (a
    memcmp): header, seq, send time and padding of every frame are checked
    without a Python loop per message. Anything else (a control frame, a
    gap, a swap, a foreign byte) falls to the slow path, which parses frames
    one by one, so loss (``sent - received``) and out-of-order arrivals (a
    seq below the highest already seen) are counted exactly.

The hot loops (``process``, ``fill``, ``flush``, ``step``) cache attributes
in locals and test plain ints: they are the instrument, keep them lean.
"""

from __future__ import annotations

import json
import ssl
import time
from typing import Any

from chatpair.bench.config import RECV_BUFFER, RECV_SIZE
from chatpair.bench.load_accounts import LoadSpec
from chatpair.bench.load_acks import LoadAcking
from chatpair.bench.load_state import (
    BANNER,
    CLOSED,
    CLOSING,
    CONNECTING,
    HANDSHAKE,
    PAIRED,
    Client,
)
from chatpair.bench.messages import BATCH, SEQ_DIGITS, TS_AT, TS_DIGITS, TS_END
from chatpair.proto import BANNER_PREFIX, MAX_BANNER, FrameType, encode_frame

_MSG = int(FrameType.MSG)
_PING = int(FrameType.PING)
_PONG = int(FrameType.PONG)
_ACK = int(FrameType.ACK)


class LoadTraffic(LoadAcking):
    """Reading, the checks, and the loop; the base of every workload.

    For the entry point: :meth:`prepare`, :meth:`run`, :meth:`measured_end`,
    :meth:`close_all` and :attr:`holds_pairs`. For workloads: override
    :meth:`on_received`, :meth:`peer_leaving_ok`, and set :attr:`fills`.
    """

    #: A writable paired client gets new batches (:meth:`fill`), not just its queue.
    fills = False
    #: Keep the pairs open after :meth:`run` until the main process has measured the server.
    holds_pairs = False

    def __init__(self, spec: LoadSpec, progress: Any = None) -> None:
        super().__init__(spec, progress)
        self.F = self.msgs.frame
        self.hdr = self.msgs.header
        self.buf = bytearray(RECV_BUFFER)  # shared by every client: a read is processed at once
        self.bufmv = memoryview(self.buf)
        self.last_rx = time.monotonic_ns()
        self.sending = False  # set by run(): before it, no MSG is made

    # -- the workload's interface ------------------------------------------------------

    def prepare(self) -> None:
        """Before 'go': connect and pair this process's pairs."""
        self.connect_all(self.spec.indices)

    def run(self) -> None:
        """After 'go': the measured workload (idle: nothing, the pairs are held)."""

    def measured_end(self) -> int:
        """When the measured phase ended (``monotonic_ns``)."""
        return time.monotonic_ns()

    def on_received(self, c: Client, n: int) -> None:
        """Workload reaction to ``n`` new messages on ``c``."""

    # -- receiving ----------------------------------------------------------------------

    def on_readable(self, c: Client) -> int:
        """Read once; process every whole frame. Returns messages received."""
        sock = c.sock
        assert sock is not None
        buf = self.buf
        left = c.left
        n_left = len(left)
        if n_left:
            buf[:n_left] = left
        try:
            n = sock.recv_into(self.bufmv[n_left:] if n_left else self.bufmv, RECV_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return 0
        except OSError as err:
            if c.state < CLOSING or c.send_done is False:
                self.error(f"{c.name}: connection lost: {err}")
            self.close_client(c)
            return 0
        if n == 0:
            self.on_eof(c, n_left)
            return 0
        now = time.monotonic_ns()
        self.last_rx = now
        before = c.received
        end = n_left + n
        pos = self.process(c, end, now)
        c.left = bytes(buf[pos:end]) if pos < end else b""
        got = c.received - before
        if got:
            self.record_delivered(now, got)
            if c.ack_clock is not None and c.state != CLOSED:
                self.count_for_ack(c, got, now)
        if self.ssl_ctx is not None and c.state != CLOSED:
            pending = sock.pending()  # type: ignore[attr-defined]
            if pending:
                return got + self.on_readable(c)
        return got

    def on_eof(self, c: Client, n_left: int) -> None:
        if c.state == CLOSING:
            self.close_client(c)
            return
        if n_left:
            self.error(f"{c.name}: server closed the connection in the middle of a frame")
        else:
            self.error(f"{c.name}: server closed the connection")
        self.close_client(c)

    def process(self, c: Client, end: int, now: int) -> int:
        """Consume whole frames from ``self.buf[:end]``; return where the rest starts."""
        buf = self.buf
        pos = 0
        if c.state == BANNER:
            nl = buf.find(b"\n", 0, end)
            if nl < 0:
                if end > MAX_BANNER:
                    self.fail_client(c, "not a chatpair server (no banner line)")
                return 0 if end <= MAX_BANNER else end
            if not buf.startswith(BANNER_PREFIX):
                self.fail_client(c, f"not a chatpair server: {bytes(buf[:min(nl, 80)])!r}")
                return end
            pos = nl + 1
            c.state = HANDSHAKE
        F = self.F
        hdr = self.hdr
        build = self.msgs.build
        while end - pos >= 5:
            if pos >= c.slow_until and end - pos >= F and c.state == PAIRED and buf.startswith(hdr, pos):
                # Fast path: the next frames should be seq expect.. of the sender's
                # current batch, all stamped with the first one's send time.
                k = c.expect
                n = (end - pos) // F
                room = BATCH - k % BATCH
                if n > room:
                    n = room
                try:
                    ts = int(buf[pos + TS_AT:pos + TS_END])
                except ValueError:
                    ts = -1
                if ts >= 0 and buf.startswith(build(k, n, ts), pos):
                    c.expect = k + n
                    c.received += n
                    lat = now - ts
                    self.record_latency(lat, n)
                    pos += n * F
                    continue
                # Something in these n frames is not what a faithful relay sends:
                # look at each of them on the slow path.
                c.slow_until = pos + n * F
            length = int.from_bytes(buf[pos:pos + 4], "big")
            if length == 0 or length > 16_777_215:
                self.fail_client(c, f"bad frame length {length}")
                return end
            if end - pos < 4 + length:
                break
            ftype = buf[pos + 4]
            payload = bytes(buf[pos + 5:pos + 4 + length])
            pos += 4 + length
            self.on_frame(c, ftype, payload, now)
            if c.state == CLOSED:
                return end
        return pos

    def on_frame(self, c: Client, ftype: int, payload: bytes, now: int) -> None:
        """The slow path: one frame of any type."""
        if ftype == _MSG:
            self.on_slow_msg(c, payload, now)
        elif ftype == FrameType.PAIRED:
            if c.state != HANDSHAKE:
                if c.state == PAIRED:  # each client is paired exactly once in a run
                    self.error(f"{c.name}: paired a second time ({payload[:80]!r})")
                return
            assert c.peer is not None
            if b'"peer":"%s"' % c.peer.name.encode() not in payload.replace(b'": "', b'":"'):
                # Someone else is in our room: the target has other users in it.
                self.error(f"{c.name}: paired with someone else ({payload[:80]!r}), expected {c.peer.name!r}")
            c.state = PAIRED
            c.t_paired = now
            self.pair_time.add(now - c.t0)
            if c.peer.state >= PAIRED:
                self.on_pair_ready(c.pair, now)
        elif ftype == FrameType.NOTICE:
            try:
                code = json.loads(payload).get("code")
            except ValueError:
                code = None
            if code == "undelivered":
                c.undelivered += 1
        elif ftype == _PING:
            self.send_ctrl(c, encode_frame(FrameType.PONG, payload))
        elif ftype == FrameType.ERROR:
            try:
                obj = json.loads(payload)
                text = f"{obj.get('code')}: {obj.get('message')}"
            except ValueError:
                text = repr(payload[:100])
            self.fail_client(c, f"server error {text}")
        elif ftype == _ACK:
            self.on_ack(c, payload)
        elif ftype == FrameType.WELCOME:
            if c.ack_clock is not None and b'"session"' not in payload:
                self.fail_client(c, "--resume: the server did not offer resume (its WELCOME has no session)")
        elif ftype in (FrameType.WAITING, _PONG):
            pass
        elif ftype == FrameType.PEER_LEFT:
            if c.state == PAIRED and not self.peer_leaving_ok(c):
                self.error(f"{c.name}: partner left early: {payload[:100]!r}")
        else:
            self.error(f"{c.name}: unexpected frame type 0x{ftype:02x}")

    def peer_leaving_ok(self, c: Client) -> bool:
        """Whether PEER_LEFT is expected now (churn: always; else only once the partner is closing)."""
        peer = c.peer
        return peer is None or peer.state >= CLOSING

    def on_slow_msg(self, c: Client, payload: bytes, now: int) -> None:
        """One MSG checked on its own: counts corrupt, out-of-order and latency."""
        try:
            seq = int(payload[:SEQ_DIGITS])
            ts = int(payload[SEQ_DIGITS + 1:SEQ_DIGITS + 1 + TS_DIGITS])
        except ValueError:
            c.corrupt += 1
            c.received += 1
            return
        if seq < 0 or len(payload) != self.cfg.size or self.msgs.build(seq, 1, ts)[5:] != payload:
            c.corrupt += 1
        c.received += 1
        if seq >= c.expect:
            c.expect = seq + 1
        else:
            c.ooo += 1
        self.record_latency(now - ts, 1)

    # -- the loop -----------------------------------------------------------------------

    def step(self, timeout: float) -> None:
        """Wait up to ``timeout`` s and serve every client that is ready."""
        clients = self.clients
        flood = self.fills
        for fd, ev in self.poller.poll(timeout):
            c = clients.get(fd)
            if c is None:
                continue
            if ev & 4:  # writable
                if c.state == CONNECTING:
                    self.on_connect_writable(c)
                    continue
                if flood and self.sending and c.state == PAIRED and not c.send_done:
                    self.fill(c)
                else:
                    self.flush(c)
            if ev & ~4 and c.state != CLOSED:  # readable, or error/hang-up: recv says which
                got = self.on_readable(c)
                if got:
                    self.on_received(c, got)

    def close_all(self) -> None:
        """Close every client (the run is over; EOFs are expected now)."""
        self.deadline_ns = 0  # no new churn cycles from here on
        for c in list(self.clients.values()):
            if c.ack_clock is not None:
                self.bye_before_close(c)
            c.state = CLOSING
            self.close_client(c)

