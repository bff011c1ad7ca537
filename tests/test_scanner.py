"""The fast frame scanner (chatpair.server.scanner.scan), byte for byte, without sockets.

``scan(view, end, max_frame) -> (items, stop, error)``: runs of MSG frames
and single control frames as ``(start, stop, count)`` (count 0: a control
frame), where the complete frames stop, and the first rule broken. Each
case is checked whole, with stale bytes after ``end`` (the loop's scratch
buffer holds old data there), and fed the way the loop feeds it - the
incomplete tail kept and prepended to the next read - split at every byte
and one byte at a time. Errors must read exactly as the protocol's own
checks word them (``check_header``, ``check_length``, ``check_client_frame``).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatpair.proto import (
    ErrorCode,
    Frame,
    FrameType,
    ProtocolError,
    check_client_frame,
    check_header,
    check_length,
    encode_frame,
)
from chatpair.server.scanner import scan

MAX = 512
MSG, PING, NEXT, BYE = FrameType.MSG, FrameType.PING, FrameType.NEXT, FrameType.BYE
STALE = b"\xff\x00\x00\x00\x07\x02" * 4  # what an old read left in the scratch buffer after ``end``


def msg(payload: bytes) -> bytes:
    return encode_frame(MSG, payload)


def raised(check, *args) -> tuple[str, str]:
    """(code, message) of the ProtocolError a protocol check raises."""
    with pytest.raises(ProtocolError) as info:
        check(*args)
    return info.value.code, info.value.message


def run(data: bytes, max_frame: int = MAX) -> tuple[list[tuple[int, int, int]], int, tuple[str, str] | None]:
    buf = data + STALE
    items, stop, error = scan(memoryview(buf), len(data), max_frame)
    return items, stop, None if error is None else (error.code, error.message)


def feed(chunks: list[bytes], max_frame: int = MAX) -> tuple[list[tuple], bytes]:
    """Like the loop: keep ``buf[stop:end]`` and put it before the next read.

    Returns what was handed on, one entry per message (runs flattened, each
    checked to be exactly ``count`` MSG frames), and the bytes kept.
    """
    pending = b""
    out: list[tuple] = []
    for chunk in chunks:
        data = pending + chunk
        buf = data + STALE
        items, stop, error = scan(memoryview(buf), len(data), max_frame)
        pos = 0
        for start, end, count in items:
            assert start == pos, "items must be contiguous, in order"
            if count:
                n = 0
                while start < end:
                    fend = start + 4 + int.from_bytes(buf[start:start + 4], "big")
                    assert buf[start + 4] == MSG
                    out.append(("msg", buf[start + 5:fend]))
                    start, n = fend, n + 1
                assert start == end and n == count, "a run's bounds or count are off"
            else:
                out.append(("control", buf[start + 4], buf[start + 5:end]))
            pos = end
        if error is not None:
            assert stop == pos
            out.append(("error", error.code, error.message))
            return out, b""
        assert stop == pos
        pending = data[stop:]
    return out, pending


def splits(data: bytes) -> list[list[bytes]]:
    """Whole, split in two at every byte, and one byte at a time."""
    return [[data]] + [[data[:i], data[i:]] for i in range(1, len(data))] + [[data[i:i + 1] for i in range(len(data))]]


# -- exact items --------------------------------------------------------------------------


def test_one_message() -> None:
    assert run(msg(b"hi")) == ([(0, 7, 1)], 7, None)


def test_consecutive_messages_are_one_run() -> None:
    data = msg(b"a") + msg(b"bc") + msg("é".encode())
    assert run(data) == ([(0, len(data), 3)], len(data), None)


def test_a_control_frame_ends_a_run_and_is_an_item_of_its_own() -> None:
    a, p, b = msg(b"a") + msg(b"b"), encode_frame(PING, b"t"), msg(b"c")
    assert run(a + p + b) == ([(0, 12, 2), (12, 18, 0), (18, 24, 1)], 24, None)


def test_control_frames_back_to_back() -> None:
    data = encode_frame(NEXT) + encode_frame(PING, b"x") + encode_frame(BYE)
    assert run(data) == ([(0, 5, 0), (5, 11, 0), (11, 16, 0)], 16, None)


def test_any_type_the_header_check_accepts_is_handed_on_for_its_owner_to_judge() -> None:
    # Whether a client may send WELCOME is check_client_frame's question, not the scanner's.
    data = encode_frame(FrameType.WELCOME, b"{}") + encode_frame(0x7F)
    assert run(data) == ([(0, 7, 0), (7, 12, 0)], 12, None)


def test_an_incomplete_frame_is_kept_at_stop() -> None:
    whole = msg(b"ab") + msg(b"cd")
    for cut in range(len(msg(b"ab")), len(whole)):
        items, stop, error = run(whole[:cut])
        assert (items, stop, error) == ([(0, 7, 1)], 7, None), cut
    assert run(b"") == ([], 0, None)
    assert run(b"\x00\x00\x00") == ([], 0, None)
    assert run(encode_frame(PING, b"xyz")[:-1]) == ([], 0, None)


def test_messages_of_every_size_up_to_the_limit() -> None:
    for size in (1, 2, 126, 127, 128, 200, 255, 256, 1000, 4095):
        payload = ("é" * (size // 2) + "x" * (size % 2)).encode()  # size bytes, multi-byte characters
        assert len(payload) == size
        data = msg(payload) * 3
        assert run(data, 4096) == ([(0, len(data), 3)], len(data), None), size


def test_length_exactly_max_frame_passes_and_one_more_is_refused() -> None:
    ok = msg(b"x" * (MAX - 1))
    assert run(ok) == ([(0, len(ok), 1)], len(ok), None)
    too_big = msg(b"x" * MAX)
    assert run(too_big) == ([], 0, raised(check_length, MAX + 1, MAX))


# -- errors, worded by the protocol's checks -------------------------------------------------------


def test_over_the_limit_is_refused_with_only_the_length_in() -> None:
    want = raised(check_length, 70_000, MAX)
    assert want[0] == ErrorCode.FRAME_TOO_LARGE.value
    header = (70_000).to_bytes(4, "big")
    assert run(header) == ([], 0, want)
    assert run(header + b"\x02") == ([], 0, want)
    assert run(msg(b"ok") + header) == ([(0, 7, 1)], 7, want)


def test_over_the_limit_of_any_type() -> None:
    data = msg(b"a") + (MAX + 1).to_bytes(4, "big") + bytes([PING])
    assert run(data) == ([(0, 6, 1)], 6, raised(check_header, MAX + 1, PING, MAX))


def test_length_zero() -> None:
    want = raised(check_length, 0, MAX)
    assert want[0] == ErrorCode.BAD_FRAME.value
    assert run(b"\x00\x00\x00\x00") == ([], 0, want)
    assert run(b"\x00\x00\x00\x00\x02") == ([], 0, want)
    assert run(msg(b"a") + b"\x00\x00\x00\x00") == ([(0, 6, 1)], 6, want)


def test_empty_message() -> None:
    want = raised(check_header, 1, MSG, MAX)
    assert want == (ErrorCode.BAD_FRAME.value, "a message cannot be empty")
    assert run(b"\x00\x00\x00\x01\x02") == ([], 0, want)
    assert run(msg(b"a") + msg(b"b") + b"\x00\x00\x00\x01\x02" + msg(b"c")) == ([(0, 12, 2)], 12, want)


BAD_UTF8 = raised(check_client_frame, Frame(MSG, b"\xff"))


@pytest.mark.parametrize("bad", [b"\xff", b"a\xc3", b"\xa9", b"\xed\xa0\x80", b"x" * 150 + b"\xc3"])
def test_bad_utf8_in_a_run_delivers_the_good_ones_first(bad: bytes) -> None:
    good = msg(b"a") + msg(b"x" * 140) + msg("né".encode())
    data = good + msg(bad) + msg(b"never")
    assert run(data) == ([(0, len(good), 3)], len(good), BAD_UTF8)


def test_bad_utf8_first() -> None:
    assert run(msg(b"\xff") + msg(b"a")) == ([], 0, BAD_UTF8)


def test_a_character_cut_across_two_messages_is_bad_utf8() -> None:
    # "é" is c3 a9: split between two frames, each half is invalid on its own.
    assert run(msg(b"a\xc3") + msg(b"\xa9b")) == ([], 0, BAD_UTF8)


def test_bad_utf8_after_a_control_frame() -> None:
    data = msg(b"a") + encode_frame(NEXT) + msg(b"b") + msg(b"\x80")
    assert run(data) == ([(0, 6, 1), (6, 11, 0), (11, 17, 1)], 17, BAD_UTF8)


# -- split at every byte: the outcome never depends on how the bytes arrive ------------------------


CASES = [
    msg(b"hello"),
    msg(b"a") + msg(b"b") + msg(b"c"),
    msg(b"a") + encode_frame(PING, b"tok") + msg("ü".encode()) + encode_frame(FrameType.PONG) + encode_frame(NEXT),
    msg(b"x" * 130) + msg(b"y") + msg(b"z" * 63),
    msg(b"a") + msg(b"b\xff") + msg(b"c"),
    msg(b"a") + msg(b"x" * 140 + b"\xff") + msg(b"c"),
    msg(b"a") + (MAX + 1).to_bytes(4, "big") + b"\x02" + b"x" * 10,
    msg(b"a") + b"\x00\x00\x00\x00" + msg(b"b"),
    msg(b"a") + b"\x00\x00\x00\x01\x02" + msg(b"b"),
    encode_frame(BYE) + msg(b"after bye"),
    msg(b"tail") + msg(b"incomplete")[:-3],
]


@pytest.mark.parametrize("data", CASES, ids=range(len(CASES)))
def test_every_split_gives_the_same_messages_controls_and_error(data: bytes) -> None:
    want = feed([data])
    for chunks in splits(data):
        assert feed(chunks) == want, [len(c) for c in chunks]


def test_what_the_whole_buffer_hands_on() -> None:
    out, rest = feed([CASES[2]])
    assert out == [("msg", b"a"), ("control", PING, b"tok"), ("msg", "ü".encode()),
                   ("control", FrameType.PONG, b""), ("control", NEXT, b"")]
    assert rest == b""
    out, rest = feed([CASES[-1]])
    assert out == [("msg", b"tail")] and rest == msg(b"incomplete")[:-3]
    out, _ = feed([CASES[5]])
    assert out == [("msg", b"a"), ("error", *BAD_UTF8)]


# -- against a frame-at-a-time reference, on frames that repeat (the equal-frames stretch) ------


def reference_scan(data: bytes, max_frame: int = MAX) -> tuple[list[tuple[int, int, int]], int, tuple[str, str] | None]:
    """The scanner's contract written the slow, obvious way: one frame at a time."""
    items: list[tuple[int, int, int]] = []
    pos = run_start = count = 0

    def close_run() -> None:
        nonlocal count
        if count:
            items.append((run_start, pos, count))
            count = 0

    while len(data) - pos >= 5:
        length, ftype = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4]
        try:
            check_header(length, ftype, max_frame)
        except ProtocolError as err:
            close_run()
            return items, pos, (err.code, err.message)
        fend = pos + 4 + length
        if fend > len(data):
            break
        if ftype == MSG:
            try:
                check_client_frame(Frame(MSG, data[pos + 5:fend]))
            except ProtocolError as err:
                close_run()
                return items, pos, (err.code, err.message)
            if not count:
                run_start = pos
            count += 1
        else:
            close_run()
            items.append((pos, fend, 0))
        pos = fend
    close_run()
    if len(data) - pos == 4:
        try:
            check_length(int.from_bytes(data[pos:], "big"), max_frame)
        except ProtocolError as err:
            return items, pos, (err.code, err.message)
    return items, pos, None


