"""A minimal chatpair wire client, written from PROTOCOL.md only.

Independent of the ``chatpair`` package: plain sockets, ``struct`` and ``json``.
Every read has a deadline; nothing here sleeps to wait for an event.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# frame types (PROTOCOL.md section 3)
HELLO = 0x01
MSG = 0x02
NEXT = 0x03
BYE = 0x04
PING = 0x05
PONG = 0x06
WELCOME = 0x10
WAITING = 0x11
PAIRED = 0x12
PEER_LEFT = 0x13
NOTICE = 0x14
ERROR = 0x1F
# Section 6 (resume, optional)
ACK = 0x07
RESUME = 0x08
RESUMED = 0x15

JSON_TYPES = {HELLO, WELCOME, WAITING, PAIRED, PEER_LEFT, NOTICE, ERROR, ACK, RESUME, RESUMED}
NAMES = {
    HELLO: "HELLO", MSG: "MSG", NEXT: "NEXT", BYE: "BYE", PING: "PING", PONG: "PONG",
    WELCOME: "WELCOME", WAITING: "WAITING", PAIRED: "PAIRED", PEER_LEFT: "PEER_LEFT",
    NOTICE: "NOTICE", ERROR: "ERROR", ACK: "ACK", RESUME: "RESUME", RESUMED: "RESUMED",
}


def tname(ftype: int) -> str:
    return NAMES.get(ftype, f"0x{ftype:02x}")


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", len(payload) + 1, ftype) + payload


def hello_payload(name: str, room: str | None = None, version: int = 1, **extra) -> bytes:
    return json.dumps({"version": version, "name": name, "room": room, **extra}).encode()


class Closed(Exception):
    """The server closed the connection."""


class Timeout(AssertionError):
    """Nothing (or not enough) arrived before the deadline."""


# -- server process ------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = [int(x) for x in fh.read().split()]
    except OSError:
        return out
    for kid in kids:
        out.append(kid)
        out.extend(children_of(kid))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    def __init__(self, *args: str, timeout: float = 10.0) -> None:
        cmd = [sys.executable, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", "0", *args]
        # Its log goes to a file nobody reads unless it will not stop; then it says why
        # (PYTHONFAULTHANDLER: SIGABRT makes every process dump its threads' stacks there).
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop() and kill()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log, cwd=ROOT, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    break
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
        finally:
            sel.close()
        line = buf.split(b"\n", 1)[0]
        if not line.startswith(b"listening on "):
            self.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.port = int(line.rsplit(b":", 1)[1])

    def children(self) -> list[int]:
        return children_of(self.proc.pid)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stacks = self.stacks()
            self.kill()
            raise AssertionError(f"server did not exit within the timeout after SIGTERM; its log and "
                                 f"threads:\n{stacks}") from None
        self._log.close()
        return code

    def stacks(self, settle: float = 2.0) -> str:
        """SIGABRT to the server and its children (each dumps its threads), then the log's tail."""
        for pid in [*self.children(), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGABRT)
            except OSError:
                pass
        try:
            self.proc.wait(settle)  # the dumps are written before the processes die
        except subprocess.TimeoutExpired:
            pass
        self._log.seek(0)
        return self._log.read()[-20000:].decode(errors="replace")

    def kill(self) -> None:
        for kid in self.children():
            try:
                os.kill(kid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# -- frame-mode client ---------------------------------------------------------------


class Client:
    """A frame-mode (or raw) connection. ``timeout`` is the default read deadline."""

    def __init__(self, port: int, timeout: float = 5.0, read_banner: bool = True) -> None:
        self.connected_at = time.monotonic()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""
        self.eof = False
        self.banner = self.read_banner() if read_banner else None

    # low level
    def _fill(self, deadline: float) -> None:
        if self.eof:
            raise Closed("connection closed")
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout("deadline passed")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(262144)
        except socket.timeout:
            raise Timeout("deadline passed") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.eof = True
            raise Closed(f"connection reset: {exc}") from None
        if not chunk:
            self.eof = True
            raise Closed("connection closed")
        self.buf += chunk

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def read_exact(self, n: int, timeout: float | None = None) -> bytes:
        deadline = self._deadline(timeout)
        while len(self.buf) < n:
            self._fill(deadline)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_banner(self, timeout: float | None = None) -> bytes:
        """The banner line including its CRLF (reads at most what a banner may be)."""
        deadline = self._deadline(timeout)
        while b"\n" not in self.buf and len(self.buf) <= 200:
            self._fill(deadline)
        i = self.buf.find(b"\n")
        assert i >= 0, f"no banner line within 200 bytes: {self.buf[:260]!r}"
        line, self.buf = self.buf[: i + 1], self.buf[i + 1:]
        return line

    def read_line(self, timeout: float | None = None) -> bytes:
        """A line-mode line, without its ``\\n`` (and without a ``\\r`` before it)."""
        deadline = self._deadline(timeout)
        while b"\n" not in self.buf:
            self._fill(deadline)
        line, self.buf = self.buf.split(b"\n", 1)
        return line[:-1] if line.endswith(b"\r") else line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, ftype: int, payload: bytes = b"") -> None:
        self.sock.sendall(frame(ftype, payload))

    def hello(self, name: str, room: str | None = None, **kw) -> None:
        self.send_frame(HELLO, hello_payload(name, room, **kw))

    def read_frame(self, timeout: float | None = None) -> tuple[int, bytes]:
        deadline = self._deadline(timeout)
        while len(self.buf) < 5:
            self._fill(deadline)
        length, ftype = struct.unpack(">IB", self.buf[:5])
        assert length >= 1, f"server sent a frame with length {length}"
        while len(self.buf) < 4 + length:
            self._fill(deadline)
        payload = self.buf[5: 4 + length]
        self.buf = self.buf[4 + length:]
        return ftype, payload

    def expect(self, ftype: int, timeout: float | None = None):
        """Next frame must be ``ftype``; returns parsed JSON (server JSON types) or bytes."""
        try:
            got, payload = self.read_frame(timeout)
        except Closed:
            raise AssertionError(f"expected {tname(ftype)}, but the connection was closed") from None
        except Timeout:
            raise AssertionError(f"expected {tname(ftype)}, but nothing arrived in time") from None
        assert got == ftype, f"expected {tname(ftype)}, got {tname(got)} {payload[:300]!r}"
        if ftype in JSON_TYPES:
            obj = json.loads(payload.decode("utf-8"))
            assert isinstance(obj, dict), f"{tname(ftype)} payload is not a JSON object: {payload!r}"
            return obj
        return payload

    def expect_error(self, code: str, timeout: float | None = None) -> dict:
        obj = self.expect(ERROR, timeout)
        assert obj.get("code") == code, f"expected ERROR {code}, got {obj!r}"
        assert isinstance(obj.get("message"), str) and obj["message"], f"ERROR without message: {obj!r}"
        self.expect_closed(timeout)
        return obj

    def expect_closed(self, timeout: float | None = None) -> None:
        """No more frames: the next thing is EOF (within the deadline)."""
        deadline = self._deadline(timeout)
        while True:
            if self.buf:
                raise AssertionError(f"expected the connection to close, got more bytes: {self.buf[:300]!r}")
            try:
                self._fill(deadline)
            except Closed:
                return
            except Timeout:
                raise AssertionError("expected the connection to close, it stayed open") from None

    def wait_closed(self, timeout: float | None = None) -> bytes:
        """Read until EOF; returns everything read (for raw / line-mode checks)."""
        deadline = self._deadline(timeout)
        while True:
            try:
                self._fill(deadline)
            except Closed:
                data, self.buf = self.buf, b""
                return data

    def expect_silence(self, seconds: float) -> None:
        """Nothing arrives (and no close) for ``seconds``."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                if self.buf:
                    raise AssertionError(f"expected nothing, got {self.buf[:300]!r}")
                self._fill(deadline)
        except Timeout:
            return
        except Closed:
            raise AssertionError("expected silence, the connection was closed") from None

    def join(self, name: str, room: str | None = None) -> dict:
        """HELLO, then WELCOME and WAITING (as every valid HELLO is answered); returns WELCOME."""
        self.name = name
        self.hello(name, room)
        w = self.expect(WELCOME)
        assert w.get("version") == 1, w
        self.expect_waiting(room)
        return w

    def expect_waiting(self, room: str | None = None) -> None:
        w = self.expect(WAITING)
        assert "room" in w and w["room"] == room, f"WAITING {w!r}, expected room {room!r}"

    def expect_paired(self, peer: str, room: str | None = None, timeout: float | None = None) -> None:
        p = self.expect(PAIRED, timeout)
        assert p.get("peer") == peer and "room" in p and p["room"] == room, \
            f"PAIRED {p!r}, expected peer {peer!r} room {room!r}"

    def expect_peer_left(self, peer: str, reason: str | set, timeout: float | None = None) -> dict:
        p = self.expect(PEER_LEFT, timeout)
        reasons = {reason} if isinstance(reason, str) else reason
        assert p.get("peer") == peer and p.get("reason") in reasons, \
            f"PEER_LEFT {p!r}, expected peer {peer!r} reason {reason!r}"
        return p

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- netcat as a line-mode client ----------------------------------------------------


class Netcat:
    """``nc 127.0.0.1 PORT`` with stdin/stdout pipes; lines are read with deadlines."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.proc = subprocess.Popen(["nc", "127.0.0.1", str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.timeout = timeout
        self.buf = b""
        self.eof = False
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, selectors.EVENT_READ)

    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _fill(self, deadline: float) -> None:
        if self.eof:
            raise Closed("nc output ended")
        left = deadline - time.monotonic()
        if left <= 0 or not self.sel.select(left):
            raise Timeout(f"nothing from nc in time; buffered {self.buf[-300:]!r}")
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.eof = True
            raise Closed("nc output ended")
        self.buf += chunk

    def read_raw_line(self, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self.buf:
            self._fill(deadline)
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def read_line(self, timeout: float | None = None) -> str:
        """Next line as text, without its line ending (``\\n`` or ``\\r\\n``)."""
        raw = self.read_raw_line(timeout)[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        return raw.decode("utf-8")

    def expect_line(self, pred, what: str, timeout: float | None = None, skip_notices: bool = False) -> str:
        """Next line must satisfy ``pred``; with ``skip_notices``, ``* `` lines before it are skipped."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        seen = []
        while True:
            try:
                line = self.read_line(max(0.0, deadline - time.monotonic()))
            except (Timeout, Closed) as exc:
                raise AssertionError(f"expected {what}; lines seen {seen!r}; {exc}") from None
            if pred(line):
                return line
            seen.append(line)
            if not (skip_notices and line.startswith("* ")):
                raise AssertionError(f"expected {what}, got {line!r} (after {seen[:-1]!r})")

    def expect_silence(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                if self.buf:
                    raise AssertionError(f"expected nothing from the server, got {self.buf[:300]!r}")
                self._fill(deadline)
        except Timeout:
            return
        except Closed:
            raise AssertionError("expected silence, nc saw the connection close") from None

    def read_until_eof(self, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while True:
                self._fill(deadline)
        except Closed:
            data, self.buf = self.buf, b""
            return data
        except Timeout:
            raise AssertionError(f"nc did not see the connection close; got {self.buf[-300:]!r}") from None

    def close(self) -> None:
        self.sel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
