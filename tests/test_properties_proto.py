"""Property-based tests (hypothesis) of the sans-IO protocol: decoders, handshake, sanitizer.

``tests/test_fuzz.py`` throws seeded random and mutated inputs at the same
parsers (and ``scripts/fuzz.py`` at a live server, for as long as you like).
Here each rule of PROTOCOL.md sections 2-5 is stated as a property over a
whole input space - every way a byte stream can be split, every name, every
byte string - and hypothesis searches that space and shrinks a failure to a
minimal example.

Every test has fixed settings: ``derandomize=True`` (the examples depend only
on the test, so CI never flakes) and no example database (nothing is written
to the work tree). To search harder locally, scale the example counts::

    CHATPAIR_HYPOTHESIS_SCALE=50 pytest tests/test_properties_proto.py
"""

from __future__ import annotations

import itertools
import json
import os
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatpair.proto import (
    BANNER_PREFIX,
    DEFAULT_MAX_FRAME,
    HANDSHAKE_MAX,
    HEADER,
    MAX_BANNER,
    MAX_NAME,
    MAX_PING_PAYLOAD,
    MAX_ROOM,
    NEED_DATA,
    EndOfStream,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    LineDecoder,
    LineKind,
    ProtocolError,
    check_banner,
    check_client_frame,
    encode_frame,
    encode_hello,
    encode_json_frame,
    encode_msg,
    make_banner,
    parse_client_line,
    parse_hello,
    parse_name_line,
    sanitize,
    sanitize_name,
    split_utf8,
    validate_name,
    validate_room,
)

_SCALE = max(1, int(os.environ.get("CHATPAIR_HYPOTHESIS_SCALE", "1")))


def cfg(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples * _SCALE,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


BAD_FRAME = ErrorCode.BAD_FRAME.value
TOO_LARGE = ErrorCode.FRAME_TOO_LARGE.value
BAD_HELLO = ErrorCode.BAD_HELLO.value
UNSUPPORTED = ErrorCode.UNSUPPORTED_VERSION.value


# --------------------------------------------------------------------------
# Strategies and drivers
# --------------------------------------------------------------------------


@st.composite
def splits(draw, data: bytes) -> list[bytes]:
    """``data`` cut into non-empty chunks at arbitrary points (``b""`` would mean EOF)."""
    if len(data) <= 1:
        return [data] if data else []
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=min(len(data) - 1, 40))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


@st.composite
def valid_frames(draw, max_frame: int = 300) -> Frame:
    """A frame the decoder must accept: any type, payload within max_frame, no empty MSG."""
    ftype = draw(st.integers(0, 255))
    payload = draw(st.binary(min_size=1 if ftype == FrameType.MSG else 0, max_size=max_frame - 1))
    return Frame(ftype, payload)


def wire(frames: list[Frame]) -> bytes:
    return b"".join(encode_frame(f.type, f.payload) for f in frames)


def decode_frames(chunks: list[bytes], max_frame: int) -> tuple[list[Frame], str | None]:
    """Feed chunks, draining after each, then EOF: (frames, error code or None).

    Also checks the hand-over rule at every step: the bytes fed so far are
    exactly the frames returned followed by ``buffered``.
    """
    dec = FrameDecoder(max_frame)
    frames: list[Frame] = []
    fed = consumed = 0
    try:
        for chunk in chunks:
            assert chunk
            dec.feed(chunk)
            fed += len(chunk)
            while (ev := dec.next_event()) is not NEED_DATA:
                assert isinstance(ev, Frame), f"{ev!r} before end of stream"
                frames.append(ev)
                consumed += 4 + 1 + len(ev.payload)
            assert len(dec.buffered) == fed - consumed
            assert len(dec.buffered) < 4 + max_frame  # never more than one partial frame held
        dec.feed(b"")
        while True:
            ev = dec.next_event()
            assert ev is not NEED_DATA, "NEED_DATA after end of stream"
            if isinstance(ev, EndOfStream):
                break
            frames.append(ev)
    except ProtocolError as exc:
        return frames, exc.code
    return frames, None


