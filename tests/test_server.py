"""The server as a user runs it: a real ``chatpair server`` subprocess on port 0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

import wire
from conftest import ROOT, RawClient, ServerProcess
from conftest import raw_pair as pair

WAITING, PAIRED, PEER_LEFT, NOTICE, ERROR, WELCOME, MSG = 0x11, 0x12, 0x13, 0x14, 0x1F, 0x10, 0x02


@pytest.mark.timeout(30)
@pytest.mark.parametrize("workers", ["0", "2"])
def test_pair_chat_and_sigterm(start_server, workers: str) -> None:
    server = start_server("--workers", workers)
    alice, bob = pair(server.port)
    waiting = RawClient(server.port)
    waiting.hello("carol")
    waiting.expect(WELCOME)
    waiting.expect(WAITING)
    alice.send_frame(MSG, "hello bob ✓".encode())
    assert bob.expect(MSG) == "hello bob ✓".encode()
    bob.send_frame(MSG, b"hi alice")
    assert alice.expect(MSG) == b"hi alice"
    if workers != "0":
        assert len(server.children()) >= 3  # listener + 2 relay workers
    assert server.stop() == 0
    for client in (alice, bob, waiting):
        err = client.expect(ERROR)
        assert err["code"] == "shutdown"  # and no PEER_LEFT came first
        assert client.at_eof()
    assert "Traceback" not in server.stderr_text


@pytest.mark.timeout(30)
def test_line_and_frame_partners_translate(server: ServerProcess) -> None:
    alice = RawClient(server.port)
    alice.hello("alice")
    alice.expect(WELCOME)
    alice.expect(WAITING)
    nc = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    reader = nc.makefile("rb")
    assert reader.readline().startswith(b"CHATPAIR/1 ")
    nc.sendall(b"bob\r\n")
    assert reader.readline() == b"* waiting for a partner\n"
    assert reader.readline() == b"* paired with alice\n"
    assert alice.expect(PAIRED)["peer"] == "bob"
    alice.send_frame(MSG, b"two\nlines \x1b]0;pwned\x07 \xc2\x9b1m")
    assert reader.readline() == b"alice: two\n"
    assert reader.readline() == b"alice: lines ^[]0;pwned^G \\x9b1m\n"
    nc.sendall(b"hi from nc\n/help\n/nope\n//slash\n\n")
    assert alice.expect(MSG) == b"hi from nc"
    assert reader.readline().startswith(b"* commands:")
    assert reader.readline().startswith(b"* unknown command /nope")
    assert alice.expect(MSG) == b"/slash"
    nc.sendall(b"/next\n")
    assert alice.expect(PEER_LEFT) == {"peer": "bob", "reason": "next"}
    assert alice.expect(WAITING) == {"room": None}
    assert reader.readline() == b"* waiting for a partner\n"
    nc.close()


@pytest.mark.timeout(30)
def test_vanished_partner_and_waiting_messages_are_reported(server: ServerProcess) -> None:
    alice = RawClient(server.port)
    alice.hello("alice")
    alice.expect(WELCOME)
    alice.expect(WAITING)
    alice.send_frame(MSG, b"anyone?")
    notice = alice.expect(NOTICE)
    assert notice["code"] == "undelivered"
    bob = RawClient(server.port)
    bob.hello("bob")
    bob.expect(WELCOME)
    bob.expect(WAITING)
    bob.expect(PAIRED)
    alice.expect(PAIRED)
    bob.sock.close()
    assert alice.expect(PEER_LEFT) == {"peer": "bob", "reason": "disconnected"}
    assert alice.expect(WAITING) == {"room": None}


@pytest.mark.timeout(30)
def test_bad_frame_cuts_off_only_the_offender(server: ServerProcess) -> None:
    alice, bob = pair(server.port)
    bystanders = pair(server.port, "carol", "dave")
    bob.send_frame(0x07)
    assert bob.expect(ERROR)["code"] == "bad_frame"
    assert alice.expect(PEER_LEFT) == {"peer": "bob", "reason": "error"}
    carol, dave = bystanders
    carol.send_frame(MSG, b"still here")
    assert dave.expect(MSG) == b"still here"


@pytest.mark.timeout(30)
def test_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, timeout=20, cwd=ROOT, stdin=subprocess.DEVNULL,
        )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_environment_variables_configure_the_server(start_server) -> None:
    server = start_server(env={"CHATPAIR_MAX_FRAME": "2048", "CHATPAIR_PING_INTERVAL": "7"})
    client = RawClient(server.port)
    client.hello("alice")
    welcome = client.expect(WELCOME)
    assert welcome["max_frame"] == 2048 and welcome["ping_interval"] == 7


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args", [["--help"], ["server", "--help"], ["--version"]])
def test_help_reads_well(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "chatpair", *args], capture_output=True, text=True,
                            timeout=20, cwd=ROOT, env={**os.environ, "COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_throttled_client_keeps_its_messages_across_a_partner_change(start_server) -> None:
    """A client over its rate when its partner leaves is still read (and relayed) after requeue."""
    server = start_server("--rate", "20", "--burst", "5")
    alice, bob = pair(server.port)
    for i in range(30):  # 25 over the burst: about 1.25 s of throttling
        alice.send_frame(MSG, b"m%d " % i + b"x" * 200)
    assert bob.expect(MSG).startswith(b"m0 ")  # the burst gets through at once
    bob.send_frame(0x04)  # BYE while alice is throttled
    assert alice.expect(PEER_LEFT)["reason"] == "bye"
    assert alice.expect(WAITING) == {"room": None}
    carol = RawClient(server.port)
    carol.hello("carol")
    carol.expect(WELCOME)
    carol.expect(WAITING)
    assert carol.expect(PAIRED)["peer"] == "alice"
    got: list[int] = []
    while not got or got[-1] != 29:  # what bob did not get goes to carol, in order, once the pause ends
        ftype, payload = carol.read_frame()
        if ftype == MSG:
            got.append(int(payload.split()[0][1:]))
    assert got == list(range(got[0], 30)) and got[0] > 0


# -- a client that speaks before it has read the banner ---------------------------------------


@pytest.mark.timeout(30)
def test_a_hello_sent_with_the_connect_gets_the_banner_first_then_the_same_frames(server: ServerProcess) -> None:
    """The listener reads such a HELLO at once and writes banner, WELCOME and WAITING in one go: same bytes, same order."""
    alice = wire.Client(server.port, read_banner=False)
    alice.send(wire.frame(wire.HELLO, wire.hello_payload("alice", "r1")))
    assert alice.read_banner().startswith(b"CHATPAIR/1 ")
    alice.expect(WELCOME)
    assert alice.expect(WAITING) == {"room": "r1"}
    bob = wire.Client(server.port, read_banner=False)
    bob.send(wire.frame(wire.HELLO, wire.hello_payload("bob", "r1")) + wire.frame(MSG, b"hi"))
    assert bob.read_banner().startswith(b"CHATPAIR/1 ")
    bob.expect(WELCOME)
    bob.expect(WAITING)
    assert bob.expect(PAIRED)["peer"] == "alice"
    # The MSG that came with bob's HELLO reaches alice, after her PAIRED.
    assert alice.expect(PAIRED)["peer"] == "bob"
    assert alice.expect(MSG) == b"hi"
    # Line mode and a bad HELLO, said at once: the banner still comes first.
    carol = wire.Client(server.port, read_banner=False)
    carol.send(b"carol\n")
    assert carol.read_banner().startswith(b"CHATPAIR/1 ")
    assert carol.read_line() == b"* waiting for a partner"
    dave = wire.Client(server.port, read_banner=False)
    dave.send(wire.frame(wire.HELLO, b'{"version": 1, "name": "bad name!"}'))
    assert dave.read_banner().startswith(b"CHATPAIR/1 ")
    dave.expect_error("bad_hello")
    for client in (alice, bob, carol, dave):
        client.close()
