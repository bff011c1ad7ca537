"""The server's side of resume (PROTOCOL.md section 6), spoken frame by frame over real sockets.

Each test drives raw frame-mode connections (tests/wire.py, written from
PROTOCOL.md alone) against a real ``chatpair server`` process; the cuts are
real: a reset (SO_LINGER 0) or a plain close. The chatpair client's own
resume is tested end to end in tests/test_client_resume.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest
import wire
from conftest import wait_for
from wire import (
    ACK,
    BYE,
    ERROR,
    MSG,
    NEXT,
    NOTICE,
    PAIRED,
    PEER_LEFT,
    PING,
    PONG,
    RESUME,
    RESUMED,
    WAITING,
    WELCOME,
)

pytestmark = pytest.mark.timeout(60)

SHAPES = {"threads": (), "workers": ("--workers", "2")}


class Peer(wire.Client):
    """A frame-mode client that keeps its session, counts MSGs, and skips ACK/PING noise."""

    def __init__(self, port: int, timeout: float = 5.0, tls: ssl.SSLContext | None = None) -> None:
        if tls is None:
            super().__init__(port, timeout)
        else:  # wire.Client's fields, on a TLS socket
            self.connected_at = time.monotonic()
            raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            self.sock = tls.wrap_socket(raw, server_hostname="localhost")
            self.timeout, self.buf, self.eof = timeout, b"", False
            self.banner = self.read_banner()
        self.port = port
        self.tls = tls
        self.session: str | None = None
        self.received = 0  # MSG frames received in this session
        self.acks: list[int] = []  # ACK counts the server sent

    def start(self, name: str, room: str | None = None, resume: bool = True) -> dict:
        extra = {"resume": True} if resume else {}
        self.hello(name, room, **extra)
        welcome = self.expect(WELCOME)
        self.session = welcome.get("session")
        self.expect(WAITING)
        return welcome

    def next_frame(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next frame that is not ACK or PING (those are noted or answered)."""
        while True:
            ftype, payload = self.read_frame(timeout)
            if ftype == ACK:
                self.acks.append(json.loads(payload)["received"])
            elif ftype == PING:
                self.send_frame(PONG, payload)
            else:
                if ftype == MSG:
                    self.received += 1
                return ftype, payload

    def want(self, ftype: int, timeout: float | None = None):
        got, payload = self.next_frame(timeout)
        assert got == ftype, f"expected {wire.tname(ftype)}, got {wire.tname(got)} {payload[:200]!r}"
        return json.loads(payload) if ftype in wire.JSON_TYPES else payload

    def msgs(self, n: int, timeout: float | None = None) -> list[str]:
        return [self.want(MSG, timeout).decode() for _ in range(n)]

    def ack(self, count: int | None = None) -> None:
        self.send_frame(ACK, json.dumps({"received": self.received if count is None else count}).encode())

    def cut(self) -> None:
        """Drop the connection with a reset, as a dying network would."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def resume(self, session: str | None = None, received: int | None = None) -> Peer:
        """A new connection that RESUMEs this one's session; returns it (counts carried over)."""
        new = Peer(self.port, self.timeout, self.tls)
        new.session = session or self.session
        new.received = self.received if received is None else received
        new.send_frame(RESUME, json.dumps({"version": 1, "session": new.session,
                                           "received": new.received}).encode())
        return new


def msg(text: str) -> bytes:
    return wire.frame(MSG, text.encode())


@pytest.fixture(params=sorted(SHAPES))
def shaped(request, start_server):
    return start_server(*SHAPES[request.param], "--resume-window", "5")


def pair(port: int, a_resume: bool = True, b_resume: bool = False, room: str | None = None) -> tuple[Peer, Peer]:
    a, b = Peer(port), Peer(port)
    a.start("alice", room, resume=a_resume)
    b.start("bob", room, resume=b_resume)
    assert a.want(PAIRED)["peer"] == "bob"
    assert b.want(PAIRED)["peer"] == "alice"
    return a, b


# -- asking for it --------------------------------------------------------------------------------


def test_welcome_offers_a_session_only_when_asked(server):
    a = Peer(server.port)
    welcome = a.start("alice")
    token = welcome["session"]
    assert isinstance(token, str) and 22 <= len(token) <= 64  # >= 128 random bits
    assert welcome["resume_window"] == 30
    b = Peer(server.port)
    assert "session" not in b.start("bob", resume=False)
    c = Peer(server.port)
    assert c.start("carol")["session"] != token


