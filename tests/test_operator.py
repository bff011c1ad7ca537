"""What an operator runs into: IPv4 and IPv6 together, the log's format, banning, TLS told at once.

Real ``chatpair server`` processes on port 0, real ``nc -4`` / ``nc -6``
(netcat-openbsd) in line mode, real signals. Every wait is for an event (a
line, a log line, end of stream) with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, RawClient, ServerProcess

WELCOME, WAITING, PAIRED, MSG, ERROR = 0x10, 0x11, 0x12, 0x02, 0x1F

needs_nc = pytest.mark.skipif(shutil.which("nc") is None, reason="needs netcat (nc)")


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not socket.has_dualstack_ipv6() or not has_ipv6_loopback(),
                                reason="needs IPv6 on loopback and dual-stack sockets")


class Netcat:
    """``nc -4`` or ``nc -6`` as a person would run it: lines in, lines out, each read with a deadline."""

    def __init__(self, family: str, host: str, port: int) -> None:
        self.proc = subprocess.Popen(["nc", family, host, str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._sel.register(self.proc.stdout.fileno(), selectors.EVENT_READ)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def readline(self, timeout: float = 5.0) -> str:
        """The next line ('' at end of stream); AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise AssertionError(f"no line from nc within {timeout}s (so far {self._buf!r})")
            chunk = os.read(self.proc.stdout.fileno(), 4096)  # type: ignore[union-attr]
            if not chunk:
                line, self._buf = self._buf, b""
                return line.decode()
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode() + "\n"

    def close(self) -> None:
        self._sel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def netcat():
    made: list[Netcat] = []

    def make(family: str, host: str, port: int) -> Netcat:
        nc = Netcat(family, host, port)
        made.append(nc)
        return nc

    yield make
    for nc in made:
        nc.close()


