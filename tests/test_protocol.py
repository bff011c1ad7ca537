"""The sans-IO codec, tested h11-style: exact bytes both ways, every split, no sockets.

Every expected byte string below is written out by hand from PROTOCOL.md
(4-byte big-endian length counting the type byte, 1 type byte, payload), not
produced by the code under test.
"""

from __future__ import annotations

import json
import random
import unicodedata
from contextlib import contextmanager

import pytest

from chatpair.proto import (
    DEFAULT_MAX_FRAME,
    HANDSHAKE_MAX,
    MAX_BANNER,
    NAME_RULE,
    NEED_DATA,
    ROOM_RULE,
    EndOfStream,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    LineCommand,
    LineKind,
    LineDecoder,
    ProtocolError,
    check_banner,
    check_client_frame,
    decode_json,
    encode_error,
    encode_frame,
    encode_hello,
    encode_json_frame,
    encode_msg,
    encode_notice,
    make_banner,
    parse_client_line,
    parse_hello,
    parse_name_line,
    sanitize,
    sanitize_name,
)

# --------------------------------------------------------------------------
# The table: encoder call <-> exact bytes <-> decoded event
# --------------------------------------------------------------------------

WELCOME = {"version": 1, "server": "chatpair/0.1.0", "max_frame": 65536, "ping_interval": 30.0, "idle_timeout": 90.0}

# (id, encode thunk, exact wire bytes, type code, payload)
TABLE = [
    ("hello", lambda: encode_hello("alice"), b'\x00\x00\x00\x29\x01{"version":1,"name":"alice","room":null}',
     0x01, b'{"version":1,"name":"alice","room":null}'),
    ("hello-room-utf8", lambda: encode_hello("Zoë", "café"),
     b'\x00\x00\x00\x2b\x01{"version":1,"name":"Zo\xc3\xab","room":"caf\xc3\xa9"}',
     0x01, '{"version":1,"name":"Zoë","room":"café"}'.encode()),
    ("msg", lambda: encode_msg("hi"), b"\x00\x00\x00\x03\x02hi", 0x02, b"hi"),
    ("msg-utf8", lambda: encode_msg("héllo 👋"), b"\x00\x00\x00\x0c\x02h\xc3\xa9llo \xf0\x9f\x91\x8b",
     0x02, "héllo 👋".encode()),
    ("msg-newlines", lambda: encode_msg("a\nb"), b"\x00\x00\x00\x04\x02a\nb", 0x02, b"a\nb"),
    ("next", lambda: encode_frame(FrameType.NEXT), b"\x00\x00\x00\x01\x03", 0x03, b""),
    ("bye", lambda: encode_frame(FrameType.BYE), b"\x00\x00\x00\x01\x04", 0x04, b""),
    ("ping-empty", lambda: encode_frame(FrameType.PING), b"\x00\x00\x00\x01\x05", 0x05, b""),
    ("ping", lambda: encode_frame(FrameType.PING, b"\x00\xfft1"), b"\x00\x00\x00\x05\x05\x00\xfft1", 0x05,
     b"\x00\xfft1"),
    ("pong", lambda: encode_frame(FrameType.PONG, b"\x00\xfft1"), b"\x00\x00\x00\x05\x06\x00\xfft1", 0x06,
     b"\x00\xfft1"),
    ("welcome", lambda: encode_json_frame(FrameType.WELCOME, WELCOME),
     b'\x00\x00\x00\x63\x10{"version":1,"server":"chatpair/0.1.0","max_frame":65536,'
     b'"ping_interval":30.0,"idle_timeout":90.0}',
     0x10, b'{"version":1,"server":"chatpair/0.1.0","max_frame":65536,"ping_interval":30.0,"idle_timeout":90.0}'),
    ("waiting", lambda: encode_json_frame(FrameType.WAITING, {"room": None}), b'\x00\x00\x00\x0e\x11{"room":null}',
     0x11, b'{"room":null}'),
    ("waiting-room", lambda: encode_json_frame(FrameType.WAITING, {"room": "r1"}),
     b'\x00\x00\x00\x0e\x11{"room":"r1"}', 0x11, b'{"room":"r1"}'),
    ("paired", lambda: encode_json_frame(FrameType.PAIRED, {"peer": "bob", "room": None}),
     b'\x00\x00\x00\x1b\x12{"peer":"bob","room":null}', 0x12, b'{"peer":"bob","room":null}'),
    ("peer-left", lambda: encode_json_frame(FrameType.PEER_LEFT, {"peer": "bob", "reason": "next"}),
     b'\x00\x00\x00\x1f\x13{"peer":"bob","reason":"next"}', 0x13, b'{"peer":"bob","reason":"next"}'),
    ("notice", lambda: encode_notice("undelivered", "no partner"),
     b'\x00\x00\x00\x2e\x14{"code":"undelivered","message":"no partner"}', 0x14,
     b'{"code":"undelivered","message":"no partner"}'),
    ("error-enum", lambda: encode_error(ErrorCode.ROOM_FULL, "room x is full"),
     b'\x00\x00\x00\x30\x1f{"code":"room_full","message":"room x is full"}', 0x1F,
     b'{"code":"room_full","message":"room x is full"}'),
    ("error-str", lambda: encode_error("shutdown", "bye"),
     b'\x00\x00\x00\x24\x1f{"code":"shutdown","message":"bye"}', 0x1F, b'{"code":"shutdown","message":"bye"}'),
]
IDS = [row[0] for row in TABLE]
ALL_BYTES = b"".join(row[2] for row in TABLE)
ALL_FRAMES = [Frame(row[3], row[4]) for row in TABLE]