def test_resume_window_zero_turns_it_off(start_server):
    srv = start_server("--resume-window", "0")
    a = Peer(srv.port)
    assert "session" not in a.start("alice")
    a.send_frame(ACK, b'{"received": 0}')
    a.expect_error("bad_frame")


# -- counting and acknowledging ------------------------------------------------------------------


def test_server_acknowledges_within_a_second_and_every_64(server):
    a, b = pair(server.port)
    a.send(msg("one"))
    assert b.msgs(1) == ["one"]
    started = time.monotonic()
    ftype, payload = a.read_frame(2.0)
    assert ftype == ACK and json.loads(payload) == {"received": 1}
    assert time.monotonic() - started < 1.5
    a.send(b"".join(msg(f"m{i}") for i in range(200)))
    assert b.msgs(200)[-1] == "m199"
    counts = []
    deadline = time.monotonic() + 3
    while not counts or counts[-1] < 201:
        ftype, payload = a.read_frame(max(0.01, deadline - time.monotonic()))
        assert ftype == ACK
        counts.append(json.loads(payload)["received"])
    assert counts == sorted(counts) and counts[-1] == 201


def test_bad_acks_are_bad_frames(server):
    a, b = pair(server.port)
    b.send(msg("hi"))
    a.msgs(1)
    a.ack(2)  # more than was sent
    a.expect_error("bad_frame")
    assert b.want(PEER_LEFT)["reason"] == "error"

    c, _ = pair(server.port, a_resume=False, room="r2")
    c.send_frame(ACK, b'{"received": 0}')  # no session
    c.expect_error("bad_frame")

    e, f = pair(server.port, room="r3")
    f.send(msg("x") + msg("y"))
    e.msgs(2)
    e.ack(2)
    e.ack(1)  # goes back
    e.expect_error("bad_frame")

    g, _ = pair(server.port, room="r4")
    g.send_frame(RESUME, json.dumps({"version": 1, "session": g.session, "received": 0}).encode())
    g.expect_error("bad_frame")  # RESUME anywhere but first


# -- drop and come back ------------------------------------------------------------------------------


def test_drop_and_resume_loses_and_doubles_nothing(shaped):
    a, b = pair(shaped.port)
    for i in range(5):
        b.send(msg(f"b{i}"))
    assert a.msgs(2) == ["b0", "b1"]
    a.ack()
    a.send(msg("a0") + msg("a1"))
    assert b.msgs(2) == ["a0", "a1"]
    a.cut()  # b2..b4 may or may not have reached alice: she has counted 2
    notice = b.want(NOTICE)
    assert notice["code"] == "peer_away" and "alice" in notice["message"]
    b.send(msg("b5") + msg("b6"))  # kept for her
    a2 = a.resume()
    welcome = a2.want(WELCOME)
    assert welcome["session"] == a.session
    resumed = a2.want(RESUMED)
    assert resumed == {"received": 2, "peer": "bob", "room": None}
    assert a2.msgs(5) == ["b2", "b3", "b4", "b5", "b6"]
    assert b.want(NOTICE)["code"] == "peer_back"
    a2.send(msg("a2"))
    assert b.msgs(1) == ["a2"]
    b.send(msg("b7"))
    assert a2.msgs(1) == ["b7"]


def test_client_resends_what_the_server_had_not_received(server):
    a, b = pair(server.port)
    a.send(msg("a0"))
    assert b.msgs(1) == ["a0"]
    a.cut()
    b.want(NOTICE)
    a2 = a.resume()
    a2.want(WELCOME)
    assert a2.want(RESUMED)["received"] == 1  # alice re-sends from her second message on
    assert b.want(NOTICE)["code"] == "peer_back"
    a2.send(msg("a1"))
    assert b.msgs(1) == ["a1"]


def test_partner_leaving_meanwhile_is_heard_in_order(shaped):
    a, b = pair(shaped.port)
    a.cut()
    b.want(NOTICE)
    b.send(msg("last words"))
    b.send_frame(BYE)
    b.expect_closed()
    a2 = a.resume()
    a2.want(WELCOME)
    assert a2.want(RESUMED) == {"received": 0, "peer": "bob", "room": None}
    assert a2.msgs(1) == ["last words"]
    assert a2.want(PEER_LEFT) == {"peer": "bob", "reason": "bye"}
    assert a2.want(WAITING)["room"] is None
    c = Peer(shaped.port)
    c.start("carol")
    assert a2.want(PAIRED)["peer"] == "carol"
    assert c.want(PAIRED)["peer"] == "alice"


