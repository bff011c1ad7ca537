"""Hardening: the server under hostile or careless clients, with real sockets and processes.

Every test starts ``python -m chatpair server`` on 127.0.0.1, port 0, and talks
to it over real sockets. Nothing sleeps to wait for something to happen: each
wait is for an event (a frame, an end of file, a line on stderr, a /proc
reading) with a deadline; the only sleeps are short pauses inside loops that
poll /proc.

What is covered (docs/security.md explains each limit):

* 3,000 stalled connections (silent, half a frame, garbage) do not stop an
  honest pair, and each is closed at its handshake deadline;
* ``--rate/--burst`` slows a flooder down to the configured rate without
  losing or reordering a message, and without slowing anyone else;
* a partner that never reads does not make the server buffer without bound,
  and is dropped at the write deadline (no message lost silently);
* ``--max-clients`` and ``--max-per-ip`` refuse with a reason, and free slots;
* running out of descriptors neither crashes nor spins the listener;
* ``kill -9`` of the listener process: the main process restarts it;
* ``--workers``: pairs relayed by worker processes, handed back, shut down;
* TLS: verified clients chat, plain TCP gets nothing, ``openssl s_client``
  and ``chatpair client --fingerprint`` work (and a wrong pin fails clearly).

Servers are started with :class:`HardServer` (a :class:`conftest.ServerProcess`
that drains stderr in a thread, so thousands of log lines cannot fill the pipe
and block the server, keeps the stdout lines after the first, and can lower the
descriptor limit of the server with ``preexec_fn``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import ROOT, ServerProcess, pid_alive, spawned_children, wait_for

from chatpair.proto import FrameType

HELLO, MSG, NEXT, BYE = FrameType.HELLO, FrameType.MSG, FrameType.NEXT, FrameType.BYE
WELCOME, WAITING, PAIRED = FrameType.WELCOME, FrameType.WAITING, FrameType.PAIRED
PEER_LEFT, NOTICE, ERROR = FrameType.PEER_LEFT, FrameType.NOTICE, FrameType.ERROR

CLK_TCK = os.sysconf("SC_CLK_TCK")


# =====================================================================================
# /proc helpers
# =====================================================================================


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def socket_inode(server_port: int, client_port: int) -> int | None:
    """Inode of the server's end of the TCP connection from ``client_port`` (/proc/net/tcp)."""
    with open("/proc/net/tcp") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            if local_port == server_port and remote_port == client_port:
                return int(parts[9])
    return None


def holds_socket(pid: int, inode: int) -> bool:
    target = f"socket:[{inode}]"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                return True
        except OSError:
            continue
    return False


def watches_socket(pid: int, inode: int) -> bool:
    """Does an epoll instance of ``pid`` watch the socket ``inode`` (is that process serving it)?"""
    try:
        names = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return False
    for name in names:
        try:
            with open(f"/proc/{pid}/fdinfo/{name}") as fh:
                info = fh.read()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("tfd:") and f" ino:{inode:x} " in line + " ":
                return True
    return False


# =====================================================================================
# The server under test
# =====================================================================================


#: conftest's ServerProcess: stderr drained line by line, every stdout line
#: kept, ``listener()``, ``wait_stderr()``; the name says what these tests use it for.
HardServer = ServerProcess


@pytest.fixture
def hard_server() -> Iterator[Callable[..., HardServer]]:
    """``hard_server(*args, preexec_fn=None)``; each is stopped (exit 0, no process left) at the end."""
    started: list[HardServer] = []

    def start(*args: str, preexec_fn: Callable[[], None] | None = None) -> HardServer:
        srv = HardServer(*args, preexec_fn=preexec_fn)
        started.append(srv)
        return srv

    yield start
    failures = []
    for srv in started:
        if srv.proc.poll() is None:
            try:
                code = srv.stop()
                if code != 0:
                    failures.append(f"server exited with {code}")
            except AssertionError as err:
                failures.append(str(err))
            finally:
                srv.kill()
        tail = srv.stderr()
        if "Traceback" in tail:
            failures.append("the server logged a traceback:\n" + tail[-4000:])
    assert not failures, "\n".join(failures)