def decode_lines(chunks: list[bytes], max_line: int) -> tuple[list[str], str | None]:
    """Feed chunks, draining after each, then EOF: (lines, error code or None)."""
    dec = LineDecoder(max_line)
    lines: list[str] = []
    try:
        for chunk in chunks:
            assert chunk
            dec.feed(chunk)
            while (ev := dec.next_line()) is not NEED_DATA:
                assert isinstance(ev, str), f"{ev!r} before end of stream"
                lines.append(ev)
            # an unfinished line is refused as soon as it is known to be over the limit
            # (PROTOCOL.md section 2), not held: only its CR may wait for the LF or NUL
            held = dec.buffered
            assert len(held) <= max_line or (len(held) == max_line + 1 and held.endswith(b"\r")), held
        dec.feed(b"")
        while True:
            ev = dec.next_line()
            assert ev is not NEED_DATA, "NEED_DATA after end of stream"
            if isinstance(ev, EndOfStream):
                break
            lines.append(ev)
    except ProtocolError as exc:
        return lines, exc.code
    return lines, None


# --------------------------------------------------------------------------
# FrameDecoder (section 3)
# --------------------------------------------------------------------------


@cfg(150)
@given(frames=st.lists(valid_frames(), max_size=8), data=st.data())
def test_valid_frames_decode_the_same_however_the_stream_is_split(frames, data):
    stream = wire(frames)
    chunks = data.draw(splits(stream), label="chunks")
    assert decode_frames(chunks, 300) == (frames, None)
    assert decode_frames(bytewise(stream), 300) == (frames, None)


@cfg(60)
@given(frames=st.lists(valid_frames(), max_size=4), data=st.data())
def test_a_frame_of_exactly_max_frame_is_accepted(frames, data):
    max_frame = data.draw(st.integers(1, 2000), label="max_frame")
    ftype = data.draw(st.sampled_from([FrameType.MSG, FrameType.HELLO, 0x42]), label="type")
    if ftype == FrameType.MSG and max_frame == 1:
        ftype = FrameType.NEXT  # a MSG cannot be empty: the smallest MSG is 2 bytes long
    big = Frame(ftype, b"x" * (max_frame - 1))
    small = [f for f in frames if len(f.payload) < max_frame]
    stream = wire([*small, big])
    assert decode_frames(data.draw(splits(stream), label="chunks"), max_frame) == ([*small, big], None)


@st.composite
def hostile_streams(draw) -> bytes:
    """Mostly-plausible garbage: valid frames, random headers, random bytes, spliced."""
    part = st.one_of(
        valid_frames().map(lambda f: encode_frame(f.type, f.payload)),
        st.binary(max_size=12),
        st.builds(lambda n, t, p: HEADER.pack(n, t) + p,
                  st.integers(0, 400), st.integers(0, 255), st.binary(max_size=20)),
        st.builds(lambda n: n.to_bytes(4, "big"), st.integers(0, 2**32 - 1)),
    )
    return b"".join(draw(st.lists(part, max_size=6)))


@cfg(200)
@given(stream=hostile_streams(), max_frame=st.integers(1, 400), data=st.data())
def test_arbitrary_bytes_raise_only_protocol_error_and_never_depend_on_the_split(stream, max_frame, data):
    whole = decode_frames([stream] if stream else [], max_frame)
    frames, code = whole
    assert code in (None, BAD_FRAME, TOO_LARGE)
    assert all(len(f.payload) + 1 <= max_frame for f in frames)
    assert not any(f.type == FrameType.MSG and not f.payload for f in frames)
    assert decode_frames(data.draw(splits(stream), label="chunks"), max_frame) == whole
    assert decode_frames(bytewise(stream), max_frame) == whole


@cfg(100)
@given(frames=st.lists(valid_frames(), max_size=5), last=valid_frames(), data=st.data())
def test_a_trailing_partial_frame_waits_then_is_bad_frame_at_end_of_stream(frames, last, data):
    encoded = encode_frame(last.type, last.payload)
    cut = data.draw(st.integers(1, len(encoded) - 1), label="cut")
    partial = encoded[:cut]
    stream = wire(frames) + partial
    dec = FrameDecoder(300)
    got = []
    for chunk in data.draw(splits(stream), label="chunks"):
        dec.feed(chunk)
        while (ev := dec.next_event()) is not NEED_DATA:
            got.append(ev)
    assert got == frames
    assert dec.next_event() is NEED_DATA
    assert dec.buffered == partial  # what a hand-over passes on
    dec.feed(b"")
    with pytest.raises(ProtocolError) as err:
        dec.next_event()
    assert err.value.code == BAD_FRAME