def test_partner_next_while_away(server):
    a, b = pair(server.port)
    a.cut()
    b.want(NOTICE)
    b.send_frame(NEXT)
    assert b.want(WAITING)["room"] is None
    a2 = a.resume()
    a2.want(WELCOME)
    a2.want(RESUMED)
    assert a2.want(PEER_LEFT)["reason"] == "next"
    a2.want(WAITING)
    b.expect_silence(0.3)  # never paired again with the one it left


def test_away_while_waiting_keeps_its_place_but_is_not_paired(server):
    a = Peer(server.port)
    a.start("alice")
    a.cut()
    wait_for("alice away", lambda: "alice@" in server.stderr() and "lost the connection" in server.stderr(), 5)
    c = Peer(server.port)
    c.start("carol")
    c.expect_silence(0.3)  # nobody to pair with: alice is away
    a2 = a.resume()
    a2.want(WELCOME)
    assert a2.want(RESUMED) == {"received": 0, "peer": None, "room": None}
    assert a2.want(PAIRED)["peer"] == "carol"
    assert c.want(PAIRED)["peer"] == "alice"


def test_take_over_closes_the_old_connection_without_a_word(shaped):
    a, b = pair(shaped.port)
    b.send(msg("x"))
    a.msgs(1)
    a2 = a.resume()  # the old connection is still open
    a2.want(WELCOME)
    assert a2.want(RESUMED)["peer"] == "bob"
    a.wait_closed(5)  # (it may have had an ACK on its way; then EOF, and no ERROR is owed)
    b.send(msg("y"))
    assert a2.msgs(1) == ["y"]
    b.expect_silence(0.3)  # no peer_away, no peer_back: nothing happened, as far as bob knows


@pytest.mark.parametrize("leaving", [BYE, NEXT], ids=["bye", "next"])
def test_resume_as_the_partner_leaves_and_someone_waits(shaped, leaving: int) -> None:
    """The RESUME may reach the relay after it handed alice back, and the listener may
    have paired her again already (carol waits) - with that relay or another. It
    follows her there: never session_expired for a session that is alive."""
    for round_ in range(25):  # each round is a fresh race; either order must work
        a, b = pair(shaped.port)
        c = Peer(shaped.port)
        c.start("carol")  # waiting: alice is paired with her the moment bob is gone
        a2 = Peer(shaped.port)  # connected before the race, so the RESUME leaves at once
        b.send_frame(leaving)
        a2.send_frame(RESUME, json.dumps({"version": 1, "session": a.session, "received": 0}).encode())
        got, payload = a2.next_frame()
        assert got == WELCOME, f"round {round_}: {wire.tname(got)} {payload[:200]!r}"
        assert a2.want(RESUMED)["received"] == 0
        a.wait_closed(5)  # taken over
        for peer in (a2, b, c):
            if leaving == NEXT or peer is not b:
                peer.send_frame(BYE)
            peer.wait_closed(5)


# -- session_expired -------------------------------------------------------------------------------------


def _expired(peer: Peer) -> str:
    obj = peer.expect(ERROR)
    assert obj["code"] == "session_expired"
    peer.expect_closed()
    return obj["message"]


def test_expired_tokens_are_indistinguishable(start_server):
    srv = start_server("--resume-window", "1")
    messages = set()
    # a made-up token
    x = Peer(srv.port)
    messages.add(_expired(x.resume(session="A" * 32, received=0)))
    # a token after BYE
    a, _b = pair(srv.port)
    a.send_frame(BYE)
    a.expect_closed()
    messages.add(_expired(a.resume()))
    # a token past its window
    c = Peer(srv.port)
    c.start("carol")
    c.cut()
    wait_for("carol's window to pass", lambda: "carol" in srv.stderr() and "did not come back" in srv.stderr(), 10)
    messages.add(_expired(c.resume()))
    assert len(messages) == 1


def test_window_passing_ends_it_as_a_disconnect(start_server):
    srv = start_server("--resume-window", "1")
    a, b = pair(srv.port)
    b.send(msg("seen") + msg("unseen1"))
    assert a.msgs(1) == ["seen"]
    a.ack(1)
    a.cut()
    b.want(NOTICE)  # peer_away
    b.send(msg("unseen2"))
    undelivered = [b.want(NOTICE, 10) for _ in range(2)]
    assert all(n["code"] == "undelivered" for n in undelivered)
    assert b.want(PEER_LEFT) == {"peer": "alice", "reason": "disconnected"}
    assert b.want(WAITING)["room"] is None
    _expired(a.resume())


