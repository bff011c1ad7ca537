"""Shared fixtures: a real ``chatpair server`` subprocess on 127.0.0.1, port 0.

Tests wait on events with deadlines (a line printed, a frame read), never on
sleeps. ``ServerProcess.stop()`` sends SIGTERM and checks the exit code and
that the listener process (and its workers) are gone.
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
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    """Direct and indirect child pids of ``pid`` (Linux /proc; empty elsewhere)."""
    out: list[int] = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = [int(x) for x in fh.read().split()]
    except OSError:
        return out
    for kid in kids:
        out.append(kid)
        out.extend(_children(kid))
    return out


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _direct_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def spawned_children(pid: int) -> list[int]:
    """Live children started by multiprocessing's spawn (not its resource tracker)."""
    out = []
    for kid in _direct_children(pid):
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as fh:
                if b"spawn_main" in fh.read() and pid_alive(kid):
                    out.append(kid)
        except OSError:
            continue
    return out


def wait_for(what: str, pred: Callable[[], Any], timeout: float, poll: float = 0.02) -> Any:
    """Poll ``pred`` (a /proc reading) until it is truthy; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


class ServerProcess:
    """A running ``python -m chatpair server``; ``port`` is the real port.

    stderr is collected line by line in the background (a chatty log must
    never fill the pipe and block the server); stdout lines after the first
    (the TLS fingerprint) are kept for :meth:`stdout_line`.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 15.0,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        cmd = [sys.executable, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=ROOT, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
        )
        self.port = 0
        self.stderr_text = ""  # the whole log, once stopped
        self._stdout = b""
        self._err: list[str] = []
        self._err_cond = threading.Condition()
        self._err_thread = threading.Thread(target=self._collect_stderr, daemon=True)
        self._err_thread.start()
        try:
            line = self.stdout_line(timeout)
        except AssertionError:
            line = ""
        if not line.startswith("listening on "):
            self.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{self.stderr()}")
        self.port = int(line.split()[2].rsplit(":", 1)[1])

    def _collect_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self._err_cond:
                self._err.append(raw.decode(errors="replace"))
                self._err_cond.notify_all()

    def stderr(self) -> str:
        """The log so far."""
        with self._err_cond:
            return "".join(self._err)

    def wait_stderr(self, text: str, timeout: float) -> str:
        """Wait for a log line containing ``text``; return it."""
        deadline = time.monotonic() + timeout
        with self._err_cond:
            while True:
                for line in self._err:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {text!r} on the server's stderr within {timeout}s:\n"
                                         + "".join(self._err[-30:]))
                self._err_cond.wait(left)

    def stdout_line(self, timeout: float) -> str:
        """The next line the server printed on stdout (AssertionError at the deadline)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._stdout:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"no stdout line from the server within {timeout}s")
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                self._stdout += chunk
        line, _, self._stdout = self._stdout.partition(b"\n")
        return line.decode(errors="replace")

    def children(self) -> list[int]:
        return _children(self.proc.pid)

    def listener(self, timeout: float = 10.0) -> int:
        """Pid of the one live listener process (after a restart the new one may still be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            kids = spawned_children(self.proc.pid)
            if kids:
                assert len(kids) == 1, f"expected one listener process, found {kids}"
                return kids[0]
            if time.monotonic() >= deadline:
                raise AssertionError("no listener process appeared")
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM; wait; return the exit code (and check no child is left)."""
        kids = self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("server did not stop within the timeout after SIGTERM")
        self._err_thread.join(5)
        self.stderr_text = self.stderr()
        deadline = time.monotonic() + 5
        while any(pid_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = [k for k in kids if pid_alive(k)]
        assert not left, f"processes left after the server stopped: {left}"
        return code

    def kill(self) -> None:
        for kid in self.children():
            try:
                os.kill(kid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_server() -> Iterator:
    """``start_server(*args)`` -> ServerProcess; every one is stopped at the end."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(*args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            try:
                server.stop()
            finally:
                server.kill()


@pytest.fixture
def server(start_server) -> ServerProcess:
    return start_server()


# -- a tiny raw client for tests (not the chatpair client: tests check the wire) --------


class RawClient:
    """Frame-mode client over a plain socket, with a deadline on every read."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.banner = self.read_line()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed with {len(self.buf)} of {n} bytes")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed before a full line")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def send_frame(self, ftype: int, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">IB", len(payload) + 1, ftype) + payload)

    def hello(self, name: str, room: str | None = None) -> None:
        self.send_frame(1, json.dumps({"version": 1, "name": name, "room": room}).encode())

    def read_frame(self) -> tuple[int, bytes]:
        length, ftype = struct.unpack(">IB", self.read_exact(5))
        return ftype, self.read_exact(length - 1)

    def expect(self, ftype: int) -> dict | bytes:
        got, payload = self.read_frame()
        assert got == ftype, f"expected type 0x{ftype:02x}, got 0x{got:02x} {payload[:200]!r}"
        return json.loads(payload) if ftype >= 0x10 else payload

    def at_eof(self) -> bool:
        """True once the server closed the connection (within the socket timeout)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()


def raw_pair(port: int, a: str = "alice", b: str = "bob", room: str | None = None) -> tuple[RawClient, RawClient]:
    """Two frame-mode clients, ``a`` then ``b``, paired with each other (in ``room``)."""
    welcome, waiting, paired = 0x10, 0x11, 0x12
    first, second = RawClient(port), RawClient(port)
    for client, name in ((first, a), (second, b)):
        client.hello(name, room)
        client.expect(welcome)
        client.expect(waiting)
    assert second.expect(paired)["peer"] == a
    assert first.expect(paired)["peer"] == b
    return first, second


@pytest.fixture
def clients():
    """``clients(*args)`` -> a ``chatpair client`` subprocess (``test_client.Proc``); every one killed at the end."""
    from test_client import Proc  # (the harness lives with the client's own tests)

    made: list[Proc] = []

    def make(*args: str, **kw) -> Proc:
        proc = Proc(*args, **kw)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


@pytest.fixture
def raw_client():
    made: list[RawClient] = []

    def make(port: int, timeout: float = 5.0) -> RawClient:
        client = RawClient(port, timeout)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