def drain(dec: FrameDecoder) -> list:
    """Every event now available, with a bound so a bug cannot loop forever."""
    out = []
    for _ in range(len(dec.buffered) + 2):
        ev = dec.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, EndOfStream):
            return out
    raise AssertionError("decoder made no progress")


def decode_chunks(chunks, max_frame: int = DEFAULT_MAX_FRAME) -> list:
    dec = FrameDecoder(max_frame)
    out = []
    for chunk in chunks:
        if chunk:  # b"" would mean EOF
            dec.feed(chunk)
            out += drain(dec)
    dec.feed(b"")
    out += drain(dec)
    return out


@pytest.mark.parametrize("encode, wire, ftype, payload", [row[1:] for row in TABLE], ids=IDS)
def test_encode_exact_bytes(encode, wire, ftype, payload):
    assert encode() == wire


@pytest.mark.parametrize("encode, wire, ftype, payload", [row[1:] for row in TABLE], ids=IDS)
def test_decode_exact_bytes(encode, wire, ftype, payload):
    dec = FrameDecoder()
    dec.feed(wire)
    frame = dec.next_event()
    assert frame == Frame(ftype, payload)
    assert frame.type == ftype and frame.payload == payload
    assert dec.next_event() is NEED_DATA
    assert dec.buffered == b""
    dec.feed(b"")
    assert dec.next_event() == EndOfStream()


@pytest.mark.parametrize("encode, wire, ftype, payload", [row[1:] for row in TABLE], ids=IDS)
def test_decode_split_at_every_byte(encode, wire, ftype, payload):
    expected = [Frame(ftype, payload), EndOfStream()]
    for i in range(len(wire) + 1):
        assert decode_chunks([wire[:i], wire[i:]]) == expected, i


def test_json_payloads_round_trip():
    dec = FrameDecoder()
    dec.feed(encode_json_frame(FrameType.WELCOME, WELCOME) + encode_hello("Zoë", "café"))
    assert dec.next_event().json() == WELCOME
    assert dec.next_event().json() == {"version": 1, "name": "Zoë", "room": "café"}
    dec.feed(encode_msg("héllo 👋"))
    assert dec.next_event().text() == "héllo 👋"


def test_whole_table_split_at_every_byte_and_one_byte_at_a_time():
    expected = ALL_FRAMES + [EndOfStream()]
    assert decode_chunks([ALL_BYTES]) == expected
    assert decode_chunks([ALL_BYTES[i:i + 1] for i in range(len(ALL_BYTES))]) == expected
    for i in range(len(ALL_BYTES) + 1):
        assert decode_chunks([ALL_BYTES[:i], ALL_BYTES[i:]]) == expected, i


def test_events_helper_stops_at_need_data_and_at_eof():
    dec = FrameDecoder()
    dec.feed(ALL_BYTES + b"\x00\x00")
    assert dec.events() == ALL_FRAMES
    assert dec.buffered == b"\x00\x00"
    dec.feed(b"\x00\x01\x04")
    dec.feed(b"")
    assert dec.events() == [Frame(FrameType.BYE, b""), EndOfStream()]