def run_cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatpair", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def closed_without_a_word(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> bool:
    """Connect; True if the server closes at once without sending anything (a denied address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        try:
            return sock.recv(100) == b""
        except ConnectionResetError:
            return True


# -- 1. IPv4 and IPv6 together ------------------------------------------------------------------


def test_the_default_host_is_every_interface_on_both_families() -> None:
    from chatpair.cli import server
    from chatpair.server.config import DEFAULT_HOST, ServerConfig

    assert DEFAULT_HOST == "::" and ServerConfig().host == "::"
    host = next(p for p in server.params if p.name == "host")
    assert host.default == "::"


@needs_nc
@needs_ipv6
@pytest.mark.timeout(30)
def test_dual_stack_serves_nc_4_and_nc_6_together(start_server, netcat) -> None:
    """``--host ::`` (the default) takes IPv4 and IPv6 clients on one socket; logs show plain IPv4."""
    srv = start_server("--host", "::")
    alice = netcat("-4", "127.0.0.1", srv.port)
    bob = netcat("-6", "::1", srv.port)
    for nc, name in ((alice, "alice"), (bob, "bob")):
        assert nc.readline().startswith("CHATPAIR/1 ")
        nc.send(name)
        assert nc.readline() == "* waiting for a partner\n"
    assert alice.readline() == "* paired with bob\n"
    assert bob.readline() == "* paired with alice\n"
    alice.send("hello over IPv4")
    assert bob.readline() == "alice: hello over IPv4\n"
    bob.send("hello over IPv6")
    assert alice.readline() == "bob: hello over IPv6\n"
    line = srv.wait_stderr("paired ", 5)
    assert re.search(r"alice@127\.0\.0\.1:\d+", line) and re.search(r"bob@\[::1\]:\d+", line), line
    assert "::ffff:" not in srv.stderr()


@needs_ipv6
@pytest.mark.timeout(30)
def test_listening_line_says_dual_stack() -> None:
    """What ``listening on`` prints for the default host (a real run, with stdin closed)."""
    proc = subprocess.Popen([sys.executable, "-m", "chatpair", "server", "--port", "0", "-q"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert re.fullmatch(r"listening on \[::\]:\d+ \(IPv6 and IPv4\)\n", line), line
        port = int(line.split()[2].rsplit(":", 1)[1])
        for host in ("127.0.0.1", "::1"):
            with socket.create_connection((host, port), timeout=5) as sock:
                assert sock.recv(200).startswith(b"CHATPAIR/1 "), host
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


@needs_nc
@pytest.mark.timeout(30)
def test_an_ipv4_host_still_means_ipv4_only(start_server, netcat) -> None:
    srv = start_server()  # --host 127.0.0.1
    nc = netcat("-4", "127.0.0.1", srv.port)
    assert nc.readline().startswith("CHATPAIR/1 ")
    if has_ipv6_loopback():
        with pytest.raises(OSError):
            socket.create_connection(("::1", srv.port), timeout=5).close()


# -- 2. Logs ----------------------------------------------------------------------------------

ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) \S")


@pytest.mark.timeout(30)
def test_text_log_lines_carry_the_date_in_iso_8601(start_server, raw_client) -> None:
    srv = start_server()
    client = raw_client(srv.port)
    client.hello("alice")
    client.expect(WELCOME)
    srv.wait_stderr("alice@", 5)
    assert srv.stop() == 0
    lines = srv.stderr_text.splitlines()
    assert lines and all(ISO_LINE.match(line) for line in lines), lines


@pytest.mark.timeout(30)
def test_json_log_is_one_object_per_line_with_fields(start_server, raw_client) -> None:
    srv = start_server("--log-format", "json", "--workers", "1")
    a, b = raw_client(srv.port), raw_client(srv.port)
    for client, name in ((a, "alice"), (b, "bob\nwith a newline")):
        client.hello(name)
    a.expect(WELCOME)
    assert b.expect(ERROR)["code"] == "bad_hello"
    srv.proc.send_signal(signal.SIGUSR1)
    srv.wait_stderr('"event": "status"', 5)
    assert srv.stop() == 0
    records = [json.loads(line) for line in srv.stderr_text.splitlines()]  # every line is one object
    for rec in records:
        assert {"time", "level", "message", "process"} <= rec.keys(), rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", rec["time"]), rec
    assert {rec["process"] for rec in records} >= {"main", "listener"}
    joined = next(rec for rec in records if "joined" in rec["message"])
    assert joined["level"] == "info" and joined["process"] == "listener"
    status = next(rec for rec in records if rec.get("event") == "status")
    # (bob may still be closing: his connection counts until the polite close is over)
    assert status["connections"] >= 1 and status["waiting"] == 1 and status["pairs"] == 0
    assert isinstance(status["messages_per_second"], (int, float))
    assert records[-1]["message"] == "stopped" and records[-1]["process"] == "main"


@pytest.mark.timeout(30)
def test_connected_is_logged_before_refused(start_server, raw_client) -> None:
    """-v: a refused connection's lines come in the order things happened; INFO has one line for it."""
    srv = start_server("--max-clients", "1", "-v")
    first = raw_client(srv.port)
    first.hello("alice")
    first.expect(WELCOME)
    second = raw_client(srv.port)
    second.hello("bob")
    assert second.expect(ERROR)["code"] == "server_full"
    srv.wait_stderr("error server_full", 5)
    lines = [line for line in srv.stderr().splitlines() if "alice" not in line]
    connected = [i for i, line in enumerate(lines) if line.endswith(": connected")]
    refused = [i for i, line in enumerate(lines) if ": refused: " in line]
    assert len(refused) == 1 and connected and connected[-1] < refused[0], lines
    info = [line for line in lines if " INFO " in line and "127.0.0.1" in line]
    assert len(info) == 1 and "error server_full" in info[0], info


# -- 3. Banning -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_deny_closes_at_accept_with_one_log_line(start_server, raw_client) -> None:
    srv = start_server("--deny", "10.0.0.0/8", "--deny", "127.0.0.1")
    assert closed_without_a_word(srv.port)
    line = srv.wait_stderr("denied", 5)
    assert re.search(r"127\.0\.0\.1:\d+: denied \(127\.0\.0\.1/32\); closed$", line.strip()), line
    assert srv.stop() == 0
    assert srv.stderr_text.count("127.0.0.1:") == 1  # one line, nothing else about it


