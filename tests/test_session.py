"""The server's resume bookkeeping (chatpair.server.session), without a socket.

What the replay log keeps and forgets decides what a returning client sees:
every MSG past its count exactly once, the events it missed, nothing it saw.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatpair.proto import FrameType, ProtocolError, encode_frame, encode_json_frame
from chatpair.server.session import Session, new_token

pytestmark = pytest.mark.timeout(30)


def msgs(*texts: str) -> bytes:
    return b"".join(encode_frame(FrameType.MSG, t.encode()) for t in texts)


def event(ftype: FrameType, **obj: object) -> bytes:
    return encode_json_frame(ftype, obj)


def texts(entries) -> list[str]:
    """Every MSG text and event type name in the replay, in order."""
    out = []
    for entry in entries:
        data, pos = entry.data, 0
        while pos < len(data):
            end = pos + 4 + int.from_bytes(data[pos:pos + 4], "big")
            ftype = data[pos + 4]
            out.append(data[pos + 5:end].decode() if ftype == FrameType.MSG else FrameType(ftype).name)
            pos = end
    return out


def test_tokens_are_long_random_and_short_enough():
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(22 <= len(t) <= 64 for t in tokens)


def test_connection_frames_are_never_logged():
    s = Session("t")
    for ftype in (FrameType.PING, FrameType.PONG, FrameType.ACK, FrameType.WELCOME, FrameType.RESUMED):
        s.record(encode_frame(ftype, b"{}"), 0)
    assert not s.log and s.stream > 0


def test_ack_forgets_what_it_covers_cutting_a_run_at_a_frame():
    s = Session("t")
    s.record(msgs("a", "b", "c"), 3)
    s.acknowledge(2, written=s.stream)
    assert s.acked == 2 and texts(s.log) == ["c"]
    assert s.log_bytes == len(msgs("c"))


def test_bad_acks():
    s = Session("t")
    s.record(msgs("a", "b"), 2)
    s.acknowledge(1, s.stream)
    with pytest.raises(ProtocolError) as back:
        s.acknowledge(0, s.stream)
    assert back.value.code == "bad_frame"
    with pytest.raises(ProtocolError) as beyond:
        s.acknowledge(3, s.stream)
    assert beyond.value.code == "bad_frame"


def test_written_events_before_the_next_unseen_message_count_as_seen():
    # bob says hi, alice acknowledges; bob leaves (written); alice drops.
    s = Session("t")
    s.record(event(FrameType.PAIRED, peer="bob", room=None), 0)
    s.record(msgs("hi"), 1)
    s.record(event(FrameType.PEER_LEFT, peer="bob", reason="bye") + event(FrameType.WAITING, room=None), 0)
    s.acknowledge(1, written=s.stream)
    s.go_away(written=s.stream, until=10.0)
    replay, peer = s.plan_resume(1)
    assert replay == [] and peer is None  # no "bob left" twice


def test_unwritten_events_and_unseen_messages_are_replayed_in_order_with_the_partner_before_them():
    s = Session("t")
    s.record(event(FrameType.PAIRED, peer="bob", room=None), 0)
    s.record(msgs("one", "two"), 2)
    written = s.stream
    s.record(msgs("three"), 1)  # queued, not written, when the connection dropped
    s.go_away(written=written, until=10.0)
    s.record(event(FrameType.PEER_LEFT, peer="bob", reason="bye"), 0)  # while away
    replay, peer = s.plan_resume(1)
    assert texts(replay) == ["two", "three", "PEER_LEFT"]
    assert peer == "bob"
    s.reconnected(replay)
    for entry in replay:
        s.record(entry.data, entry.msgs)
    assert s.sent == 3  # the same numbers, not counted twice


def test_resume_counts_out_of_range_leave_the_session_alone():
    s = Session("t")
    s.record(msgs("a", "b"), 2)
    s.acknowledge(1, s.stream)
    s.go_away(s.stream, 10.0)
    for bad in (3, 0):
        with pytest.raises(ProtocolError) as err:
            s.check_resume(bad)
        assert err.value.code == "bad_hello"
    assert texts(s.plan_resume(1)[0]) == ["b"]


def test_state_round_trip_for_a_worker():
    s = Session("tok")
    s.record(event(FrameType.PAIRED, peer="bob", room="r"), 0)
    s.record(msgs("x", "y"), 2)
    s.clock.received_msgs(5, now=1.0)
    t = Session.from_state(s.state(), now=2.0)
    assert (t.token, t.sent, t.peer, t.clock.received, t.log_bytes) == ("tok", 2, "bob", 5, s.log_bytes)
    assert t.clock.deadline() is not None  # the ACK owed is still owed
    assert texts(t.log) == texts(s.log)


@given(st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=1, max_size=30), st.data())
def test_any_drop_and_resume_replays_exactly_the_messages_past_the_count(batches, data):
    """Messages sent in runs, acknowledged at random, cut anywhere: the replay is exactly what is missing."""
    s = Session("t")
    n = 0
    for size, ack in batches:
        s.record(msgs(*(str(n + i) for i in range(size))), size)
        n += size
        if ack:
            s.acknowledge(data.draw(st.integers(s.acked, n)), s.stream)
    s.go_away(written=data.draw(st.integers(0, s.stream)), until=1.0)
    received = data.draw(st.integers(s.acked, n))
    replay, _ = s.plan_resume(received)
    assert [t for t in texts(replay)] == [str(i) for i in range(received, n)]


def test_events_sent_with_welcome_are_followed():
    """The newcomer's WELCOME, WAITING and PAIRED go out in one write: PAIRED still names the partner."""
    s = Session("t")
    s.record(event(FrameType.WELCOME, version=1) + event(FrameType.WAITING, room=None)
             + event(FrameType.PAIRED, peer="bob", room=None), 0)
    assert s.peer == "bob"
    assert texts(s.log) == ["WAITING", "PAIRED"]
    s.record(msgs("hi"), 1)
    s.go_away(written=s.stream, until=1.0)
    replay, peer = s.plan_resume(0)
    assert texts(replay) == ["hi"] and peer == "bob"