@cfg(150)
@given(
    frames=st.lists(valid_frames(), max_size=4),
    max_frame=st.sampled_from([1, 2, 300, HANDSHAKE_MAX, DEFAULT_MAX_FRAME]),
    data=st.data(),
)
def test_an_oversized_length_is_refused_as_soon_as_its_four_bytes_are_in(frames, max_frame, data):
    length = data.draw(st.integers(max_frame + 1, 2**32 - 1), label="length")
    small = [f for f in frames if len(f.payload) < max_frame]
    dec = FrameDecoder(max_frame)
    got = []
    for chunk in data.draw(splits(wire(small)), label="chunks"):
        dec.feed(chunk)
        while (ev := dec.next_event()) is not NEED_DATA:
            got.append(ev)
    assert got == small
    header = length.to_bytes(4, "big")
    for i in range(3):  # byte by byte: before the 4th byte it may wait, or refuse early
        dec.feed(header[i:i + 1])
        try:
            assert dec.next_event() is NEED_DATA
        except ProtocolError as exc:  # refusing even earlier is allowed
            assert exc.code == TOO_LARGE
            return
    dec.feed(header[3:])  # the 4th byte: known now, refused now, no payload waited for
    with pytest.raises(ProtocolError) as err:
        dec.next_event()
    assert err.value.code == TOO_LARGE


@cfg(60)
@given(frames=st.lists(valid_frames(), max_size=3), more=st.binary(max_size=10), data=st.data())
def test_length_zero_and_an_empty_msg_are_bad_frame_when_their_header_is_in(frames, more, data):
    bad = data.draw(st.sampled_from([b"\0\0\0\0", HEADER.pack(1, FrameType.MSG)]), label="bad header")
    stream = wire(frames) + bad
    assert decode_frames(data.draw(splits(stream), label="chunks"), 300) == (frames, BAD_FRAME)
    assert decode_frames(bytewise(stream + more), 300) == (frames, BAD_FRAME)


@cfg(60)
@given(hello=valid_frames(max_frame=HANDSHAKE_MAX),
       size=st.integers(HANDSHAKE_MAX + 1, 4 * HANDSHAKE_MAX), data=st.data())
def test_max_frame_raised_after_the_first_frame_applies_to_bytes_already_buffered(hello, size, data):
    """The server starts at HANDSHAKE_MAX and raises the limit after HELLO; a big
    MSG that arrived in the same read as HELLO must not be judged by the old limit."""
    big = Frame(FrameType.MSG, b"x" * (size - 1))
    dec = FrameDecoder(HANDSHAKE_MAX)
    got = []
    for chunk in data.draw(splits(wire([hello, big])), label="chunks"):
        dec.feed(chunk)
        while (ev := dec.next_event()) is not NEED_DATA:
            got.append(ev)
            dec.max_frame = DEFAULT_MAX_FRAME
    assert got == [hello, big]


# --------------------------------------------------------------------------
# Encoders and split_utf8
# --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@cfg(60)
@given(ftype=st.sampled_from(list(FrameType)), obj=st.dictionaries(st.text(), json_values, max_size=5),
       data=st.data())
def test_json_frames_round_trip_through_the_decoder(ftype, obj, data):
    encoded = encode_json_frame(ftype, obj)
    frames, code = decode_frames(data.draw(splits(encoded), label="chunks"), DEFAULT_MAX_FRAME)
    assert code is None and [f.type for f in frames] == [ftype]
    assert frames[0].json() == obj


@cfg(100)
@given(text=st.text(min_size=1), data=st.data())
def test_msg_round_trips_through_the_decoder(text, data):
    encoded = encode_msg(text)
    frames, code = decode_frames(data.draw(splits(encoded), label="chunks"), len(encoded) - 4)  # exactly fits
    assert code is None and len(frames) == 1
    check_client_frame(frames[0])
    assert frames[0].text() == text


