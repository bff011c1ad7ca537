"""``chatpair bench --resume``: HELLO asks for resume, clients count and ACK as PROTOCOL.md section 6 says.

A small fake server (threads, just enough protocol) offers resume - or
does not - relays MSG frames between the two clients of a room, ACKs what
each client sent, and records every ACK the bench clients send with the
time it came and how many MSG frames had been written to that client by
then. The checks are the spec's rule: counts never go back nor past what
was sent, at most 64 MSG frames unacknowledged after a read, and no MSG
left unacknowledged for more than a second while the run goes on. The
same bench against the real ``chatpair server`` runs once that server
offers resume.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chatpair.bench import BenchConfig, run_bench

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)

ACK, MSG, BYE, HELLO = 0x07, 0x02, 0x04, 0x01


def _frame(ftype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", len(payload) + 1, ftype) + payload


def _json_frame(ftype: int, obj: dict) -> bytes:
    return _frame(ftype, json.dumps(obj).encode())


@dataclass
class Peer:
    """One client connection as the fake server sees it."""

    sock: socket.socket
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    written: int = 0  # MSG frames written to this client
    first_unacked_at: float | None = None  # when the oldest MSG not covered by an ACK was written
    acks: list[tuple[int, int, float]] = field(default_factory=list)  # (count, written, late by s)
    received: int = 0  # MSG frames this client sent

    def send(self, data: bytes, msgs: int = 0) -> None:
        with self.lock:
            self.sock.sendall(data)
            if msgs:
                self.written += msgs
                if self.first_unacked_at is None:
                    self.first_unacked_at = time.monotonic()

    def on_ack(self, count: int) -> None:
        with self.lock:
            waited = time.monotonic() - self.first_unacked_at if self.first_unacked_at else 0.0
            self.acks.append((count, self.written, waited))
            self.first_unacked_at = None if count >= self.written else time.monotonic()


class ResumeRelay:
    """Pairs clients by room; relays MSG; offers resume unless ``offer`` is False; ``delay`` slows each MSG."""

    def __init__(self, offer: bool = True, delay: float = 0.0) -> None:
        self.offer = offer
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.peers: list[Peer] = []
        self.rooms: dict[str, Peer] = {}
        self.hellos: list[dict] = []
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self._accept = threading.Thread(target=self._serve, name="resume-relay")
        self._accept.start()

    def _serve(self) -> None:
        self.listener.settimeout(30)
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(30)
            self.socks.append(conn)
            t = threading.Thread(target=self._conn, args=(conn,), name="resume-conn")
            self.threads.append(t)
            t.start()

    def _read(self, sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _conn(self, sock: socket.socket) -> None:
        try:
            sock.sendall(b"CHATPAIR/1 fake/0 resume test relay\r\n")
            length, ftype = struct.unpack(">IB", self._read(sock, 5))
            hello = json.loads(self._read(sock, length - 1))
            assert ftype == HELLO
            with self.lock:
                self.hellos.append(hello)
            welcome = {"version": 1, "server": "fake", "max_frame": 65536, "ping_interval": 30, "idle_timeout": 90}
            if self.offer and hello.get("resume") is True:
                welcome |= {"session": "t" * 32, "resume_window": 30}
            sock.sendall(_json_frame(0x10, welcome) + _json_frame(0x11, {"room": hello["room"]}))
            peer = Peer(sock, hello["name"])
            resumable = "session" in welcome
            with self.lock:
                partner = self.rooms.pop(hello["room"], None)
                if partner is None:
                    self.rooms[hello["room"]] = peer
                self.peers.append(peer)
            if partner is not None:
                # Linked before PAIRED goes out: the waiter starts sending the
                # moment it reads PAIRED, and its thread must know where to.
                peer.partner = partner  # type: ignore[attr-defined]
                partner.partner = peer  # type: ignore[attr-defined]
                partner.send(_json_frame(0x12, {"peer": peer.name, "room": hello["room"]}))
                peer.send(_json_frame(0x12, {"peer": partner.name, "room": hello["room"]}))
            while True:
                length, ftype = struct.unpack(">IB", self._read(sock, 5))
                payload = self._read(sock, length - 1)
                if ftype == BYE:
                    return
                if ftype == ACK:
                    peer.on_ack(json.loads(payload)["received"])
                elif ftype == MSG:
                    if self.delay:
                        time.sleep(self.delay)  # the fake network is slow on purpose
                    other: Peer = peer.partner  # type: ignore[attr-defined]
                    other.send(_frame(MSG, payload), 1)
                    peer.received += 1
                    if resumable and peer.received % 50 == 0:
                        peer.send(_json_frame(ACK, {"received": peer.received}))
        except (OSError, EOFError, AttributeError):
            return

    def bench_peers(self) -> list[Peer]:
        return [p for p in self.peers if not p.name.startswith("benchprobe")]

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        except OSError:
            pass
        self.listener.close()
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._accept.join(10)
        for t in self.threads:
            t.join(10)


@pytest.fixture
def relay():
    made: list[ResumeRelay] = []

    def make(**kwargs: object) -> ResumeRelay:
        r = ResumeRelay(**kwargs)  # type: ignore[arg-type]
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _check_ack_rule(peer: Peer) -> None:
    counts = [count for count, _, _ in peer.acks]
    assert counts == sorted(counts), f"{peer.name}: ACK counts went back: {counts}"
    for count, written, waited in peer.acks:
        assert count <= written, f"{peer.name}: ACK of {count} with only {written} written"
        # The bench ACKs within 0.5 s; 1.5 s leaves room for a loaded machine
        # and still fails a client that waits for the 64th message instead.
        assert waited <= 1.5, f"{peer.name}: an MSG waited {waited:.2f} s for its ACK"
    last = counts[-1] if counts else 0
    # The run ends right after the last read: what it read then may be unacknowledged, fewer than 64.
    assert peer.written - last < 64 or peer.written - last <= peer.written - (counts[-2] if len(counts) > 1 else 0)


def test_flood_hello_asks_for_resume_and_clients_ack(relay) -> None:
    r = relay()
    result = run_bench(BenchConfig(mode="flood", pairs=2, messages=1500, size=40, resume=True,
                                   target=("127.0.0.1", r.port)))
    assert result.ok, result.failures
    assert result.delivered == 2 * 2 * 1500
    assert all(h.get("resume") is True for h in r.hellos)
    peers = r.bench_peers()
    assert len(peers) == 4
    for peer in peers:
        assert peer.written == 1500 and peer.acks, peer.name
        _check_ack_rule(peer)
        assert peer.acks[-1][0] > 1500 - 64 * 10  # acknowledged all along, not only at the end
    assert result.acks_sent == sum(len(p.acks) for p in peers)
    # The fake server's ACKs (one per 50 messages) were read and checked - all but
    # the last one or two per client, which may still be in flight when the run ends.
    assert 4 * (1500 // 50 - 2) <= result.acks_received <= 4 * (1500 // 50)
    assert result.server_welcome is not None and "session" not in result.server_welcome  # a secret: not kept


def test_pingpong_acks_within_a_second_even_when_nothing_more_arrives(relay) -> None:
    # Each hop takes 0.7 s: an ACK is due before the next message comes, so the
    # time rule (not the 64-message one) must send it; one pair = blocking sockets.
    r = relay(delay=0.7)
    result = run_bench(BenchConfig(mode="pingpong", pairs=1, messages=3, size=40, resume=True,
                                   target=("127.0.0.1", r.port)))
    assert result.ok, result.failures
    for peer in r.bench_peers():
        _check_ack_rule(peer)
        assert peer.acks, f"{peer.name} never acknowledged"
        assert peer.acks[0][0] >= 1


def test_a_server_that_does_not_offer_resume_fails_clearly(relay) -> None:
    r = relay(offer=False)
    proc = subprocess.run([sys.executable, "-m", "chatpair", "bench", "--resume", "--pairs", "1", "--messages", "5",
                           "--target", f"127.0.0.1:{r.port}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not offer resume" in lines[0] and "Traceback" not in proc.stderr
    assert len(r.hellos) == 1  # only the probe: no load was started


def test_without_resume_hello_does_not_ask(relay) -> None:
    r = relay()
    result = run_bench(BenchConfig(mode="flood", pairs=1, messages=100, size=40, target=("127.0.0.1", r.port)))
    assert result.ok, result.failures
    assert r.hellos and all("resume" not in h for h in r.hellos)
    assert result.acks_sent == 0


def _server_offers_resume(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        buf = b""
        while b"\n" not in buf:
            buf += sock.recv(1024)
        buf = buf.split(b"\n", 1)[1]
        sock.sendall(_json_frame(HELLO, {"version": 1, "name": "probe", "room": "resumecheck", "resume": True}))
        while len(buf) < 5 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            buf += sock.recv(4096)
        length = struct.unpack(">I", buf[:4])[0]
        return "session" in json.loads(buf[5:4 + length])


def test_against_the_real_server_when_it_offers_resume(server) -> None:
    if not _server_offers_resume(server.port):
        pytest.skip("chatpair server does not offer resume yet (no session in WELCOME)")
    for mode in ("flood", "pingpong"):
        result = run_bench(BenchConfig(mode=mode, pairs=2, messages=300, size=40, resume=True,
                                       target=("127.0.0.1", server.port)))
        assert result.ok, (mode, result.failures)
        assert result.delivered == 2 * 2 * 300
        assert result.acks_sent > 0
