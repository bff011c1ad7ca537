"""``listening on`` means served: the main process prints it once the listener says ``ready``.

The listener is a spawned process; it takes a fresh interpreter a tenth of a
second or more to import chatpair and start its loop. These tests hold that
process at its very start - a ``sitecustomize`` put on its ``PYTHONPATH``
runs in every new interpreter, and acts only in multiprocessing's spawned
children (``--multiprocessing-fork`` on their command line) - and look at
what the main process has said meanwhile. Nothing is timed: the held
listener answers on one FIFO and waits for its release on another.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

HOLD_ENV = "CHATPAIR_TEST_HOLD_SPAWNED"

# Runs at the start of every interpreter that has it on its path; only a spawned
# child (the listener, here: no --workers) is held. ``alarm`` ends it should the
# test die before releasing it.
SITECUSTOMIZE = f"""
import os, signal, sys
_hold = os.environ.get({HOLD_ENV!r})
if _hold and "--multiprocessing-fork" in sys.argv:
    signal.alarm(60)
    _go = os.open(os.path.join(_hold, "go"), os.O_RDWR)  # RDWR: opening waits for no writer
    _held = os.open(os.path.join(_hold, "held"), os.O_WRONLY | os.O_NONBLOCK)
    os.write(_held, b"h")
    os.close(_held)
    _word = os.read(_go, 1)
    os.close(_go)
    if _word == b"x":
        os._exit(3)
    signal.alarm(0)
"""


@dataclass
class HeldServer:
    """A ``chatpair server`` whose listener process is held at its start."""

    proc: subprocess.Popen
    hold: Path
    held_fd: int

    def wait_held(self, timeout: float = 30.0) -> None:
        assert select.select([self.held_fd], [], [], timeout)[0], "the listener process never started"
        assert os.read(self.held_fd, 1) == b"h"

    def release(self, word: bytes = b"g") -> None:
        """Let the held listener go on (``x``: exit with code 3 instead, as a broken one would)."""
        go = os.open(self.hold / "go", os.O_WRONLY)  # the listener holds the read end open: no wait
        os.write(go, word)
        os.close(go)

    def said_anything(self) -> bool:
        assert self.proc.stdout is not None
        return bool(select.select([self.proc.stdout], [], [], 0)[0])

    def stdout_line(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        assert select.select([self.proc.stdout], [], [], timeout)[0], "no line from the server"
        return self.proc.stdout.readline().decode()


@pytest.fixture
def held_server(tmp_path: Path) -> Iterator[HeldServer]:
    site, hold = tmp_path / "site", tmp_path / "hold"
    site.mkdir()
    hold.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    os.mkfifo(hold / "held")
    os.mkfifo(hold / "go")
    held_fd = os.open(hold / "held", os.O_RDONLY | os.O_NONBLOCK)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, HOLD_ENV: str(hold)},
    )
    try:
        yield HeldServer(proc, hold, held_fd)
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(held_fd)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_listening_on_waits_for_the_listener_and_then_it_answers_at_once(held_server: HeldServer) -> None:
    held_server.wait_held()
    # The port is bound, the listener process started but not serving: not a word yet
    # (before this was fixed, "listening on" was printed before the listener was started).
    assert not held_server.said_anything()
    held_server.release()
    line = held_server.stdout_line()
    assert line.startswith("listening on 127.0.0.1:"), line
    port = int(line.split()[2].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert sock.recv(64).startswith(b"CHATPAIR/1 ")
    held_server.proc.terminate()
    assert held_server.proc.wait(30) == 0


def test_a_listener_that_dies_before_it_is_ready_is_one_line_and_exit_1(held_server: HeldServer) -> None:
    held_server.wait_held()
    held_server.release(b"x")
    assert held_server.proc.wait(30) == 1
    assert held_server.proc.stdout is not None and held_server.proc.stderr is not None
    assert held_server.proc.stdout.read() == b""  # never "listening on"
    log = held_server.proc.stderr.read().decode()
    assert "the listener process ended before it was ready (exit code 3)" in log
    assert "Traceback" not in log


def _sleep_until_killed() -> None:
    import time

    time.sleep(60)


def test_the_client_count_skips_a_restarted_listeners_ready() -> None:
    """A listener restarted after a crash says ``ready`` unasked; asked ``count`` meanwhile,
    its ``ready`` may come first: the stop prompt must still get ``clients N``."""
    import multiprocessing
    import threading

    from chatpair.server.config import ServerConfig
    from chatpair.server.main import Server

    server = Server(ServerConfig(host="127.0.0.1", port=0))
    ours, listener_end = socket.socketpair()
    child = multiprocessing.get_context("spawn").Process(target=_sleep_until_killed)
    child.start()  # stands in for a live listener process: client_count asks only a live one
    server._control, server._process = ours, child

    def answer() -> None:  # the listener's side: its ready, then the answer to "count"
        asked = b""
        while b"count\n" not in asked:
            asked += listener_end.recv(64)
        listener_end.sendall(b"ready\n")
        listener_end.sendall(b"clients 3\n")

    helper = threading.Thread(target=answer)
    helper.start()
    try:
        assert server.client_count(timeout=30) == 3
    finally:
        helper.join(30)
        child.kill()
        child.join(30)
        ours.close()
        listener_end.close()
        server.sock.close()
