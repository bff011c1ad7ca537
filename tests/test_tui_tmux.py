"""The curses client in a real terminal: tmux panes at 80x24, read back with
``tmux capture-pane -p``.

Each test gets its own tmux server (``-S`` socket in tmp_path) so tests never
see each other's sessions, and the server is killed at the end. Waiting is
always "poll capture-pane until a condition holds or a deadline passes".
Skipped when tmux is not installed (.ci/run installs it).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from test_client import fill_room

pytestmark = [
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
    pytest.mark.skipif(sys.platform == "win32", reason="curses client is POSIX-only"),
]

ROOT = Path(__file__).resolve().parent.parent
MSG, WELCOME, WAITING, PAIRED = 0x02, 0x10, 0x11, 0x12


class Tmux:
    """A private tmux server; one session per client."""

    def __init__(self, tmp: Path) -> None:
        self.socket = str(tmp / "tmux.sock")
        self.tmp = tmp

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, timeout=10)
        if check and result.returncode != 0:
            raise AssertionError(f"tmux {args}: {result.stderr.decode()}")
        return result.stdout.decode("utf-8", "replace")

    def start(self, session: str, command: str, width: int = 80, height: int = 24) -> None:
        env = f"cd {shlex.quote(str(ROOT))} && export LANG=C.UTF-8 LC_ALL=C.UTF-8 NO_COLOR=1 &&"
        self.run("new-session", "-d", "-s", session, "-x", str(width), "-y", str(height),
                 f"{env} {command}; echo EXIT=$?; sleep 60")
        # A detached session follows the size given at creation, not a client's.
        self.run("set-option", "-t", session, "window-size", "manual")

    def client(self, session: str, port: int, name: str, *extra: str) -> None:
        args = " ".join(shlex.quote(a) for a in extra)
        self.start(session, f"{shlex.quote(sys.executable)} -m chatpair client --port {port} --name {name} {args}")

    def screen(self, session: str) -> list[str]:
        return self.run("capture-pane", "-p", "-t", session).split("\n")[:-1]

    def keys(self, session: str, *keys: str, literal: bool = False) -> None:
        self.run("send-keys", "-t", session, *(["-l"] if literal else []), *keys)

    def wait(self, session: str, check: Callable[[list[str]], bool], timeout: float = 10.0) -> list[str]:
        """Poll the pane until ``check(lines)`` is true; fail with the screen after the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen(session)
            if check(lines):
                return lines
            if time.monotonic() > deadline:
                shown = "\n".join(lines)
                raise AssertionError(f"screen of {session} never matched:\n{shown}")
            time.sleep(0.05)  # poll interval, not a wait for an event

    def wait_text(self, session: str, text: str, timeout: float = 10.0) -> list[str]:
        return self.wait(session, lambda lines: any(text in line for line in lines), timeout)

    def kill(self) -> None:
        self.run("kill-server", check=False)


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    yield t
    t.kill()


def test_typing_is_not_disturbed_then_enter_delivers_then_resize(server, tmux):
    tmux.client("alice", server.port, "alice")
    tmux.wait_text("alice", "waiting for a partner")
    tmux.client("bob", server.port, "bob")
    tmux.wait_text("alice", "* paired with bob")
    tmux.wait_text("bob", "* paired with alice")

    tmux.keys("alice", "hello wor", literal=True)
    tmux_alice = "alice"
    tmux.wait(tmux_alice, lambda lines: lines[-1] == "> hello wor")
    tmux.keys("bob", "hi alice 你好 😀", literal=True)
    tmux.keys("bob", "Enter")
    lines = tmux.wait(tmux_alice, lambda lines: any("bob: hi alice 你好 😀" in line for line in lines))
    assert len(lines) == 24
    assert lines[-1] == "> hello wor"  # the input line is untouched
    assert "you: alice" in lines[-2] and "partner: bob" in lines[-2] and "rtt" in lines[-2]
    # The cursor is still at the end of what alice typed.
    cursor = tmux.run("display", "-p", "-t", "alice", "#{cursor_x},#{cursor_y}").strip()
    assert cursor == f"{len('> hello wor')},23"

    tmux.keys("alice", "Enter")
    tmux.wait_text("bob", "alice: hello wor")
    tmux.wait(tmux_alice, lambda lines: lines[-1] == ">" or lines[-1] == "> ")

    # Resize to 60x20: status and input move to the new bottom rows, text rewraps.
    tmux.keys("bob", "x" * 70, literal=True)
    tmux.keys("bob", "Enter")
    tmux.wait_text("alice", "bob: xxxx")
    tmux.run("resize-window", "-t", "alice", "-x", "60", "-y", "20")
    # (Wait for the whole repaint: a capture can land between the status row
    # and the conversation being drawn at the new size.)
    lines = tmux.wait("alice", lambda lines: len(lines) == 20 and "you: alice" in lines[18]
                      and "bob: hi alice" in "\n".join(lines) and "alice: hello wor" in "\n".join(lines))
    assert all(len(line) <= 60 for line in lines)
    assert lines[19].startswith(">")
    text = "\n".join(lines)
    assert "bob: hi alice" in text and "alice: hello wor" in text
    # The 75-cell message now takes two rows of at most 60 cells.
    row = next(i for i, line in enumerate(lines) if line.startswith("bob: xxx"))
    assert lines[row + 1].strip() and set(lines[row + 1].strip()) == {"x"}


