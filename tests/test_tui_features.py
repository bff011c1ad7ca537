"""The chat screen's finer points, on a real terminal (tmux), read back with capture-pane.

Bracketed paste (one message of several lines), "N new messages" while
scrolled back, the input line re-scrolled after the window widens, Ctrl-Z
and ``fg``, emoji joined with ZWJ kept whole, and the conversation left
readable in the terminal after leaving. Waiting is always polling the screen
with a deadline (:meth:`Tmux.wait`).
"""

from __future__ import annotations

import shlex
import sys

import pytest
from test_tui_tmux import ROOT, Tmux


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    yield t
    t.kill()


def pair(tmux: Tmux, port: int, *extra_alice: str) -> None:
    tmux.client("alice", port, "alice", *extra_alice)
    tmux.wait_text("alice", "waiting for a partner")
    tmux.client("bob", port, "bob")
    tmux.wait_text("alice", "* paired with bob")
    tmux.wait_text("bob", "* paired with alice")


def test_paste_of_several_lines_is_one_message(server, tmux):
    pair(tmux, server.port)
    tmux.run("set-buffer", "-b", "p", "first line\nsecond line\nthird")
    tmux.run("paste-buffer", "-p", "-b", "p", "-t", "alice")  # -p: bracketed, as the client asked
    lines = tmux.wait("alice", lambda lines: lines[-1].startswith("> first line\u21b5second line\u21b5third"))
    assert not any("alice: first line" in line for line in lines)  # not sent line by line
    tmux.keys("alice", "Enter")
    lines = tmux.wait_text("bob", "alice: third")
    text = "\n".join(lines)
    assert "alice: first line\nalice: second line\nalice: third" in text


def test_scrolled_back_view_counts_new_messages(server, tmux):
    pair(tmux, server.port)
    for i in range(30):
        tmux.keys("bob", f"old {i}", "Enter")
    tmux.wait_text("alice", "bob: old 29")
    tmux.keys("alice", "PPage")
    tmux.wait("alice", lambda lines: not any("old 29" in line for line in lines))
    tmux.keys("bob", "new one", "Enter")
    lines = tmux.wait_text("alice", "1 new message below (PgDn)")
    assert not any("bob: new one" in line for line in lines)  # the view stayed where it was
    tmux.keys("bob", "new two", "Enter")
    tmux.wait_text("alice", "2 new messages below (PgDn)")
    tmux.keys("alice", "NPage")
    lines = tmux.wait_text("alice", "bob: new two")
    assert not any("new message" in line for line in lines)


def test_input_line_rescrolls_when_the_window_widens(server, tmux):
    tmux.client("alice", server.port, "alice")
    tmux.wait_text("alice", "waiting for a partner")
    tmux.run("resize-window", "-t", "alice", "-x", "40", "-y", "24")
    tmux.wait("alice", lambda lines: all(len(line) <= 40 for line in lines) and "you: alice" in lines[-2])
    typed = "".join(f"{i:02d}." for i in range(20))  # 60 characters
    tmux.keys("alice", typed, literal=True)
    tmux.wait("alice", lambda lines: lines[-1].endswith("19.") and not lines[-1].startswith("> 00."))
    tmux.run("resize-window", "-t", "alice", "-x", "100", "-y", "24")
    tmux.wait("alice", lambda lines: lines[-1] == "> " + typed)


def test_ctrl_z_suspends_and_fg_resumes(server, tmux):
    tmux.run("new-session", "-d", "-s", "sh", "-x", "80", "-y", "24", "bash --norc --noprofile -i")
    tmux.run("set-option", "-t", "sh", "window-size", "manual")
    command = (f"cd {shlex.quote(str(ROOT))} && export LANG=C.UTF-8 LC_ALL=C.UTF-8 NO_COLOR=1 PS1='$ ' && "
               f"{shlex.quote(sys.executable)} -m chatpair client --port {server.port} --name zed")
    tmux.keys("sh", command, "Enter")
    tmux.wait_text("sh", "waiting for a partner")
    tmux.keys("sh", "half typed", literal=True)
    tmux.keys("sh", "C-z")
    lines = tmux.wait_text("sh", "Stopped")
    assert not any("you: zed" in line for line in lines)  # the shell has the terminal back
    tmux.keys("sh", "fg", "Enter")
    lines = tmux.wait("sh", lambda lines: lines[-1] == "> half typed" and "you: zed" in lines[-2])
    assert any("waiting for a partner" in line for line in lines)
    tmux.keys("sh", "C-u", "/quit", "Enter")
    tmux.wait_text("sh", "* waiting for a partner")


def test_zwj_emoji_stay_whole_and_conversation_stays_after_exit(server, tmux):
    pair(tmux, server.port)
    family, flag, thumbs = "\U0001F468\u200d\U0001F469\u200d\U0001F467", "\U0001F1FA\U0001F1F8", "\U0001F44D\U0001F3FD"
    tmux.keys("bob", f"fam {family} flag {flag} ok {thumbs} end", literal=True)
    tmux.keys("bob", "Enter")
    # The screen draws a ZWJ cluster as blanks through curses, then the cluster itself
    # straight after the refresh, so wait for the finished line, not its first sight.
    lines = tmux.wait_text("alice", f"bob: fam {family} flag {flag} ok {thumbs} end")
    assert lines[-1].rstrip() == ">" and "you: alice" in lines[-2]  # nothing spilled over the status line
    # In the input line a family is one character: one Backspace removes all of it.
    tmux.keys("alice", f"x{family}", literal=True)
    lines = tmux.wait("alice", lambda lines: lines[-1].rstrip() == f"> x{family}")
    cursor = tmux.run("display", "-p", "-t", "alice", "#{cursor_x}").strip()
    assert cursor == "5"  # "> x" and the family's two cells
    tmux.keys("alice", "BSpace")
    tmux.wait("alice", lambda lines: lines[-1] == "> x")
    tmux.keys("alice", "C-u", "/quit", "Enter")
    lines = tmux.wait_text("alice", "EXIT=0")
    text = "\n".join(lines)
    assert "* paired with bob" in text and f"bob: fam {family}" in text  # still readable after leaving