def test_encode_msg_refuses_empty_text():
    with pytest.raises(ValueError):
        encode_msg("")


def test_max_frame_is_below_2_24_so_the_first_byte_is_zero():
    assert encode_msg("x" * (DEFAULT_MAX_FRAME - 1))[0] == 0


# --------------------------------------------------------------------------
# FrameDecoder limits and end of stream
# --------------------------------------------------------------------------


@contextmanager
def raises_code(code: str):
    """pytest.raises(ProtocolError) that also checks the wire error code."""
    with pytest.raises(ProtocolError) as info:
        yield info
    assert info.value.code == code, (info.value.code, info.value.message)


def test_length_zero_is_bad_frame_as_soon_as_the_length_is_in():
    dec = FrameDecoder()
    dec.feed(b"\x00\x00\x00")
    assert dec.next_event() is NEED_DATA
    dec.feed(b"\x00")
    with raises_code("bad_frame"):
        dec.next_event()


@pytest.mark.parametrize("length", [HANDSHAKE_MAX + 1, 0x00FFFFFF, 0xFFFFFFFF])
def test_too_large_is_refused_before_the_payload(length):
    dec = FrameDecoder(HANDSHAKE_MAX)
    header = length.to_bytes(4, "big")
    for b in header[:3]:
        dec.feed(bytes([b]))
        assert dec.next_event() is NEED_DATA
    dec.feed(header[3:])  # no type byte, no payload: the length alone is enough
    with raises_code("frame_too_large") as info:
        dec.next_event()
    assert str(length) in info.value.message


def test_exactly_max_frame_is_accepted():
    dec = FrameDecoder(HANDSHAKE_MAX)
    wire = encode_msg("x" * (HANDSHAKE_MAX - 1))
    assert wire[:4] == HANDSHAKE_MAX.to_bytes(4, "big")
    dec.feed(wire)
    assert dec.next_event() == Frame(FrameType.MSG, b"x" * (HANDSHAKE_MAX - 1))


def test_max_frame_may_change_between_frames():
    big = encode_msg("y" * 5000)
    dec = FrameDecoder(HANDSHAKE_MAX)
    dec.feed(encode_hello("alice") + big)  # both in one read, as a fast client sends them
    assert dec.next_event().type == FrameType.HELLO
    dec.max_frame = DEFAULT_MAX_FRAME  # the server raises the limit after HELLO
    assert dec.next_event() == Frame(FrameType.MSG, b"y" * 5000)
    # and lowering it applies to the next frame too
    dec.max_frame = 100
    dec.feed(big)
    with raises_code("frame_too_large"):
        dec.next_event()


def test_eof_at_a_boundary_is_end_of_stream():
    dec = FrameDecoder()
    dec.feed(b"")
    assert dec.next_event() == EndOfStream()
    assert dec.next_event() == EndOfStream()  # and stays so
    assert decode_chunks([encode_msg("a"), encode_msg("b")]) == [
        Frame(2, b"a"), Frame(2, b"b"), EndOfStream()]


@pytest.mark.parametrize("cut", range(1, len(encode_msg("hello"))))
def test_eof_mid_frame_is_a_protocol_error(cut):
    dec = FrameDecoder()
    dec.feed(encode_msg("first") + encode_msg("hello")[:cut])
    assert dec.next_event() == Frame(2, b"first")
    dec.feed(b"")
    with raises_code("bad_frame"):
        dec.next_event()


# --------------------------------------------------------------------------
# Garbage never raises anything but ProtocolError and never hangs
# --------------------------------------------------------------------------


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # anything at all
        return rng.randbytes(rng.randrange(0, 80))
    if kind == 1:  # plausible small lengths, random types and payloads
        out = b""
        for _ in range(rng.randrange(1, 6)):
            payload = rng.randbytes(rng.randrange(0, 40))
            out += (len(payload) + rng.choice([0, 1, 1, 1, 2])).to_bytes(4, "big") + bytes(
                [rng.randrange(256)]) + payload
        return out
    if kind == 2:  # real frames with bytes flipped
        data = bytearray(rng.choice(TABLE)[2] + rng.choice(TABLE)[2])
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    # JSON-ish payloads in well-formed frames
    text = "".join(rng.choice('{}[]":,0123456789.eE-+ truefalsnul\\u"ab\xe9') for _ in range(rng.randrange(0, 60)))
    return encode_frame(rng.choice([1, 0x10, 0x11, 0x12, 0x13, 0x14, 0x1F]), text.encode())