def test_quit_restores_terminal(server, tmux):
    before, after = tmux.tmp / "before", tmux.tmp / "after"
    client = f"{shlex.quote(sys.executable)} -m chatpair client --port {server.port} --name carol"
    tmux.start("carol", f"stty -a > {before}; {client}; stty -a > {after}")
    tmux.wait_text("carol", "waiting for a partner")
    tmux.keys("carol", "/quit", literal=True)
    tmux.keys("carol", "Enter")
    tmux.wait_text("carol", "EXIT=0")
    assert before.read_text() == after.read_text()


def test_ctrl_c_restores_terminal(server, tmux):
    before, after = tmux.tmp / "before", tmux.tmp / "after"
    client = f"{shlex.quote(sys.executable)} -m chatpair client --port {server.port} --name dave"
    tmux.start("dave", f"stty -a > {before}; {client}; stty -a > {after}")
    tmux.wait_text("dave", "waiting for a partner")
    tmux.keys("dave", "typed", literal=True)
    tmux.keys("dave", "C-c")
    tmux.wait_text("dave", "EXIT=0")
    assert before.read_text() == after.read_text()


def test_hostile_message_is_harmless_text(server, raw_client, tmux):
    raw = raw_client(server.port)
    raw.hello("mallory")
    raw.expect(WELCOME)
    raw.expect(WAITING)
    tmux.client("erin", server.port, "erin")
    raw.expect(PAIRED)
    tmux.wait_text("erin", "paired with mallory")
    title_before = tmux.run("display", "-p", "-t", "erin", "#{pane_title}")
    hostile = "A\x1b[2J\x1b]0;pwned\x07B\x1b]8;;http://evil\x1b\\C\x9b31mD\x07E\u202eF"
    raw.send_frame(MSG, hostile.encode())
    lines = tmux.wait_text("erin", "mallory: A")
    row = next(line for line in lines if "mallory: A" in line)
    assert row.startswith("mallory: A^[[2J^[]0;pwned^GB^[]8;;http://evil^[\\C\\x9b31mD^GE<U+202E>F")
    assert "* paired with mallory" in "\n".join(lines)  # the screen was not wiped by ESC[2J
    assert tmux.run("display", "-p", "-t", "erin", "#{pane_title}") == title_before
    assert "pwned" not in tmux.run("display", "-p", "-t", "erin", "#{pane_title}")


def test_server_loss_reconnects_on_same_port(start_server, tmux):
    first = start_server()
    port = first.port
    tmux.client("frank", port, "frank", "--room", "den")
    tmux.wait_text("frank", "waiting for a partner in room den")
    first.kill()  # a crash, not a clean stop: the client sees the connection close
    lines = tmux.wait_text("frank", "reconnecting in")
    text = "\n".join(lines)
    assert "closed the connection" in text or "lost" in text
    # Backoff: attempts fail while nothing listens; the first is said once, the rest are counted
    # in the status line (the conversation is not flooded with one line per attempt).
    lines = tmux.wait("frank", lambda lines: "(3 failed)" in lines[-2], timeout=10)
    refused = [line for line in lines if f"cannot connect to 127.0.0.1:{port}: connection refused" in line]
    assert len(refused) == 1, lines
    second = start_server("--port", str(port))
    assert second.port == port
    lines = tmux.wait_text("frank", f"reconnected to 127.0.0.1:{port}", timeout=20)
    tmux.wait("frank", lambda lines: "waiting for a partner in room den" in "\n".join(lines).split("reconnected")[-1])
    # And the same room is joined again: a partner in room "den" is paired with frank.
    tmux.client("gina", port, "gina", "--room", "den")
    tmux.wait_text("frank", "paired with gina")


def test_full_room_is_said_once_not_retried_forever(server, raw_client, tmux):
    """A full room stays full while its pair chats: one clear line, exit 3 (as in pipe mode).

    It used to reconnect every 0.5 s for ever (the backoff restarted on every
    successful connect), two server log lines per attempt.
    """
    fill_room(raw_client, server.port, "lab")
    tmux.client("eve", server.port, "eve", "--room", "lab")
    lines = tmux.wait_text("eve", "not reconnecting")
    assert any("room lab is full" in line for line in lines)
    assert not any("reconnecting in" in line for line in lines)
    tmux.keys("eve", "x")
    tmux.wait_text("eve", "EXIT=3")
    assert server.stderr().count("eve@") <= 2  # joined, refused: once


def test_a_message_entered_while_waiting_is_sent_once_paired(server, raw_client, tmux):
    """Enter while there is no partner: the line leaves the input box, one line says what will happen,
    and the message goes out (in order) when a partner arrives - as pipe mode does."""
    tmux.client("hana", server.port, "hana", "--room", "early")
    tmux.wait_text("hana", "waiting for a partner in room early")
    for text in ("first words", "second"):
        tmux.keys("hana", text, literal=True)
        tmux.keys("hana", "Enter")
    lines = tmux.wait(
        "hana", lambda lines: sum("will be sent once you are paired" in line for line in lines) == 2)
    assert lines[-1].rstrip() == ">"  # not kept in the input line
    assert not any("hana: first words" in line for line in lines)  # shown when it is really sent
    raw = raw_client(server.port)
    raw.hello("ivan", "early")
    raw.expect(WELCOME)
    raw.expect(WAITING)
    raw.expect(PAIRED)
    assert raw.expect(MSG) == b"first words"
    assert raw.expect(MSG) == b"second"
    lines = tmux.wait_text("hana", "hana: second")
    text = "\n".join(lines)
    assert text.index("paired with ivan") < text.index("hana: first words") < text.index("hana: second")
