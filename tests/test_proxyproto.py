"""The PROXY protocol parser (chatpair/server/proxyproto.py): exact bytes, limits, a real HAProxy.

Three layers: hand-written headers (valid and malformed, each fed whole, in
every split, and with trailing bytes), hypothesis (headers we build parse
back to what we built; random bytes never raise anything but
ProxyHeaderError), and headers written by a real ``haproxy`` (``send-proxy``,
``send-proxy-v2`` and its LOCAL health check) to a plain socket server here,
whose source address must be the test client's own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatpair.proto import NEED_DATA
from chatpair.server.accept import real_address
from chatpair.server.proxyproto import (
    MAX_V1_LENGTH,
    MAX_V2_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    build_v1,
    build_v2,
    parse_proxy_header,
)

_SCALE = max(1, int(os.environ.get("CHATPAIR_HYPOTHESIS_SCALE", "1")))


def cfg(max_examples: int) -> settings:
    return settings(max_examples=max_examples * _SCALE, deadline=None, derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow])


def parse_in_every_split(data: bytes) -> ProxyHeader:
    """Feed every prefix: NEED_DATA until the header is whole, then the same result each time."""
    full = parse_proxy_header(data)
    assert isinstance(full, ProxyHeader)
    for cut in range(full.length):
        assert parse_proxy_header(data[:cut]) is NEED_DATA, f"prefix of {cut} bytes"
    for cut in range(full.length, len(data) + 1):
        part = parse_proxy_header(data[:cut])
        assert isinstance(part, ProxyHeader) and part.rest == data[full.length:cut]
    return full


# -- version 1: exact bytes -----------------------------------------------------------------


def test_v1_tcp4():
    h = parse_in_every_split(b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 7878\r\n\x00\x00hello")
    assert (h.version, h.local, h.source, h.dest) == (1, False, ("192.0.2.1", 56324), ("198.51.100.7", 7878))
    assert h.rest == b"\x00\x00hello" and h.length == 46


def test_v1_tcp6_is_normalized():
    h = parse_in_every_split(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 0 65535\r\nalice\n")
    assert h.source == ("2001:db8::1", 0) and h.dest == ("::1", 65535) and h.rest == b"alice\n"


def test_an_ipv4_mapped_source_is_the_ipv4_address_the_acceptor_would_have_seen():
    for header in (b"PROXY TCP6 ::ffff:10.0.0.5 ::1 1234 7878\r\n",
                   build_v2(("::ffff:10.0.0.5", 1234), ("::1", 7878))):
        source = parse_proxy_header(header).source
        assert real_address(source) == ("10.0.0.5", 1234), source
    assert real_address(("2001:db8::1", 9)) == ("2001:db8::1", 9)
    assert real_address(("192.0.2.1", 9)) == ("192.0.2.1", 9)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff:f::f ffff:f::f 65535 65535\r\n",
                                  b"PROXY UNKNOWN \xff anything at all\r\n"])
def test_v1_unknown_means_use_the_real_peer(line):
    h = parse_in_every_split(line + b"rest")
    assert h.source is None and h.dest is None and h.rest == b"rest" and not h.local


def test_v1_longest_line_is_accepted():
    line = b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(line) == 104
    assert parse_proxy_header(line).source[1] == 65535  # type: ignore[union-attr]
    worst = b"PROXY UNKNOWN " + b"f" * (MAX_V1_LENGTH - 16) + b"\r\n"
    assert len(worst) == MAX_V1_LENGTH
    assert isinstance(parse_proxy_header(worst), ProxyHeader)


def test_v1_without_crlf_in_107_bytes_is_refused():
    almost = b"PROXY UNKNOWN " + b"f" * (MAX_V1_LENGTH - 15)
    assert len(almost) == MAX_V1_LENGTH - 1 and parse_proxy_header(almost) is NEED_DATA
    with pytest.raises(ProxyHeaderError, match="no CRLF in its first 107 bytes"):
        parse_proxy_header(almost + b"f")


@pytest.mark.parametrize("data, message", [
    (b"GET / HTTP/1.1\r\n", "expected a PROXY protocol header"),
    (b"PROXX", "expected a PROXY protocol header"),
    (b"\x00\x00\x00\x10\x01", "expected a PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CR that is not followed by LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "must be 'PROXY TCP4|TCP6"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "must be 'PROXY TCP4|TCP6"),
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "must be 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "must be 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "bad TCP4 address"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "bad TCP4 address"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad TCP4 address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad TCP6 address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad TCP6 address"),
    (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad TCP6 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "bad port"),
])
def test_v1_malformed(data, message):
    with pytest.raises(ProxyHeaderError, match=message) as info:
        parse_proxy_header(data)
    assert "\n" not in str(info.value)


def test_wrong_start_is_refused_at_the_first_wrong_byte():
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(b"X")
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(b"\r\n\r\n\x00\r\nQX")
    assert parse_proxy_header(b"PRO") is NEED_DATA
    assert parse_proxy_header(V2_SIGNATURE[:7]) is NEED_DATA
    assert parse_proxy_header(b"") is NEED_DATA


# -- version 2: exact bytes -----------------------------------------------------------------


def test_v2_tcp4_exact_bytes():
    data = bytes.fromhex("0d0a0d0a000d0a515549540a 21 11 000c c0000201 c6336407 dc04 1ebe") + b"hi"
    h = parse_in_every_split(data)
    assert (h.version, h.local, h.source, h.dest) == (2, False, ("192.0.2.1", 56324), ("198.51.100.7", 7870))
    assert h.rest == b"hi" and h.length == 28 and h.tlvs == ()
    assert build_v2(("192.0.2.1", 56324), ("198.51.100.7", 7870)) == data[:28]


def test_v2_tcp6_with_tlvs():
    data = build_v2(("2001:db8::1", 1), ("::1", 2), tlvs=((0x05, b"uid-1"), (0x04, b""))) + b"x"
    h = parse_in_every_split(data)
    assert h.source == ("2001:db8::1", 1) and h.dest == ("::1", 2)
    assert h.tlvs == ((0x05, b"uid-1"), (0x04, b"")) and h.rest == b"x"


def test_v2_local_ignores_any_address_block():
    assert parse_proxy_header(build_v2(None, None, local=True) + b"z") == ProxyHeader(2, True, None, None, b"z", (), 16)
    # A LOCAL header may still carry addresses: the length is honoured, the addresses ignored.
    with_addr = bytearray(build_v2(("1.2.3.4", 5), ("6.7.8.9", 10)))
    with_addr[12] = 0x20
    h = parse_in_every_split(bytes(with_addr) + b"z")
    assert h.local and h.source is None and h.rest == b"z" and h.length == 28


@pytest.mark.parametrize("fam, addr_len", [(0x00, 0), (0x12, 12), (0x22, 36), (0x31, 216), (0x32, 216)])
def test_v2_unspec_udp_and_unix_fall_back_to_the_real_peer(fam, addr_len):
    data = V2_SIGNATURE + bytes([0x21, fam]) + addr_len.to_bytes(2, "big") + b"\x07" * addr_len + b"after"
    h = parse_in_every_split(data)
    if fam in (0x12, 0x22):  # UDP still names addresses; we report them, the caller may ignore them
        assert h.source is not None
    else:
        assert h.source is None
    assert h.rest == b"after" and not h.local


@pytest.mark.parametrize("data, message", [
    (V2_SIGNATURE + b"\x11", "version 1"),
    (V2_SIGNATURE + b"\x22", "unknown command 2"),
    (V2_SIGNATURE + b"\x21\x41", "unknown family/transport byte 0x41"),
    (V2_SIGNATURE + b"\x21\x13", "unknown family/transport byte 0x13"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0b" + b"\x00" * 11, "too short for its 12-byte addresses"),
    (V2_SIGNATURE + b"\x21\x21\x00\x0c" + b"\x00" * 12, "too short for its 36-byte addresses"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0e" + b"\x00" * 14, "ends inside a TLV"),
    (V2_SIGNATURE + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x05\x00\x02\x00", "runs past the end"),
    (V2_SIGNATURE + b"\x21\x11" + (MAX_V2_PAYLOAD + 1).to_bytes(2, "big"), "more than the limit of 2048"),
])
def test_v2_malformed(data, message):
    with pytest.raises(ProxyHeaderError, match=message):
        parse_proxy_header(data)


def test_v2_length_limit_is_checked_before_waiting_for_the_bytes():
    head = V2_SIGNATURE + b"\x21\x11\xff\xff"
    with pytest.raises(ProxyHeaderError, match="65535 bytes"):
        parse_proxy_header(head)
    assert parse_proxy_header(head, max_v2_payload=65535) is NEED_DATA


# -- hypothesis -----------------------------------------------------------------------------

addresses4 = st.ip_addresses(v=4).map(str)
addresses6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@cfg(300)
@given(v6=st.booleans(), a4=addresses4, b4=addresses4, a6=addresses6, b6=addresses6,
       sport=ports, dport=ports, rest=st.binary(max_size=40))
def test_v1_round_trip(v6, a4, b4, a6, b6, sport, dport, rest):
    src, dst = (a6, b6) if v6 else (a4, b4)
    h = parse_proxy_header(build_v1((src, sport), (dst, dport)) + rest)
    assert isinstance(h, ProxyHeader)
    assert (h.source, h.dest, h.rest, h.version) == ((src, sport), (dst, dport), rest, 1)


@cfg(300)
@given(v6=st.booleans(), a4=addresses4, b4=addresses4, a6=addresses6, b6=addresses6, sport=ports,
       dport=ports, rest=st.binary(max_size=40),
       tlvs=st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=30)), max_size=4).map(tuple))
def test_v2_round_trip(v6, a4, b4, a6, b6, sport, dport, rest, tlvs):
    src, dst = (a6, b6) if v6 else (a4, b4)
    h = parse_proxy_header(build_v2((src, sport), (dst, dport), tlvs=tlvs) + rest)
    assert isinstance(h, ProxyHeader)
    assert (h.source, h.dest, h.rest, h.tlvs, h.version) == ((src, sport), (dst, dport), rest, tlvs, 2)


def _only_clear_errors(data: bytes) -> None:
    try:
        result = parse_proxy_header(data)
    except ProxyHeaderError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert result is NEED_DATA or isinstance(result, ProxyHeader)


@cfg(1000)
@given(st.binary(max_size=200))
@example(b"PROXY TCP6 ::1 ::1 1 1\r\n")
def test_random_bytes_only_raise_the_clear_error(data):
    _only_clear_errors(data)


@cfg(1000)
@given(st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE, V2_SIGNATURE + b"\x21"]),
       st.binary(max_size=120))
def test_random_bytes_after_a_valid_start_only_raise_the_clear_error(start, tail):
    _only_clear_errors(start + tail)


# -- a real haproxy -------------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeaderCatcher:
    """A plain socket server: each accepted connection's header + first bytes, parsed, in a list."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.headers: list[ProxyHeader] = []
        self.arrived = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="header-catcher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                result: object = NEED_DATA
                try:
                    while result is NEED_DATA or (not result.local and b"\n" not in result.rest):  # type: ignore[union-attr]
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                        result = parse_proxy_header(data)
                except (OSError, ProxyHeaderError):
                    continue
                if isinstance(result, ProxyHeader):
                    with self.arrived:
                        self.headers.append(result)
                        self.arrived.notify_all()

    def wait(self, pred, timeout: float = 10.0) -> ProxyHeader:
        with self.arrived:
            found = self.arrived.wait_for(lambda: next((h for h in self.headers if pred(h)), None), timeout)
        assert found, f"no matching PROXY header arrived within {timeout}s; got {self.headers}"
        return found

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[tuple[HeaderCatcher, int, int]]:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed (Debian package haproxy)")
    catcher = HeaderCatcher()
    p1, p2 = _free_port(), _free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend v1
    bind 127.0.0.1:{p1}
    default_backend v1
frontend v2
    bind 127.0.0.1:{p2}
    unique-id-format chatpair-%cp
    default_backend v2
backend v1
    server s1 127.0.0.1:{catcher.port} send-proxy
backend v2
    server s2 127.0.0.1:{catcher.port} send-proxy-v2 proxy-v2-options unique-id check inter 30s check-send-proxy
""")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # haproxy binds its frontends before it starts health checks, so the
        # first (LOCAL) check arriving means it is ready.
        catcher.wait(lambda h: h.local)
        yield catcher, p1, p2
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        catcher.close()
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (Debian package haproxy)")
@pytest.mark.parametrize("version", [1, 2])
def test_real_haproxy_headers_name_the_real_client(haproxy, version):
    catcher, p1, p2 = haproxy
    with socket.create_connection(("127.0.0.1", p1 if version == 1 else p2), timeout=5) as client:
        me = client.getsockname()
        client.sendall(b"alice\r\n")
        h = catcher.wait(lambda h: h.source == (me[0], me[1]))
        assert h.version == version and not h.local
        assert h.dest == ("127.0.0.1", p1 if version == 1 else p2)
        assert h.rest == b"alice\r\n"
        if version == 2:
            assert (0x05, f"chatpair-{me[1]}".encode()) in h.tlvs
