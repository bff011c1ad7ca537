"""A real HAProxy in front of real chatpair servers, for tests.

    client ──► haproxy (127.0.0.1, ``.port``; mode tcp, balance roundrobin)
                 ├─ send-proxy-v2 ──► chatpair server --proxy-protocol (node 0)
                 ├─ send-proxy-v2 ──► node 1
                 └─ ...

:class:`HAProxy` writes a configuration for the given backend ports, starts
``haproxy -db`` and waits until it listens: haproxy binds every frontend at
once, and a second frontend (a Unix socket in its directory, so no other
process can hold it) that rejects each connection at once tells when that
has happened without a connection reaching a backend. ``noreuseport``: a
port taken meanwhile by another test's listener makes haproxy fail (and
start again on another port) instead of sharing it. Timeouts are long (an hour), so idle chat connections are never cut
by the balancer during a test. :meth:`HAProxy.stop` terminates and reaps it.

:class:`ServerGroup` is N chatpair servers behind one HAProxy that looks,
to a test, like one server: ``port`` (the balancer's), ``proc`` (signals go
to every node; ``wait`` waits for all), ``children()``, ``stop()``,
``kill()`` - what ``tests/wire.py``'s ``Server`` offers, so the
conformance suite runs through it unchanged (tests/test_conformance_haproxy.py).

Tests that need haproxy skip (saying why) when it is not installed: the
Debian package ``haproxy``; CI installs it.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/bin/haproxy") if Path(p).exists()), None)

needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (Debian package haproxy)")


def free_port() -> int:
    """A port free on 127.0.0.1 right now (haproxy binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connectable(path: Path) -> bool:
    """Does a Unix socket at ``path`` accept connections (haproxy has bound all its frontends)?"""
    try:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(1)
            probe.connect(str(path))
            return True
    except OSError:
        return False


class HAProxy:
    """``haproxy -db`` balancing ``backends`` (ports on 127.0.0.1) round robin, with ``send``."""

    def __init__(self, backends: Sequence[int], send: str = "send-proxy-v2", directory: Path | None = None,
                 timeout: float = 10.0) -> None:
        assert HAPROXY is not None, "haproxy is not installed"
        assert send in ("send-proxy", "send-proxy-v2", ""), send
        self._tmp = None if directory is not None else tempfile.TemporaryDirectory(prefix="chatpair-haproxy-")
        self.dir = directory if directory is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.backends = list(backends)
        self.send = send
        # A port picked free may be taken again before haproxy binds it (tests run in parallel).
        # With noreuseport haproxy then fails to start instead of sharing the port with another
        # listener (SO_REUSEPORT would split the connections between the two): try new ports.
        for attempt in range(5):
            self.port = free_port()
            self.ready_path = self.dir / f"ready-{self.port}.sock"
            self.config = self.dir / f"haproxy-{self.port}.cfg"
            self.log_path = self.dir / f"haproxy-{self.port}.log"
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by stop()
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self._write_config())], stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT)
            try:
                wait_for("haproxy to listen", lambda: self.proc.poll() is not None or _connectable(self.ready_path),
                         timeout)
            except BaseException:
                self.stop()
                raise
            if self.proc.poll() is None:
                return
            failed = self.log()
            self._log.close()
            if "cannot bind" not in failed.lower() or attempt == 4:
                self.stop()
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}: {failed}")

    def _write_config(self) -> Path:
        servers = "\n".join(f"    server node{i} 127.0.0.1:{port} {self.send}" for i, port in enumerate(self.backends))
        self.config.write_text(f"""\
global
    noreuseport
defaults
    mode tcp
    timeout connect 5s
    # An hour: a chat connection may stay silent for a long time.
    timeout client 1h
    timeout server 1h
frontend chatpair
    bind 127.0.0.1:{self.port}
    default_backend nodes
frontend ready
    bind {self.ready_path}
    tcp-request connection reject
backend nodes
    balance roundrobin
{servers}
""")
        return self.config

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()


class _GroupProc:
    """The ``proc`` of a :class:`ServerGroup`: what a test does to "the server" it does to every node."""

    def __init__(self, nodes: list[Any]) -> None:
        self._nodes = nodes

    @property
    def pid(self) -> int:
        return int(self._nodes[0].proc.pid)

    def poll(self) -> int | None:
        codes = [n.proc.poll() for n in self._nodes]
        return None if any(c is None for c in codes) else max(codes, key=abs)

    def send_signal(self, sig: int) -> None:
        for node in self._nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        codes = [n.proc.wait(timeout) for n in self._nodes]
        return max(codes, key=abs)


class ServerGroup:
    """Chatpair servers behind one HAProxy, offering what ``wire.Server`` offers.

    ``start(args)`` starts one node with those ``chatpair server`` options
    and returns an object with ``port``, ``proc``, ``children()``, ``stop()``
    and ``kill()`` (``wire.Server`` or ``conftest.ServerProcess``).
    ``node_args[i]`` are node i's own options, put before ``args`` (which
    every node gets): ``--proxy-protocol`` for each, and later ``--cluster``
    and ``--node-id``.
    """

    def __init__(self, start: Callable[..., Any], node_args: Sequence[Sequence[str]], args: Sequence[str] = (),
                 send: str = "send-proxy-v2") -> None:
        self.nodes: list[Any] = []
        self.haproxy: HAProxy | None = None
        try:
            for own in node_args:
                self.nodes.append(start(*own, *args))
            self.haproxy = HAProxy([n.port for n in self.nodes], send=send)
        except BaseException:
            self.kill()
            raise
        self.port = self.haproxy.port
        self.proc = _GroupProc(self.nodes)

    def children(self) -> list[int]:
        return [pid for n in self.nodes for pid in n.children()]

    def stop(self, timeout: float = 10.0) -> int:
        try:
            # Every node told at once, so they stop side by side: one after the
            # other, three cluster nodes on a loaded machine outlasted a
            # 10-second test timeout (the teardown counts in it).
            for node in self.nodes:
                if node.proc.poll() is None:
                    node.proc.send_signal(signal.SIGTERM)
            codes = [n.stop(timeout) for n in self.nodes]
        finally:
            if self.haproxy is not None:
                self.haproxy.stop()
        return max(codes, key=abs)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()
        if self.haproxy is not None:
            self.haproxy.stop()

