"""Many pairs, cut again and again with messages in flight both ways: nothing lost, nothing twice.

Each pair runs in its own thread with raw frame-mode sockets (tests/wire.py,
written from PROTOCOL.md): both partners send numbered messages, one of them
is cut at once - reset or plain close, with its messages and its partner's
still in flight - and comes back with RESUME, re-sending what RESUMED says
the server has not received. At the end each side must have received the
other's numbers exactly once, in order, and the server's log must show no
crash. It runs against relay threads and against relay worker processes.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import traceback

import pytest
import wire
from conftest import wait_for
from wire import ACK, MSG, NOTICE, PAIRED, PING, PONG, RESUME, RESUMED, WAITING, WELCOME

pytestmark = pytest.mark.timeout(120)

PAIRS = 12
ROUNDS = 8
BURST = 40


class Side:
    """One resumable client: what it sent (kept until acknowledged), what it received."""

    def __init__(self, port: int, name: str, room: str) -> None:
        self.port, self.name, self.room = port, name, room
        self.sent: list[bytes] = []  # every message it ever sent, numbered by position
        self.acked = 0  # the server's ACK covers this many of them
        self.got: list[int] = []  # the partner's numbers, in the order they arrived
        self.conn = wire.Client(port, timeout=10)
        self.conn.hello(name, room, resume=True)
        welcome = self.conn.expect(WELCOME)
        self.session = welcome["session"]
        self.conn.expect(WAITING)

    def send_burst(self, n: int) -> None:
        frames = []
        for _ in range(n):
            data = f"{self.name}:{len(self.sent)}".encode()
            self.sent.append(data)
            frames.append(wire.frame(MSG, data))
        try:
            self.conn.send(b"".join(frames))
        except OSError:
            pass  # cut meanwhile by the server's side of a take-over: resume will re-send

    def cut(self, rng: random.Random) -> None:
        if rng.random() < 0.5:
            self.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.conn.sock.close()

    def resume(self) -> None:
        conn = wire.Client(self.port, timeout=10)
        conn.send_frame(RESUME, json.dumps({"version": 1, "session": self.session,
                                            "received": len(self.got)}).encode())
        assert conn.expect(WELCOME)["session"] == self.session
        resumed = conn.expect(RESUMED)
        assert resumed["peer"] is not None, f"{self.name} lost its partner: {resumed}"
        have = resumed["received"]
        assert self.acked <= have <= len(self.sent), (self.acked, have, len(self.sent))
        self.conn = conn
        if have < len(self.sent):
            conn.send(b"".join(wire.frame(MSG, m) for m in self.sent[have:]))

    def read_until(self, count: int, partner: str) -> None:
        """Read until ``count`` of the partner's messages are in (acknowledging as we go)."""
        unacked = 0
        while len(self.got) < count:
            ftype, payload = self.conn.read_frame()
            if ftype == MSG:
                who, number = payload.decode().split(":")
                assert who == partner
                self.got.append(int(number))
                unacked += 1
                if unacked >= 64 or len(self.got) == count:
                    self.conn.send_frame(ACK, json.dumps({"received": len(self.got)}).encode())
                    unacked = 0
            elif ftype == ACK:
                self.acked = max(self.acked, json.loads(payload)["received"])
            elif ftype == PING:
                self.conn.send_frame(PONG, payload)
            elif ftype == NOTICE:
                code = json.loads(payload)["code"]
                assert code in ("peer_away", "peer_back"), payload
            else:
                raise AssertionError(f"{self.name}: unexpected {wire.tname(ftype)} {payload[:200]!r}")


def run_pair(port: int, index: int, errors: list[BaseException]) -> None:
    rng = random.Random(index)
    try:
        a = Side(port, f"a{index}", f"room{index}")
        b = Side(port, f"b{index}", f"room{index}")
        for side in (a, b):
            assert side.conn.expect(PAIRED)["room"] == f"room{index}"
        for _ in range(ROUNDS):
            a.send_burst(rng.randint(1, BURST))
            b.send_burst(rng.randint(1, BURST))
            victim = rng.choice((a, b))
            victim.cut(rng)
            victim.resume()
            a.read_until(len(b.sent), b.name)
            b.read_until(len(a.sent), a.name)
        assert a.got == list(range(len(b.sent)))
        assert b.got == list(range(len(a.sent)))
        for side in (a, b):
            side.conn.close()
    except BaseException as err:  # noqa: BLE001 - reported by the test
        errors.append(err)


@pytest.mark.parametrize("shape", [(), ("--workers", "2")], ids=["threads", "workers"])
def test_pairs_cut_with_messages_in_flight_lose_and_double_nothing(start_server, shape):
    srv = start_server(*shape)
    errors: list[BaseException] = []
    threads = [threading.Thread(target=run_pair, args=(srv.port, i, errors), daemon=True) for i in range(PAIRS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, "".join(traceback.format_exception(errors[0])) + srv.stderr()[-4000:]
    # (log lines are flushed by the server's loops a quarter second at most after the event)
    wait_for("every resume in the log", lambda: srv.stderr().count(": resumed") >= PAIRS * ROUNDS, 10)
    log = srv.stderr()
    assert "Traceback" not in log and "crashed" not in log, log[-3000:]