@pytest.fixture(autouse=True)
def many_descriptors() -> None:
    """Raise this test process's RLIMIT_NOFILE soft limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# =====================================================================================
# A small wire client: every read has a deadline
# =====================================================================================


class Closed(Exception):
    """The server closed the connection."""


class Peer:
    """A chatpair client over a plain or TLS socket; ``read_*`` take a timeout in seconds."""

    def __init__(self, port: int = 0, *, sock: socket.socket | None = None, banner: bool = True,
                 source: str | None = None, timeout: float = 5.0) -> None:
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                            source_address=(source, 0) if source else None)
        self.sock = sock
        self.buf = bytearray()
        self.timeout = timeout
        self.banner = self.read_line() if banner else b""

    # -- reading --------------------------------------------------------------------
    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nothing more from the server in time (have {bytes(self.buf[:80])!r})")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(262144)
        except (TimeoutError, socket.timeout):
            raise TimeoutError(f"nothing more from the server in time (have {bytes(self.buf[:80])!r})") from None
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            raise Closed(f"closed by the server (buffered: {bytes(self.buf[:200])!r})")
        self.buf += chunk

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def read_exact(self, n: int, timeout: float | None = None) -> bytes:
        deadline = self._deadline(timeout)
        while len(self.buf) < n:
            self._fill(deadline)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_line(self, timeout: float | None = None) -> bytes:
        deadline = self._deadline(timeout)
        while b"\n" not in self.buf:
            self._fill(deadline)
        i = self.buf.index(b"\n") + 1
        line = bytes(self.buf[:i])
        del self.buf[:i]
        return line

    def read_frame(self, timeout: float | None = None) -> tuple[int, bytes]:
        deadline = self._deadline(timeout)
        while len(self.buf) < 5:
            self._fill(deadline)
        length, ftype = struct.unpack_from(">IB", self.buf)
        body = self.read_exact(4 + length, max(0.0, deadline - time.monotonic()) + 0.001)
        return ftype, body[5:]

    def expect(self, ftype: int, timeout: float | None = None) -> Any:
        got, payload = self.read_frame(timeout)
        assert got == ftype, f"expected 0x{ftype:02x}, got 0x{got:02x} {payload[:300]!r}"
        return json.loads(payload) if ftype >= 0x10 else payload

    def expect_error(self, code: str, timeout: float | None = None) -> dict:
        err = self.expect(ERROR, timeout)
        assert err["code"] == code, err
        return err

    def wait_eof(self, timeout: float | None = None) -> bytes:
        """Read until the server closes; return everything read."""
        deadline = self._deadline(timeout)
        try:
            while True:
                self._fill(deadline)
        except Closed:
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    # -- writing -------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    def send_frame(self, ftype: int, payload: bytes = b"") -> None:
        self.send(struct.pack(">IB", len(payload) + 1, ftype) + payload)

    def msg(self, text: str) -> None:
        self.send_frame(MSG, text.encode())

    # -- conversation ------------------------------------------------------------------------
    def join(self, name: str, room: str | None = None, timeout: float | None = None) -> None:
        assert self.banner.startswith(b"CHATPAIR/1 "), self.banner
        self.send_frame(HELLO, json.dumps({"version": 1, "name": name, "room": room}).encode())
        welcome = self.expect(WELCOME, timeout)
        assert welcome["version"] == 1
        assert self.expect(WAITING, timeout) == {"room": room}

    def paired(self, peer: str, timeout: float | None = None) -> None:
        got = self.expect(PAIRED, timeout)
        assert got["peer"] == peer, got

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def make_pair(port: int, a: str, b: str, room: str | None = None, timeout: float = 5.0,
              **kw: Any) -> tuple[Peer, Peer]:
    pa = Peer(port, timeout=timeout, **kw)
    pa.join(a, room)
    pb = Peer(port, timeout=timeout, **kw)
    pb.join(b, room)
    pb.paired(a)
    pa.paired(b)
    return pa, pb


def chat(a: Peer, b: Peer, text: str, timeout: float = 5.0) -> None:
    """``a`` says ``text``; ``b`` reads exactly it."""
    a.msg(text)
    assert b.expect(MSG, timeout) == text.encode()


@pytest.fixture
def peers(hard_server) -> Iterator[list[Peer]]:
    """Peers appended here are closed before the servers stop (so no lingering close waits)."""
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


# =====================================================================================
# 1. Thousands of stalled connections
# =====================================================================================

STALLED_EACH = 1000
HANDSHAKE = 3.0


@pytest.mark.timeout(40)
def test_stalled_connections_do_not_block_honest_clients(hard_server, peers):
    srv = hard_server("--handshake-timeout", str(HANDSHAKE), "--max-per-ip", "0", "-q")
    listener = srv.listener()
    rng = random.Random(7)
    half_hello = struct.pack(">IB", 64, HELLO) + b'{"version"'  # announces 63 bytes, sends 9
    # Garbage without a newline (line mode, never a complete first line) and
    # under the 1,024-byte pre-handshake limit, so it stalls instead of failing.
    garbage_bytes = bytes(b for b in range(1, 256) if b not in (0x0A, 0xFF))

    kinds = ["silent"] * STALLED_EACH + ["half"] * STALLED_EACH + ["garbage"] * STALLED_EACH
    rng.shuffle(kinds)
    socks: list[tuple[socket.socket, str, float]] = []
    try:
        started = time.monotonic()
        for kind in kinds:
            t = time.monotonic()
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            if kind == "half":
                s.sendall(half_hello)
            elif kind == "garbage":
                s.sendall(bytes(rng.choice(garbage_bytes) for _ in range(rng.randint(1, 900))))
            socks.append((s, kind, t))
        opened = time.monotonic() - started
        assert opened < HANDSHAKE - 0.5, f"opening took {opened:.1f}s: they were not all open at once"
        # The listener really holds them all (plus its own few descriptors).
        wait_for("the listener to accept all 3,000", lambda: open_fds(listener) >= len(socks), 2)

        # Two honest clients pair and exchange a message within 1 s.
        t0 = time.monotonic()
        a = Peer(srv.port, timeout=1)
        peers.append(a)
        a.join("alice")
        b = Peer(srv.port, timeout=1)
        peers.append(b)
        b.join("bob")
        b.paired("alice")
        a.paired("bob")
        chat(a, b, "hello through the crowd", timeout=1)
        chat(b, a, "and back", timeout=1)
        took = time.monotonic() - t0
        assert took < 1.0, f"the honest pair needed {took:.2f}s"
        assert time.monotonic() < socks[0][2] + HANDSHAKE, "the test was too slow to prove anything"

        # Every stalled connection is closed at its deadline: not before, and
        # within 2 s after (the deadline runs from accept, which is after connect).
        closed_at: dict[int, float] = {}
        said: dict[int, bytes] = {}
        by_fd = {s.fileno(): (s, kind, t) for s, kind, t in socks}
        with selectors.DefaultSelector() as sel:
            for s, _, _ in socks:
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            last_deadline = max(t for _, _, t in socks) + HANDSHAKE + 2.0
            while len(closed_at) < len(socks):
                left = last_deadline - time.monotonic()
                if left <= 0:
                    break
                for key, _ in sel.select(left):
                    s = key.fileobj
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if data:
                        said[s.fileno()] = said.get(s.fileno(), b"") + data
                        continue
                    closed_at[s.fileno()] = time.monotonic()
                    sel.unregister(s)
        still_open = [by_fd[fd][1] for fd in by_fd if fd not in closed_at]
        assert not still_open, f"{len(still_open)} stalled connections still open after deadline+2s"
        early, late = [], []
        for fd, when in closed_at.items():
            _, kind, t = by_fd[fd]
            if when < t + HANDSHAKE - 0.05:
                early.append((kind, round(when - t, 2)))
            elif when > t + HANDSHAKE + 2.0:
                late.append((kind, round(when - t, 2)))
        assert not early, f"closed before the handshake deadline: {early[:10]}"
        assert not late, f"closed more than 2 s after the deadline: {late[:10]}"
        # Each was told why where the server knew the mode.
        for fd, (_, kind, _) in by_fd.items():
            text = said.get(fd, b"")
            assert text.startswith(b"CHATPAIR/1 "), (kind, text[:100])
            after_banner = text.split(b"\n", 1)[1]
            if kind == "silent":
                assert after_banner == b"", (kind, after_banner[:200])
            elif kind == "half":
                length, ftype = struct.unpack_from(">IB", after_banner)
                assert ftype == ERROR, (kind, after_banner[:200])
                assert json.loads(after_banner[5:4 + length])["code"] == "handshake_timeout"
            else:
                assert after_banner.startswith(b"* error: "), (kind, after_banner[:200])
        # The honest pair is still together and chatting.
        chat(a, b, "still here", timeout=2)
    finally:
        for s, _, _ in socks:
            s.close()
    assert srv.listener() == listener, "the listener process was restarted"


# =====================================================================================
# 2. Rate limit: a flooder is slowed down to the configured rate, nobody else is
# =====================================================================================


@pytest.mark.timeout(30)
def test_rate_limit_slows_a_flooder_without_loss_or_harm_to_others(hard_server, peers):
    srv = hard_server("--rate", "1000", "--burst", "100", "-q")
    flooder, sink = make_pair(srv.port, "flooder", "sink", room="flood")
    calm_a, calm_b = make_pair(srv.port, "calm_a", "calm_b", room="calm")
    peers.extend([flooder, sink, calm_a, calm_b])

    count = 5000
    arrivals: list[tuple[float, bytes]] = []
    progress = threading.Condition()
    failure: list[BaseException] = []

    def read_all() -> None:
        try:
            while len(arrivals) < count:
                ftype, payload = sink.read_frame(timeout=10)
                assert ftype == MSG, (ftype, payload[:200])
                with progress:
                    arrivals.append((time.monotonic(), payload))
                    progress.notify_all()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failure.append(err)
            with progress:
                progress.notify_all()

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    blob = b"".join(struct.pack(">IB", 6, MSG) + b"%05d" % i for i in range(count))
    t0 = time.monotonic()
    flooder.send(blob)  # the kernel takes it all; the server reads it at its pace

    with progress:
        assert progress.wait_for(lambda: len(arrivals) >= 1000 or failure, timeout=5), "the flood stalled"
    assert not failure, failure
    # Meanwhile another pair is served promptly, both ways.
    for a, b, text in ((calm_a, calm_b, "are you there?"), (calm_b, calm_a, "yes")):
        t = time.monotonic()
        chat(a, b, text, timeout=1)
        assert time.monotonic() - t < 1.0
    with progress:
        assert len(arrivals) < count, "the flood was over before the other pair spoke; nothing was shown"

    reader.join(12)
    assert not reader.is_alive(), "the flood did not finish"
    assert not failure, failure
    assert [p for _, p in arrivals] == [b"%05d" % i for i in range(count)], "lost or reordered messages"
    took = arrivals[-1][0] - t0
    # 100 at once, then 1,000 a second: (5000 - 100) / 1000 = 4.9 s. Loose bounds.
    assert 4.0 <= took < 8.0, f"5,000 messages at --rate 1000 --burst 100 took {took:.2f}s"


# =====================================================================================
# 3. A partner that never reads
# =====================================================================================


@pytest.mark.timeout(40)
def test_partner_that_never_reads_is_dropped_and_memory_stays_bounded(hard_server, peers):
    srv = hard_server("--write-timeout", "2", "-q")
    listener = srv.listener()
    sender, stuck = make_pair(srv.port, "sender", "stuck")
    peers.extend([sender, stuck])
    base_rss = rss_bytes(listener)

    payload = b"x" * 60_000
    one = struct.pack(">IB", len(payload) + 1, MSG) + payload
    blob = one * 16
    cap = 200 * 1024 * 1024
    sent = 0  # bytes of MSG frames sent
    peer_left: dict | None = None
    notices = 0
    left_after = 0.0
    max_rss = base_rss
    last_rss_check = 0.0
    sock = sender.sock
    sock.setblocking(False)
    t0 = time.monotonic()
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while peer_left is None and sent < cap:
            assert time.monotonic() - t0 < 20, "no PEER_LEFT within 20 s"
            now = time.monotonic()
            if now - last_rss_check > 0.05:
                max_rss = max(max_rss, rss_bytes(listener))
                last_rss_check = now
            for _, mask in sel.select(0.05):
                if mask & selectors.EVENT_WRITE:
                    off = sent % len(blob)
                    try:
                        sent += sock.send(memoryview(blob)[off:])
                    except BlockingIOError:
                        pass
                if mask & selectors.EVENT_READ:
                    chunk = sock.recv(65536)
                    assert chunk, "the server closed the sender"
                    sender.buf += chunk
                    while len(sender.buf) >= 5:
                        length, ftype = struct.unpack_from(">IB", sender.buf)
                        if len(sender.buf) < 4 + length:
                            break
                        body = bytes(sender.buf[5:4 + length])
                        del sender.buf[:4 + length]
                        if ftype == PEER_LEFT:
                            peer_left = json.loads(body)
                            left_after = time.monotonic() - t0
                            break
                        # NOTICE undelivered: messages queued for the partner when it was dropped
                        assert ftype == NOTICE and json.loads(body)["code"] == "undelivered", (ftype, body)
                        notices += 1
    max_rss = max(max_rss, rss_bytes(listener))
    assert peer_left is not None, f"sent {sent >> 20} MB and the partner was never dropped"
    assert peer_left == {"peer": "stuck", "reason": "timeout"}
    assert left_after >= 2.0, f"dropped after {left_after:.2f}s, before the 2 s write deadline"
    assert left_after < 10.0, f"dropped only after {left_after:.2f}s"
    grew = max_rss - base_rss
    assert grew < 64 * 1024 * 1024, f"listener RSS grew by {grew >> 20} MB while a partner did not read"

    # No silent loss: every message sent either reached the stuck partner's
    # socket or was answered with NOTICE undelivered.
    sock.setblocking(True)
    off = sent % len(one)
    if off:  # finish the frame in flight
        sender.send(one[off:])
        sent += len(one) - off
    total = sent // len(one)
    delivered = 0
    stuck_data = stuck.wait_eof(timeout=10)
    pos = 0
    while len(stuck_data) - pos >= 5:
        length, ftype = struct.unpack_from(">IB", stuck_data, pos)
        if len(stuck_data) - pos < 4 + length:
            break  # a frame cut short by the drop
        if ftype == MSG:
            delivered += 1
        pos += 4 + length
    waiting = False
    deadline = time.monotonic() + 10
    while notices < total - delivered:
        try:
            ftype, body = sender.read_frame(timeout=max(0.01, deadline - time.monotonic()))
        except (TimeoutError, Closed) as err:
            raise AssertionError(
                f"messages lost silently: {total} sent, {delivered} reached the partner's socket, "
                f"{notices} answered NOTICE undelivered ({err})") from None
        if ftype == NOTICE:
            assert json.loads(body)["code"] == "undelivered"
            notices += 1
        elif ftype == WAITING:
            waiting = True
        else:
            raise AssertionError((ftype, body[:200]))
    assert delivered + notices == total, (delivered, notices, total)
    if not waiting:
        sender.expect(WAITING, timeout=2)  # queued again after the partner left
    assert srv.listener() == listener


# =====================================================================================
# 4. --max-clients and --max-per-ip
# =====================================================================================


def refused_frame(port: int, code: str, **kw: Any) -> None:
    p = Peer(port, **kw)
    try:
        p.send_frame(HELLO, json.dumps({"version": 1, "name": "late", "room": None}).encode())
        p.expect_error(code)
        p.wait_eof()
    finally:
        p.close()


def refused_line(port: int, expected: str, **kw: Any) -> None:
    p = Peer(port, **kw)
    try:
        p.send(b"late\n")
        line = p.read_line().decode()
        assert line.startswith("* error: ") and expected in line, line
        p.wait_eof()
    finally:
        p.close()


def accepted(port: int, name: str, **kw: Any) -> Peer:
    p = Peer(port, **kw)
    p.join(name, room=name)  # a room of its own: stays waiting
    return p


@pytest.mark.timeout(30)
def test_max_clients_refuses_with_server_full_and_frees_slots(hard_server, peers):
    srv = hard_server("--max-clients", "3")
    first = [accepted(srv.port, f"c{i}") for i in range(3)]
    peers.extend(first)
    refused_frame(srv.port, "server_full")
    refused_line(srv.port, "full")
    # A slot frees when a client leaves (the server must notice the close first).
    first[0].close()
    deadline = time.monotonic() + 5
    while True:
        p = Peer(srv.port)
        peers.append(p)
        p.send_frame(HELLO, json.dumps({"version": 1, "name": "again", "room": "again"}).encode())
        ftype, body = p.read_frame()
        if ftype == WELCOME:
            break
        assert ftype == ERROR and json.loads(body)["code"] == "server_full", (ftype, body)
        assert time.monotonic() < deadline, "no slot freed within 5 s of a client leaving"
        p.close()
    assert p.expect(WAITING) == {"room": "again"}
    refused_frame(srv.port, "server_full")  # full again


@pytest.mark.timeout(30)
def test_max_per_ip_refuses_too_many_connections_and_frees_slots(hard_server, peers):
    srv = hard_server("--max-per-ip", "2")  # given explicitly: loopback counts too
    first = [accepted(srv.port, f"c{i}") for i in range(2)]
    peers.extend(first)
    refused_frame(srv.port, "too_many_connections")
    refused_line(srv.port, "too many connections from 127.0.0.1")
    # Another address is counted on its own.
    other = accepted(srv.port, "other", source="127.0.0.2")
    peers.append(other)
    first[1].close()
    deadline = time.monotonic() + 5
    while True:
        p = Peer(srv.port)
        peers.append(p)
        p.send(b"again again\n")
        line = p.read_line().decode()
        if line.startswith("* waiting"):
            break
        assert "too many connections" in line, line
        assert time.monotonic() < deadline, "no slot freed within 5 s of a client leaving"
        p.close()
    refused_frame(srv.port, "too_many_connections")


@pytest.mark.timeout(30)
def test_default_per_ip_limit_spares_loopback(hard_server, peers):
    srv = hard_server("-q")  # --max-per-ip not given: 256, but loopback is not counted
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(260)]
    try:
        p = accepted(srv.port, "the_261st")
        peers.append(p)
    finally:
        for s in socks:
            s.close()


# =====================================================================================
# 5. Running out of file descriptors
# =====================================================================================


def _limit_fds_to_256() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


@pytest.mark.timeout(40)
def test_descriptor_exhaustion_neither_crashes_nor_spins(hard_server, peers):
    srv = hard_server("-q", preexec_fn=_limit_fds_to_256)
    listener = srv.listener()
    # A pair that is chatting before the flood keeps chatting through it.
    a, b = make_pair(srv.port, "early_a", "early_b", room="early")
    peers.extend([a, b])
    flood: list[socket.socket] = []
    try:
        for _ in range(300):
            flood.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        srv.wait_stderr("cannot accept more connections", timeout=5)
        assert pid_alive(listener)

        # Spinning would show as CPU time; resting shows as nearly none.
        cpu0 = cpu_seconds(listener)
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            assert pid_alive(listener) and srv.proc.poll() is None, "the server died"
            time.sleep(0.1)
        used = cpu_seconds(listener) - cpu0
        assert used < 0.3, f"the listener used {used:.2f}s of CPU in 2 s while out of descriptors"
        chat(a, b, "still chatting while the server is out of descriptors", timeout=2)

        for s in flood[50:]:
            s.close()
        del flood[50:]
        # A new pair is served once descriptors are free again.
        c, d = make_pair(srv.port, "late_c", "late_d", room="late", timeout=10)
        peers.extend([c, d])
        chat(c, d, "served")
        chat(d, c, "indeed")
    finally:
        for s in flood:
            s.close()
    assert srv.listener() == listener, "the listener was restarted: it crashed"


# =====================================================================================
# 6. kill -9 of the listener process
# =====================================================================================


@pytest.mark.timeout(30)
def test_killed_listener_is_restarted_on_the_same_port(hard_server, peers):
    srv = hard_server()
    old = srv.listener()
    a, b = make_pair(srv.port, "before_a", "before_b")
    peers.extend([a, b])
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for("the killed listener to die", lambda: not pid_alive(old), 2)
    c = Peer(srv.port, timeout=2)  # same port: the main process holds the socket
    peers.append(c)
    c.join("after_c", timeout=2)
    d = Peer(srv.port, timeout=2)
    peers.append(d)
    d.join("after_d", timeout=2)
    d.paired("after_c", timeout=2)
    c.paired("after_d", timeout=2)
    chat(c, d, "served by a new listener", timeout=2)
    took = time.monotonic() - t0
    assert took < 2.0, f"a new pair was served {took:.2f}s after kill -9"
    new = srv.listener()
    assert new != old
    srv.wait_stderr("listener process died", timeout=2)
    # The old listener's clients were cut off with it (their sockets died with the process).
    a.wait_eof(timeout=2)


# =====================================================================================
# 7. --workers 2
# =====================================================================================


def relayed_by(srv: HardServer, peer: Peer, pids: list[int]) -> list[int]:
    inode = socket_inode(srv.port, peer.sock.getsockname()[1])
    assert inode, "no /proc/net/tcp entry for the connection"
    return [pid for pid in pids if holds_socket(pid, inode)]


@pytest.mark.timeout(40)
def test_workers_relay_hand_back_and_shut_down(hard_server, peers):
    srv = hard_server("--workers", "2")
    listener = srv.listener()
    workers = wait_for("two relay worker processes", lambda: len(spawned_children(listener)) == 2
                       and spawned_children(listener), 10)
    a, b = make_pair(srv.port, "wa", "wb")
    peers.extend([a, b])
    chat(a, b, "to b")
    chat(b, a, "to a")
    # Both server-side sockets now live in one worker, and the listener does not
    # serve them (it only parks a duplicate, unwatched, to tell them if the worker dies).
    owner = wait_for("a worker to own the pair", lambda: relayed_by(srv, a, workers) ==
                     relayed_by(srv, b, workers) and len(relayed_by(srv, a, workers)) == 1
                     and relayed_by(srv, a, workers), 2)
    assert owner[0] in workers
    for p in (a, b):
        inode = socket_inode(srv.port, p.sock.getsockname()[1])
        assert watches_socket(owner[0], inode), "the worker does not serve the pair"
        assert not watches_socket(listener, inode), "the pair is relayed by the listener, not by a worker"

    # BYE: the partner is handed back to the listener and paired with a newcomer.
    a.send_frame(BYE)
    a.wait_eof()
    assert b.expect(PEER_LEFT) == {"peer": "wa", "reason": "bye"}
    assert b.expect(WAITING) == {"room": None}
    c = Peer(srv.port)
    peers.append(c)
    c.join("wc")
    c.paired("wb")
    b.paired("wc")
    chat(b, c, "hi newcomer")
    chat(c, b, "hi b")
    assert len(relayed_by(srv, c, workers)) == 1
    assert not watches_socket(listener, socket_inode(srv.port, c.sock.getsockname()[1]))

    # NEXT: both are handed back; neither is paired with the other again.
    c.send_frame(NEXT)
    assert c.expect(WAITING) == {"room": None}
    assert b.expect(PEER_LEFT) == {"peer": "wc", "reason": "next"}
    assert b.expect(WAITING) == {"room": None}
    d = Peer(srv.port)
    peers.append(d)
    d.join("wd")
    first = d.expect(PAIRED)["peer"]
    assert first in ("wb", "wc")
    e = Peer(srv.port)
    peers.append(e)
    e.join("we")
    second = e.expect(PAIRED)["peer"]
    assert {first, second} == {"wb", "wc"}
    partner_of = {"wb": b, "wc": c}
    assert partner_of[first].expect(PAIRED)["peer"] == "wd"
    assert partner_of[second].expect(PAIRED)["peer"] == "we"
    chat(d, partner_of[first], "d says hi")
    chat(partner_of[first], d, "hi d")
    chat(e, partner_of[second], "e says hi")
    chat(partner_of[second], e, "hi e")

    # SIGTERM: every client, paired (in workers) or waiting (in the listener), hears "shutdown".
    w = Peer(srv.port)
    peers.append(w)
    w.join("lonely", room="lonely")
    everyone = [b, c, d, e, w]
    srv.proc.send_signal(signal.SIGTERM)
    for p in everyone:
        p.expect_error("shutdown", timeout=8)
        p.wait_eof(timeout=8)
        p.close()
    assert srv.stop() == 0  # also checks that no process is left
    assert not any(pid_alive(pid) for pid in workers + [listener])


# =====================================================================================
# 8. TLS
# =====================================================================================


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True, timeout=30,
    )
    return crt, key


def fingerprint_of(crt: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(crt.read_text())
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def tls_peer(port: int, crt: Path, timeout: float = 5.0) -> Peer:
    ctx = ssl.create_default_context(cafile=str(crt))
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return Peer(sock=ctx.wrap_socket(raw, server_hostname="localhost"), timeout=timeout)


@pytest.fixture
def tls_server(hard_server, cert):
    crt, key = cert
    srv = hard_server("--tls-cert", str(crt), "--tls-key", str(key), "--handshake-timeout", "2")
    line = srv.stdout_line(5)
    assert line == f"certificate fingerprint {fingerprint_of(crt)}", line
    srv.fingerprint = line.split()[-1]
    return srv


@pytest.mark.timeout(30)
def test_tls_verified_clients_chat(tls_server, cert, peers):
    crt, _ = cert
    a = tls_peer(tls_server.port, crt)
    peers.append(a)
    assert a.sock.version() in ("TLSv1.2", "TLSv1.3")
    a.join("tls_a")
    b = tls_peer(tls_server.port, crt)
    peers.append(b)
    b.join("tls_b")
    b.paired("tls_a")
    a.paired("tls_b")
    chat(a, b, "over TLS")
    chat(b, a, "é ünïcode 🎉 " * 100)


@pytest.mark.timeout(30)
def test_tls_plain_tcp_gets_no_banner_and_is_closed_at_the_deadline(tls_server, peers):
    p = Peer(tls_server.port, banner=False)
    peers.append(p)
    t0 = time.monotonic()
    data = p.wait_eof(timeout=2 + 2)
    took = time.monotonic() - t0
    assert data == b"", f"a plain-TCP client got {data[:100]!r} from a TLS server"
    assert took >= 2 - 0.05, f"closed after {took:.2f}s, before the 2 s handshake deadline"


@pytest.mark.timeout(30)
def test_tls_openssl_s_client_reaches_line_mode(tls_server, cert, peers):
    crt, _ = cert
    proc = subprocess.Popen(
        ["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{tls_server.port}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = b""

    def read_until(text: bytes, timeout: float) -> bytes:
        nonlocal out
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while text not in out:
                left = deadline - time.monotonic()
                assert left > 0 and sel.select(left), f"s_client printed {out!r}, not {text!r}"
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"s_client ended; it printed {out!r}"
                out += chunk
        return out

    try:
        read_until(b"CHATPAIR/1 ", 10)
        proc.stdin.write(b"carol\n")
        proc.stdin.flush()
        read_until(b"* waiting for a partner\n", 5)
        # A frame-mode TLS client and the line-mode one chat.
        dave = tls_peer(tls_server.port, crt)
        peers.append(dave)
        dave.join("dave")
        dave.paired("carol")
        read_until(b"* paired with dave\n", 5)
        chat_line = "hello carol \x1b]0;pwned\x07"
        dave.msg(chat_line)
        read_until(b"dave: hello carol ^[]0;pwned^G\n", 5)  # section 5: no escape reaches the terminal
        proc.stdin.write(b"hi dave\n")
        proc.stdin.flush()
        assert dave.expect(MSG) == b"hi dave"
    finally:
        proc.kill()
        proc.wait()


def run_cli_client(port: int, fingerprint: str, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "chatpair", "client", "--json", "--no-reconnect", "--timeout", "5",
         "--fingerprint", fingerprint, "--name", name, f"127.0.0.1:{port}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )


def _client_supports_fingerprint() -> bool:
    try:
        import chatpair.client as client
    except ImportError:
        return False
    return hasattr(client, "parse_fingerprint")


needs_cli_fingerprint = pytest.mark.skipif(not _client_supports_fingerprint(),
                                           reason="chatpair client --fingerprint is not there yet")


@needs_cli_fingerprint
@pytest.mark.timeout(30)
def test_tls_cli_client_with_the_right_fingerprint_chats(tls_server, cert, peers):
    crt, _ = cert
    proc = run_cli_client(tls_server.port, tls_server.fingerprint, "pinned")
    assert proc.stdin is not None and proc.stdout is not None
    buf = b""

    def next_event(timeout: float = 10) -> dict:
        nonlocal buf
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                assert left > 0 and sel.select(left), f"no event from the client; stdout so far {buf!r}"
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"the client exited: {proc.wait()} {proc.stderr.read()!r}"
                buf += chunk
        line, buf = buf.split(b"\n", 1)
        return json.loads(line)

    def expect_event(kind: str) -> dict:
        while True:
            ev = next_event()
            if ev.get("event") == kind:
                return ev
            assert ev.get("event") in ("welcome", "waiting", "notice", "sent"), ev

    try:
        expect_event("waiting")
        partner = tls_peer(tls_server.port, crt)
        peers.append(partner)
        partner.join("partner")
        partner.paired("pinned")
        assert expect_event("paired")["peer"] == "partner"
        proc.stdin.write(b"hello over a pinned certificate\n")
        proc.stdin.flush()
        assert partner.expect(MSG) == b"hello over a pinned certificate"
        partner.msg("pinned and well")
        ev = expect_event("message")
        assert (ev["from"], ev["text"]) == ("partner", "pinned and well")
        proc.stdin.close()  # end of input: BYE, exit 0
        assert proc.wait(10) == 0, proc.stderr.read()
        assert partner.expect(PEER_LEFT) == {"peer": "pinned", "reason": "bye"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_cli_fingerprint
@pytest.mark.timeout(30)
def test_tls_cli_client_with_a_wrong_fingerprint_fails_clearly(tls_server):
    wrong = "SHA256:" + "00" * 32
    proc = run_cli_client(tls_server.port, wrong, "pinned")
    try:
        _, err = proc.communicate(b"never sent\n", timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, f"expected one clear line on stderr, got:\n{err.decode()}"
    assert "fingerprint" in lines[0] and "Traceback" not in lines[0], lines[0]
    assert tls_server.fingerprint in lines[0], "the message should say which fingerprint the server has"
