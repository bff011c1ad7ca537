"""The server under test: one bench starts itself, or a running one, sampled from /proc.

The bench reaches a server only as a subprocess (``python -m chatpair
server``) and over sockets; it never imports server code. What it measures
of the server - RSS, CPU seconds, open descriptors of the process tree - it
reads from ``/proc`` (Linux), so a server on another host is measured by its
traffic only.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from chatpair.errors import ChatpairError
from chatpair.proto import BANNER_PREFIX, MAX_BANNER


@dataclass
class ServerStats:
    """The server's process tree as seen in /proc at one moment."""

    pids: list[int]
    rss: int  # bytes, summed over the processes
    cpu: float  # user + system seconds, summed
    fds: int  # open descriptors, summed


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids = [int(x) for x in fh.read().split()]
        except OSError:
            continue
        for kid in kids:
            out.append(kid)
            out.extend(_descendants(kid))
    return out


def _is_helper(pid: int) -> bool:
    """multiprocessing's resource tracker is not part of the server's work."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"resource_tracker" in fh.read()
    except OSError:
        return True


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_stats(pids: list[int]) -> ServerStats:
    """RSS, CPU and descriptors of ``pids`` from /proc (missing ones count 0)."""
    rss = fds = 0
    cpu = 0.0
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                rss += int(fh.read().split()[1]) * _PAGE
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / _TICK
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            alive.append(pid)
        except (OSError, IndexError, ValueError):
            continue
    return ServerStats(alive, rss, cpu, fds)


class ServerUnderTest:
    """The process tree to sample: a server bench started itself, or a given pid."""

    def __init__(self, root_pid: int | None) -> None:
        self.root_pid = root_pid

    def pids(self) -> list[int]:
        """The working processes: the listener and its children (not the idle main one)."""
        if self.root_pid is None or not os.path.isdir(f"/proc/{self.root_pid}"):
            return []
        kids = [p for p in _descendants(self.root_pid) if not _is_helper(p)]
        return kids or [self.root_pid]

    def stats(self) -> ServerStats | None:
        pids = self.pids()
        return proc_stats(pids) if pids else None


class LocalServer(ServerUnderTest):
    """``python -m chatpair server`` on a free loopback port, for the run's length."""

    def __init__(self, extra_args: tuple[str, ...] = (), timeout: float = 20.0) -> None:
        self.command = [sys.executable, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", "0",
                        "-q", *extra_args]
        # stderr goes to a file: a pipe nobody reads would fill and block the server.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log, start_new_session=True)
        super().__init__(self.proc.pid)
        line = self._first_line(timeout)
        if not line.startswith(b"listening on "):
            self.stop()
            raise ChatpairError(f"the bench server did not start: {line.decode(errors='replace')!r} "
                                f"{self.log_tail()}".strip())
        self.port = int(line.rsplit(b":", 1)[1])
        self.host = "127.0.0.1"
        self._wait_ready(timeout)

    def _first_line(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        return buf.split(b"\n", 1)[0].strip()

    def _wait_ready(self, timeout: float) -> None:
        """A banner proves the listener process is up (and its workers started)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                banner = sock.recv(MAX_BANNER)
        except OSError as err:
            self.stop()
            raise ChatpairError(f"the bench server does not answer: {err}") from None
        if not banner.startswith(BANNER_PREFIX):
            self.stop()
            raise ChatpairError(f"the bench server sent no banner: {banner!r}")

    def log_tail(self, limit: int = 2000) -> str:
        try:
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-limit:]
        except (OSError, ValueError):
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL the whole session if it will not stop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


# ------------------------------------------------------------------------------
