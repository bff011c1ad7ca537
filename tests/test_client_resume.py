"""The client resumes a dropped conversation (PROTOCOL.md section 6), end to end.

Real processes: ``chatpair server``, ``chatpair client`` in pipe mode (and,
in tmux, the chat screen), and tests/faultproxy.py between one client and
the server to cut its connection: resets, silent drops (the client notices
by its own keepalive), cuts in the middle of a frame. Every wait has a
deadline; nothing sleeps to wait for something (the only sleeps pace a
writer, so that a stream of messages is spread over time).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from faultproxy import C2S, S2C, FaultProxy

ROOT = Path(__file__).resolve().parent.parent
#: The server pings after 1 s of silence, so a client's keepalive notices a
#: silent drop within about 3 s (keepalive_times(1, 30) == (1.0, 3.0)).
FAST_PINGS = ("--ping-interval", "1", "--idle-timeout", "5")


class Pipe:
    """A ``chatpair client`` with pipes; stdout and stderr lines collected by threads."""

    def __init__(self, port: int, name: str, *args: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatpair", "client", "--port", str(port), "--name", name, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "NO_COLOR": ""},
        )
        self.cond = threading.Condition()
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for thread in self.readers:
            thread.start()
        self.writer: threading.Thread | None = None

    def _collect(self, stream, lines: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self.cond:
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait(self, what: str, pred: Callable[[], object], timeout: float = 15.0) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                raise AssertionError(f"{self.name}: no {what} within {timeout}s\nstdout tail: {self.out[-15:]}\n"
                                     f"stderr: {self.err[-15:]}")

    def wait_line(self, text: str, timeout: float = 15.0) -> None:
        self.wait(repr(text), lambda: any(text in line for line in self.out), timeout)

    def from_peer(self, peer: str) -> list[str]:
        with self.cond:
            return [line[len(peer) + 2:] for line in self.out if line.startswith(f"{peer}: ")]

    def json_events(self) -> list[dict]:
        with self.cond:
            return [json.loads(line) for line in self.out if line.startswith("{")]

    def write(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def feed(self, lines: list[str], pace: float) -> None:
        """Write ``lines`` from a thread, one every ``pace`` seconds (a stream, not one burst)."""
        def run() -> None:
            for line in lines:
                try:
                    self.write(line + "\n")
                except (BrokenPipeError, ValueError, OSError):
                    return
                time.sleep(pace)
        self.writer = threading.Thread(target=run, daemon=True)
        self.writer.start()

    def finish(self, timeout: float = 20.0) -> int:
        """Close stdin (end of input: BYE) and wait for the exit code."""
        if self.writer is not None:
            self.writer.join(timeout)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.stdin = None
        code = self.proc.wait(timeout)
        for thread in self.readers:
            thread.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.stdin = None


@pytest.fixture
def pipes():
    made: list[Pipe] = []

    def make(port: int, name: str, *args: str) -> Pipe:
        pipe = Pipe(port, name, *args)
        made.append(pipe)
        return pipe

    yield make
    for pipe in made:
        pipe.kill()


def _server_offers_resume(server) -> bool:
    from conftest import RawClient

    raw = RawClient(server.port)
    try:
        raw.send_frame(0x01, json.dumps({"version": 1, "name": "probe", "room": None, "resume": True}).encode())
        welcome = raw.expect(0x10)
        return isinstance(welcome, dict) and "session" in welcome
    finally:
        raw.close()


@pytest.fixture
def resume_server(start_server):
    """``resume_server(*args)``: a server started with FAST_PINGS that offers sessions."""
    def start(*args: str):
        server = start_server(*FAST_PINGS, *args)
        assert _server_offers_resume(server), "this server does not offer resume (no session in WELCOME)"
        return server
    return start


def _cut(proxy: FaultProxy, kind: str) -> None:
    if kind == "reset":
        assert proxy.cut_reset() == 1
    elif kind == "silent":
        assert proxy.cut_silent() == 1
    else:
        done = proxy.cut_mid_frame(C2S if kind == "mid_c2s" else S2C)
        assert done.wait(15), f"no frame went {kind[4:]} to be cut"


def _stream_through_cuts(resume_server, pipes, *server_args: str, n: int = 1000, cuts: int = 10) -> None:
    """Alice (through the proxy) and bob stream ``n`` numbered messages each while alice is cut ``cuts`` times."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    server = resume_server(*server_args)
    with FaultProxy("127.0.0.1", server.port) as proxy:
        bob = pipes(server.port, "bob", "--room", "stream")
        bob.wait_line("* waiting for a partner in room stream")
        alice = pipes(proxy.port, "alice", "--room", "stream")
        alice.wait_line("* paired with bob")
        bob.wait_line("* paired with alice")
        sent_a = [f"a{i:04d}" for i in range(n)]
        sent_b = [f"b{i:04d}" for i in range(n)]
        alice.feed(sent_a, 0.008)
        bob.feed(sent_b, 0.008)
        kinds = (["reset", "silent", "mid_c2s", "mid_s2c"] * (cuts // 4 + 1))[:cuts]
        rng.shuffle(kinds)
        # Random moments, as seen by the traffic: after so many of alice's messages reached bob.
        moments = sorted(rng.sample(range(n // 20, n - n // 10), cuts))
        for i, (moment, kind) in enumerate(zip(moments, kinds, strict=True)):
            bob.wait(f"alice's message {moment} (cut {i + 1}, seed {seed})",
                     lambda m=moment: len(bob.from_peer("alice")) >= m, timeout=60)
            _cut(proxy, kind)
            # Back in (RESUMED read) before the next cut, which must not fall in a handshake.
            alice.wait(f"'* reconnected' after cut {i + 1} ({kind}, seed {seed})",
                       lambda k=i + 1: alice.out.count("* reconnected") >= k, timeout=30)
            if kind == "silent":
                proxy.release_silent()
        alice.wait("every message of bob", lambda: len(alice.from_peer("bob")) >= n, timeout=90)
        bob.wait("every message of alice", lambda: len(bob.from_peer("alice")) >= n, timeout=90)
        assert (alice.finish(), bob.finish()) == (0, 0), (alice.err, bob.err)
    context = f"seed {seed}, cuts {list(zip(moments, kinds, strict=True))}"
    assert alice.from_peer("bob") == sent_b, context  # every message once, in order
    assert bob.from_peer("alice") == sent_a, context
    for pipe, peer in ((alice, "bob"), (bob, "alice")):  # the same partner throughout
        paired = [line for line in pipe.out if line.startswith("* paired with")]
        assert paired == [f"* paired with {peer}"], (context, pipe.out[-20:])
        left = [line for line in pipe.out if " left (" in line]  # alice finishes first: bob sees her BYE
        assert left == ([] if pipe is alice else ["* alice left (bye); waiting for a partner"]), (context, left)
    lost = [line for line in alice.err if "reconnecting..." in line]
    assert len(lost) == cuts, (context, alice.err)
    assert not any("could not be resumed" in line for line in alice.err + alice.out), context
    assert alice.out.count("* reconnected") == cuts, context


@pytest.mark.timeout(240)
def test_thousand_messages_each_way_through_ten_cuts(resume_server, pipes):
    _stream_through_cuts(resume_server, pipes)


@pytest.mark.timeout(240)
def test_thousand_messages_each_way_through_ten_cuts_with_workers(resume_server, pipes):
    _stream_through_cuts(resume_server, pipes, "--workers", "2")


@pytest.mark.timeout(60)
def test_json_events_and_a_line_typed_while_away(resume_server, pipes):
    """--json: reconnecting / resumed for the one cut, peer_away / peer_back for its partner; a
    message typed while the connection is down is sent once it is back, exactly once."""
    server = resume_server()
    with FaultProxy("127.0.0.1", server.port) as proxy:
        bob = pipes(server.port, "bob", "--json", "--room", "js")
        bob.wait_line('"event": "waiting"')
        alice = pipes(proxy.port, "alice", "--json", "--room", "js")
        bob.wait_line('"event": "paired"')
        alice.wait_line('"event": "paired"')
        alice.write("before\n")
        bob.wait_line('"text": "before"')
        proxy.refuse_new(True)  # alice cannot come back yet
        assert proxy.cut_reset() == 1
        alice.wait_line('"event": "reconnecting"')
        bob.wait_line('"event": "peer_away"')
        alice.write("while away\n")
        bob.write("to the absent\n")
        assert proxy.wait_for(lambda: proxy.refused >= 1, timeout=10)  # alice tried, and was refused
        proxy.refuse_new(False)
        alice.wait_line('"event": "resumed"')
        bob.wait_line('"event": "peer_back"')
        bob.wait_line('"text": "while away"')
        alice.wait_line('"text": "to the absent"')
        assert (alice.finish(), bob.finish()) == (0, 0)
    a_events, b_events = alice.json_events(), bob.json_events()
    assert [e["text"] for e in b_events if e["event"] == "message"] == ["before", "while away"]
    assert [e["text"] for e in a_events if e["event"] == "message"] == ["to the absent"]
    resumed = next(e for e in a_events if e["event"] == "resumed")
    assert resumed["peer"] == "bob" and resumed["room"] == "js"
    away = next(e for e in b_events if e["event"] == "peer_away")
    assert "alice" in away["message"]
    assert [e["event"] for e in a_events].count("welcome") == 1
    assert not any(e["event"] == "resume_failed" for e in a_events + b_events)
    assert not any(e["event"] == "peer_left" for e in a_events)
    left = [e for e in b_events if e["event"] == "peer_left"]  # alice finished first: her BYE, only
    assert left in ([], [{"event": "peer_left", "peer": "alice", "reason": "bye"}]), left
    assert any("reconnecting..." in line for line in alice.err)


@pytest.mark.timeout(60)
def test_expired_session_one_line_and_a_fresh_start(start_server, pipes):
    """The server restarts (sessions gone): RESUME gets session_expired; one line says so, and a
    fresh HELLO with the same name and room follows (--json: resume_failed)."""
    first = start_server(*FAST_PINGS)
    assert _server_offers_resume(first)
    port = first.port
    text = pipes(port, "carol", "--room", "den")
    data = pipes(port, "dave", "--room", "den", "--json")
    text.wait_line("* paired with dave")
    data.wait_line('"event": "paired"')
    first.kill()
    for pipe in (text, data):
        pipe.wait("the reconnecting line", lambda p=pipe: any("reconnecting..." in line for line in p.err))
    start_server(*FAST_PINGS, "--port", str(port))
    text.wait("the failure line", lambda: any("could not be resumed" in line for line in text.err))
    data.wait_line('"event": "resume_failed"')
    text.wait("a second pairing", lambda: text.out.count("* paired with dave") == 2)  # afresh, same room
    assert [line for line in text.out if line.startswith("* paired with")] == ["* paired with dave"] * 2
    failed = [line for line in text.err if "could not be resumed" in line]
    assert len(failed) == 1 and failed[0].startswith("* the conversation could not be resumed: "), text.err
    assert (text.finish(), data.finish()) == (0, 0)


@pytest.mark.timeout(60)
def test_server_without_resume_is_v1(start_server, pipes):
    """--resume-window 0: WELCOME has no session, so a cut ends the client as before (exit 2, one line)."""
    server = start_server("--resume-window", "0")
    assert not _server_offers_resume(server)
    with FaultProxy("127.0.0.1", server.port) as proxy:
        bob = pipes(server.port, "bob")
        alice = pipes(proxy.port, "alice")
        alice.wait_line("* paired with bob")
        proxy.cut_reset()
        bob.wait_line("* alice left (disconnected); waiting for a partner")
        assert alice.proc.wait(15) == 2
        alice.kill()
        assert len(alice.err) == 1 and alice.err[0].startswith("chatpair: "), alice.err
        assert not any("reconnecting" in line for line in alice.out + alice.err)


@pytest.mark.timeout(30)
def test_no_resume_says_plain_hello(resume_server, pipes):
    """--no-resume (or CHATPAIR_CLIENT_NO_RESUME): HELLO without "resume"; a cut ends the client (exit 2)."""
    server = resume_server()
    with FaultProxy("127.0.0.1", server.port) as proxy:
        alice = pipes(proxy.port, "alice", "--no-resume")
        alice.wait_line("* waiting for a partner")
        proxy.cut_reset()
        assert alice.proc.wait(15) == 2
        assert not any("reconnecting" in line for line in alice.out + alice.err)


# ---------------------------------------------------------------------------
# The chat screen, in tmux
# ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.skipif(sys.platform == "win32", reason="curses client is POSIX-only")
def test_tmux_screen_shows_reconnecting_then_nothing_missing_or_doubled(resume_server, tmp_path):
    import shutil

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    from test_tui_tmux import Tmux

    tmux = Tmux(tmp_path)
    server = resume_server()
    try:
        with FaultProxy("127.0.0.1", server.port) as proxy:
            py = shlex.quote(sys.executable)
            tmux.start("bob", f"{py} -m chatpair client --port {server.port} --name bob --room tm")
            tmux.wait_text("bob", "waiting for a partner in room tm")
            tmux.start("alice", f"{py} -m chatpair client --port {proxy.port} --name alice --room tm")
            tmux.wait_text("alice", "* paired with bob")
            tmux.wait_text("bob", "* paired with alice")
            for who, text in (("alice", "one from alice"), ("bob", "one from bob")):
                tmux.keys(who, text, literal=True)
                tmux.keys(who, "Enter")
            tmux.wait_text("alice", "bob: one from bob")
            tmux.wait_text("bob", "alice: one from alice")

            proxy.refuse_new(True)
            assert proxy.cut_silent() == 1  # alice's keepalive has to notice
            tmux.wait("alice", lambda lines: "reconnecting..." in lines[-2], timeout=20)  # the status line
            tmux.keys("alice", "typed while away", literal=True)
            tmux.keys("alice", "Enter")
            tmux.keys("bob", "sent to the absent", literal=True)
            tmux.keys("bob", "Enter")
            assert proxy.wait_for(lambda: proxy.refused >= 1, timeout=10)
            tmux.wait_text("bob", "alice lost the connection", timeout=20)  # the server's idle timeout
            tmux.wait("bob", lambda lines: "partner: alice (away)" in lines[-2])
            proxy.refuse_new(False)
            tmux.wait_text("alice", "* reconnected", timeout=20)
            tmux.wait_text("alice", "bob: sent to the absent")
            tmux.wait_text("bob", "alice: typed while away")
            tmux.wait("alice", lambda lines: "partner: bob" in lines[-2] and "reconnecting" not in lines[-2])
            for who, text in (("alice", "two from alice"), ("bob", "two from bob")):
                tmux.keys(who, text, literal=True)
                tmux.keys(who, "Enter")
            alice = tmux.wait_text("alice", "bob: two from bob")
            bob = tmux.wait_text("bob", "alice: two from alice")
            proxy.release_silent()
    finally:
        tmux.kill()
    for screen, expected in (
        (alice, ["alice: one from alice", "bob: one from bob", "alice: typed while away",
                 "bob: sent to the absent", "alice: two from alice", "bob: two from bob"]),
        (bob, ["alice: one from alice", "bob: one from bob", "bob: sent to the absent",
               "alice: typed while away", "alice: two from alice", "bob: two from bob"]),
    ):
        said = [line.rstrip() for line in screen if line.startswith(("alice: ", "bob: "))]
        assert sorted(said) == sorted(expected), screen  # nothing missing, nothing twice
        assert said.index("alice: two from alice") > said.index("alice: typed while away"), screen
    assert any("alice lost the connection" in line for line in bob), bob
    assert any("alice is back" in line for line in bob), bob
