"""Tests of the fault-injection proxy itself, against a tiny echo server.

Raw sockets only, no chatpair. Every wait has a deadline; nothing sleeps.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import threading
import time

import pytest
from faultproxy import BUFFER_LIMIT, C2S, S2C, FaultProxy, _Framing

pytestmark = pytest.mark.timeout(10)

BANNER = b"CHATPAIR/1 echo/0 framed echo for the proxy tests\r\n"


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", len(payload) + 1, ftype) + payload


class EchoServer:
    """Echoes every byte back; ``framed``: sends a banner line first, so that both
    directions look like chatpair frame mode when the client sends frames."""

    def __init__(self, framed: bool = False) -> None:
        self.framed = framed
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cond = threading.Condition()
        self.accepted = 0
        self.live = 0
        self.ended: list[tuple[str, bytes]] = []  # per connection: ("eof"|"reset"|..., bytes read)
        self.threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self.threads[0].start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.cond:
                self.accepted += 1
                self.live += 1
                self.cond.notify_all()
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        got, how = bytearray(), "eof"
        with conn:
            conn.settimeout(5)
            try:
                if self.framed:
                    conn.sendall(BANNER)
                while data := conn.recv(65536):
                    got += data
                    conn.sendall(data)
            except ConnectionResetError:
                how = "reset"
            except OSError as exc:
                how = repr(exc)
        with self.cond:
            self.live -= 1
            self.ended.append((how, bytes(got)))
            self.cond.notify_all()

    def wait_ended(self, n: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.ended) >= n, timeout), self.ended
            return list(self.ended)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self.listener.close()
        for t in self.threads:
            t.join(6)


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def framed_echo():
    server = EchoServer(framed=True)
    yield server
    server.close()


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        assert data, f"EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


def read_to_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while data := sock.recv(65536):
        buf += data
    return bytes(buf)


def nothing_to_read(sock: socket.socket) -> bool:
    return not select.select([sock], [], [], 0)[0]  # nothing readable: no data, EOF or reset


def roundtrip(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    assert read_exact(sock, len(data)) == data


def test_bytes_pass_both_ways_unchanged(echo):
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        with connect(proxy) as a, connect(proxy) as b:
            assert proxy.wait_connections(2)
            roundtrip(a, b"hello")
            roundtrip(b, bytes(range(256)))
            roundtrip(a, b"\x00" * 3)
        assert proxy.connections == 2
        assert proxy.wait_for(lambda: proxy.forwarded == {C2S: 264, S2C: 264})


def test_large_transfer_and_half_close(echo):
    blob = random.Random(1).randbytes(4 << 20)
    with FaultProxy("127.0.0.1", echo.port) as proxy, connect(proxy) as sock:
        def send() -> None:
            sock.sendall(blob)
            sock.shutdown(socket.SHUT_WR)  # the end of stream is passed on too
        sender = threading.Thread(target=send)
        sender.start()
        assert read_to_eof(sock) == blob
        sender.join(5)
        assert proxy.wait_for(lambda: proxy.forwarded == {C2S: len(blob), S2C: len(blob)})
        assert echo.wait_ended(1) == [("eof", blob)]


def test_cut_reset_resets_both_sides(echo):
    with FaultProxy("127.0.0.1", echo.port) as proxy, connect(proxy) as sock:
        roundtrip(sock, b"before the cut")
        assert proxy.cut_reset() == 1
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
        assert echo.wait_ended(1) == [("reset", b"before the cut")]
        assert proxy.cut_reset() == 0  # nothing left to cut


def test_cut_reset_acts_on_the_latest_connection_or_all(echo):
    with FaultProxy("127.0.0.1", echo.port) as proxy, \
            connect(proxy) as old, connect(proxy) as new, connect(proxy) as third:
        for sock in (old, new, third):
            roundtrip(sock, b"x")
        assert proxy.cut_reset() == 1
        with pytest.raises(ConnectionResetError):
            third.recv(1)
        roundtrip(old, b"still here")
        assert proxy.cut_reset(which="all") == 2
        for sock in (old, new):
            with pytest.raises(ConnectionResetError):
                sock.recv(1)


# -- mid-frame cuts ------------------------------------------------------------------

FRAMES = [frame(0x02, b"m" * 100), frame(0x04), frame(0x02, b"after")]


def expected_keep(keep: int | None, whole: bytes) -> int:
    length = len(whole) - 4
    if keep is None:
        return 4 + length // 2
    return keep if keep < 4 else min(keep, 3 + length)


@pytest.mark.parametrize("keep", [None, 1, 3, 7, 10**6])
def test_cut_mid_frame_server_to_client(framed_echo, keep):
    with FaultProxy("127.0.0.1", framed_echo.port) as proxy, connect(proxy) as sock:
        assert read_exact(sock, len(BANNER)) == BANNER
        first = frame(0x02, b"whole")
        sock.sendall(first)
        assert read_exact(sock, len(first)) == first
        done = proxy.cut_mid_frame(S2C, keep=keep)
        sock.sendall(b"".join(FRAMES))  # one write: the cut frame starts a chunk, others follow
        assert done.wait(5)
        got = read_to_eof(sock)  # the receiver: an incomplete frame, then end of stream
        n = expected_keep(keep, FRAMES[0])
        assert got == FRAMES[0][:n] and 0 < n < len(FRAMES[0])
        # the sender (the echo server) is cut too
        assert framed_echo.wait_ended(1)[0][0] in ("eof", "reset")


@pytest.mark.parametrize("keep", [None, 2, 3])
def test_cut_mid_frame_client_to_server(framed_echo, keep):
    with FaultProxy("127.0.0.1", framed_echo.port) as proxy, connect(proxy) as sock:
        done = proxy.cut_mid_frame(C2S, keep=keep)  # armed before the first byte
        assert read_exact(sock, len(BANNER)) == BANNER
        sock.sendall(FRAMES[1] + FRAMES[2])
        assert done.wait(5)
        how, got = framed_echo.wait_ended(1)[0]
        n = expected_keep(keep, FRAMES[1])
        assert (how, got) == ("eof", FRAMES[1][:n]) and 0 < n < len(FRAMES[1])
        try:  # the sender is cut too: the proxy stopped reading, so no echo comes back
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass


def test_cut_mid_frame_needs_a_connection(framed_echo):
    with FaultProxy("127.0.0.1", framed_echo.port) as proxy, pytest.raises(LookupError):
        proxy.cut_mid_frame()


@pytest.mark.parametrize("direction", [C2S, S2C])
def test_framing_cut_does_not_depend_on_chunking(direction):
    rng = random.Random(7)
    frames = [frame(0x02, rng.randbytes(rng.randrange(1, 300))) if i % 3 else frame(0x03)
              for i in range(40)]
    prefix = BANNER if direction == S2C else b""
    stream = prefix + b"".join(frames)
    starts, off = [], len(prefix)
    for f in frames:
        starts.append(off)
        off += len(f)
    for _ in range(100):
        arm_at = rng.randrange(len(stream) - 300)
        keep = rng.choice([None, 1, 2, 3, 4, 5, 50, 10**6])
        target = next(s for s in starts if s >= arm_at)
        whole = stream[target:target + 4 + int.from_bytes(stream[target:target + 4], "big")]
        want = target + expected_keep(keep, whole)
        assert target < want < target + len(whole)
        for sizes in ("bytes", "random"):
            parser, pos, cut = _Framing(direction), 0, None
            while cut is None:
                if pos == arm_at:
                    parser.arm(keep)
                step = 1 if sizes == "bytes" else rng.randrange(1, 200)
                if pos < arm_at:
                    step = min(step, arm_at - pos)
                chunk = stream[pos:pos + step]
                assert chunk, "stream ended without a cut"
                kept = parser.feed(chunk)
                if kept is not None:
                    cut = pos + kept
                pos += len(chunk)
            assert cut == want, (arm_at, keep, sizes)


def test_framing_line_mode_is_never_cut():
    parser = _Framing(C2S)
    parser.arm(None)
    assert parser.feed(b"alice\n") is None and parser.feed(frame(0x02, b"hi")) is None


# -- hold and release ----------------------------------------------------------------


def test_hold_client_to_server_then_release(echo):
    with FaultProxy("127.0.0.1", echo.port) as proxy, connect(proxy) as sock:
        roundtrip(sock, b"warm-up")
        assert proxy.hold(C2S) == 1
        for part in (b"one ", b"two ", b"three"):
            sock.sendall(part)
        sock.shutdown(socket.SHUT_WR)
        assert proxy.wait_for(lambda: proxy.received[C2S] == 7 + 13)
        assert proxy.forwarded[C2S] == 7 and nothing_to_read(sock)
        assert proxy.release(C2S) == 1
        assert read_to_eof(sock) == b"one two three"  # the held end of stream comes last
        assert echo.wait_ended(1) == [("eof", b"warm-upone two three")]


def test_hold_server_to_client_then_release(echo):
    with FaultProxy("127.0.0.1", echo.port) as proxy, connect(proxy) as sock:
        proxy.hold(S2C)
        sock.sendall(b"abc")
        sock.sendall(b"def")
        assert proxy.wait_for(lambda: proxy.received[S2C] == 6)
        assert proxy.forwarded == {C2S: 6, S2C: 0} and nothing_to_read(sock)
        proxy.release(S2C)
        assert read_exact(sock, 6) == b"abcdef"


def test_hold_is_bounded_and_release_delivers_everything_in_order(echo):
    blob = random.Random(2).randbytes(3 * BUFFER_LIMIT)
    with FaultProxy("127.0.0.1", echo.port) as proxy, connect(proxy) as sock:
        proxy.hold(C2S)
        sender = threading.Thread(target=sock.sendall, args=(blob,))
        sender.start()
        # the proxy buffers up to its limit, then leaves the rest to TCP flow control
        assert proxy.wait_for(lambda: proxy.received[C2S] >= BUFFER_LIMIT)
        assert proxy.forwarded[C2S] == 0
        proxy.release(C2S)
        assert read_exact(sock, len(blob)) == blob
        sender.join(5)


# -- silent drop ---------------------------------------------------------------------


def test_cut_silent_forwards_nothing_until_released(echo):
    with FaultProxy("127.0.0.1", echo.port) as proxy, connect(proxy) as dead:
        roundtrip(dead, b"alive")
        assert proxy.cut_silent() == 1
        dead.sendall(b"into the void")
        # a witness: a round trip on another connection goes through the same loop
        with connect(proxy) as other:
            roundtrip(other, b"ok")
        assert proxy.received[C2S] == len(b"alive") + 2
        assert nothing_to_read(dead)  # no data, no EOF, no reset
        assert echo.wait_ended(1) == [("eof", b"ok")]
        with echo.cond:
            assert echo.live == 1  # the server heard nothing from the dead link either
        assert proxy.release_silent() == 1
        with pytest.raises(ConnectionResetError):
            dead.recv(1)
        assert echo.wait_ended(2)[1] == ("reset", b"alive")


# -- refusing new connections --------------------------------------------------------


def test_refuse_new(echo):
    with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.refuse_new(True)
        # the reset comes at connect() or at the first read
        with pytest.raises(ConnectionResetError), connect(proxy) as sock:
            sock.recv(1)
        assert proxy.wait_for(lambda: proxy.refused == 1)
        assert proxy.connections == 0 and echo.accepted == 0
        proxy.refuse_new(False)
        with connect(proxy) as sock:
            assert proxy.wait_connections(1)
            roundtrip(sock, b"back")


# -- closing -------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_joins_the_thread_and_closes_every_socket(echo):
    before = open_fds()
    proxy = FaultProxy("127.0.0.1", echo.port).start()
    clients = [connect(proxy) for _ in range(4)]
    for sock in clients:
        roundtrip(sock, b"hi")
    proxy.hold(S2C)
    clients[0].sendall(b"held")
    proxy.cut_silent()
    assert proxy.wait_for(lambda: proxy.received[S2C] == 12)
    thread = proxy._thread
    deadline = time.monotonic() + 2
    proxy.close()
    assert not thread.is_alive() and time.monotonic() < deadline
    proxy.close()  # twice is fine
    for sock in clients:
        sock.close()
    with echo.cond:
        assert echo.cond.wait_for(lambda: echo.live == 0, 5)
    assert open_fds() == before
    with pytest.raises(RuntimeError):
        proxy.cut_reset()


def test_close_without_start_closes_the_listener(echo):
    before = open_fds()
    FaultProxy("127.0.0.1", echo.port).close()
    assert open_fds() == before
