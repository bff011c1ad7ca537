"""The workloads: one small class per ``--mode``, on top of :class:`LoadTraffic`.

=================  ==========================================================
class              traffic pattern
=================  ==========================================================
``FloodLoad``      both clients of every pair send batches as fast as the
                   socket (and the window) allows
``PingPongLoad``   strict turns: A sends one, B answers one, A the next...;
                   round trips measured at A
``IdleLoad``       pairs are opened and held; the main process measures the
                   server meanwhile
``ChurnLoad``      each slot connects a pair, exchanges a few messages, says
                   BYE, and again, until the duration is over
=================  ==========================================================

A workload overrides the hooks of :class:`~chatpair.bench.load_traffic.LoadTraffic`
(``run``, ``on_received``, ``on_pair_ready``...); the entry point in
:mod:`chatpair.bench.load` picks the class from :data:`LOADS`.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

from chatpair.bench.load_accounts import LoadReport, LoadSpec
from chatpair.bench.load_state import CLOSED, CLOSING, PAIRED, Client, Pair
from chatpair.bench.load_traffic import LoadTraffic
from chatpair.bench.poller import Poller
from chatpair.proto import FrameType, encode_frame

_BYE_FRAME = encode_frame(FrameType.BYE)
#: After Ctrl-C, messages in flight get this long to arrive before the report.
DRAIN_NS = 1_000_000_000


class StreamLoad(LoadTraffic):
    """A workload that runs until every message is in: flood and ping-pong."""

    def measured_end(self) -> int:
        # The measured phase ends with the last message received (the loop
        # notices completion a little later).
        return self.last_rx

    def complete(self) -> bool:
        """Every message sent so far has arrived, and no sender has more to send."""
        raise NotImplementedError

    def stop_sending(self) -> None:
        """Ctrl-C: make no new messages; what is in flight may still arrive."""
        raise NotImplementedError

    def drive(self) -> None:
        """Run the loop until every message is in, or nothing arrives for a while.

        When the main process asks to stop (Ctrl-C), senders stop and the
        messages in flight get :data:`DRAIN_NS` to arrive.
        """
        stall = int(self.cfg.stall_timeout * 1e9)
        self.last_rx = time.monotonic_ns()
        next_pub = 0
        drain_until = 0
        while True:
            self.step(0.05)
            now = time.monotonic_ns()
            if now >= next_pub:
                next_pub = now + 100_000_000
                self.tick_acks(now)
                self.publish()
                if self.complete():
                    break
                if not drain_until and self.stopping():
                    self.stop_sending()
                    drain_until = now + DRAIN_NS
                elif drain_until and now > drain_until:
                    break
                if now - self.last_rx > stall and (self.deadline_ns == 0 or now > self.deadline_ns):
                    self.error(f"no message arrived for {self.cfg.stall_timeout:g} s; giving up")
                    break
        self.publish()


class FloodLoad(StreamLoad):
    """Both clients of every pair send as fast as the socket allows."""

    fills = True

    def __init__(self, spec: LoadSpec, progress: Any = None) -> None:
        super().__init__(spec, progress)
        self.window = spec.config.window

    def run(self) -> None:
        cfg = self.cfg
        total = cfg.messages if cfg.messages is not None else -1
        self.sending = True
        self.deadline_ns = time.monotonic_ns() + int((cfg.duration or 0) * 1e9)
        for pair in self.pairs:
            for c in (pair.a, pair.b):
                if c is not None and c.state == PAIRED:
                    c.total = total
                    self.set_events(c, Poller.READ | Poller.WRITE)
        self.drive()

    def stop_sending(self) -> None:
        for pair in self.pairs:
            for c in (pair.a, pair.b):
                if c is not None and not c.send_done:
                    c.total = c.sent
                    c.send_done = True  # a batch being written is finished first (fill)

    def on_received(self, c: Client, n: int) -> None:
        sender = c.peer
        if sender is not None and sender.blocked and sender.sent - c.expect < self.window:
            sender.blocked = False
            self.fill(sender)

    def complete(self) -> bool:
        for pair in self.pairs:
            for c in (pair.a, pair.b):
                if c is None or c.state != PAIRED:
                    continue
                peer = c.peer
                if not peer.send_done or c.expect < peer.sent:  # type: ignore[union-attr]
                    return False
        return True


class PingPongLoad(StreamLoad):
    """Strict turns: A sends one message, B answers with one, A sends the next..."""

    def __init__(self, spec: LoadSpec, progress: Any = None) -> None:
        super().__init__(spec, progress)
        self.turns = -1  # A's messages to send; -1: until the deadline
        self.single = False  # run_single: sockets are blocking and not in the poller

    def run(self) -> None:
        cfg = self.cfg
        self.turns = cfg.messages if cfg.messages is not None else -1
        self.deadline_ns = time.monotonic_ns() + int((cfg.duration or 0) * 1e9)
        active = [p for p in self.pairs if p.a is not None and p.a.state == PAIRED and p.b.state == PAIRED]  # type: ignore[union-attr]
        if len(active) == 1 and self.ssl_ctx is None:
            self.run_single(active[0])
            return
        for pair in active:
            self.send_one(pair.a)  # type: ignore[arg-type]
        self.drive()

    def run_single(self, pair: Pair) -> None:
        """One pair: blocking sockets, no selector - each hop wakes the reader
        directly instead of through epoll, which is a few microseconds less per
        message (measured: p50 one-way latency drops by about a tenth)."""
        a, b = pair.a, pair.b
        assert a is not None and b is not None
        for c in (a, b):
            self.poller.unregister(c.fd)
            c.events = 0
            c.sock.settimeout(self.cfg.stall_timeout)  # type: ignore[union-attr]
        self.single = True
        self.send_one(a)
        # on_received makes B answer and A send the next turn (or finish).
        while a.state == PAIRED and b.state == PAIRED and not a.send_done:
            if self.stopping():
                self.turns = 0  # A's next turn is its last
            for reader in (b, a):
                want = reader.received + 1
                while reader.received < want and reader.state == PAIRED:
                    if self.ack_pending and not self.wait_readable(reader):
                        continue  # an ACK fell due and went out first
                    got = self.on_readable(reader)
                    if got:
                        self.on_received(reader, got)
        self.publish()

    def set_events(self, c: Client, events: int) -> None:
        if not self.single:
            super().set_events(c, events)

    def stop_sending(self) -> None:
        self.turns = 0  # every A stops at its next turn

    def send_one(self, c: Client) -> None:
        now = time.monotonic_ns()
        c.t_last = now
        data = self.msgs.build(c.sent, 1, now)
        c.sent += 1
        sock = c.sock
        if c.off >= len(c.out) and not c.ctrl and sock is not None and c.state != CLOSED:
            # Nothing queued: write straight away (the common case, and the
            # per-message cost here is what limits ping-pong on two cores).
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                sent = 0
            except OSError as err:
                self.fail_client(c, f"send: {err}")
                return
            if sent == len(data):
                return
            data = data[sent:]
        self.queue(c, data)

    def on_received(self, c: Client, n: int) -> None:
        if c.role == 1:
            for _ in range(n):
                self.send_one(c)
            return
        now = time.monotonic_ns()
        self.rtt.add(now - c.t_last)
        if (self.turns >= 0 and c.sent >= self.turns) or (self.turns < 0 and now >= self.deadline_ns):
            c.send_done = True
            assert c.peer is not None
            c.peer.send_done = True
            return
        self.send_one(c)

    def complete(self) -> bool:
        for pair in self.pairs:
            a, b = pair.a, pair.b
            if a is None or b is None or a.state != PAIRED:
                continue
            if not a.send_done or a.expect < b.sent or b.expect < a.sent:
                return False
        return True


class IdleLoad(LoadTraffic):
    """Pairs are opened and held; the main process measures the server meanwhile."""

    holds_pairs = True


class ChurnLoad(LoadTraffic):
    """Each slot connects a pair, exchanges a few messages, says BYE, and again."""

    fills = True

    def __init__(self, spec: LoadSpec, progress: Any = None) -> None:
        super().__init__(spec, progress)
        self.churn_delivered = 0  # messages of the cycles already finished, and of the open ones

    def prepare(self) -> None:
        """One cycle per slot, not counted: the server allocates what it keeps
        (worker channels, buffers) so the descriptor baseline is taken after."""
        self.churn(0.0)
        self.reset_accounts()
        self.churn_delivered = 0

    def run(self) -> None:
        self.churn(self.cfg.duration)

    def churn(self, duration: float | None) -> None:
        """Cycle every slot until ``duration`` s are over, then close what is open."""
        cfg = self.cfg
        self.deadline_ns = time.monotonic_ns() + int((duration or 0) * 1e9)
        self.sending = True
        for i in self.spec.indices:
            pair = Pair(i, "")
            pair.cycle = 1
            self.pairs.append(pair)
            self.new_pair(pair)
        stall = int(max(cfg.stall_timeout, 10.0) * 1e9)
        self.last_rx = time.monotonic_ns()
        next_pub = 0
        drain_until = 0
        while self.clients:
            self.step(0.05)
            now = time.monotonic_ns()
            if now >= next_pub:
                next_pub = now + 100_000_000
                self.tick_acks(now)
                self.publish()
                if not drain_until and self.stopping():
                    self.deadline_ns = 0  # Ctrl-C: no new cycles; the open ones may finish
                    drain_until = now + DRAIN_NS
                elif drain_until and now > drain_until:
                    break
                if now - self.last_rx > stall:
                    self.error(f"churn stalled: nothing arrived for {stall / 1e9:g} s")
                    break
        self.close_all()
        self.publish()

    def on_pair_ready(self, pair: Pair, now: int) -> None:
        super().on_pair_ready(pair, now)
        for c in (pair.a, pair.b):
            assert c is not None
            c.total = self.cfg.messages or 1
            self.set_events(c, Poller.READ | Poller.WRITE)

    def on_received(self, c: Client, n: int) -> None:
        self.maybe_bye(c)

    def on_send_done(self, c: Client) -> None:
        self.maybe_bye(c)

    def maybe_bye(self, c: Client) -> None:
        # BYE once this client sent everything and got everything from its
        # partner, so no message can be caught in the partner's departure.
        peer = c.peer
        assert peer is not None
        if c.state == PAIRED and c.send_done and c.off >= len(c.out) and peer.send_done \
                and c.expect >= peer.total:
            c.state = CLOSING
            self.send_ctrl(c, _BYE_FRAME)

    def on_pair_closed(self, pair: Pair) -> None:
        a, b = pair.a, pair.b
        assert a is not None and b is not None
        r = self.report
        if a.t_paired and b.t_paired and a.received >= b.sent and b.received >= a.sent:
            r.cycles += 1
        # Keep the totals of the finished cycle, then reuse the slot.
        r.add_client(a)
        r.add_client(b)
        self.churn_delivered += a.received + b.received
        pair.a = pair.b = None
        if time.monotonic_ns() < self.deadline_ns:
            pair.cycle += 1
            self.new_pair(pair)

    def peer_leaving_ok(self, c: Client) -> bool:
        return True

    def progress_count(self) -> int:
        return self.report.cycles

    def delivered_so_far(self) -> int:
        return self.churn_delivered

    def count_open_pairs(self, r: LoadReport) -> None:
        # Pairs cut short by the end of the run still count what they sent
        # (closed = 2: closing them now starts no new cycle).
        for pair in self.pairs:
            if pair.a is not None:
                pair.closed = 2
                for c in (pair.a, pair.b):
                    r.sent += c.sent  # type: ignore[union-attr]
                    r.delivered += c.received  # type: ignore[union-attr]


#: The workload of each ``--mode``.
LOADS: dict[str, type[LoadTraffic]] = {
    "flood": FloodLoad, "pingpong": PingPongLoad, "idle": IdleLoad, "churn": ChurnLoad,
}
