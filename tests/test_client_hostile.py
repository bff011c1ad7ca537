"""The client against a hostile or broken server (issue item 6).

Each test runs a scripted fake server - a listening socket on 127.0.0.1,
port 0, whose one connection is served by a thread that sends fixed bytes -
and the real ``python -m chatpair client`` as a subprocess in pipe mode. What
is checked: the client ends, within a deadline, with one clear line on
stderr and the right exit code, and its memory (RSS from /proc) stays under a
bound meanwhile; for the PING flood also its CPU time (utime + stime from
/proc) over a fixed window. Every wait is on an event with a deadline.
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
from collections.abc import Callable
from pathlib import Path

import pytest

from chatpair.proto.clientside import split_message

ROOT = Path(__file__).resolve().parent.parent
HELLO, MSG, BYE, PING, PONG = 0x01, 0x02, 0x04, 0x05, 0x06
WELCOME, WAITING, PAIRED, NOTICE, ERROR = 0x10, 0x11, 0x12, 0x14, 0x1F
BANNER = b"CHATPAIR/1 hostile/0 scripted test server\r\n"
#: A Python client with chatpair imported takes ~25 MB; a leak passes this fast.
RSS_LIMIT_KB = 150_000

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", len(payload) + 1, ftype) + payload


def jframe(ftype: int, obj: dict) -> bytes:
    return frame(ftype, json.dumps(obj).encode())


def welcome(**changes) -> bytes:
    obj = {"version": 1, "server": "hostile/0", "max_frame": 65536, "ping_interval": 30, "idle_timeout": 90}
    obj.update(changes)
    return jframe(WELCOME, {k: v for k, v in obj.items() if v is not ...})


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_frame(conn: socket.socket) -> tuple[int, bytes]:
    length = struct.unpack(">I", recv_exact(conn, 4))[0]
    body = recv_exact(conn, length)
    return body[0], body[1:]


class ScriptedServer:
    """Accepts one connection, sends the banner, reads HELLO, then runs ``script``."""

    def __init__(self, script: Callable[[socket.socket, ScriptedServer], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.label = f"127.0.0.1:{self.port}"
        self.script = script
        self.stop = threading.Event()
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(10)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conn = conn
        try:
            conn.settimeout(10)
            conn.sendall(BANNER)
            ftype, _ = read_frame(conn)
            assert ftype == HELLO
            self.script(conn, self)
        except (OSError, EOFError):
            pass  # the client went away: what the test checks happens on its side

    def close(self) -> None:
        self.stop.set()
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(10)
        if self.conn is not None:
            self.conn.close()
        self.sock.close()


@pytest.fixture
def scripted():
    made: list[ScriptedServer] = []

    def make(script):
        srv = ScriptedServer(script)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Client:
    """``chatpair client`` in pipe mode; stdout and stderr go to files (never a full pipe)."""

    def __init__(self, port: int, tmp_path: Path, stdin_data: bytes = b"", close_stdin: bool = True) -> None:
        self.out_path, self.err_path = tmp_path / "stdout", tmp_path / "stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatpair", "client", "--port", str(port), "--name", "alice",
                 "--timeout", "5"],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=ROOT,
                env={**os.environ, "NO_COLOR": ""},
            )
        assert self.proc.stdin is not None
        if stdin_data:
            self.proc.stdin.write(stdin_data)
            self.proc.stdin.flush()
        if close_stdin:
            self.close_stdin()
        self.peak_rss = 0

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.stdin = None

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def check_rss(self) -> None:
        rss = rss_kb(self.proc.pid)
        self.peak_rss = max(self.peak_rss, rss)
        if rss > RSS_LIMIT_KB:
            self.proc.kill()
            raise AssertionError(f"client memory grew to {rss} kB (limit {RSS_LIMIT_KB} kB)")

    def wait_until(self, event: threading.Event, timeout: float) -> None:
        """Wait for a server-side event, checking memory and that the client still runs."""
        deadline = time.monotonic() + timeout
        while not event.wait(0.05):
            self.check_rss()
            if self.proc.poll() is not None:
                raise AssertionError(f"client exited early ({self.proc.returncode}): {self.stderr()!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no event within {timeout}s")

    def finish(self, timeout: float = 8.0) -> tuple[int, str, str]:
        """Wait for the client to exit (memory checked meanwhile); (code, stdout, stderr)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                code = self.proc.wait(0.05)
                break
            except subprocess.TimeoutExpired:
                self.check_rss()
                if time.monotonic() > deadline:
                    self.proc.kill()
                    self.proc.wait()
                    raise AssertionError(f"client did not end within {timeout}s: {self.stderr()!r}") from None
        return code, self.out_path.read_text(), self.stderr()

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def kill(self) -> None:
        self.close_stdin()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def client(tmp_path):
    made: list[Client] = []

    def make(port: int, **kw) -> Client:
        c = Client(port, tmp_path, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill()


def assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("chatpair: "), err
    for needle in needles:
        assert needle in err, err


# ---------------------------------------------------------------------------
# WELCOME with an absurd max_frame
# ---------------------------------------------------------------------------


def test_split_message_always_progresses():
    # max_bytes too small for one character used to loop forever appending "".
    code = ("from chatpair.proto.clientside import split_message\n"
            "for n in (0, 1, 2, 3):\n"
            "    try:\n"
            "        split_message('\u00e9\u20ac\U0001f600', n)\n"
            "    except ValueError:\n"
            "        pass\n"
            "    else:\n"
            "        raise SystemExit('no ValueError for %d' % n)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=10, check=False)
    assert result.returncode == 0, result.stderr
    text = "a\u00e9\u20ac\U0001f600" * 20
    for n in (4, 5, 6, 7, 64):
        pieces = split_message(text, n)
        assert "".join(pieces) == text and all(1 <= len(p.encode()) <= n for p in pieces)


@pytest.mark.parametrize("max_frame", [2, 0, -5, 63, "65536", 65536.0, True, None, ..., 2**24, 2**40],
                         ids=["2", "0", "negative", "63", "string", "float", "bool", "null", "missing",
                              "2**24", "2**40"])
def test_absurd_max_frame_is_one_clear_error(scripted, client, max_frame):
    # WELCOME max_frame 2 then a non-ASCII message used to loop forever in
    # split_message, growing memory; other nonsense values were silently ignored.
    def script(conn, srv):
        conn.sendall(welcome(max_frame=max_frame) + jframe(WAITING, {"room": None})
                     + jframe(PAIRED, {"peer": "mallory", "room": None}))
        srv.stop.wait(10)

    srv = scripted(script)
    me = client(srv.port, stdin_data="h\u00e9llo\n".encode())
    code, _, err = me.finish()
    assert code == 2
    assert_one_line(err, srv.label, "max_frame")


# ---------------------------------------------------------------------------
# A frame over the limit in the same read as WELCOME
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("announced", [65536, 1024])
def test_oversized_frame_with_welcome_is_reported_as_such(scripted, client, announced):
    def script(conn, srv):
        # One write: WELCOME, then a header announcing 70,000 bytes, then a flood
        # of filler the client must not buffer.
        conn.sendall(welcome(max_frame=announced) + struct.pack(">IB", 70_000, MSG) + b"x" * 60_000)
        while not srv.stop.is_set():
            conn.sendall(b"x" * 65536)

    srv = scripted(script)
    me = client(srv.port, close_stdin=False)
    code, _, err = me.finish()
    assert code == 2
    assert_one_line(err, srv.label, "sent a frame of 70,000 bytes", f"over its own limit of {announced:,}")
    assert "closed the connection" not in err


def test_oversized_frame_before_welcome(scripted, client):
    def script(conn, srv):
        conn.sendall(struct.pack(">IB", 1 << 20, WELCOME) + b"{" * 1000)
        srv.stop.wait(10)

    srv = scripted(script)
    me = client(srv.port, close_stdin=False)
    code, _, err = me.finish()
    assert code == 2
    assert_one_line(err, srv.label, "sent a frame of 1,048,576 bytes")
    assert "closed the connection" not in err


# ---------------------------------------------------------------------------
# NOTICE and ERROR in one read
# ---------------------------------------------------------------------------


def test_notice_before_error_in_one_read_is_shown(scripted, client):
    def script(conn, srv):
        conn.sendall(welcome() + jframe(WAITING, {"room": None})
                     + jframe(NOTICE, {"code": "maintenance", "message": "going down for maintenance"})
                     + jframe(ERROR, {"code": "shutdown", "message": "the server is shutting down"}))
        srv.stop.wait(10)

    srv = scripted(script)
    me = client(srv.port, close_stdin=False)
    code, out, err = me.finish()
    assert code == 3
    assert_one_line(err, srv.label, "the server is shutting down")
    # the error itself is said once, on stderr (above), not also on stdout
    assert out.splitlines() == ["* waiting for a partner", "* going down for maintenance"]


def test_notice_before_refusal_in_one_read_is_shown(scripted, client):
    # No WELCOME at all: the NOTICE still comes out before the one error line.
    def script(conn, srv):
        conn.sendall(jframe(NOTICE, {"code": "motd", "message": "read the rules"})
                     + jframe(ERROR, {"code": "server_full", "message": "the server is full"}))
        srv.stop.wait(10)

    srv = scripted(script)
    me = client(srv.port, close_stdin=False)
    code, out, err = me.finish()
    assert code == 3
    assert_one_line(err, srv.label, "the server is full")
    assert out.splitlines() == ["* read the rules"]


# ---------------------------------------------------------------------------
# A PING flood whose PONGs the server never reads
# ---------------------------------------------------------------------------

#: The fixed window over which the client's CPU time is sampled.
CPU_WINDOW = 1.5


def test_ping_flood_never_read_bounded_cpu_and_memory(scripted, client):
    # Small PINGs (9 bytes on the wire): the most frames, so the most work, per byte.
    chunk = frame(PING, b"1234") * (65536 // 9)
    full = threading.Event()  # a send timed out: every buffer between us is full
    stop_flooding = threading.Event()
    found = {"pongs": 0, "msgs": []}
    drained = threading.Event()

    def script(conn, srv):
        conn.sendall(welcome() + jframe(WAITING, {"room": None}) + jframe(PAIRED, {"peer": "mallory", "room": None}))
        conn.settimeout(0.2)
        while not stop_flooding.is_set():
            try:
                conn.send(chunk)
            except TimeoutError:
                full.set()
        # Now read what the client sent meanwhile: PONGs, and its messages.
        conn.settimeout(5)
        while found["msgs"][-1:] != [b"still here"]:
            ftype, payload = read_frame(conn)
            if ftype == PONG:
                found["pongs"] += 1
            elif ftype == MSG:
                found["msgs"].append(payload)
        drained.set()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # a reset: the client must say so in one line

    srv = scripted(script)
    me = client(srv.port, close_stdin=False)
    me.write(b"hello before the flood\n")
    me.wait_until(full, timeout=10)
    me.write(b"still here\n")  # typed while the server reads nothing: must not be lost
    start_cpu, start = cpu_seconds(me.proc.pid), time.monotonic()
    while time.monotonic() - start < CPU_WINDOW:  # a fixed sampling window, memory checked meanwhile
        stop_flooding.wait(0.05)
        me.check_rss()
    used = (cpu_seconds(me.proc.pid) - start_cpu) / (time.monotonic() - start)
    stop_flooding.set()
    me.wait_until(drained, timeout=10)
    assert used < 0.5, f"client used {used:.0%} of a core under a PING flood"
    assert found["msgs"] == [b"hello before the flood", b"still here"]
    assert found["pongs"] >= 1  # PINGs are still answered, just not without bound
    code, _, err = me.finish()
    assert code == 2
    assert_one_line(err, f"connection to {srv.label} lost")


def test_pongs_never_grow_the_outbox_of_a_server_that_does_not_read():
    """The write side of a PING flood, on a socketpair whose other end reads nothing.

    Every PING is answered while little waits to be sent; past that, only the
    latest one is, once the server reads again. Our own messages are never
    dropped, and the PONG path stays linear (no copy of the outbox per PING).
    """
    from chatpair.client.config import ClientConfig
    from chatpair.client.session import Connection

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        conn = Connection(ours, ClientConfig(name="alice"), "test")
        theirs.sendall(welcome() + jframe(PAIRED, {"peer": "mallory", "room": None}))
        assert [type(ev).__name__ for ev in conn.receive()] == ["Welcome", "Paired"]
        pings = b"".join(frame(PING, i.to_bytes(4, "big")) for i in range(1000))
        started = time.monotonic()
        for _ in range(300):  # 300,000 PINGs, answers never read
            theirs.sendall(pings)
            assert conn.receive() == []  # one read takes all 9,000 bytes of a socketpair
            assert len(conn.outbox) < 8192  # PONG_ROOM (4 KiB) and one frame
        assert time.monotonic() - started < 10
        conn.send_msg("mine")  # the outbox is past the PONG room: queued all the same
        theirs.sendall(frame(PING, b"last"))
        assert conn.receive() == []
        # The server reads again: everything queued goes out, the last PONG too.
        theirs.settimeout(5)
        got = bytearray()
        while conn.wants_write:
            got += theirs.recv(1 << 20)
            conn.flush()
        theirs.setblocking(False)
        try:
            while True:
                got += theirs.recv(1 << 20)
        except BlockingIOError:
            pass
        frames = []
        while got:
            length = struct.unpack(">I", got[:4])[0]
            frames.append((got[4], bytes(got[5:4 + length])))
            del got[:4 + length]
        assert (MSG, b"mine") in frames
        assert frames[-1] == (PONG, b"last")  # owed: the latest PING, answered once the server reads
        assert frames.count((PONG, b"last")) == 1
