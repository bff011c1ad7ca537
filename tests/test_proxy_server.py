"""``chatpair server --proxy-protocol``: behind a real HAProxy, the real client address counts.

A real ``haproxy`` (``send-proxy`` and ``send-proxy-v2``, tests/haproxy.py)
in front of a real ``chatpair server --proxy-protocol``: the log names the
client's address, not the balancer's; ``--deny`` and ``--max-per-ip`` judge
that address. Each client connects from its own loopback address
(127.0.0.x: every address of 127.0.0.0/8 is the local host on Linux), while
haproxy reaches the server from 127.0.0.1. Without the balancer: the header
may arrive in pieces, and the client's first bytes in the same segment stay
for the handshake; a connection without a header is closed (one log line,
no banner), by the handshake deadline if it says nothing.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from haproxy import HAPROXY, HAProxy, needs_haproxy

from chatpair.server.proxyproto import build_v1, build_v2

BANNER = b"CHATPAIR/1 "


def connect_from(source: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from the loopback address ``source``."""
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    """Bytes until ``marker`` has arrived (AssertionError at end of stream or the deadline)."""
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no {marker!r} within {timeout}s: {data!r}") from None
        assert chunk, f"closed before {marker!r}: {data!r}"
        data += chunk
    return data


def closed_silently(sock: socket.socket, timeout: float = 5.0) -> bool:
    """The server closed without sending a byte (end of stream, or a reset)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def balancer():
    """``balancer(server, send)`` -> HAProxy in front of ``server``; stopped at the end."""
    started: list[HAProxy] = []

    def start(server, send: str = "send-proxy-v2") -> HAProxy:
        proxy = HAProxy([server.port], send=send)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@needs_haproxy
@pytest.mark.timeout(30)
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_the_log_names_the_real_client_through_haproxy(start_server, balancer, send):
    server = start_server("--proxy-protocol")
    proxy = balancer(server, send)
    with connect_from("127.0.0.5", proxy.port) as alice, connect_from("127.0.0.6", proxy.port) as bob:
        a_port, b_port = alice.getsockname()[1], bob.getsockname()[1]
        assert read_until(alice, b"\n").startswith(BANNER)
        alice.sendall(b"alice\n")
        read_until(alice, b"waiting")
        assert read_until(bob, b"\n").startswith(BANNER)
        bob.sendall(b"bob\n")
        read_until(bob, b"paired")
        line = server.wait_stderr("paired alice@", 5)  # (names both: neither waited a timer tick alone)
        assert f"alice@127.0.0.5:{a_port}" in line and f"bob@127.0.0.6:{b_port}" in line, line
        bob.sendall(b"hi alice\n")
        assert b"bob: hi alice" in read_until(alice, b"hi alice")
    assert server.stop() == 0
    assert "alice@127.0.0.1:" not in server.stderr_text, "the balancer's address was logged as the client's"


@needs_haproxy
@pytest.mark.timeout(30)
def test_deny_judges_the_real_client_address_not_the_balancer(start_server, balancer):
    # The balancer (127.0.0.1) is not what is denied: 127.0.0.7 is.
    server = start_server("--proxy-protocol", "--deny", "127.0.0.7/32")
    proxy = balancer(server)
    with connect_from("127.0.0.7", proxy.port) as denied:
        port = denied.getsockname()[1]
        assert closed_silently(denied), "a denied client got bytes"
    server.wait_stderr(f"127.0.0.7:{port}: denied (127.0.0.7/32); closed", 5)
    with connect_from("127.0.0.8", proxy.port) as allowed:
        assert read_until(allowed, b"\n").startswith(BANNER)


@needs_haproxy
@pytest.mark.timeout(30)
def test_max_per_ip_counts_the_real_client_address(start_server, balancer):
    server = start_server("--proxy-protocol", "--max-per-ip", "1")
    proxy = balancer(server, "send-proxy")
    with connect_from("127.0.0.9", proxy.port) as first:
        assert read_until(first, b"\n").startswith(BANNER)
        first.sendall(b"first\n")
        read_until(first, b"waiting")
        # Only now the second, so the server cannot see it first (haproxy opens
        # its connections to the server in its own order).
        with connect_from("127.0.0.9", proxy.port) as second, connect_from("127.0.0.10", proxy.port) as other:
            read_until(second, b"\n")
            second.sendall(b"second\n")
            assert b"too many connections from 127.0.0.9" in read_until(second, b"limit is 1")
            # Without the header every client would be 127.0.0.1, and this one refused too.
            read_until(other, b"\n")
            other.sendall(b"other\n")
            assert b"paired" in read_until(other, b"paired")


@pytest.mark.timeout(20)
def test_no_header_is_refused_without_a_banner(start_server):
    server = start_server("--proxy-protocol")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as direct:
        direct.sendall(b"\x00\x00\x00\x2c\x01" + b'{"version": 1, "name": "alice", "room": null}')
        assert closed_silently(direct)
    line = server.wait_stderr("expected a PROXY protocol header", 5)
    assert "Traceback" not in server.stderr()
    assert "closed" in line


@pytest.mark.timeout(20)
def test_a_silent_connection_is_closed_at_the_handshake_deadline(start_server):
    server = start_server("--handshake-timeout", "1", env={"CHATPAIR_PROXY_PROTOCOL": "1"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as direct:
        start = time.monotonic()
        assert closed_silently(direct, timeout=5)
        assert 0.8 <= time.monotonic() - start <= 3.0
    server.wait_stderr("no PROXY protocol header", 5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as partial:
        partial.sendall(b"PROXY TCP4 192.0.2.1")
        assert closed_silently(partial, timeout=5)
    server.wait_stderr("PROXY protocol header not finished", 5)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("split", ["whole", "bytewise"])
@pytest.mark.parametrize("version", [1, 2])
def test_header_and_first_bytes_together_or_in_pieces(start_server, version, split):
    """Only the header is consumed: a HELLO in the same segment still reaches the handshake."""
    server = start_server("--proxy-protocol")
    build = build_v1 if version == 1 else build_v2
    header = build(("198.51.100.4", 4242), ("127.0.0.1", server.port))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if split == "whole":
            sock.sendall(header + b"carol\n")
        else:
            for i in range(len(header)):
                sock.sendall(header[i:i + 1])
            sock.sendall(b"carol\n")
        data = read_until(sock, b"waiting")
        assert data.startswith(BANNER), data
    server.wait_stderr("carol@198.51.100.4:4242: ", 5)  # (joined, or left while waiting)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("header", [build_v2(None, None, local=True), b"PROXY UNKNOWN\r\n"],
                         ids=["v2-local", "v1-unknown"])
def test_local_and_unknown_headers_keep_the_socket_address(start_server, header):
    server = start_server("--proxy-protocol")
    with connect_from("127.0.0.11", server.port) as sock:
        port = sock.getsockname()[1]
        sock.sendall(header + b"dave\n")
        read_until(sock, b"waiting")
    server.wait_stderr(f"dave@127.0.0.11:{port}: ", 5)  # (joined, or left while waiting)


@pytest.mark.timeout(20)
def test_without_the_option_a_header_is_just_a_bad_first_line(start_server):
    """The server never guesses: without --proxy-protocol a header is the client's first line."""
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        assert read_until(sock, b"\n").startswith(BANNER)
        sock.sendall(build_v1(("192.0.2.1", 1), ("192.0.2.2", 2)))
        assert b"* error" in read_until(sock, b"* error")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