def _split(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(len(data) + 1), k=min(len(data) + 1, rng.randrange(0, 4))))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def test_garbage_frames_only_raise_protocol_error():
    rng = random.Random(20240601)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        data = _garbage(rng)
        try:
            frames = decode_chunks(_split(rng, data), max_frame=rng.choice([HANDSHAKE_MAX, DEFAULT_MAX_FRAME]))
        except ProtocolError as err:
            assert err.code in ("bad_frame", "frame_too_large")
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        for frame in frames[:-1]:
            for check in (parse_hello, check_client_frame, Frame.json, Frame.text):
                try:
                    check(frame)
                except ProtocolError:
                    pass
    assert outcomes["ok"] > 100 and outcomes["error"] > 100  # the generator covers both paths


def test_deeply_nested_json_is_a_protocol_error_not_a_recursion_error():
    # Found by this file: json.loads raised RecursionError for b"[" * 1023, a
    # HELLO that fits the handshake limit.
    with raises_code("bad_hello"):
        parse_hello(Frame(FrameType.HELLO, b"[" * (HANDSHAKE_MAX - 1)))
    with raises_code("bad_frame"):
        decode_json(b'{"a":' * 50_000)


def test_garbage_lines_only_raise_protocol_error():
    rng = random.Random(7)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 60)) + rng.choice([b"", b"\n", b"\xff", b"\xff\xfa"])
        dec = LineDecoder(rng.choice([8, 32, 1024]))
        try:
            for chunk in _split(rng, data):
                if chunk:
                    dec.feed(chunk)
                    _drain_lines(dec)
            dec.feed(b"")
            lines = _drain_lines(dec)
        except ProtocolError as err:
            assert err.code == "frame_too_large"
            continue
        assert lines[-1] == EndOfStream()
        for line in lines[:-1]:
            assert isinstance(line, str)
            parse_client_line(line)
            try:
                parse_name_line(line)
            except ProtocolError as err:
                assert err.code == "bad_hello"


# --------------------------------------------------------------------------
# HELLO, names and rooms
# --------------------------------------------------------------------------


def hello_frame(obj) -> Frame:
    return Frame(FrameType.HELLO, json.dumps(obj).encode())


def test_parse_hello_valid():
    assert parse_hello(hello_frame({"version": 1, "name": "alice", "room": None})) == Hello("alice", None)
    assert parse_hello(hello_frame({"version": 1, "name": "alice"})) == Hello("alice", None)
    assert parse_hello(hello_frame({"version": 1, "name": "alice", "room": "r-1"})) == Hello("alice", "r-1")


def test_parse_hello_ignores_unknown_keys():
    obj = {"version": 1, "name": "bob", "room": "x", "future": {"a": [1, 2]}, "client": "other/9"}
    assert parse_hello(hello_frame(obj)) == Hello("bob", "x")


@pytest.mark.parametrize("version", [0, 2, 99, -1])
def test_parse_hello_other_versions_are_unsupported(version):
    with raises_code("unsupported_version") as info:
        parse_hello(hello_frame({"version": version, "name": "alice", "room": None}))
    assert str(version) in info.value.message


@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1], {"v": 1}])
def test_parse_hello_version_of_wrong_type_is_bad_hello(version):
    with raises_code("bad_hello"):
        parse_hello(hello_frame({"version": version, "name": "alice", "room": None}))


def test_parse_hello_version_missing_is_bad_hello():
    with raises_code("bad_hello"):
        parse_hello(hello_frame({"name": "alice", "room": None}))


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1, 2]", b'"alice"', b"null", b"\xff\xfe{}",
                                     b'{"version": 1, "name": "a"'])
def test_parse_hello_payload_not_a_json_object_is_bad_hello(payload):
    with raises_code("bad_hello"):
        parse_hello(Frame(FrameType.HELLO, payload))


@pytest.mark.parametrize("ftype", [FrameType.MSG, FrameType.NEXT, FrameType.PING, 0x07, 0x10])
def test_first_frame_not_hello_is_bad_hello(ftype):
    with raises_code("bad_hello"):
        parse_hello(Frame(ftype, b'{"version":1,"name":"alice","room":null}'))