@cfg(200)
@given(text=st.text(), max_bytes=st.integers(1, 40))
@example(text="a\U0001F600b", max_bytes=4)
@example(text="\U0001F600", max_bytes=2)
def test_split_utf8_pieces_are_whole_characters_within_the_limit(text, max_bytes):
    pieces = split_utf8(text, max_bytes)
    assert b"".join(pieces) == text.encode()
    decoded = [p.decode("utf-8") for p in pieces]  # each piece valid UTF-8 on its own
    assert all(pieces), "an empty piece would be an empty (bad_frame) MSG"
    for piece, chars in zip(pieces, decoded):
        # within the limit, or (only possible when max_bytes < 4) one character on its own
        assert len(piece) <= max_bytes or len(chars) == 1
    if max_bytes >= 4:
        assert all(len(p) <= max_bytes for p in pieces)
    for piece, following in zip(pieces, decoded[1:]):  # greedy: no piece could take one more character
        assert len(piece) + len(following[0].encode()) > max_bytes


# --------------------------------------------------------------------------
# What a client may send (section 3)
# --------------------------------------------------------------------------


@cfg(150)
@given(payload=st.one_of(st.binary(max_size=80), st.text(max_size=40).map(str.encode),
                         st.integers(MAX_PING_PAYLOAD - 2, MAX_PING_PAYLOAD + 2).map(lambda n: b"p" * n)))
@example(payload=b"p" * MAX_PING_PAYLOAD)
@example(payload=b"p" * (MAX_PING_PAYLOAD + 1))
@example(payload=b"")
@example(payload=b"\xed\xa0\x80")  # an encoded surrogate: not UTF-8
def test_check_client_frame_accepts_exactly_what_a_client_may_send(payload):
    try:
        payload.decode("utf-8")
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    for ftype in range(256):  # every type code, reserved and server-only ones included
        if ftype == FrameType.MSG:
            ok = bool(payload) and utf8
        elif ftype in (FrameType.PING, FrameType.PONG):
            ok = len(payload) <= MAX_PING_PAYLOAD
        else:
            ok = ftype in (FrameType.NEXT, FrameType.BYE)
        try:
            check_client_frame(Frame(ftype, payload))
        except ProtocolError as exc:
            assert not ok, f"refused a valid frame of type 0x{ftype:02x}: {exc}"
            assert exc.code == BAD_FRAME
        else:
            assert ok, f"accepted type 0x{ftype:02x} with {payload!r}"


# --------------------------------------------------------------------------
# LineDecoder (section 4)
# --------------------------------------------------------------------------

#: Line text: anything but the line ends (CR, LF); NUL is allowed inside a line.
line_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30)
ENDINGS = [b"\n", b"\r\n", b"\r\0"]


@st.composite
def typed_lines(draw) -> tuple[list[str], bytes]:
    """(expected lines, bytes): each line ended by LF, CR LF or CR NUL; maybe a last unended line."""
    lines = draw(st.lists(line_text, max_size=8))
    ends = draw(st.lists(st.sampled_from(ENDINGS), min_size=len(lines), max_size=len(lines)))
    tail = draw(st.one_of(st.just(""), line_text))
    stream = b"".join(line.encode() + end for line, end in zip(lines, ends)) + tail.encode()
    return (lines + [tail] if tail else lines), stream


@cfg(150)
@given(case=typed_lines(), data=st.data())
def test_lines_decode_the_same_however_ended_and_split(case, data):
    lines, stream = case
    assert decode_lines(data.draw(splits(stream), label="chunks"), HANDSHAKE_MAX) == (lines, None)
    assert decode_lines(bytewise(stream), HANDSHAKE_MAX) == (lines, None)


iac_sequences = st.one_of(
    st.integers(240, 249).map(lambda c: bytes([0xFF, c])),  # IAC NOP, IAC GA, ...
    st.builds(lambda c, opt: bytes([0xFF, c, opt]), st.integers(251, 254), st.integers(0, 255)),  # WILL..DONT
    st.lists(st.one_of(st.integers(0, 255), st.sampled_from([0xFF, 0xF0, 0x0A, 0x0D, 0x00])), max_size=8)
    .map(lambda b: b"\xff\xfa" + bytes(b).replace(b"\xff", b"\xff\xff") + b"\xff\xf0"),  # SB..SE, IAC doubled
)


@cfg(150)
@given(case=typed_lines(), data=st.data())
def test_telnet_iac_sequences_anywhere_never_change_the_lines(case, data):
    lines, stream = case
    inserts = data.draw(st.lists(st.tuples(st.integers(0, len(stream)), iac_sequences), max_size=5), label="iac")
    noisy = bytearray(stream)
    for pos, seq in sorted(inserts, reverse=True):  # from the back, so positions stay valid
        noisy[pos:pos] = seq
    noisy = bytes(noisy)
    assert decode_lines(data.draw(splits(noisy), label="chunks"), HANDSHAKE_MAX) == (lines, None)
    assert decode_lines(bytewise(noisy), HANDSHAKE_MAX) == (lines, None)


