"""'Any key stops the server' asks first: the server in a real terminal (a tmux pane).

A key asks ``stop the server and disconnect N clients? [y/N]``; ``n`` (any
key but ``y``) keeps every pair chatting; ``y`` stops as before (every client
told ERROR shutdown, exit 0). Waiting is always polling the pane or reading a
frame with a deadline.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys

import pytest
from conftest import RawClient
from test_tui_tmux import Tmux

pytestmark = [
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
    pytest.mark.skipif(sys.platform == "win32", reason="tmux is POSIX-only"),
]

WELCOME, WAITING, PAIRED, ERROR, MSG = 0x10, 0x11, 0x12, 0x1F, 0x02


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    yield t
    t.kill()


def start_server(tmux: Tmux) -> int:
    tmux.start("server", f"{shlex.quote(sys.executable)} -m chatpair server --host 127.0.0.1 --port 0")
    lines = tmux.wait("server", lambda lines: any("press any key to stop" in line for line in lines))
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", "\n".join(lines))
    assert match, "\n".join(lines)
    return int(match.group(1))


def pair(port: int) -> tuple[RawClient, RawClient]:
    alice, bob = RawClient(port), RawClient(port)
    alice.hello("alice")
    alice.expect(WELCOME)
    alice.expect(WAITING)
    bob.hello("bob")
    bob.expect(WELCOME)
    bob.expect(WAITING)
    assert bob.expect(PAIRED)["peer"] == "alice"
    assert alice.expect(PAIRED)["peer"] == "bob"
    return alice, bob


def count(lines: list[str], text: str) -> int:
    return sum(line.count(text) for line in lines)


@pytest.mark.timeout(30)
def test_a_key_asks_n_keeps_chatting_y_stops(tmux):
    port = start_server(tmux)
    alice, bob = pair(port)
    try:
        tmux.keys("server", "x", literal=True)
        tmux.wait_text("server", "stop the server and disconnect 2 clients? [y/N]")
        tmux.keys("server", "n", literal=True)
        tmux.wait_text("server", "still running")

        alice.send_frame(MSG, b"still here?")
        assert bob.expect(MSG) == b"still here?"
        bob.send_frame(MSG, b"yes")
        assert alice.expect(MSG) == b"yes"

        tmux.keys("server", "Enter")
        tmux.wait("server", lambda lines: count(lines, "disconnect 2 clients? [y/N]") == 2)
        tmux.keys("server", "y", literal=True)
        for client in (alice, bob):
            assert client.expect(ERROR)["code"] == "shutdown"
            assert client.at_eof()
        lines = tmux.wait_text("server", "EXIT=")
        assert any("EXIT=0" in line for line in lines), "\n".join(lines)
    finally:
        alice.close()
        bob.close()


@pytest.mark.timeout(30)
def test_a_key_with_no_client_stops_at_once(tmux):
    start_server(tmux)
    tmux.keys("server", "q", literal=True)
    lines = tmux.wait_text("server", "EXIT=")
    text = "\n".join(lines)
    assert "no clients connected; stopping" in text and "EXIT=0" in text, text