@needs_ipv6
@pytest.mark.timeout(30)
def test_deny_matches_ipv4_clients_of_a_dual_stack_socket(start_server) -> None:
    srv = start_server("--host", "::", "--deny", "127.0.0.0/8")
    assert closed_without_a_word(srv.port, "127.0.0.1")
    with socket.create_connection(("::1", srv.port), timeout=5) as sock:
        assert sock.recv(200).startswith(b"CHATPAIR/1 ")


@pytest.mark.parametrize(("args", "expected"), [
    (("--deny", "10.0.0.0/33"), "'10.0.0.0/33' is not an IP network"),
    (("--deny", "example.com"), "'example.com' is not an IP network"),
    (("--metrics", "localhost"), "is not HOST:PORT"),
])
def test_a_bad_option_is_one_clear_click_error(args: tuple[str, ...], expected: str) -> None:
    result = run_cli("server", "--port", "0", *args)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_bad_deny_file_is_one_line_at_start(tmp_path: Path) -> None:
    deny = tmp_path / "deny"
    deny.write_text("# banned\n10.0.0.0/8\nnot-a-network\n")
    result = run_cli("server", "--host", "127.0.0.1", "--port", "0", "--deny-file", str(deny))
    assert result.returncode == 2, result
    expected = (f"chatpair: {deny}:3: 'not-a-network' is not an IP network (a CIDR such as 10.0.0.0/8 or "
                "2001:db8::/32, or one address)")
    assert result.stderr.splitlines() == [expected], result.stderr
    assert result.stdout == ""


@pytest.mark.timeout(40)
def test_deny_file_is_read_again_on_sighup(start_server, raw_client, tmp_path: Path) -> None:
    """SIGHUP with --deny-file: reload, not stop. A bad file keeps the previous list."""
    deny = tmp_path / "deny"
    deny.write_text("# nobody yet\n10.0.0.0/8  # a comment after a network\n")
    srv = start_server("--deny-file", str(deny))
    alice = raw_client(srv.port)  # allowed: chats on through every reload
    alice.hello("alice")
    alice.expect(WELCOME)
    alice.expect(WAITING)

    deny.write_text("10.0.0.0/8\n127.0.0.0/8\n")
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_stderr("deny list reloaded", 5)
    assert closed_without_a_word(srv.port)
    srv.wait_stderr("denied (127.0.0.0/8)", 5)

    deny.write_text("127.0.0.0/8\nbogus\n")  # a mistake: the previous list stays
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_stderr("deny list not reloaded", 5)
    assert "keeping the previous 2 networks" in srv.stderr()
    assert closed_without_a_word(srv.port)

    deny.write_text("# let everyone in again\n")
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_stderr("0 networks denied", 5)
    bob = raw_client(srv.port)
    bob.hello("bob")
    bob.expect(WELCOME)
    bob.expect(WAITING)
    assert bob.expect(PAIRED)["peer"] == "alice" and alice.expect(PAIRED)["peer"] == "bob"
    alice.send_frame(MSG, b"still here")
    assert bob.expect(MSG) == b"still here"
    assert srv.proc.poll() is None
    assert srv.stop() == 0
    assert srv.stderr_text.count("denied (") == 2
    assert srv.stderr_text.count("deny list reloaded from") == 2
    assert srv.stderr_text.count("deny list not reloaded") == 1
    assert "SIGHUP ignored" not in srv.stderr_text and "hung up" not in srv.stderr_text


# -- 4. Plaintext on the TLS port -----------------------------------------------------------------