@cfg(150)
@given(case=typed_lines(), max_line=st.integers(1, 20), data=st.data())
def test_a_line_over_max_line_bytes_is_frame_too_large_and_earlier_lines_still_arrive(case, max_line, data):
    lines, stream = case
    expected: tuple[list[str], str | None] = (lines, None)
    for i, line in enumerate(lines):
        if len(line.encode()) > max_line:  # the limit counts bytes, not the CR LF ending
            expected = (lines[:i], TOO_LARGE)
            break
    assert decode_lines(data.draw(splits(stream), label="chunks"), max_line) == expected
    assert decode_lines(bytewise(stream), max_line) == expected


@cfg(100)
@given(raw=st.binary(max_size=40).map(lambda b: bytes(c for c in b if c not in b"\r\n\0\xff")), data=st.data())
@example(raw=b"caf\xc3\xa9 \xc3 \xe2\x82", data=None)
def test_bytes_that_are_not_utf8_become_replacement_characters_however_split(raw, data):
    """People type; they are not refused for it. A character cut between two reads is not broken."""
    stream = raw + b"\n"
    chunks = data.draw(splits(stream), label="chunks") if data is not None else bytewise(stream)
    assert decode_lines(chunks, HANDSHAKE_MAX) == ([raw.decode("utf-8", "replace")], None)


@cfg(200)
@given(
    stream=st.lists(
        st.one_of(st.binary(max_size=12), st.sampled_from([b"\r", b"\n", b"\0", b"\r\0", b"\xff", b"\xff\xfa"]),
                  iac_sequences),
        max_size=12,
    ).map(b"".join),
    max_line=st.integers(1, 30),
    data=st.data(),
)
def test_arbitrary_line_bytes_raise_only_protocol_error_and_never_depend_on_the_split(stream, max_line, data):
    whole = decode_lines([stream] if stream else [], max_line)
    lines, code = whole
    assert code in (None, TOO_LARGE)
    for line in lines:
        assert "\n" not in line
        assert len(line) <= max_line  # one character per raw byte at most (U+FFFD replaces >= 1)
    assert decode_lines(data.draw(splits(stream), label="chunks"), max_line) == whole
    assert decode_lines(bytewise(stream), max_line) == whole


# --------------------------------------------------------------------------
# Typed line commands (section 4)
# --------------------------------------------------------------------------


@cfg(200)
@given(line=st.one_of(line_text, line_text.map(lambda s: "/" + s), line_text.map(lambda s: "//" + s),
                      st.text(st.sampled_from(" \t\x0b\x0c\u3000"), max_size=3),  # blank
                      st.sampled_from(["/next", "/QUIT", " /help ", "/next now", "/", "//", "/ping"])))
@example(line=" ")
def test_a_typed_line_is_a_message_a_command_or_nothing(line):
    cmd = parse_client_line(line)
    if not line.strip():
        assert cmd.kind is LineKind.EMPTY
    elif line.startswith("//"):
        assert cmd.kind is LineKind.MSG and cmd.text == line[1:]  # "//x" sends "/x"
    elif line.startswith("/"):
        assert cmd.kind is not LineKind.MSG  # a command or unknown: never sent as a message
        if cmd.kind is LineKind.UNKNOWN:
            assert cmd.text.startswith("/")
        else:
            assert cmd.kind in (LineKind.NEXT, LineKind.QUIT, LineKind.HELP)
            assert line.strip().lower() == "/" + cmd.kind.value
    else:
        assert cmd.kind is LineKind.MSG and cmd.text == line  # sent exactly as typed
    if cmd.kind is LineKind.MSG:
        assert cmd.text.strip(), "an empty MSG is bad_frame"


# --------------------------------------------------------------------------
# Handshake: names, rooms, HELLO, the first line, the banner (sections 1-4)
# --------------------------------------------------------------------------

_LETTER_OR_DIGIT = {"Lu", "Ll", "Lt", "Lm", "Lo", "Nd"}


