"""A real ``redis-server`` for the cluster tests, on a Unix socket in a temporary directory.

Started with ``--save '' --appendonly no`` (nothing written to disk, so a
restart comes back empty, like a Redis without persistence) and stopped at
the end. Tests skip, saying why, only when redis-server or the ``redis``
package is missing; CI installs both (``.ci/run``, the ``test`` extra).
Readiness is the server's own "ready to accept connections" line, waited
for with a deadline.
"""

from __future__ import annotations

import selectors
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server") or next(
    (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()), None)

try:
    import redis
except ImportError:  # the cluster extra is not installed
    redis = None  # type: ignore[assignment]

needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None or redis is None,
    reason="needs redis-server (Debian package redis-server) and the redis package (pip install '.[test]')")


class RedisServer:
    """One redis-server process; :meth:`stop` and :meth:`start` again to simulate an outage."""

    def __init__(self, directory: Path, args: tuple[str, ...] = ()) -> None:
        """``args``: more ``redis-server`` options (e.g. ``("--databases", "1000")``)."""
        self.dir = directory
        self.args = args
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no", *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        seen = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"eady to accept connections" not in seen:  # "Ready ..." or "ready ... at SOCKET"
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.stop()
                    raise AssertionError(f"redis-server did not start within {timeout}s: {seen[-500:]!r}")
                chunk = self.proc.stdout.read1(65536)  # type: ignore[union-attr]
                if not chunk:
                    raise AssertionError(f"redis-server exited at start: {seen[-500:]!r}")
                seen += chunk
        # From here on nobody reads its log: send it nowhere rather than fill a pipe.
        self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout and not self.proc.stdout.closed:
            self.proc.stdout.close()
        self.proc = None

    def client(self, **options: Any) -> Any:
        assert redis is not None
        return redis.Redis(unix_socket_path=str(self.socket), **options)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None or redis is None:
        pytest.skip("needs redis-server (Debian package redis-server) and the redis package")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rclient(redis_server: RedisServer) -> Iterator[Any]:
    """A client on an emptied database; closed afterwards."""
    client = redis_server.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()
