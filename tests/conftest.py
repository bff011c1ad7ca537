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
from typing import Iterator

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


class ServerProcess:
    """A running ``python -m chatpair server``; ``port`` is the real port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 15.0) -> None:
        cmd = [sys.executable, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=ROOT, env={**os.environ, **(env or {})},
        )
        self.port = 0
        self.stdout_rest = b""  # what the server printed after its first line (TLS fingerprint)
        line = self._read_stdout_line(timeout)
        if not line.startswith(b"listening on "):
            self.proc.kill()
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"server did not start: {line!r} {err}")
        self.port = int(line.split()[2].rsplit(b":", 1)[1])
        # Drain stderr in the background: a chatty log must never fill the
        # pipe and block the server.
        self.stderr_text = ""  # the whole log, once stopped
        self._stderr_chunks: list[bytes] = []
        self._stderr_thread = threading.Thread(target=self._collect_stderr, daemon=True)
        self._stderr_thread.start()

    def _collect_stderr(self) -> None:
        assert self.proc.stderr is not None
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):  # type: ignore[union-attr]
            self._stderr_chunks.append(chunk)

    def stderr_so_far(self) -> str:
        return b"".join(self._stderr_chunks).decode(errors="replace")

    def _read_stdout_line(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        sel.close()
        line, _, self.stdout_rest = buf.partition(b"\n")
        return line

    def children(self) -> list[int]:
        return _children(self.proc.pid)

    def listener_pid(self, timeout: float = 10.0) -> int:
        """The listener process (``listening on`` is printed before it starts: poll for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in _children(self.proc.pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        if b"spawn_main" in fh.read() and pid in _direct_children(self.proc.pid):
                            return pid
                except OSError:
                    continue
            time.sleep(0.02)
        raise AssertionError("no listener process appeared")

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
        self._stderr_thread.join(5)
        self.stderr_text = self.stderr_so_far()
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