@pytest.fixture
def tls_server(start_server, tmp_path: Path):
    """``tls_server(*args)``: a server speaking TLS only, with a fresh self-signed certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True, timeout=30)

    def start(*args: str) -> ServerProcess:
        srv = start_server("--tls-cert", str(crt), "--tls-key", str(key), *args)
        assert srv.stdout_line(5).startswith("certificate fingerprint ")
        return srv

    start.cafile = str(crt)  # type: ignore[attr-defined]
    return start


def read_to_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


@pytest.mark.timeout(30)
def test_nc_on_the_tls_port_is_told_at_once(tls_server, netcat) -> None:
    srv = tls_server("--handshake-timeout", "10")
    start = time.monotonic()
    if shutil.which("nc"):
        nc = netcat("-4", "127.0.0.1", srv.port)
        nc.send("alice")
        assert nc.readline() == "* error: this server speaks TLS: use --tls\n"
        nc.proc.stdin.close()  # type: ignore[union-attr]  # nc exits once both directions are done
        assert nc.readline() == ""
    else:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"alice\n")
            assert read_to_eof(sock) == b"* error: this server speaks TLS: use --tls\n"
    assert time.monotonic() - start < 3, "told only at the handshake deadline"
    line = srv.wait_stderr("speaks TLS", 5)
    assert "127.0.0.1:" in line and "error bad_hello: this server speaks TLS: use --tls" in line
    assert srv.stop() == 0
    assert "sent nothing" not in srv.stderr_text and "Traceback" not in srv.stderr_text


@pytest.mark.timeout(30)
def test_a_frame_mode_client_on_the_tls_port_gets_an_error_frame(tls_server) -> None:
    srv = tls_server("--handshake-timeout", "10")
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        hello = json.dumps({"version": 1, "name": "alice", "room": None}).encode()
        sock.sendall(struct.pack(">IB", len(hello) + 1, 0x01) + hello)
        data = read_to_eof(sock)
    assert time.monotonic() - start < 3
    length, ftype = struct.unpack(">IB", data[:5])
    assert ftype == ERROR and len(data) == 4 + length
    assert json.loads(data[5:]) == {"code": "bad_hello", "message": "this server speaks TLS: use --tls"}


@pytest.mark.timeout(30)
def test_tls_clients_still_work_and_a_silent_one_is_logged_as_such(tls_server) -> None:
    """A ClientHello in pieces is still TLS; a client that sends nothing is not "told" anything."""
    srv = tls_server("--handshake-timeout", "1")
    ctx = ssl.create_default_context(cafile=tls_server.cafile)  # type: ignore[attr-defined]
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"carol\n")  # line mode over TLS
        reader = tls.makefile("rb")
        assert reader.readline().startswith(b"CHATPAIR/1 ")
        assert reader.readline() == b"* waiting for a partner\n"
        reader.close()
    # A TLS record trickling in byte by byte is not mistaken for plaintext.
    bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(bio_in, bio_out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = bio_out.read()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        for i in range(len(hello)):
            sock.sendall(hello[i:i + 1])
        reply = sock.recv(5)
    assert reply[:1] == b"\x16", reply  # a ServerHello, not a plaintext error
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as silent:
        assert read_to_eof(silent) == b""  # nothing said to a client whose language is unknown
    line = srv.wait_stderr("no TLS hello", 5)
    assert "a client without --tls waits for a banner" in line and "sent nothing" not in line


# -- 5. Signals the children ignore ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_sigusr1_to_the_process_group_only_logs_a_status_line() -> None:
    srv = ServerProcess("--workers", "1", preexec_fn=os.setsid)
    try:
        pair = [RawClient(srv.port), RawClient(srv.port)]
        for client, name in zip(pair, ("alice", "bob")):
            client.hello(name)
            client.expect(WELCOME)
            client.expect(WAITING)
        pair[1].expect(PAIRED)
        pair[0].expect(PAIRED)
        os.killpg(srv.proc.pid, signal.SIGUSR1)
        line = srv.wait_stderr("status:", 5)
        assert "2 connections" in line and "1 pair" in line and "0 waiting" in line, line
        pair[0].send_frame(MSG, b"after SIGUSR1")  # the listener and the worker are alive
        assert pair[1].expect(MSG) == b"after SIGUSR1"
        for client in pair:
            client.close()
        assert srv.stop() == 0
    finally:
        srv.kill()