@pytest.mark.parametrize("name", [None, 5, 1.5, True, ["alice"], {"n": "alice"}])
def test_parse_hello_name_of_wrong_type(name):
    with raises_code("bad_hello") as info:
        parse_hello(hello_frame({"version": 1, "name": name, "room": None}))
    assert NAME_RULE in info.value.message


def test_parse_hello_name_missing():
    with raises_code("bad_hello"):
        parse_hello(hello_frame({"version": 1, "room": None}))


@pytest.mark.parametrize("room", [5, True, [], {}, ""])
def test_parse_hello_room_of_wrong_type_or_empty(room):
    with raises_code("bad_hello") as info:
        parse_hello(hello_frame({"version": 1, "name": "alice", "room": room}))
    assert ROOM_RULE in info.value.message


GOOD_NAMES = [
    "alice", "A", "Zoë", "Łukasz", "李小龙", "Ωmega", "ǅ",  # letters: Lu Ll Lo Lt
    "ʰi",  # Lm
    "r2d2", "007", "٣٤٥", "१२३", "４２",  # Nd, including Arabic-Indic, Devanagari, fullwidth
    "_", "-", ".", "a_b-c.d", "x" * 32,
]
BAD_NAMES = [
    "", " ", "a b", "alice ", "\talice", "a\nb", "a\x00", "a\x1b[31m",
    "a😀", "😀", "a!", "a,b", "a@b", "a/b", "a:b", "'", '"', "a+b",
    "²", "Ⅻ", "½",  # numbers that are not decimal digits (No, Nl)
    "e\u0301",  # combining mark (Mn) is neither a letter nor a digit
    "a\u200b", "a\u202eb",  # format characters
    "x" * 33,
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name):
    assert parse_hello(hello_frame({"version": 1, "name": name, "room": None})).name == name
    assert parse_hello(hello_frame({"version": 1, "name": "a", "room": name})).room == name
    assert parse_name_line(f"{name} {name}") == Hello(name, name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_and_rooms(name):
    with raises_code("bad_hello") as info:
        parse_hello(hello_frame({"version": 1, "name": name, "room": None}))
    assert NAME_RULE in info.value.message
    if len(name) <= 32:  # (33 characters is a fine room)
        with raises_code("bad_hello") as info:
            parse_hello(hello_frame({"version": 1, "name": "alice", "room": name}))
        assert ROOM_RULE in info.value.message


def test_room_length_limits():
    assert parse_hello(hello_frame({"version": 1, "name": "a", "room": "r" * 33})).room == "r" * 33
    assert parse_hello(hello_frame({"version": 1, "name": "a", "room": "r" * 64})).room == "r" * 64
    assert parse_hello(hello_frame({"version": 1, "name": "a", "room": "é" * 64})).room == "é" * 64
    with raises_code("bad_hello"):
        parse_hello(hello_frame({"version": 1, "name": "a", "room": "r" * 65}))
    with raises_code("bad_hello"):
        parse_hello(hello_frame({"version": 1, "name": "é" * 33, "room": None}))


def test_parse_hello_accepts_raw_utf8_json():
    frame = Frame(FrameType.HELLO, '{"version":1,"name":"Zoë","room":"café"}'.encode())
    assert parse_hello(frame) == Hello("Zoë", "café")


@pytest.mark.parametrize("line, expected", [
    ("alice", Hello("alice", None)),
    ("alice room1", Hello("alice", "room1")),
    ("  alice   room1  ", Hello("alice", "room1")),
    ("alice\troom1", Hello("alice", "room1")),
    ("Zoë café", Hello("Zoë", "café")),
    ("x" * 32 + " " + "r" * 64, Hello("x" * 32, "r" * 64)),
])
def test_parse_name_line_ok(line, expected):
    assert parse_name_line(line) == expected


@pytest.mark.parametrize("line", ["", "   ", "a b c", "al!ce", "alice r!", "x" * 33, "alice " + "r" * 65,
                                  "😀", "\ufffd"])
def test_parse_name_line_refused(line):
    with raises_code("bad_hello") as info:
        parse_name_line(line)
    assert NAME_RULE in info.value.message or ROOM_RULE in info.value.message


def test_a_bad_second_word_is_named_as_the_room_it_was_taken_for():
    """A person who typed "bad name!" meant a name: the error says the second word was read as a room."""
    with raises_code("bad_hello") as info:
        parse_name_line("bad name!")
    assert "NAME or NAME ROOM" in info.value.message and "'name!' is not a room code" in info.value.message


# --------------------------------------------------------------------------
# Line mode
# --------------------------------------------------------------------------


def _drain_lines(dec: LineDecoder) -> list:
    out = []
    for _ in range(len(dec.buffered) + 2):
        item = dec.next_line()
        if item is NEED_DATA:
            return out
        out.append(item)
        if isinstance(item, EndOfStream):
            return out
    raise AssertionError("line decoder made no progress")


def decode_lines(chunks, max_line: int = 1024) -> list:
    dec = LineDecoder(max_line)
    out = []
    for chunk in chunks:
        if chunk:
            dec.feed(chunk)
            out += _drain_lines(dec)
    dec.feed(b"")
    out += _drain_lines(dec)
    return out


IAC_WILL_ECHO = b"\xff\xfb\x01"
IAC_DO_SGA = b"\xff\xfd\x03"
IAC_WONT, IAC_DONT = b"\xff\xfc\x22", b"\xff\xfe\x18"
IAC_SB_TTYPE = b"\xff\xfa\x18\x00xterm-256color\xff\xf0"
IAC_SB_WITH_ESCAPED_IAC = b"\xff\xfa\x18\x00a\xff\xffb\xff\xf0"
IAC_NOP = b"\xff\xf1"

LINE_CASES = [
    ("lf", b"hello\nworld\n", ["hello", "world"]),
    ("crlf", b"hello\r\nworld\r\n", ["hello", "world"]),
    ("cr-only-before-newline-dropped", b"a\rb\r\n", ["a\rb"]),
    ("empty-lines", b"\n\r\n\n", ["", "", ""]),
    ("utf8", "Zoë café 👋\r\n".encode(), ["Zoë café 👋"]),
    ("invalid-utf8", b"caf\xe9 ok\n\xc3\n", ["caf\ufffd ok", "\ufffd"]),
    ("telnet-negotiation", IAC_WILL_ECHO + IAC_DO_SGA + b"alice\r\n" + IAC_WONT + IAC_DONT + b"hi\r\n",
     ["alice", "hi"]),
    ("telnet-subnegotiation", IAC_SB_TTYPE + b"al" + IAC_NOP + b"ice" + IAC_SB_WITH_ESCAPED_IAC + b"\r\n",
     ["alice"]),
    ("iac-iac", b"a\xff\xffb\n", ["ab"]),
    ("last-line-without-newline", b"one\ntwo", ["one", "two"]),
    ("last-line-cr-without-newline", b"one\r", ["one"]),
]


@pytest.mark.parametrize("data, lines", [c[1:] for c in LINE_CASES], ids=[c[0] for c in LINE_CASES])
def test_line_decoder_every_split(data, lines):
    expected = [*lines, EndOfStream()]
    assert decode_lines([data]) == expected
    assert decode_lines([data[i:i + 1] for i in range(len(data))]) == expected
    for i in range(len(data) + 1):
        assert decode_lines([data[:i], data[i:]]) == expected, i
        for j in range(i, len(data) + 1):
            assert decode_lines([data[:i], data[i:j], data[j:]]) == expected, (i, j)


def test_line_decoder_eof_with_nothing_buffered():
    dec = LineDecoder(10)
    dec.feed(b"")
    assert dec.next_line() == EndOfStream()


def test_line_decoder_need_data_and_buffered():
    dec = LineDecoder(100)
    dec.feed(b"par")
    assert dec.next_line() is NEED_DATA
    assert dec.buffered == b"par"


def test_long_line_refused_as_soon_as_known():
    dec = LineDecoder(10)
    for _ in range(10):
        dec.feed(b"x")
        assert dec.next_line() is NEED_DATA
    dec.feed(b"x")  # 11 bytes, no newline: no need to wait for one
    with raises_code("frame_too_large"):
        dec.next_line()


def test_long_line_in_one_read_with_newline():
    dec = LineDecoder(10)
    dec.feed(b"ok\n" + b"x" * 11 + b"\n")
    assert dec.next_line() == "ok"
    with raises_code("frame_too_large"):
        dec.next_line()


def test_long_last_line_at_eof():
    dec = LineDecoder(10)
    dec.feed(b"x" * 11)
    dec.feed(b"")
    with raises_code("frame_too_large"):
        dec.next_line()


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
def test_line_of_exactly_the_limit_is_fine_whatever_its_ending(ending):
    # The limit counts the line, not its ending: telnet (CRLF) and netcat (LF)
    # users get the same limit. (Found by this file: CRLF used to cost a byte.)
    data = b"x" * 10 + ending
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))]):
        assert decode_lines(chunks, max_line=10) == ["x" * 10, EndOfStream()]


