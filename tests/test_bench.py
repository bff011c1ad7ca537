"""``chatpair bench``: every mode on a tiny run, ``--json``, and loss/reorder detection.

No timing assertions: these check that the instrument counts exactly. A tiny
fake relay (threads, just enough protocol) drops or swaps one message so the
bench must notice and fail.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatpair.bench import BATCH, BenchConfig, LogHistogram, MessageFactory, run_bench
from chatpair.bench.report import render, render_histogram

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(30)


# -- pure pieces -------------------------------------------------------------------------


def test_messages_carry_seq_and_send_time() -> None:
    m = MessageFactory(40)
    ts = time.monotonic_ns()
    frames = m.build(2 * BATCH + 5, 3, ts)
    assert len(frames) == 3 * 45
    for i in range(3):
        frame = bytes(frames[i * 45:(i + 1) * 45])
        length, ftype = struct.unpack(">IB", frame[:5])
        assert (length, ftype) == (41, 0x02)
        payload = frame[5:].decode("utf-8")  # a MSG must be valid UTF-8
        seq, sent, _pad = payload.split(":", 2)
        assert int(seq) == 2 * BATCH + 5 + i and int(sent) == ts
        assert bytes(m.build(2 * BATCH + 5 + i, 1, ts)) == frame  # one at a time: same bytes


def test_histogram_percentiles_are_within_two_percent() -> None:
    h = LogHistogram()
    values = list(range(1, 100_001))
    for v in values:
        h.add(v * 37)
    for p in (50, 90, 99, 99.9):
        exact = values[int(len(values) * p / 100) - 1] * 37
        assert abs(h.percentile(p) - exact) / exact < 0.02  # type: ignore[operator]
    assert h.total == len(values)
    for v in (0, 1, 63, 64, 65, 1000, 123456789):
        low, high = LogHistogram.bounds(LogHistogram.index(v))
        assert low <= v < high
    assert "histogram" in render_histogram(h)


# -- against the real server ---------------------------------------------------------------


@pytest.mark.parametrize("mode, extra", [
    ("flood", {"messages": 10}),
    ("pingpong", {"messages": 10}),
    ("idle", {"duration": 0.2}),  # the default hold is 3 s
    ("churn", {"messages": 3, "duration": 0.3}),
])
def test_each_mode_small_run(mode: str, extra: dict) -> None:
    result = run_bench(BenchConfig(mode=mode, pairs=2, size=40, **extra))
    assert result.ok, result.failures
    assert result.pairs_connected >= 2
    assert result.server_local and result.server_rss_before
    if mode in ("flood", "pingpong"):
        assert result.sent == result.delivered == 2 * 2 * 10
        assert result.latency.total == result.delivered
    if mode == "pingpong":
        assert result.rtt.total == 2 * 10
    if mode == "idle":
        assert result.memory_per_pair is not None
    if mode == "churn":
        assert result.churn_cycles >= 2
        assert result.delivered == result.sent == result.churn_cycles * 2 * 3
        assert result.server_fds_after is not None
    assert "result" in render(result)


def test_cli_json_is_one_object_and_server_options_pass_through() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "chatpair", "bench", "--pairs", "2", "--messages", "10", "--json",
         "--", "--relay-threads", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=25,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # exactly one JSON document
    assert data["ok"] is True and data["lost"] == 0 and data["delivered"] == 40
    assert "--relay-threads" in data["server_command"]


# -- a relay that misbehaves on purpose ---------------------------------------------------


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    length, ftype = struct.unpack(">IB", _read_exact(sock, 5))
    return ftype, _read_exact(sock, length - 1)


def _frame(ftype: int, obj: dict | None = None, raw: bytes = b"") -> bytes:
    payload = json.dumps(obj).encode() if obj is not None else raw
    return struct.pack(">IB", len(payload) + 1, ftype) + payload


class FaultyRelay:
    """Pairs the first two clients and relays A->B with one fault: ``drop`` or ``swap``."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self._main = threading.Thread(target=self._serve, name="faulty-relay")
        self._main.start()

    def _serve(self) -> None:
        self.listener.settimeout(20)
        names = []
        try:
            while len(names) < 2:
                conn, _ = self.listener.accept()
                conn.settimeout(20)
                self.conns.append(conn)
                conn.sendall(b"CHATPAIR/1 faulty/0 test relay\r\n")
                ftype, payload = _read_frame(conn)
                assert ftype == 0x01
                hello = json.loads(payload)
                conn.sendall(_frame(0x10, {"version": 1, "server": "faulty", "max_frame": 65536,
                                           "ping_interval": 30, "idle_timeout": 90})
                             + _frame(0x11, {"room": hello.get("room")}))
                if hello["name"] == "benchprobe":  # bench checks its target first: not one to pair
                    self.conns.pop().close()
                    continue
                names.append(hello["name"])
        except (OSError, EOFError):
            return
        a, b = self.conns
        a.sendall(_frame(0x12, {"peer": names[1], "room": None}))
        b.sendall(_frame(0x12, {"peer": names[0], "room": None}))
        for src, dst, faulty in ((a, b, True), (b, a, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, faulty), name="faulty-pump")
            self.threads.append(t)
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, faulty: bool) -> None:
        held: bytes | None = None
        count = 0
        try:
            while True:
                ftype, payload = _read_frame(src)
                frame = _frame(ftype, raw=payload)
                if ftype == 0x02:
                    count += 1
                    if faulty and count == 3:
                        if self.fault == "drop":
                            continue
                        held = frame  # swap: the 3rd goes after the 4th
                        continue
                dst.sendall(frame)
                if held is not None:
                    dst.sendall(held)
                    held = None
        except (OSError, EOFError):
            return

    def close(self) -> None:
        for sock in [self.listener, *self.conns]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._main.join(10)
        for t in self.threads:
            t.join(10)


@pytest.fixture
def faulty_relay():
    made: list[FaultyRelay] = []

    def make(fault: str) -> FaultyRelay:
        relay = FaultyRelay(fault)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


def test_a_dropped_message_is_counted_lost(faulty_relay) -> None:
    relay = faulty_relay("drop")
    result = run_bench(BenchConfig(mode="flood", pairs=1, messages=10, target=("127.0.0.1", relay.port)))
    assert result.lost == 1 and result.out_of_order == 0
    assert result.delivered == 19 and result.sent == 20
    assert not result.ok and "1 message(s) lost" in result.failures


def test_a_swapped_message_is_out_of_order_and_exits_non_zero(faulty_relay) -> None:
    relay = faulty_relay("swap")
    proc = subprocess.run(
        [sys.executable, "-m", "chatpair", "bench", "--pairs", "1", "--messages", "10", "--json",
         "--target", f"127.0.0.1:{relay.port}"],
        cwd=ROOT, capture_output=True, text=True, timeout=25, env={**os.environ, "COLUMNS": "100"},
    )
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["out_of_order"] == 1 and data["lost"] == 0 and data["delivered"] == 20
    assert "out of order" in proc.stderr


def test_bad_options_are_one_line_errors() -> None:
    proc = subprocess.run([sys.executable, "-m", "chatpair", "bench", "--target", "nonsense"],
                          cwd=ROOT, capture_output=True, text=True, timeout=25)
    assert proc.returncode == 2
    assert "HOST:PORT" in proc.stderr and "Traceback" not in proc.stderr
