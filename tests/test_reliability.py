"""Regression tests for traffic no other test produced: split handshakes and
line-mode lines that grow when translated to frames.

The churn test (``test_churn.py``) covers ownership of connections under
connect/leave traffic; these are the single-connection cases.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time

import pytest

from conftest import RawClient, ServerProcess

WAITING, PAIRED, MSG, WELCOME = 0x11, 0x12, 0x02, 0x10

from chatpair.proto import split_utf8  # noqa: E402


# -- split_utf8 (no socket) ------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", [1, 2, 3, 4, 5, 7, 64])
def test_split_utf8_cuts_between_characters_and_always_progresses(max_bytes: int) -> None:
    text = "a\ufffd👍é" * 20 + "z"
    pieces = split_utf8(text, max_bytes)
    assert b"".join(pieces).decode("utf-8") == text
    for piece in pieces:
        piece.decode("utf-8")  # every piece is whole characters
        assert len(piece) <= max(max_bytes, 4)
        if max_bytes >= 4:
            assert len(piece) <= max_bytes


def test_split_utf8_short_and_empty() -> None:
    assert split_utf8("hi", 10) == [b"hi"]
    assert split_utf8("", 10) == []


# -- a handshake that arrives in pieces ------------------------------------------------


def frame_partner(port: int, name: str, expect_peer: str) -> RawClient:
    """A frame-mode client who arrives second and is paired with ``expect_peer``."""
    client = RawClient(port)
    client.hello(name)
    client.expect(WELCOME)
    client.expect(WAITING)
    assert client.expect(PAIRED)["peer"] == expect_peer
    return client


def _line_client(port: int) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"CHATPAIR/1 ")
    return sock, reader


@pytest.mark.timeout(30)
def test_name_line_in_two_segments_joins_as_bob(server: ServerProcess) -> None:
    sock, reader = _line_client(server.port)
    sock.sendall(b"b")
    # The point of the test is two TCP segments: give the server time to
    # read the first byte alone (nothing is waited for; nothing answers it).
    time.sleep(0.3)
    sock.sendall(b"ob\n")
    assert reader.readline() == b"* waiting for a partner\n"
    alice = frame_partner(server.port, "alice", "bob")
    assert reader.readline() == b"* paired with alice\n"
    sock.sendall(b"hi\n")
    assert alice.expect(MSG) == b"hi"
    sock.close()


@pytest.mark.timeout(30)
@pytest.mark.skipif(shutil.which("nc") is None, reason="needs nc (netcat-openbsd)")
def test_nc_with_a_pause_inside_the_name(server: ServerProcess) -> None:
    """The issue's own command: ``(printf b; sleep .3; printf 'ob\\n'; sleep 1) | nc``."""
    alice = RawClient(server.port)
    alice.hello("alice")
    alice.expect(WELCOME)
    alice.expect(WAITING)
    script = f"(printf b; sleep .3; printf 'ob\\n'; sleep 1) | nc 127.0.0.1 {server.port}"
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert alice.expect(PAIRED)["peer"] == "bob"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
def test_hello_split_at_every_byte_boundary(server: ServerProcess) -> None:
    payload = b'{"version": 1, "name": "spl\xc3\xa9t", "room": null}'
    hello = struct.pack(">IB", len(payload) + 1, 0x01) + payload
    for cut in range(1, len(hello)):
        client = RawClient(server.port)
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sock.sendall(hello[:cut])
        time.sleep(0.01)  # two segments, not a wait for an event
        client.sock.sendall(hello[cut:])
        client.expect(WELCOME)
        assert client.expect(WAITING) == {"room": None}, f"cut at {cut}"
        client.close()


@pytest.mark.timeout(30)
def test_character_mode_telnet_bytes_one_at_a_time(server: ServerProcess) -> None:
    """What telnet in character mode sends: option negotiation, then a key per segment."""
    sock, reader = _line_client(server.port)
    iac_will_sga = bytes([0xFF, 0xFB, 0x03])
    iac_do_echo = bytes([0xFF, 0xFD, 0x01])
    for piece in (iac_will_sga, iac_do_echo, b"c", b"a", b"r", b"o", b"l", b"\r\n"):
        sock.sendall(piece)
        time.sleep(0.02)
    assert reader.readline() == b"* waiting for a partner\n"
    dave = frame_partner(server.port, "dave", "carol")
    for key in b"hey\r\n":
        sock.sendall(bytes([key]))
    assert dave.expect(MSG) == b"hey"
    sock.close()


# -- translation never breaks max_frame -----------------------------------------------


@pytest.mark.timeout(30)
def test_long_line_of_invalid_bytes_reaches_frame_partner_within_max_frame(start_server) -> None:
    server = start_server("--max-frame", "32768")
    frame_peer = RawClient(server.port)
    frame_peer.hello("alice")
    welcome = frame_peer.expect(WELCOME)
    max_frame = welcome["max_frame"]  # type: ignore[index]
    frame_peer.expect(WAITING)
    sock, reader = _line_client(server.port)
    sock.sendall(b"bob\n")
    assert frame_peer.expect(PAIRED)["peer"] == "bob"
    line = bytes(range(0x80, 0xFF)) * (30_000 // 127) + b"\x80" * (30_000 % 127)
    assert len(line) == 30_000 and len(line) < max_frame
    sock.sendall(line + b"\n")
    received = ""
    while len(received) < 30_000:
        length, ftype = struct.unpack(">IB", frame_peer.read_exact(5))
        assert ftype == MSG
        assert length <= max_frame
        received += frame_peer.read_exact(length - 1).decode("utf-8")
    assert received == "\ufffd" * 30_000
    sock.sendall(b"after\n")
    assert frame_peer.expect(MSG) == b"after"  # still paired: nobody was cut off
    sock.close()



@pytest.mark.timeout(40)
@pytest.mark.skipif(shutil.which("telnet") is None or shutil.which("tmux") is None,
                    reason="needs telnet and tmux")
def test_real_telnet_in_character_mode_can_chat(server: ServerProcess, tmp_path) -> None:
    """A real telnet in a real terminal, switched to character mode with ^] mode character."""
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]

    def run(*args: str) -> str:
        return subprocess.run([*tmux, *args], capture_output=True, timeout=10, check=True).stdout.decode()

    def wait_screen(text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in (screen := run("capture-pane", "-p", "-t", "t")):
            assert time.monotonic() < deadline, f"{text!r} not on the screen:\n{screen}"
            time.sleep(0.05)

    run("new-session", "-d", "-s", "t", "-x", "80", "-y", "24", f"telnet 127.0.0.1 {server.port}")
    try:
        wait_screen("CHATPAIR/1")
        run("send-keys", "-t", "t", "C-]")
        wait_screen("telnet>")
        run("send-keys", "-t", "t", "mode character", "Enter")
        run("send-keys", "-t", "t", "carol", "Enter")
        wait_screen("* waiting for a partner")
        dave = frame_partner(server.port, "dave", "carol")
        wait_screen("* paired with dave")
        dave.send_frame(MSG, b"hello carol")
        wait_screen("dave: hello carol")
        run("send-keys", "-t", "t", "hi dave", "Enter")
        assert dave.expect(MSG) == b"hi dave"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
