"""Signals to the server's whole process group, SIGHUP, and nothing left behind at exit.

Each server here runs in a process group of its own (``os.setsid`` in
``preexec_fn``), as under systemd or in a terminal, so a signal can go to the
group (``kill -TERM -- -PGID``) and "nothing left" can be checked the way a
supervisor does: no process of the group exists at the moment the server's
exit is seen (``pgrep -g PGID`` is empty). Waits are for events (a frame, a
line, a log line, the exit) with deadlines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from typing import Callable, Iterator

import pytest

from conftest import RawClient, ServerProcess, pid_alive

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs POSIX signals and Linux /proc")

WELCOME, WAITING, PAIRED, ERROR, MSG = 0x10, 0x11, 0x12, 0x1F, 0x02


def group_members(pgid: int) -> list[tuple[int, str]]:
    """Every process in process group ``pgid`` (zombies too, as ``pgrep -g`` lists them): (pid, state)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            found.append((int(entry), fields[0]))
    return found


@pytest.fixture
def group_server() -> Iterator[Callable[..., ServerProcess]]:
    """``group_server(*args, preexec_fn=os.setsid)``: a server leading its own process group."""
    started: list[ServerProcess] = []

    def start(*args: str, preexec_fn: Callable[[], None] = os.setsid) -> ServerProcess:
        srv = ServerProcess(*args, preexec_fn=preexec_fn)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        try:
            if srv.proc.poll() is None:
                srv.stop()
        finally:
            srv.kill()
            with contextlib.suppress(OSError):
                os.killpg(srv.proc.pid, signal.SIGKILL)  # whatever a failed test left behind


def join(port: int, name: str, room: str | None = None) -> RawClient:
    client = RawClient(port)
    client.hello(name, room)
    client.expect(WELCOME)
    client.expect(WAITING)
    return client


def pair(port: int, a: str, b: str, room: str | None = None) -> tuple[RawClient, RawClient]:
    first = join(port, a, room)
    second = join(port, b, room)
    assert second.expect(PAIRED)["peer"] == a
    assert first.expect(PAIRED)["peer"] == b
    return first, second


def chat(sender: RawClient, receiver: RawClient, text: bytes) -> None:
    sender.send_frame(MSG, text)
    assert receiver.expect(MSG) == text


