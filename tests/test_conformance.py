"""Independent conformance test for the chatpair wire protocol, version 1.

Written from /work/shared/PROTOCOL.md only (not from the server's code), with
the minimal client in ``tests/wire.py``. Every assertion is about bytes or JSON
on the wire; where the page leaves a choice open, the test accepts any choice.
No test sleeps to wait for an event: reads have deadlines.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import select
import selectors
import signal
import socket
import struct
import time

import pytest

from wire import (
    BYE, ERROR, HELLO, MSG, NEXT, NOTICE, PAIRED, PEER_LEFT, PING, PONG, WAITING, WELCOME,
    Client, Closed, Netcat, Server, Timeout, frame, hello_payload, tname,
)

_room_ids = itertools.count(1)


def fresh_room(prefix: str = "r") -> str:
    """A room nobody else uses (isolates tests that share a server)."""
    return f"{prefix}{os.getpid()}-{next(_room_ids)}"


# -- fixtures ------------------------------------------------------------------------


def _stop_all(started: list[Server]) -> None:
    for s in started:
        try:
            if s.proc.poll() is None:
                s.stop()
        finally:
            s.kill()


@pytest.fixture(scope="module")
def make_server():
    """What every server below is started with: ``make_server(*args)`` -> an object with
    ``port``, ``proc``, ``children()``, ``stop()`` and ``kill()``. A module that
    imports these tests may override it (tests/test_conformance_haproxy.py:
    the same tests through HAProxy)."""
    return Server


@pytest.fixture
def servers(make_server):
    """``servers(*args)`` starts a fresh server on port 0; all are stopped at the end."""
    started: list[Server] = []

    def start(*args: str) -> Server:
        s = make_server(*args)
        started.append(s)
        return s

    yield start
    _stop_all(started)


@pytest.fixture(scope="module")
def shared(make_server):
    """One default server for tests that only touch their own rooms or never pair."""
    s = make_server()
    yield s
    _stop_all([s])


@pytest.fixture(scope="module")
def small(make_server):
    """A server with the smallest max_frame the CLI allows (1,024)."""
    s = make_server("--max-frame", "1024")
    yield s
    _stop_all([s])


@pytest.fixture(scope="module")
def quick_handshake(make_server):
    s = make_server("--handshake-timeout", "1")
    yield s
    _stop_all([s])


@pytest.fixture
def conn():
    made: list[Client] = []

    def make(port: int, timeout: float = 5.0, **kw) -> Client:
        c = Client(port, timeout, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def netcat():
    made: list[Netcat] = []

    def make(port: int) -> Netcat:
        n = Netcat(port)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


def pair(conn, port: int, a: str = "alice", b: str = "bob", room: str | None = None):
    """Two clients that the server paired with each other (first a, then b)."""
    ca = conn(port)
    ca.join(a, room)
    cb = conn(port)
    cb.join(b, room)
    cb.expect_paired(a, room)
    ca.expect_paired(b, room)
    return ca, cb


# -- 1. banner -----------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_banner(shared, conn):
    c = conn(shared.port)
    b = c.banner
    assert b.startswith(b"CHATPAIR/1 "), b
    assert b.endswith(b"\r\n"), b
    assert b.count(b"\n") == 1 and b.count(b"\r") == 1, b
    assert len(b) <= 200, len(b)
    text = b[:-2].decode("ascii")  # one ASCII line
    software = text.split(" ")[1]
    assert software, f"no <software> field in {b!r}"


@pytest.mark.timeout(10)
def test_banner_is_sent_before_the_client_says_anything(shared):
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as s:
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            assert chunk, "closed before the banner"
            data += chunk
        assert data.startswith(b"CHATPAIR/1 ")


# -- 3. handshake: HELLO -> WELCOME -> WAITING ------------------------------------


@pytest.mark.timeout(10)
def test_welcome_and_waiting_with_defaults(shared, conn):
    room = fresh_room()
    c = conn(shared.port)
    c.hello("alice", room)
    w = c.expect(WELCOME)
    assert w["version"] == 1 and type(w["version"]) is int
    assert isinstance(w["server"], str)
    assert w["max_frame"] == 65536 and type(w["max_frame"]) is int
    assert isinstance(w["ping_interval"], (int, float)) and not isinstance(w["ping_interval"], bool)
    assert isinstance(w["idle_timeout"], (int, float)) and not isinstance(w["idle_timeout"], bool)
    assert w["ping_interval"] == 30
    assert w["idle_timeout"] == 90
    wt = c.expect(WAITING)
    assert wt == {**wt, "room": room}
    c.expect_silence(0.3)


@pytest.mark.timeout(10)
def test_welcome_announces_configured_values_and_lobby_waiting_is_null(servers, conn):
    s = servers("--max-frame", "4096", "--ping-interval", "7.5", "--idle-timeout", "20")
    c = conn(s.port)
    c.hello("alice", None)
    w = c.expect(WELCOME)
    assert w["version"] == 1
    assert w["max_frame"] == 4096
    assert w["ping_interval"] == 7.5
    assert w["idle_timeout"] == 20
    wt = c.expect(WAITING)
    assert "room" in wt and wt["room"] is None, wt


def _name_ok_cases():
    return [
        ("a", None),
        ("x" * 32, None),                    # longest name
        ("é" * 32, None),                    # 32 characters, 64 bytes
        ("Zoë_O-Brien.2", None),
        ("名前", None),                       # Lo
        ("١٢٣", None),                        # Nd (Arabic-Indic digits)
        ("ǅx", None),                         # Lt
        ("bob", "R" * 64),                   # longest room
        ("bob", "küche-1.a_b"),
    ]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name,room", _name_ok_cases())
def test_valid_names_and_rooms_are_accepted(shared, conn, name, room):
    if room is not None:  # keep rooms unique on the shared server, same length rules
        tag = fresh_room("q").replace("-", "_")
        room = (room + tag) if len(room) + len(tag) <= 64 else room[: 64 - len(tag)] + tag
    c = conn(shared.port)
    c.join(name, room)


@pytest.mark.timeout(10)
def test_unknown_hello_keys_are_ignored(shared, conn):
    room = fresh_room()
    c = conn(shared.port)
    c.send_frame(HELLO, hello_payload("alice", room, extra={"x": [1, 2]}, color="red"))
    assert c.expect(WELCOME)["version"] == 1
    c.expect_waiting(room)


@pytest.mark.timeout(10)
def test_hello_of_exactly_1024_bytes_is_accepted(shared, conn):
    room = fresh_room()
    body = hello_payload("alice", room)
    body = body[:-1] + b" " * (1023 - len(body)) + b"}"   # length field = 1 + 1023 = 1024
    assert len(body) == 1023
    c = conn(shared.port)
    c.send(struct.pack(">IB", 1024, HELLO) + body)
    c.expect(WELCOME)
    c.expect_waiting(room)


# -- bad_hello / unsupported_version / frame_too_large before the handshake -----------


def _bad_hellos():
    def h(**kw):
        obj = {"version": 1, "name": "alice", "room": None}
        obj.update(kw)
        return frame(HELLO, json.dumps(obj).encode())

    return {
        "first-frame-MSG": frame(MSG, b"hi"),
        "first-frame-NEXT": frame(NEXT),
        "first-frame-PING": frame(PING, b"x"),
        "bad-json": frame(HELLO, b'{"version": 1, "name": "al'),
        "json-not-object": frame(HELLO, b'[1, "alice", null]'),
        "json-not-utf8": frame(HELLO, b'{"version": 1, "name": "al\xff\xfe", "room": null}'),
        "name-space": h(name="a b"),
        "name-punct": h(name="bob!"),
        "name-empty": h(name=""),
        "name-33": h(name="x" * 33),
        "name-combining-mark": h(name="e\u0301"),
        "name-bidi": h(name="a\u202eb"),
        "name-esc": h(name="a\x1bb"),
        "name-superscript-No": h(name="x²"),
        "name-not-string": h(name=123),
        "name-null": h(name=None),
        "room-empty": h(room=""),
        "room-65": h(room="r" * 65),
        "room-space": h(room="a b"),
        "room-punct": h(room="kitchen!"),
        "room-not-string": h(room=5),
    }


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", list(_bad_hellos()))
def test_bad_hello(shared, conn, case):
    c = conn(shared.port)
    c.send(_bad_hellos()[case])
    c.expect_error("bad_hello")


@pytest.mark.timeout(10)
def test_unsupported_version(shared, conn):
    c = conn(shared.port)
    c.send_frame(HELLO, hello_payload("alice", fresh_room(), version=2))
    c.expect_error("unsupported_version")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("length", [1025, 0x00FFFFFF])
def test_hello_length_over_1024_is_refused_from_the_length_alone(shared, conn, length):
    c = conn(shared.port)
    c.send(struct.pack(">I", length))   # only the 4 length bytes; the rest never comes
    t0 = time.monotonic()
    c.expect_error("frame_too_large", timeout=3)
    assert time.monotonic() - t0 < 3    # well before the 10 s handshake timeout


@pytest.mark.timeout(10)
def test_first_line_over_1024_bytes_is_refused(shared, conn):
    c = conn(shared.port)
    c.send(b"a" * 1025)                  # no newline: already longer than 1,024
    t0 = time.monotonic()
    data = c.wait_closed(timeout=3)
    assert time.monotonic() - t0 < 3
    lines = [ln.rstrip(b"\r") for ln in data.split(b"\n") if ln]
    assert lines and lines[-1].startswith(b"* error: "), data


# -- bad_frame / frame_too_large after the handshake -----------------------------------


BAD_FRAMES = {
    "empty-MSG": frame(MSG, b""),
    "MSG-invalid-utf8": frame(MSG, b"ok\xff\xfe"),
    "MSG-truncated-utf8": frame(MSG, b"ok\xc3"),
    "MSG-encoded-surrogate": frame(MSG, b"\xed\xa0\x80"),
    "MSG-overlong": frame(MSG, b"\xc0\xaf"),
    "reserved-0x07": frame(0x07),
    "reserved-0x0f": frame(0x0F, b"x"),
    "reserved-0x15": frame(0x15),
    "reserved-0x1e": frame(0x1E),
    "server-only-0x10": frame(0x10, b'{"version": 1, "server": "x", "max_frame": 65536, '
                                    b'"ping_interval": 30, "idle_timeout": 90}'),
    "server-only-0x11": frame(0x11, b'{"room": null}'),
    "server-only-0x12": frame(0x12, b'{"peer": "x", "room": null}'),
    "server-only-0x13": frame(0x13, b'{"peer": "x", "reason": "bye"}'),
    "server-only-0x14": frame(0x14, b'{"code": "x", "message": "y"}'),
    "server-only-0x1f": frame(0x1F, b'{"code": "x", "message": "y"}'),
    "unknown-0x7f": frame(0x7F),
    "second-HELLO": frame(HELLO, hello_payload("alice", None)),
    "length-zero": b"\x00\x00\x00\x00",
    "PING-65-bytes": frame(PING, b"p" * 65),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frame_after_hello(shared, conn, case):
    c = conn(shared.port)
    c.join("alice", fresh_room())
    c.send(BAD_FRAMES[case])
    c.expect_error("bad_frame", timeout=3)


@pytest.mark.timeout(15)
def test_msg_over_max_frame_is_frame_too_large(small, conn):
    room = fresh_room()
    a, b = pair(conn, small.port, room=room)
    payload = b"m" * 1024                # length field 1025 > max_frame 1024
    a.send(struct.pack(">IB", 1025, MSG))
    try:
        ftype, body = a.read_frame(timeout=2)
    except Timeout:                      # the server may want the whole frame first
        a.send(payload)
        ftype, body = a.read_frame(timeout=5)
    assert ftype == ERROR, (tname(ftype), body)
    assert json.loads(body)["code"] == "frame_too_large", body
    a.expect_closed()
    b.expect_peer_left("alice", "error")   # cut off for breaking the protocol


@pytest.mark.timeout(15)
def test_msg_of_exactly_max_frame_is_relayed(small, conn):
    room = fresh_room()
    a, b = pair(conn, small.port, room=room)
    body = ("é" * 511 + "x").encode()   # 1023 bytes: length field 1024 == max_frame
    assert len(body) == 1023
    a.send_frame(MSG, body)
    assert b.expect(MSG) == body


# -- pairing -------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_pairing_in_the_lobby_fifo_with_three_clients(servers, conn):
    s = servers()
    a = conn(s.port)
    a.join("alice")
    a.expect_silence(0.2)                       # alone: nothing yet
    b = conn(s.port)
    b.hello("bob")
    b.expect(WELCOME)
    b.expect_waiting(None)                      # WAITING always, even with a partner there
    b.expect_paired("alice", None)
    a.expect_paired("bob", None)
    c = conn(s.port)
    c.join("carol")
    c.expect_silence(0.3)                       # alice and bob are taken
    a.expect_silence(0)
    b.expect_silence(0)
    d = conn(s.port)
    d.join("dave")
    d.expect_paired("carol", None)
    c.expect_paired("dave", None)
    a.expect_silence(0.1)
    b.expect_silence(0)


@pytest.mark.timeout(10)
def test_rooms_pair_only_with_each_other_and_room_full(servers, conn):
    s = servers()
    a = conn(s.port)
    a.join("alice", "kitchen")
    b = conn(s.port)
    b.join("bob")                               # lobby: must not pair with alice
    a.expect_silence(0.3)
    b.expect_silence(0)
    c = conn(s.port)
    c.join("carol", "kitchen")
    c.expect_paired("alice", "kitchen")
    a.expect_paired("carol", "kitchen")
    b.expect_silence(0.1)
    d = conn(s.port)
    d.hello("dave", "kitchen")                  # a pair is chatting, nobody waiting
    d.expect(WELCOME)
    d.expect_error("room_full")
    e = conn(s.port)
    e.join("eve")                               # lobby still works
    e.expect_paired("bob", None)
    b.expect_paired("eve", None)
    # a room that loses one side requeues the other in the same room
    a.send_frame(BYE)
    c.expect_peer_left("alice", "bye")
    c.expect_waiting("kitchen")
    f = conn(s.port)
    f.join("frank", "kitchen")
    f.expect_paired("carol", "kitchen")
    c.expect_paired("frank", "kitchen")


# -- relay ----------------------------------------------------------------------------

_CHARS = ["a", "b", "Z", "0", " ", "\n", "\t", "\r", "é", "ß", "Ω", "中", "文", "😀", "𝄞",
          "\u202e", "\x1b", "\x00", "\u00a0", "~", "\\", '"', "\ufeff"]


def _text(rng: random.Random, n: int) -> bytes:
    parts, size = [], 0
    while size < n:
        b = rng.choice(_CHARS).encode()
        if size + len(b) > n:
            b = b"x"
        parts.append(b)
        size += len(b)
    return b"".join(parts)


def _payloads(seed: int, count: int, max_frame: int) -> list[bytes]:
    rng = random.Random(seed)
    block = _text(rng, 1000)
    out = []
    for i in range(count):
        if i == 0:
            n = 1
        elif i == 1 or i % 500 == 250:
            n = max_frame - 1
        elif i % 97 == 0:
            n = rng.randint(1024, 16384)
        elif i % 7 == 0:
            n = rng.randint(1, 4)
        else:
            n = rng.randint(1, 200)
        if n > 1000:
            p = block * (n // 1000) + _text(rng, n % 1000)
        else:
            p = _text(rng, n)
        assert len(p) == n
        p.decode("utf-8")
        out.append(p)
    return out


@pytest.mark.timeout(45)
def test_full_duplex_relay_5000_each_way_verbatim_and_in_order(servers, conn):
    s = servers()
    a = conn(s.port)
    w = a.join("alice")
    max_frame = w["max_frame"]
    b = conn(s.port)
    b.join("bob")
    b.expect_paired("alice")
    a.expect_paired("bob")
    n = 5000
    sent = {a: _payloads(1, n, max_frame), b: _payloads(2, n, max_frame)}
    out = {c: b"".join(frame(MSG, p) for p in sent[c]) for c in (a, b)}
    pos = {a: 0, b: 0}
    inbuf = {a: a.buf, b: b.buf}
    got = {a: 0, b: 0}
    other = {a: b, b: a}
    sel = selectors.DefaultSelector()
    for c in (a, b):
        c.sock.setblocking(False)
        sel.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    deadline = time.monotonic() + 40
    while got[a] < n or got[b] < n:
        left = deadline - time.monotonic()
        assert left > 0, f"relay stalled: alice got {got[a]}, bob got {got[b]}; sent {pos[a]}/{pos[b]} bytes"
        for key, mask in sel.select(min(left, 1.0)):
            c = key.data
            if mask & selectors.EVENT_WRITE and pos[c] < len(out[c]):
                try:
                    pos[c] += c.sock.send(out[c][pos[c]: pos[c] + 262144])
                except BlockingIOError:
                    pass
                if pos[c] >= len(out[c]):
                    sel.modify(c.sock, selectors.EVENT_READ, c)
            if mask & selectors.EVENT_READ:
                try:
                    chunk = c.sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                assert chunk, f"{c.name}: connection closed after {got[c]} messages"
                buf = inbuf[c] + chunk
                i = 0
                expected = sent[other[c]]
                while len(buf) - i >= 5:
                    length, ftype = struct.unpack_from(">IB", buf, i)
                    if len(buf) - i < 4 + length:
                        break
                    body = buf[i + 5: i + 4 + length]
                    assert ftype == MSG, f"{c.name}: got {tname(ftype)} {body[:200]!r} after {got[c]} messages"
                    k = got[c]
                    assert k < n, f"{c.name}: more messages than were sent"
                    assert body == expected[k], \
                        f"{c.name}: message {k} differs: {len(body)} bytes {body[:80]!r} vs {len(expected[k])} bytes {expected[k][:80]!r}"
                    got[c] += 1
                    i += 4 + length
                inbuf[c] = buf[i:]
    sel.close()
    for c in (a, b):
        assert inbuf[c] == b"", f"{c.name}: trailing bytes {inbuf[c][:100]!r}"


# -- leaving: BYE, NEXT, disconnect ---------------------------------------------------


def _read_until_closed(c: Client, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    frames = []
    while True:
        try:
            frames.append(c.read_frame(timeout))
        except Closed:
            return frames
        except Timeout:
            raise AssertionError(f"connection stayed open; frames {frames!r}") from None


@pytest.mark.timeout(10)
def test_bye(servers, conn):
    s = servers()
    a, b = pair(conn, s.port)
    a.send_frame(BYE)
    frames = _read_until_closed(a)
    assert not [f for f in frames if f[0] in (ERROR, PEER_LEFT, WAITING, PAIRED)], frames
    b.expect_peer_left("alice", "bye")
    b.expect_waiting(None)
    c = conn(s.port)
    c.join("carol")
    c.expect_paired("bob")
    b.expect_paired("carol")
    d = conn(s.port)
    d.join("dave")                               # BYE while waiting: closed too
    d.send_frame(BYE)
    frames = _read_until_closed(d)
    assert not [f for f in frames if f[0] == ERROR], frames


@pytest.mark.timeout(10)
def test_next_requeues_both_and_never_repairs_them(servers, conn):
    s = servers()
    a, b = pair(conn, s.port)
    a.send_frame(NEXT)
    a.expect_waiting(None)
    b.expect_peer_left("alice", "next")
    b.expect_waiting(None)
    a.expect_silence(0.4)                        # both waiting, but not for each other
    b.expect_silence(0)
    c = conn(s.port)
    c.join("carol")
    p = c.expect(PAIRED)
    assert p.get("peer") in ("alice", "bob") and p.get("room") is None and "room" in p, p
    first, second = (a, b) if p["peer"] == "alice" else (b, a)
    first.expect_paired("carol")
    second.expect_silence(0.2)
    d = conn(s.port)
    d.join("dave")
    d.expect_paired(second.name)
    second.expect_paired("dave")
    # the new pairs relay
    c.send_frame(MSG, b"hi from carol")
    assert first.expect(MSG) == b"hi from carol"
    second.send_frame(MSG, b"hi dave")
    assert d.expect(MSG) == b"hi dave"


@pytest.mark.timeout(10)
def test_disconnect_requeue_and_repair_with_newcomer(servers, conn):
    s = servers()
    a, b = pair(conn, s.port)
    a.sock.shutdown(socket.SHUT_RDWR)
    a.close()
    b.expect_peer_left("alice", "disconnected")
    b.expect_waiting(None)
    c = conn(s.port)
    c.join("carol")
    c.expect_paired("bob")
    b.expect_paired("carol")
    b.send_frame(MSG, "héllo\ncarol".encode())
    assert c.expect(MSG) == "héllo\ncarol".encode()


@pytest.mark.timeout(10)
def test_partner_cut_off_for_protocol_error(servers, conn):
    s = servers()
    a, b = pair(conn, s.port)
    b.send_frame(0x07)
    b.expect_error("bad_frame")
    a.expect_peer_left("bob", "error")
    a.expect_waiting(None)


# -- NOTICE, PING/PONG --------------------------------------------------------------


@pytest.mark.timeout(10)
def test_msg_while_waiting_is_answered_undelivered(shared, conn):
    room = fresh_room()
    a = conn(shared.port)
    a.join("alice", room)
    a.send_frame(MSG, b"anyone there?")
    n = a.expect(NOTICE)
    assert n.get("code") == "undelivered" and isinstance(n.get("message"), str), n
    b = conn(shared.port)                        # not fatal: alice can still chat
    b.join("bob", room)
    b.expect_paired("alice", room)
    a.expect_paired("bob", room)
    a.send_frame(MSG, b"hi")
    assert b.expect(MSG) == b"hi"


@pytest.mark.timeout(10)
def test_client_ping_is_answered_with_pong(shared, conn):
    c = conn(shared.port)
    c.join("alice", fresh_room())
    for payload in (b"", b"abc", b"\x00\xff\x10 bin", bytes(range(64))):
        c.send_frame(PING, payload)
        assert c.expect(PONG) == payload
    c.send_frame(PONG, b"unsolicited")           # PONG is allowed from a client
    c.send_frame(PING, b"still here")
    assert c.expect(PONG) == b"still here"
    c.send_frame(PING, b"x" * 65)
    c.expect_error("bad_frame")


# -- handshake timeout --------------------------------------------------------------


#: With --handshake-timeout 1: the latest a deadline may be told. The server
#: checks deadlines on a quarter-second timer, and on a loaded two-core
#: machine (four test processes, HAProxy in between) that timer can run a
#: second late. The bound still tells an absolute deadline from an extended
#: one; the trickling test checks that bytes do not extend it.
DEADLINE_LATEST = 2.5


def _elapsed(c: Client) -> float:
    return time.monotonic() - c.connected_at


@pytest.mark.timeout(10)
def test_handshake_timeout_frame_mode(quick_handshake, conn):
    c = conn(quick_handshake.port)
    c.send(b"\x00")
    obj = c.expect(ERROR, timeout=4)
    took = _elapsed(c)  # when the ERROR arrived (the close after it is not the deadline's)
    assert obj.get("code") == "handshake_timeout", obj
    c.expect_closed(timeout=4)
    assert 0.8 <= took <= DEADLINE_LATEST, took


@pytest.mark.timeout(10)
def test_handshake_timeout_not_extended_by_trickling_bytes(quick_handshake, conn):
    c = conn(quick_handshake.port)
    body = hello_payload("alice", None) + b" " * 40
    data = struct.pack(">IB", len(body) + 1, HELLO) + body
    pending = list(data[:-5])                      # never complete the HELLO
    got = None
    while got is None:
        assert _elapsed(c) < 4, "no handshake_timeout while bytes trickled in"
        try:
            got = c.read_frame(timeout=0.1)        # pacing: a read with a deadline
        except Timeout:
            if pending:
                try:
                    c.send(bytes([pending.pop(0)]))
                except OSError:
                    pass
        except Closed:
            raise AssertionError("closed without ERROR handshake_timeout") from None
    assert got[0] == ERROR and json.loads(got[1])["code"] == "handshake_timeout", got
    assert 0.8 <= _elapsed(c) <= DEADLINE_LATEST, _elapsed(c)
    c.expect_closed()


@pytest.mark.timeout(10)
def test_handshake_timeout_silent_connection_is_just_closed(quick_handshake, conn):
    c = conn(quick_handshake.port)
    data = c.wait_closed(timeout=4)
    assert data == b"", data
    assert 0.8 <= _elapsed(c) <= DEADLINE_LATEST, _elapsed(c)


@pytest.mark.timeout(10)
def test_handshake_timeout_line_mode(quick_handshake, conn):
    c = conn(quick_handshake.port)
    c.send(b"ali")                                 # no newline
    data = c.wait_closed(timeout=4)
    assert 0.8 <= _elapsed(c) <= DEADLINE_LATEST, _elapsed(c)
    lines = [ln.rstrip(b"\r") for ln in data.split(b"\n") if ln]
    assert lines and lines[-1].startswith(b"* "), data


# -- idle timeout and keepalive ---------------------------------------------------------


@pytest.mark.timeout(15)
def test_keepalive_ping_pong_and_idle_timeout(servers, conn):
    s = servers("--handshake-timeout", "1", "--ping-interval", "0.5", "--idle-timeout", "1.5")
    lurker = conn(s.port)                          # line mode: no idle timeout applies
    lurker.send(b"lena " + fresh_room().encode() + b"\n")
    assert lurker.read_line().startswith(b"* waiting"), "line-mode waiting notice"
    a = conn(s.port)
    a.join("alice")
    b = conn(s.port)
    b.join("bob")
    t_b = time.monotonic()                         # bob's last frame was its HELLO
    b.expect_paired("alice")
    a.expect_paired("bob")
    events = {a: [], b: []}
    open_ = {a: True, b: True}
    end = time.monotonic() + 3.3
    while time.monotonic() < end:
        for c in (a, b):
            if not open_[c]:
                continue
            try:
                ftype, body = c.read_frame(timeout=0.02)
            except Timeout:
                continue
            except Closed:
                open_[c] = False
                events[c].append((time.monotonic() - t_b, "EOF", b""))
                continue
            events[c].append((time.monotonic() - t_b, ftype, body))
            if c is a and ftype == PING:
                a.send_frame(PONG, body)
    # bob: PING(s) after ping_interval, then ERROR timeout at idle_timeout, then close
    eb = events[b]
    assert eb and eb[0][1] == PING, eb
    assert 0.4 <= eb[0][0] < 1.4, f"first PING at {eb[0][0]:.2f}s"
    assert all(len(e[2]) <= 64 for e in eb if e[1] == PING), eb
    kinds = [e[1] for e in eb]
    assert ERROR in kinds, f"no ERROR timeout for the silent client: {eb}"
    i = kinds.index(ERROR)
    assert set(kinds[:i]) == {PING}, eb
    assert json.loads(eb[i][2])["code"] == "timeout", eb[i]
    assert 1.3 <= eb[i][0] <= 2.6, f"ERROR timeout at {eb[i][0]:.2f}s, idle_timeout 1.5"
    assert kinds[i + 1:] == ["EOF"], eb
    # alice answered every PING: stays, gets PEER_LEFT timeout then WAITING
    ea = events[a]
    assert open_[a], ea
    nonping = [e for e in ea if e[1] != PING]
    assert len(nonping) == 2, ea
    assert nonping[0][1] == PEER_LEFT, ea
    pl = json.loads(nonping[0][2])
    assert pl.get("peer") == "bob" and pl.get("reason") == "timeout", pl
    assert nonping[1][1] == WAITING and json.loads(nonping[1][2]).get("room", 1) is None, ea
    assert sum(1 for e in ea if e[1] == PING) >= 2, ea
    a.send_frame(PING, b"alive?")
    while True:
        ftype, body = a.read_frame()
        if ftype == PING:
            a.send_frame(PONG, body)
            continue
        assert (ftype, body) == (PONG, b"alive?")
        break
    lurker.expect_silence(0.05)                    # still open, nothing sent to it


# -- shutdown -----------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_shutdown_tells_everyone_and_leaves_no_process(servers, conn):
    s = servers()
    a, b = pair(conn, s.port)
    c = conn(s.port)
    c.join("carol")
    r1, r2 = pair(conn, s.port, "rita", "rob", room="den")
    ln = conn(s.port)
    ln.send(b"lena lobby2\n")
    assert ln.read_line().startswith(b"* waiting")
    kids = s.children()
    pidfds = {}
    for k in kids:
        try:
            pidfds[k] = os.pidfd_open(k)
        except OSError:
            pass
    s.proc.send_signal(signal.SIGTERM)
    for cl in (a, b, c, r1, r2):
        cl.expect_error("shutdown", timeout=8)     # first and only frame: no PEER_LEFT
    data = ln.wait_closed(timeout=8)
    lines = [x.rstrip(b"\r") for x in data.split(b"\n") if x]
    assert lines and lines[-1].startswith(b"* error: "), data
    assert all(x.startswith(b"* ") for x in lines), data
    code = s.proc.wait(10)
    assert code == 0, f"exit code {code}"
    try:
        for k, fd in pidfds.items():
            r, _, _ = select.select([fd], [], [], 5)
            assert r, f"child process {k} still running after the server exited"
    finally:
        for fd in pidfds.values():
            os.close(fd)


# -- stalled connections ------------------------------------------------------------


@pytest.mark.timeout(30)
def test_stalled_connections_do_not_delay_a_new_pair(servers):
    s = servers()
    stalls = [b"", b"\x00", b"\x00\x00", b"\x00\x00\x00\x30\x01{\"vers", b"half a na"]
    socks = []
    try:
        for i in range(250):
            sk = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            socks.append(sk)
            if stalls[i % len(stalls)]:
                sk.sendall(stalls[i % len(stalls)])
        t0 = time.monotonic()
        a = Client(s.port)
        a.join("alice", "fast")
        b = Client(s.port)
        b.join("bob", "fast")
        b.expect_paired("alice", "fast")
        a.expect_paired("bob", "fast")
        elapsed = time.monotonic() - t0
        a.close()
        b.close()
        assert elapsed < 1.0, f"pairing took {elapsed:.2f}s with 250 stalled connections"
    finally:
        for sk in socks:
            sk.close()


# -- line mode (real netcat) ------------------------------------------------------------


def _starts(prefix: str):
    return lambda line: line.startswith(prefix)


@pytest.mark.timeout(20)
def test_line_mode_with_netcat_and_a_frame_partner(servers, conn, netcat):
    s = servers()
    nc = netcat(s.port)
    banner = nc.read_raw_line()
    assert banner.startswith(b"CHATPAIR/1 ") and banner.endswith(b"\r\n"), banner
    nc.write(b"carol\n")
    nc.expect_line(_starts("* waiting"), "'* waiting...'", skip_notices=True)
    bob = conn(s.port)
    bob.join("bob")
    bob.expect_paired("carol", None)
    nc.expect_line(_starts("* paired with bob"), "'* paired with bob'", skip_notices=True)

    # frame -> line
    bob.send_frame(MSG, b"hi there")
    nc.expect_line(lambda l: l == "bob: hi there", "'bob: hi there'")
    bob.send_frame(MSG, "l1\nl2 ünï 中文 😀\nl3".encode())
    for want in ("bob: l1", "bob: l2 ünï 中文 😀", "bob: l3"):
        nc.expect_line(lambda l, w=want: l == w, repr(want))

    # line -> frame
    def sends(raw: bytes, want: bytes):
        nc.write(raw)
        assert bob.expect(MSG) == want, raw

    sends(b"hello bob\n", b"hello bob")
    sends(b"crlf\r\n", b"crlf")
    nc.write(b"\n\r\n\n")                          # empty lines are ignored
    sends(b"after empty\n", b"after empty")
    sends(b"caf\xe9\n", "caf\ufffd".encode())      # not UTF-8 -> U+FFFD
    sends(b"te\xff\xfb\x01lnet\xff\xf1 ok\n", b"telnet ok")   # IAC WILL ECHO, IAC NOP
    sends(b"\xff\xfd\x03\xff\xfb\x18opt\n", b"opt")           # IAC DO, IAC WILL at line start
    sends(b"//x\n", b"/x")
    sends(b"//next\n", b"/next")

    # /help: only '* ' lines, nothing sent
    nc.write(b"/help\n")
    first = nc.expect_line(_starts("* "), "a '* ' help line")
    assert first
    bob.send_frame(MSG, b"marker")
    nc.expect_line(lambda l: l == "bob: marker", "'bob: marker' after the help lines", skip_notices=True)
    # unknown command: a '* ' line pointing at /help, not sent
    nc.write(b"/frobnicate now\n")
    line = nc.expect_line(_starts("* "), "a '* ' line for an unknown command")
    assert "/help" in line, line
    sends(b"sentinel\n", b"sentinel")              # nothing was sent before it
    bob.expect_silence(0.1)

    # /next: partner gets PEER_LEFT next; both wait again
    nc.write(b"/next\n")
    bob.expect_peer_left("carol", "next")
    bob.expect_waiting(None)
    nc.expect_line(_starts("* waiting"), "'* waiting' after /next", skip_notices=True)
    bob.expect_silence(0.3)                        # not paired again with each other


_FORBIDDEN = [chr(c) for c in range(0x20) if c not in (0x09, 0x0A)] + \
    [chr(c) for c in range(0x80, 0xA0)] + \
    [chr(c) for c in range(0x202A, 0x202F)] + [chr(c) for c in range(0x2066, 0x206A)]


@pytest.mark.timeout(15)
def test_line_mode_output_is_sanitized(servers, conn, netcat):
    s = servers()
    nc = netcat(s.port)
    nc.read_raw_line()
    nc.write(b"carol\n")
    nc.expect_line(_starts("* waiting"), "'* waiting'", skip_notices=True)
    bob = conn(s.port)
    bob.join("bob")
    bob.expect_paired("carol")
    nc.expect_line(_starts("* paired with bob"), "'* paired with bob'", skip_notices=True)
    evil = ("\x1b[31mred\x07bell\u009bcsi\u202eevil\u2067iso\u202aemb"
            "\x1b]8;;http://x.example/\x07link\x1b]8;;\x07 end\rcr\x00nul\x7fdel\x08bs\u0085nel\ttab")
    bob.send_frame(MSG, evil.encode())
    bob.send_frame(MSG, b"done")
    lines = []
    while True:
        raw = nc.read_raw_line()
        body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        text = body.decode("utf-8")
        if text == "bob: done":
            break
        lines.append(text)
    assert lines, "the message did not arrive"
    assert all(l.startswith("bob: ") for l in lines), lines
    joined = "\n".join(lines)
    bad = sorted({f"U+{ord(ch):04X}" for ch in joined if ch in _FORBIDDEN})
    assert not bad, f"control characters reached the line-mode client: {bad} in {lines!r}"
    pos = 0
    for word in ("red", "bell", "csi", "evil", "iso", "emb", "link", "end", "cr", "nul", "bs", "nel", "tab"):
        i = joined.find(word, pos)
        assert i >= 0, f"text {word!r} lost: {lines!r}"
        pos = i + len(word)


@pytest.mark.timeout(15)
def test_line_mode_quit(servers, conn, netcat):
    s = servers()
    nc = netcat(s.port)
    nc.read_raw_line()
    nc.write(b"carol\n")
    nc.expect_line(_starts("* waiting"), "'* waiting'", skip_notices=True)
    bob = conn(s.port)
    bob.join("bob")
    bob.expect_paired("carol")
    nc.write(b"/quit\n")
    bob.expect_peer_left("carol", {"bye", "disconnected"})
    bob.expect_waiting(None)
    # netcat (without -N) keeps a connection open while its stdin is open and
    # never half-closes it itself: once stdin is closed, nc's output only ends
    # if the server closed the connection.
    nc.proc.stdin.close()
    rest = nc.read_until_eof()
    for ln in rest.split(b"\n"):
        assert not ln.rstrip(b"\r") or ln.startswith(b"* "), rest
    assert nc.proc.wait(5) is not None


@pytest.mark.timeout(15)
def test_line_mode_room_partner_leaves_and_repair(servers, conn, netcat):
    s = servers()
    nc = netcat(s.port)
    nc.read_raw_line()
    nc.write(b"carol kitchen\n")
    nc.expect_line(_starts("* waiting"), "'* waiting'", skip_notices=True)
    lobby = conn(s.port)
    lobby.join("lou")                              # lobby client: not carol's partner
    bob = conn(s.port)
    bob.join("bob", "kitchen")
    bob.expect_paired("carol", "kitchen")
    nc.expect_line(_starts("* paired with bob"), "'* paired with bob'", skip_notices=True)
    lobby.expect_silence(0.1)
    bob.send_frame(BYE)
    line = nc.expect_line(_starts("* "), "a '* ' line saying bob left")
    assert "bob" in line and "bye" in line, line
    dave = conn(s.port)
    dave.join("dave", "kitchen")
    dave.expect_paired("carol", "kitchen")
    nc.expect_line(_starts("* paired with dave"), "'* paired with dave'", skip_notices=True)
    dave.send_frame(MSG, b"yo")
    nc.expect_line(lambda l: l == "dave: yo", "'dave: yo'")
    nc.write(b"hey dave\n")
    assert dave.expect(MSG) == b"hey dave"


@pytest.mark.timeout(10)
def test_line_mode_bad_name_is_an_error_line(shared, conn):
    c = conn(shared.port)
    c.send(b"b@d!\n")
    data = c.wait_closed()
    lines = [x.rstrip(b"\r") for x in data.split(b"\n") if x]
    assert lines and lines[-1].startswith(b"* error: "), data


@pytest.mark.timeout(10)
def test_line_mode_line_length_limit(small, conn):
    room = fresh_room()
    f = conn(small.port)
    f.join("fred", room)
    c = conn(small.port)
    c.send(b"lina " + room.encode() + b"\n")
    f.expect_paired("lina", room)
    body = ("é" * 511).encode()                    # 1,022 bytes: under max_frame - 1 either way
    c.send(body + b"\n")
    assert f.expect(MSG) == body
    c.send(b"y" * 1100)                            # over max_frame - 1 = 1,023 already
    try:
        data = c.wait_closed(timeout=2)
    except Timeout:                                # the server may wait for the newline
        c.send(b"\n")
        data = c.wait_closed()
    lines = [x.rstrip(b"\r") for x in data.split(b"\n") if x]
    assert lines and lines[-1].startswith(b"* error: "), data
    f.expect_peer_left("lina", "error")