def test_cr_at_the_limit_then_more_bytes_is_too_long():
    dec = LineDecoder(10)
    dec.feed(b"x" * 10 + b"\r")
    assert dec.next_line() is NEED_DATA  # not known yet: "\n" may follow
    dec.feed(b"y")
    with raises_code("frame_too_large"):
        dec.next_line()


def test_iac_bytes_do_not_count_towards_the_limit():
    dec = LineDecoder(5)
    dec.feed(IAC_SB_TTYPE + b"hello" + IAC_WILL_ECHO * 10 + b"\n")
    assert dec.next_line() == "hello"


def test_max_line_may_change_between_lines():
    dec = LineDecoder(HANDSHAKE_MAX)
    dec.feed(b"alice\n" + b"z" * 2000 + b"\n")
    assert dec.next_line() == "alice"
    dec.max_line = DEFAULT_MAX_FRAME - 1
    assert dec.next_line() == "z" * 2000


@pytest.mark.parametrize("line, expected", [
    ("/next", LineCommand(LineKind.NEXT)),
    ("/quit", LineCommand(LineKind.QUIT)),
    ("/help", LineCommand(LineKind.HELP)),
    ("/NEXT", LineCommand(LineKind.NEXT)),
    ("/next  ", LineCommand(LineKind.NEXT)),
    ("//x", LineCommand(LineKind.MSG, "/x")),
    ("//next", LineCommand(LineKind.MSG, "/next")),
    ("//", LineCommand(LineKind.MSG, "/")),
    ("/nope", LineCommand(LineKind.UNKNOWN, "/nope")),
    ("/nope with args", LineCommand(LineKind.UNKNOWN, "/nope")),
    ("/", LineCommand(LineKind.UNKNOWN, "/")),
    ("", LineCommand(LineKind.EMPTY)),
    ("   ", LineCommand(LineKind.EMPTY)),
    ("\t", LineCommand(LineKind.EMPTY)),
    ("hello", LineCommand(LineKind.MSG, "hello")),
    ("  hello  ", LineCommand(LineKind.MSG, "  hello  ")),
    ("a /next", LineCommand(LineKind.MSG, "a /next")),
    ("héllo 👋", LineCommand(LineKind.MSG, "héllo 👋")),
])
def test_parse_client_line(line, expected):
    assert parse_client_line(line) == expected