def test_resume_count_beyond_what_was_sent_is_bad_hello_and_leaves_the_session(server):
    a, b = pair(server.port)
    b.send(msg("one"))
    a.msgs(1)
    a.cut()
    b.want(NOTICE)
    bad = a.resume(received=7)
    bad.expect_error("bad_hello")
    good = a.resume()
    good.want(WELCOME)
    assert good.want(RESUMED)["peer"] == "bob"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_resume_over_tls(start_server, tmp_path):
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True, timeout=30)
    srv = start_server("--tls-cert", str(crt), "--tls-key", str(key))
    ctx = ssl.create_default_context(cafile=str(crt))
    a, b = Peer(srv.port, tls=ctx), Peer(srv.port, tls=ctx)
    a.start("alice")
    b.start("bob")
    a.want(PAIRED)
    b.want(PAIRED)
    b.send(msg("before"))
    assert a.msgs(1) == ["before"]
    a.cut()
    assert b.want(NOTICE)["code"] == "peer_away"
    b.send(msg("while away"))
    a2 = a.resume()
    a2.want(WELCOME)
    assert a2.want(RESUMED) == {"received": 0, "peer": "bob", "room": None}  # alice sent nothing
    assert a2.msgs(1) == ["while away"]
    assert b.want(NOTICE)["code"] == "peer_back"
    wait_for("the resume in the log", lambda: "alice@" in srv.stderr() and ": resumed" in srv.stderr(), 5)
    assert a.session not in srv.stderr()  # the token is never logged


# -- v1 stays v1 --------------------------------------------------------------------------------


def test_a_v1_client_drop_is_a_plain_disconnect(server):
    a, b = pair(server.port, a_resume=False, b_resume=False)
    a.cut()
    assert b.want(PEER_LEFT) == {"peer": "alice", "reason": "disconnected"}
    b.want(WAITING)


def test_line_mode_partner_hears_away_and_back(server):
    a = Peer(server.port)
    a.start("alice")
    nc = wire.Netcat(server.port)
    nc.write(b"bob\n")
    nc.expect_line(lambda l: l.startswith("CHATPAIR/1 "), "banner")
    nc.expect_line(lambda l: l == "* paired with alice", "paired", skip_notices=True)
    a.want(PAIRED)
    a.cut()
    line = nc.expect_line(lambda l: l.startswith("* "), "away line")
    assert line == "* alice lost the connection; waiting up to 30 s for them to return"
    nc.write(b"are you there?\n")
    a2 = a.resume()
    a2.want(WELCOME)
    a2.want(RESUMED)
    assert a2.msgs(1) == ["are you there?"]
    assert nc.expect_line(lambda l: l.startswith("* "), "back line") == "* alice is back"


# -- flow control: an absent partner slows the sender down ----------------------------------------------


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(120)
def test_absent_partner_slows_the_sender_and_memory_stays_bounded(server):
    a, b = pair(server.port)
    listener = server.listener()
    a.cut()
    b.want(NOTICE)
    before = _rss_kib(listener)
    chunk = msg("x" * 60_000)  # 200 MB in 60 kB messages
    total = 200 * 1024 * 1024 // len(chunk) + 1
    sent = [0]
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            for _ in range(total):
                b.sock.sendall(chunk)
                sent[0] += 1
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    b.sock.settimeout(None)
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    # The sender is slowed: its sends stop making progress while alice is away.
    progress = []
    wait_for("the sender to be held back", lambda: progress.append(sent[0]) or
             (len(progress) > 25 and progress[-1] == progress[-25]), 30)
    assert sent[0] < total
    grown = (_rss_kib(listener) - before) / 1024
    assert grown < 64, f"server RSS grew by {grown:.0f} MB"
    # She comes back and reads it all; the sender goes on; nothing is lost.
    a2 = a.resume()
    a2.want(WELCOME)
    a2.want(RESUMED)
    got = 0
    while got < total:
        ftype, payload = a2.read_frame(30)
        if ftype == MSG:
            assert len(payload) == 60_000
            got += 1
            if got % 64 == 0:
                a2.ack(got)
    thread.join(30)
    assert not errors and sent[0] == total
    assert _rss_kib(listener) - before < 64 * 1024
