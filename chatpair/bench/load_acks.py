"""Acknowledging with --resume (PROTOCOL.md section 6), as a well-behaved client does.

The fourth layer of a load process (see :mod:`chatpair.bench.load`). With
``--resume`` every client asked for a resumable session in HELLO, so it
must count the MSG frames it receives and acknowledge them: at the latest
after 64 unacknowledged frames, or :data:`~chatpair.bench.config.ACK_DELAY`
seconds after the first of them arrived (the spec's limit is 1 s). One ACK
covers a whole read, however many frames it held. The counting and the
schedule are :class:`chatpair.proto.resume.AckClock`; this layer only
sends the ACK frames and checks the server's: what acknowledging costs is
what ``--resume`` measures.
"""

from __future__ import annotations

import json
import select
import ssl
import time
from typing import Any

from chatpair.bench.load_accounts import LoadSpec
from chatpair.bench.load_sending import LoadSending
from chatpair.bench.load_state import CLOSED, CONNECTING, Client
from chatpair.proto import FrameType, encode_frame
from chatpair.proto.resume import encode_ack

_BYE = encode_frame(FrameType.BYE)


class LoadAcking(LoadSending):
    """The ACK schedule of every client that asked for resume.

    For the reading layer: :meth:`count_for_ack` after each read that held
    MSG frames, :meth:`on_ack` for an ACK from the server; for the loops:
    :meth:`tick_acks` a few times a second.
    """

    def __init__(self, spec: LoadSpec, progress: Any = None) -> None:
        super().__init__(spec, progress)
        self.ack_pending: set[Client] = set()  # clients with an ACK to send later

    def count_for_ack(self, c: Client, got: int, now: int) -> None:
        """``got`` MSG frames were read: ACK now if 64 are unacknowledged or one is old, else later."""
        clock = c.ack_clock
        assert clock is not None
        t = now / 1e9
        clock.received_msgs(got, t)
        if clock.ack_due(t):
            self.send_ack(c)
        else:
            self.ack_pending.add(c)

    def send_ack(self, c: Client) -> None:
        assert c.ack_clock is not None
        self.send_ctrl(c, encode_ack(c.ack_clock.take_ack()))
        self.report.acks_sent += 1
        self.ack_pending.discard(c)

    def tick_acks(self, now: int) -> None:
        """The timer side of the ACK rule: acknowledge what has waited long enough."""
        if not self.ack_pending:
            return
        t = now / 1e9
        for c in list(self.ack_pending):
            if c.state == CLOSED or c.ack_clock is None:
                self.ack_pending.discard(c)
            elif c.ack_clock.ack_due(t):
                self.send_ack(c)

    def on_ack(self, c: Client, payload: bytes) -> None:
        """The server's ACK of this client's messages: it must never go back or past what was sent."""
        if c.ack_clock is None:
            self.error(f"{c.name}: ACK from the server in a session that is not resumable")
            return
        self.report.acks_received += 1
        try:
            count = json.loads(payload)["received"]
        except (ValueError, KeyError, TypeError):
            self.error(f"{c.name}: bad ACK from the server: {payload[:80]!r}")
            return
        if not isinstance(count, int) or count < c.server_acked or count > c.sent:
            self.error(f"{c.name}: server ACK of {count!r} after {c.server_acked}, with {c.sent} sent")
            return
        c.server_acked = count

    def bye_before_close(self, c: Client) -> None:
        """BYE before the run's last close, where ``c`` is at a frame boundary.

        A close without it is a drop, for which the server would keep the
        session (and tell the partner ``peer_away``) for its resume window.
        """
        if c.sock is not None and c.state != CONNECTING and c.off >= len(c.out) and not c.ctrl:
            try:
                c.sock.send(_BYE)
            except (OSError, ssl.SSLError):
                pass

    def wait_readable(self, c: Client) -> bool:
        """Blocking sockets (one ping-pong pair): wait for ``c`` to be readable, ACKs falling due meanwhile.

        False when an ACK fell due first (it has been sent; call again).
        """
        deadlines = [p.ack_clock.deadline() or 0.0 for p in self.ack_pending if p.ack_clock is not None]
        if not deadlines or c.sock is None:
            return True
        wait = max(0.0, min(deadlines) - time.monotonic())
        if select.select([c.sock], [], [], wait)[0]:
            return True
        self.tick_acks(time.monotonic_ns())
        return False