# --------------------------------------------------------------------------
# check_client_frame (server side, after HELLO)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    Frame(FrameType.MSG, b"hi"), Frame(FrameType.MSG, "👋".encode()), Frame(FrameType.NEXT, b""),
    Frame(FrameType.BYE, b""), Frame(FrameType.PING, b""), Frame(FrameType.PING, b"p" * 64),
    Frame(FrameType.PONG, b"p" * 64),
])
def test_client_frames_accepted(frame):
    check_client_frame(frame)


@pytest.mark.parametrize("frame", [
    Frame(FrameType.MSG, b""), Frame(FrameType.MSG, b"\xff"), Frame(FrameType.MSG, b"caf\xc3"),
    Frame(FrameType.PING, b"p" * 65), Frame(FrameType.PONG, b"p" * 65), Frame(FrameType.HELLO, b"{}"),
    *[Frame(t, b"{}") for t in [0x00, *range(0x07, 0x10), *range(0x10, 0x20), 0x20, 0xFF]],
])
def test_client_frames_refused_with_bad_frame(frame):
    with raises_code("bad_frame"):
        check_client_frame(frame)


# --------------------------------------------------------------------------
# Section 5: sanitize
# --------------------------------------------------------------------------

BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]
CONTROLS = [cp for cp in range(0x20) if cp not in (0x09, 0x0A)] + [0x7F, *range(0x80, 0xA0)] + BIDI


