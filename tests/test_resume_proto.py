"""Resume bookkeeping (PROTOCOL.md section 6) without a socket: Outbox, AckClock, frames."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatpair.proto import FrameDecoder, ProtocolError, encode_msg
from chatpair.proto.frames import Frame
from chatpair.proto.resume import (
    ACK_EVERY,
    AckClock,
    Outbox,
    Resume,
    encode_ack,
    encode_resume,
    encode_resumed,
    parse_ack,
    parse_resume,
)
from chatpair.proto.wire import FrameType


def frames_of(data: bytes) -> list[bytes]:
    if not data:
        return []  # (feeding b"" would mean end of stream)
    decoder = FrameDecoder()
    decoder.feed(data)
    return [f.payload for f in decoder.events()]


def test_outbox_keeps_runs_until_acknowledged_and_cuts_a_run_at_a_frame() -> None:
    box = Outbox()
    box.record(encode_msg("a") + encode_msg("bb") + encode_msg("ccc"), 3)
    box.record(encode_msg("d"), 1)
    assert (box.sent, box.acked, box.unacked) == (4, 0, 4)
    box.acknowledge(2)  # inside the first run
    assert (box.acked, box.unacked) == (2, 2)
    assert frames_of(b"".join(box.since(2))) == [b"ccc", b"d"]
    assert box.nbytes == len(encode_msg("ccc") + encode_msg("d"))
    box.acknowledge(4)
    assert box.since(4) == [] and box.nbytes == 0


def test_outbox_refuses_acks_that_go_back_or_beyond() -> None:
    box = Outbox()
    box.record(encode_msg("x") * 3, 3)
    box.acknowledge(2)
    with pytest.raises(ProtocolError) as back:
        box.acknowledge(1)
    assert back.value.code == "bad_frame"
    with pytest.raises(ProtocolError) as beyond:
        box.acknowledge(4)
    assert beyond.value.code == "bad_frame"
    assert (box.acked, box.unacked) == (2, 1)  # a refused ACK changes nothing


def test_resume_count_beyond_what_was_sent_is_bad_hello_and_leaves_the_outbox() -> None:
    box = Outbox()
    box.record(encode_msg("x") * 2, 2)
    with pytest.raises(ProtocolError) as beyond:
        box.since(3)
    assert beyond.value.code == "bad_hello"
    box.acknowledge(1)
    with pytest.raises(ProtocolError) as below:
        box.since(0)  # below an earlier ACK: counts never go back
    assert below.value.code == "bad_hello"
    assert frames_of(b"".join(box.since(1))) == [b"x"]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=20), st.data())
def test_outbox_since_is_exactly_the_frames_past_the_count(run_sizes: list[int], data: st.DataObject) -> None:
    box = Outbox()
    sent: list[bytes] = []
    for size in run_sizes:
        run = [f"m{len(sent) + i}".encode() for i in range(size)]
        box.record(b"".join(encode_msg(t.decode()) for t in run), size)
        sent += run
    acked = data.draw(st.integers(0, len(sent)))
    box.acknowledge(acked)
    received = data.draw(st.integers(acked, len(sent)))
    assert frames_of(b"".join(box.since(received))) == sent[received:]
    assert box.nbytes == sum(len(encode_msg(t.decode())) for t in sent[received:])


def test_ack_clock_every_64_or_after_the_delay() -> None:
    clock = AckClock(delay=0.5)
    assert not clock.ack_due(0.0) and clock.deadline() is None
    clock.received_msgs(1, now=10.0)
    assert not clock.ack_due(10.4)
    assert clock.deadline() == 10.5
    assert clock.ack_due(10.5)
    assert clock.take_ack() == 1 and clock.deadline() is None
    clock.received_msgs(ACK_EVERY - 1, now=11.0)
    assert not clock.ack_due(11.0)
    clock.received_msgs(1, now=11.0)
    assert clock.ack_due(11.0)
    assert clock.take_ack() == 1 + ACK_EVERY


def test_frames_round_trip_and_refuse_nonsense() -> None:
    def frame(data: bytes) -> Frame:
        decoder = FrameDecoder()
        decoder.feed(data)
        return decoder.next_event()  # type: ignore[return-value]

    assert parse_ack(frame(encode_ack(7))) == 7
    assert parse_resume(frame(encode_resume("tok", 3))) == Resume("tok", 3)
    resumed = frame(encode_resumed(5, "bob", None))
    assert resumed.type == FrameType.RESUMED and resumed.json() == {"received": 5, "peer": "bob", "room": None}
    for payload in (b'{"received": -1}', b'{"received": true}', b'{"received": "3"}', b"{}", b"[]"):
        with pytest.raises(ProtocolError) as err:
            parse_ack(Frame(FrameType.ACK, payload))
        assert err.value.code == "bad_frame"
    for payload, code in ((b'{"version": 1, "session": "", "received": 0}', "bad_hello"),
                          (b'{"version": 1, "session": "t", "received": -2}', "bad_hello"),
                          (b'{"version": 2, "session": "t", "received": 0}', "unsupported_version"),
                          (b'{"session": "t", "received": 0}', "bad_hello"),
                          (b"nope", "bad_hello")):
        with pytest.raises(ProtocolError) as err:
            parse_resume(Frame(FrameType.RESUME, payload))
        assert err.value.code == code