class LineClient:
    """A netcat user: line mode, one line read at a time (socket timeout 5 s)."""

    def __init__(self, port: int, first_line: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.reader = self.sock.makefile("rb")
        assert self.reader.readline().startswith(b"CHATPAIR/1 ")
        self.sock.sendall(first_line + b"\n")

    def readline(self) -> bytes:
        return self.reader.readline()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def everyone(port: int) -> tuple[list[RawClient], LineClient]:
    """A frame-mode pair, a line-mode client paired with a frame-mode one, a frame-mode client waiting."""
    alice, bob = pair(port, "alice", "bob")
    carol = LineClient(port, b"carol mix")
    assert carol.readline() == b"* waiting for a partner in room mix\n"
    erin = join(port, "erin", "mix")
    assert erin.expect(PAIRED)["peer"] == "carol"
    assert carol.readline() == b"* paired with erin\n"
    dave = join(port, "dave", "den")
    chat(alice, bob, b"hi bob")  # both pairs are in their relays (worker processes with --workers)
    erin.send_frame(MSG, b"hi carol")
    assert carol.readline() == b"erin: hi carol\n"
    return [alice, bob, erin, dave], carol


def all_told_shutdown(frame_clients: list[RawClient], line_client: LineClient) -> None:
    for client in frame_clients:
        assert client.expect(ERROR)["code"] == "shutdown"  # nothing else (no PEER_LEFT) first
        assert client.at_eof()
        client.close()
    assert line_client.readline() == b"* error: the server is shutting down\n"
    assert line_client.readline() == b""
    line_client.close()


def exits_with_nothing_left(srv: ServerProcess, timeout: float = 15.0) -> int:
    """Wait for the server's exit; at that moment no process of its group may exist."""
    code = srv.proc.wait(timeout)
    left = group_members(srv.proc.pid)
    assert not left, f"processes left in the server's process group when it exited: {left}"
    srv.wait_stderr(" stopped", 5)  # its last log line: the stderr pipe is drained up to the end
    assert "Traceback" not in srv.stderr()
    return code


@pytest.mark.timeout(30)
@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_to_the_process_group_stops_cleanly(group_server, workers: str) -> None:
    """``kill -TERM -- -PGID`` (systemd's default): every client hears shutdown, exit 0, nothing left."""
    srv = group_server("--workers", workers)
    frame_clients, line_client = everyone(srv.port)
    members = group_members(srv.proc.pid)
    assert len(members) >= (5 if workers == "2" else 3), members  # main, tracker, listener (+ workers)
    os.killpg(srv.proc.pid, signal.SIGTERM)
    all_told_shutdown(frame_clients, line_client)
    assert exits_with_nothing_left(srv) == 0
    assert "SIGTERM: stopping" in srv.stderr()


@pytest.mark.timeout(30)
def test_sighup_is_ignored_and_logged_when_detached(group_server) -> None:
    """No terminal (systemd, nohup): SIGHUP to the group changes nothing but one log line."""
    srv = group_server("--workers", "2")
    alice, bob = pair(srv.port, "alice", "bob")
    chat(alice, bob, b"before")
    listener = srv.listener()
    members = [pid for pid, _ in group_members(srv.proc.pid)]
    os.killpg(srv.proc.pid, signal.SIGHUP)
    srv.wait_stderr("SIGHUP ignored", 5)
    chat(bob, alice, b"after")  # the pair's worker is alive
    carol, dave = pair(srv.port, "carol", "dave")  # the listener pairs; the other worker relays
    chat(carol, dave, b"new pair")
    assert srv.listener() == listener, "the listener was restarted"
    assert [pid for pid in members if not pid_alive(pid)] == []  # the resource tracker too
    assert srv.stderr().count("SIGHUP ignored") == 1
    srv.proc.send_signal(signal.SIGTERM)
    for client in (alice, bob, carol, dave):
        assert client.expect(ERROR)["code"] == "shutdown"
        client.close()
    assert exits_with_nothing_left(srv) == 0


@pytest.mark.timeout(30)
def test_terminal_hangup_stops_cleanly(group_server) -> None:
    """In a terminal, SIGHUP means it went away: a real hang-up stops the server like SIGTERM."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()

    def in_terminal() -> None:  # the session leader, with the pty as stdin and controlling terminal
        os.setsid()
        os.dup2(slave, 0)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        srv = group_server("--workers", "2", preexec_fn=in_terminal)
    finally:
        os.close(slave)
    try:
        srv.wait_stderr("press any key", 5)  # it is in the terminal's foreground
        frame_clients, line_client = everyone(srv.port)
    finally:
        os.close(master)  # the terminal goes away: SIGHUP to the session leader and the foreground group
    all_told_shutdown(frame_clients, line_client)
    assert exits_with_nothing_left(srv) == 0
    assert "the terminal hung up (SIGHUP): stopping" in srv.stderr()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("round_", range(5))
def test_nothing_left_in_the_group_at_exit(group_server, round_: int) -> None:
    """``kill -TERM`` of the server: when its exit is seen, no process it started exists (resource tracker too)."""
    srv = group_server("--workers", "2" if round_ % 2 else "0", "-q")
    alice, bob = pair(srv.port, "alice", "bob")
    chat(alice, bob, b"through the relay")
    srv.proc.send_signal(signal.SIGTERM)  # the main process only
    for client in (alice, bob):
        assert client.expect(ERROR)["code"] == "shutdown"
        client.close()
    code = srv.proc.wait(15)
    left = group_members(srv.proc.pid)
    assert not left, f"processes left in the server's process group when it exited: {left}"
    assert code == 0


@pytest.mark.timeout(60)
def test_signals_in_quick_succession_stop_it_every_time(group_server) -> None:
    """SIGTERMs (and Ctrl-Cs) arriving while earlier ones are being handled, and while it exits:
    it stops, exit code 0, every time. Before, the handler took a lock the code it interrupted
    could hold (a node hung for good, twice in a day, when a test sent SIGTERM twice), nested a
    log call per signal (RecursionError), and the last ones raised KeyboardInterrupt at exit."""
    for round_ in range(4):
        srv = group_server()
        until = time.monotonic() + 0.3  # a stream of signals, so that some land inside a handler
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < until and srv.proc.poll() is None:
                srv.proc.send_signal(signal.SIGTERM if round_ % 2 else signal.SIGINT)
        assert srv.proc.wait(10) == 0, f"round {round_}"