# A few payloads, so that frames of one length (and one header) come in long stretches.
PAYLOADS = [b"x" * 59, b"y" * 59, b"z", "é".encode() * 20, b"w" * 127, b"v" * 200, b"\xff" * 59,
            b"a" * 58 + b"\xc3"]
FRAMES = [msg(p) for p in PAYLOADS] + [encode_frame(PING, b"p"), encode_frame(NEXT), b"\x00\x00\x00\x00\x02"]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from(FRAMES), st.integers(1, 40)), max_size=6), st.integers(0, 40))
def test_stretches_of_equal_frames_scan_as_one_frame_at_a_time_would(pieces: list[tuple[bytes, int]],
                                                                   cut: int) -> None:
    data = b"".join(frame * times for frame, times in pieces)
    data = data[:max(0, len(data) - cut)]  # often ends in the middle of a frame
    assert run(data) == reference_scan(data)


def test_a_stretch_of_equal_frames_ending_in_a_different_one() -> None:
    data = msg(b"a" * 59) * 1000 + msg(b"b" * 58) + msg(b"a" * 59) * 3
    assert run(data) == ([(0, len(data), 1004)], len(data), None)
    data = msg(b"a" * 59) * 1000 + msg(b"a" * 58 + b"\xff") + msg(b"a" * 59)
    assert run(data) == ([(0, 64000, 1000)], 64000, BAD_UTF8)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 130), st.integers(1, 5000), st.integers(0, 4), st.integers(0, 255), st.integers(0, 200))
def test_equal_frames_counts_a_stretch_as_a_walk_would(size: int, stretch: int, column: int, byte: int,
                                                       cut: int) -> None:
    """The stretch of one header, measured in windows of strided slices, against a plain walk:
    long stretches (several windows), ended by a frame whose header differs in any one byte."""
    from chatpair.server.scanner import _equal_frames

    frame = msg(b"m" * size)
    odd = bytearray(frame)
    odd[column] = byte
    data = (frame * stretch + bytes(odd) + frame * 3)[:max(len(frame), len(frame) * (stretch + 4) - cut)]
    stride = len(frame)
    walked = 0
    while (walked + 1) * stride <= len(data) and data[walked * stride:walked * stride + 5] == frame[:5]:
        walked += 1
    assert _equal_frames(memoryview(data), 0, stride, len(data)) == walked