@pytest.mark.timeout(30)
@pytest.mark.parametrize("through", ["haproxy", "header-and-client-hello-together"])
def test_tls_after_the_header(start_server, balancer, tmp_path: Path, through):
    """The header is read, then TLS: a ClientHello sent with the header is not lost."""
    if through == "haproxy" and HAPROXY is None:
        pytest.skip("haproxy is not installed (Debian package haproxy)")
    cert, key = tmp_path / "s.pem", tmp_path / "s.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
                    "-subj", "/CN=proxied", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    server = start_server("--proxy-protocol", "--tls-cert", str(cert), "--tls-key", str(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if through == "haproxy":
        raw = connect_from("127.0.0.12", balancer(server).port)
        expected = f"erin@127.0.0.12:{raw.getsockname()[1]}: "  # (joined, or left while waiting)
    else:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        # Header and ClientHello in one segment: a non-blocking TLS object over
        # memory lets the test write both at once.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        raw.sendall(build_v2(("203.0.113.9", 999), ("127.0.0.1", server.port)) + outgoing.read())
        raw.settimeout(5)
        banner = b""
        while b"\n" not in banner:  # pump the TLS object: the server's bytes in, ours out
            try:
                if tls.do_handshake() is None:
                    banner += tls.read(4096)
            except ssl.SSLWantReadError:
                pass
            if outgoing.pending:
                raw.sendall(outgoing.read())
            if b"\n" not in banner:
                chunk = raw.recv(65536)
                assert chunk, f"closed during TLS: {server.stderr()[-500:]}"
                incoming.write(chunk)
        raw.close()
        assert banner.startswith(BANNER), banner
        server.wait_stderr("203.0.113.9:999: closed during the handshake", 5)
        return
    with ctx.wrap_socket(raw) as sock:
        assert read_until(sock, b"\n").startswith(BANNER)
        sock.sendall(b"erin\n")
        read_until(sock, b"waiting")
    server.wait_stderr(expected, 5)