def _dangerous(ch: str) -> bool:
    cp = ord(ch)
    return (unicodedata.category(ch) == "Cc" and ch not in "\t\n") or cp in BIDI


@pytest.mark.parametrize("cp", CONTROLS, ids=[f"U+{cp:04X}" for cp in CONTROLS])
def test_every_control_becomes_visible_text(cp):
    for func in (sanitize, sanitize_name):
        out = func(f"a{chr(cp)}b")
        assert not any(_dangerous(ch) for ch in out), (cp, out)
        assert out.startswith("a") and out.endswith("b")
        assert len(out) > 2  # made visible, not silently dropped
        assert out.isprintable()


@pytest.mark.parametrize("text, shown", [
    ("\x1b", "^["), ("\x07", "^G"), ("\x00", "^@"), ("\r", "^M"), ("\x7f", "^?"), ("\x9b", "\\x9b"),
    ("\u202e", "<U+202E>"), ("\u2066", "<U+2066>"),
])
def test_sanitize_representations(text, shown):
    assert sanitize(text) == shown


@pytest.mark.parametrize("attack", [
    "\x1b[2J\x1b[H",  # clear screen, cursor home
    "\x1b]0;pwned\x07",  # set the window title
    "\x1b]8;;https://evil.example\x1b\\click me\x1b]8;;\x1b\\",  # OSC 8 hyperlink
    "\x9b31m red via C1 CSI \x9d0;title\x9c",
    "abc\u202edcba\u2069",  # bidi reordering
    "line\roverwrite",
])
def test_sanitize_defuses_terminal_attacks(attack):
    for func in (sanitize, sanitize_name):
        out = func(attack)
        assert not any(_dangerous(ch) for ch in out)
        assert "\x1b" not in out and "\x07" not in out and "\r" not in out


@pytest.mark.parametrize("text", ["hello", "tab\there", "line1\nline2\n", "emoji 😀👍🏽 👨‍👩‍👧", "中文 Zoë",
                                  "", "a \\ b ^ c < U+202E >"])
def test_sanitize_leaves_plain_text_alone(text):
    assert sanitize(text) == text


def test_sanitize_name_also_flattens_tab_and_newline():
    out = sanitize_name("bob\n\tmallory")
    assert "\n" not in out and "\t" not in out
    assert out.startswith("bob") and out.endswith("mallory")
    assert sanitize_name("Zoë_李-1.x") == "Zoë_李-1.x"


def test_sanitize_random_text_never_leaves_a_control():
    rng = random.Random(99)
    pool = [chr(cp) for cp in CONTROLS] + list("ab \t\n😀é李") + ["\u2028", "\u200f"]
    for _ in range(2000):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(0, 20)))
        assert not any(_dangerous(ch) for ch in sanitize(text))
        name = sanitize_name(text)
        assert not any(_dangerous(ch) for ch in name) and "\n" not in name and "\t" not in name


# --------------------------------------------------------------------------
# Banner
# --------------------------------------------------------------------------


def test_make_banner_exact():
    assert make_banner("chatpair/0.1.0") == b"CHATPAIR/1 chatpair/0.1.0 type your name and press Enter\r\n"


@pytest.mark.parametrize("text", ["", "x" * 500, "héllo wörld " * 40, "😀" * 100])
def test_make_banner_is_short_ascii_and_ends_crlf(text):
    banner = make_banner("chatpair/0.1.0", text)
    assert len(banner) <= MAX_BANNER == 200
    assert banner.endswith(b"\r\n") and banner.count(b"\n") == 1
    assert banner.startswith(b"CHATPAIR/1 ")
    banner.decode("ascii")
    assert check_banner(banner).startswith("chatpair/0.1.0")


def test_check_banner():
    assert check_banner(make_banner("chatpair/0.1.0")) == "chatpair/0.1.0 type your name and press Enter"
    assert check_banner(b"CHATPAIR/1 other/2 hi\r\n") == "other/2 hi"


@pytest.mark.parametrize("line", [b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 400 Bad Request\r\n", b"",
                                  b"CHATPAIR/2 future\r\n", b"chatpair/1 lower\r\n", b"CHATPAIR/1"])
def test_check_banner_refuses_other_servers(line):
    with pytest.raises(ProtocolError) as info:
        check_banner(line)
    assert info.value.message == "not a chatpair server"