def token_ok(value: object, max_len: int) -> bool:
    """PROTOCOL.md: 1..max_len characters, each a letter (L*), a digit (Nd) or one of _ - ."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= max_len
        and all(ch in "_-." or unicodedata.category(ch) in _LETTER_OR_DIGIT for ch in value)
    )


#: Characters a name may hold, including 4-byte letters: the limit counts characters, not bytes.
name_chars = st.one_of(
    st.characters(whitelist_categories=("Lu", "Ll", "Lt", "Lm", "Lo", "Nd")),
    st.sampled_from("_-.aZ9\U0001D400\u00e9\u4e2d"),
)
#: Near misses: space, controls, combining marks, other digits (No, Nl), symbols, bidi, surrogates.
bad_chars = st.one_of(
    st.sampled_from(" \t\n\r\x00\x1b\x7f\x85\u0301\u00b2\u2167\u2028\u202e\u200b\ufeff!@/:,'\"\\\ud800\U0001F600"),
    st.characters(blacklist_categories=("Lu", "Ll", "Lt", "Lm", "Lo", "Nd")),
)
valid_names = st.text(name_chars, min_size=1, max_size=MAX_NAME)
valid_rooms = st.text(name_chars, min_size=1, max_size=MAX_ROOM)
maybe_names = st.one_of(
    valid_names,
    st.text(st.one_of(name_chars, bad_chars), max_size=MAX_ROOM + 4),
    st.text(name_chars, min_size=MAX_NAME - 1, max_size=MAX_ROOM + 2),  # around both length limits
)


@cfg(200)
@given(n=st.integers(0, MAX_ROOM + 3), ch=name_chars)
@example(n=MAX_NAME, ch="\U0001D400")
@example(n=MAX_NAME + 1, ch="a")
@example(n=MAX_ROOM, ch="\U0001D400")
@example(n=MAX_ROOM + 1, ch="a")
@example(n=0, ch="a")
def test_name_and_room_length_limits_count_characters(n, ch):
    text = ch * n
    for validate, limit in ((validate_name, MAX_NAME), (validate_room, MAX_ROOM)):
        if 1 <= n <= limit:
            assert validate(text) == text
        else:
            with pytest.raises(ProtocolError) as err:
                validate(text)
            assert err.value.code == BAD_HELLO


@cfg(300)
@given(name=maybe_names, room=st.one_of(st.none(), maybe_names))
@example(name="\u00e9", room=None)  # precomposed e-acute: a letter
@example(name="e\u0301", room=None)  # e + combining acute (Mn): not a letter
@example(name="\u0663", room="x")  # ARABIC-INDIC DIGIT THREE: Nd
@example(name="\u00b2", room=None)  # SUPERSCRIPT TWO: No, not Nd
def test_validate_name_and_room_accept_exactly_the_protocol_set(name, room):
    for validate, value, limit in ((validate_name, name, MAX_NAME), (validate_room, room, MAX_ROOM)):
        if value is None and validate is validate_room:
            assert validate(None) is None  # no room: the open lobby
            continue
        if token_ok(value, limit):
            assert validate(value) == value
        else:
            with pytest.raises(ProtocolError) as err:
                validate(value)
            assert err.value.code == BAD_HELLO


_ABSENT = object()
hello_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 3), st.floats(allow_nan=False), st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)


@cfg(300)
@given(
    version=st.one_of(st.just(1), st.just(_ABSENT), hello_values, st.just(2), st.just(True), st.just("1")),
    name=st.one_of(maybe_names, st.just(_ABSENT), hello_values),
    room=st.one_of(st.none(), maybe_names, st.just(_ABSENT), hello_values),
    extra=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("version", "name", "room")),
                          json_values, max_size=2),
)
def test_parse_hello_accepts_exactly_the_valid_hellos(version, name, room, extra):
    obj = dict(extra)  # unknown keys are ignored (forward compatibility)
    for key, value in (("version", version), ("name", name), ("room", room)):
        if value is not _ABSENT:
            obj[key] = value
    payload = json.dumps(obj).encode()  # ASCII: \uXXXX escapes, lone surrogates included
    version_ok = type(version) is int and version == 1
    valid = version_ok and token_ok(name, MAX_NAME) and (room in (None, _ABSENT) or token_ok(room, MAX_ROOM))
    allowed: set[str] = set()
    if not valid:
        if type(version) in (int, float) and version != 1:  # a float: either code is a fair answer
            allowed.add(UNSUPPORTED)
        if not version_ok or not token_ok(name, MAX_NAME) or not (room in (None, _ABSENT) or token_ok(room, MAX_ROOM)):
            allowed.add(BAD_HELLO)
    try:
        hello = parse_hello(Frame(FrameType.HELLO, payload))
    except ProtocolError as exc:
        assert not valid, f"refused a valid HELLO {obj!r}: {exc}"
        assert exc.code in allowed, (exc.code, allowed)
    else:
        assert valid, f"accepted {obj!r}"
        assert hello == Hello(name, None if room is _ABSENT else room)


@cfg(200)
@given(ftype=st.integers(0, 255), payload=st.one_of(st.binary(max_size=60), json_values.map(lambda v: json.dumps(v).encode())))
def test_parse_hello_on_any_frame_is_a_hello_or_bad_hello(ftype, payload):
    try:
        hello = parse_hello(Frame(ftype, payload))
    except ProtocolError as exc:
        assert exc.code in (BAD_HELLO, UNSUPPORTED)
        if ftype != FrameType.HELLO:
            assert exc.code == BAD_HELLO
    else:
        assert ftype == FrameType.HELLO
        assert token_ok(hello.name, MAX_NAME) and (hello.room is None or token_ok(hello.room, MAX_ROOM))


@cfg(150)
@given(name=valid_names, room=st.one_of(st.none(), valid_rooms), data=st.data())
def test_every_valid_hello_fits_the_handshake_limit_and_round_trips(name, room, data):
    encoded = encode_hello(name, room)
    assert len(encoded) - 4 <= HANDSHAKE_MAX  # the server must never refuse a valid HELLO as too large
    frames, code = decode_frames(data.draw(splits(encoded), label="chunks"), HANDSHAKE_MAX)
    assert code is None and len(frames) == 1
    assert parse_hello(frames[0]) == Hello(name, room)


@cfg(150)
@given(name=valid_names, room=st.one_of(st.none(), valid_rooms),
       space=st.sampled_from([" ", "  ", "\t", " \t "]), pad=st.sampled_from(["", " ", "\t"]),
       end=st.sampled_from(ENDINGS), data=st.data())
def test_every_valid_name_line_fits_the_handshake_limit_and_round_trips(name, room, space, pad, end, data):
    line = pad + name + (space + room if room else "") + pad
    raw = line.encode() + end
    assert len(line.encode()) <= HANDSHAKE_MAX
    lines, code = decode_lines(data.draw(splits(raw), label="chunks"), HANDSHAKE_MAX)
    assert code is None and lines == [line]
    assert parse_name_line(lines[0]) == Hello(name, room)


def _no_exotic_space(line: str) -> bool:
    # Which characters besides space and tab separate NAME from ROOM is not specified
    # (str.split() also splits on U+3000, U+001F, ...): lines with those are left out.
    return not any(ch.isspace() and ch not in " \t" for ch in line)


@cfg(300)
@given(line=st.one_of(
    st.text(max_size=40),
    st.lists(maybe_names, max_size=4).map(" ".join),
    st.tuples(st.sampled_from(["", " ", "\t"]), valid_names, st.sampled_from([" ", "\t", "  "]), maybe_names)
    .map("".join),
).filter(_no_exotic_space))
@example(line="alice red")
@example(line="alice red blue")
@example(line="alice\x00")
def test_parse_name_line_accepts_exactly_name_or_name_room(line):
    parts = [p for p in line.replace("\t", " ").split(" ") if p]
    valid = 1 <= len(parts) <= 2 and token_ok(parts[0], MAX_NAME) and (len(parts) == 1 or token_ok(parts[1], MAX_ROOM))
    try:
        hello = parse_name_line(line)
    except ProtocolError as exc:
        assert not valid, f"refused {line!r}: {exc}"
        assert exc.code == BAD_HELLO
    else:
        assert valid, f"accepted {line!r}"
        assert [hello.name] + ([hello.room] if hello.room is not None else []) == parts


@cfg(100)
@given(software=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
       text=st.one_of(st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=40),
                      st.integers(150, 300).map(lambda n: "x" * n)))
@example(software="chatpair/0.1.0", text="x" * 300)
def test_the_banner_is_one_short_ascii_line_that_check_banner_accepts(software, text):
    banner = make_banner(software, text)
    assert len(banner) <= MAX_BANNER
    assert banner.startswith(BANNER_PREFIX) and banner.endswith(b"\r\n")
    assert banner.count(b"\n") == 1 and banner.count(b"\r") == 1
    banner.decode("ascii")
    shown = check_banner(banner)
    assert f"{software} {text}".encode("ascii", "replace").decode().startswith(shown)


@cfg(100)
@given(line=st.binary(max_size=40))
def test_check_banner_refuses_whatever_lacks_the_prefix(line):
    if line.startswith(BANNER_PREFIX):
        check_banner(line)
    else:
        with pytest.raises(ProtocolError):
            check_banner(line)


# --------------------------------------------------------------------------
# Sanitizer (section 5)
# --------------------------------------------------------------------------

_BIDI = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))]
_CONTROLS = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))]
untrusted_text = st.lists(
    st.one_of(
        st.characters(blacklist_categories=("Cs",)),
        st.sampled_from(_CONTROLS + _BIDI + ["\u2028", "\u2029", "\u200e", "\u061c"]),
        st.sampled_from(["^[", "\\x9b", "<U+202E>", "\x1b[2J", "\x1b]0;title\x07"]),  # look-alikes, real escapes
    ),
    max_size=30,
).map("".join)


def forbidden(ch: str, *, newline_ok: bool, tab_ok: bool) -> bool:
    """Section 5: C0 and C1 controls (tab and newline aside), DEL, and the bidi controls."""
    cp = ord(ch)
    if ch == "\n":
        return not newline_ok
    if ch == "\t":
        return not tab_ok
    return cp < 0x20 or 0x7F <= cp < 0xA0 or ch in _BIDI


@cfg(300)
@given(text=untrusted_text)
@example(text="\x1b]8;;http://evil\x07click\x1b]8;;\x07")
@example(text="\u202egnp.exe")
@example(text="\x9b31m")
def test_sanitized_text_has_no_terminal_controls(text):
    for out, newline_ok, tab_ok in (
        (sanitize(text), True, True),
        (sanitize(text, keep_newlines=False), False, True),
        (sanitize_name(text), False, False),
    ):
        bad = [ch for ch in out if forbidden(ch, newline_ok=newline_ok, tab_ok=tab_ok)]
        assert not bad, f"{text!r} -> {out!r} keeps {bad!r}"


@cfg(200)
@given(text=untrusted_text)
def test_sanitize_is_idempotent(text):
    for f in (sanitize, lambda t: sanitize(t, keep_newlines=False), sanitize_name):
        once = f(text)
        assert f(once) == once


@cfg(200)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_printable_text_is_unchanged(text):
    printable = "".join(ch for ch in text if ch.isprintable() or ch in "\t\n")
    assert sanitize(printable) == printable
    one_line = printable.replace("\n", "").replace("\t", "")
    assert sanitize_name(one_line) == one_line


@cfg(100)
@given(name=valid_names)
def test_a_valid_name_is_shown_as_itself(name):
    assert sanitize_name(name) == name


@cfg(200)
@given(text=untrusted_text)
def test_no_printable_character_is_lost(text):
    """Controls are made visible or removed; everything else survives, in order."""
    out = iter(sanitize(text))
    for ch in text:
        if ch.isprintable():
            assert any(o == ch for o in out), f"{ch!r} of {text!r} lost"


@cfg(100)
@given(text=st.text(st.one_of(st.characters(), st.characters(whitelist_categories=("Cs",))), max_size=10))
def test_sanitized_text_can_always_be_written_as_utf8(text):
    """Any str can come out of json.loads (escapes), and a terminal or log file takes only UTF-8."""
    for out in (sanitize(text), sanitize(text, keep_newlines=False), sanitize_name(text)):
        out.encode("utf-8")


_json_values = st.one_of(st.none(), st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
                         st.integers(), st.booleans(), st.floats(allow_nan=False))


@cfg(300)
@given(obj=st.dictionaries(st.text(st.characters(blacklist_categories=("Cs",)), max_size=8), _json_values,
                           max_size=4))
def test_an_event_is_exactly_what_the_json_encoder_writes(obj):
    """Events of strings and nulls are written by hand (for speed): byte for byte the encoder's output."""
    frame = encode_json_frame(FrameType.NOTICE, obj)
    assert frame[5:] == json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    assert json.loads(frame[5:]) == obj
