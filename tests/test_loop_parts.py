"""The selector loop's pieces that need no socket: states, rate limit, timers, rendering, output queue.

Time is passed in everywhere, so each rule is checked exactly.
"""

from __future__ import annotations

import selectors
import socket

import pytest

from chatpair.proto import FrameType, encode_frame, encode_json_frame, encode_notice
from chatpair.server.config import Limits
from chatpair.server.conn import Conn, OutChunk
from chatpair.server.ratelimit import MIN_READ, THROTTLED_READ_PER_TOKEN, RateLimiter
from chatpair.server.render import event_bytes, line_msg_bytes, undelivered_notices
from chatpair.server.states import Mode, Phase
from chatpair.server.timers import Expired, sweep, sweep_interval


class NoSocket:
    def fileno(self) -> int:
        return -1


def conn(cid: int = 1, mode: Mode = Mode.FRAME, phase: Phase = Phase.CHATTING, now: float = 0.0) -> Conn:
    c = Conn(NoSocket(), cid, "test", now)  # type: ignore[arg-type]
    c.mode, c.phase = mode, phase
    return c


# -- named states --------------------------------------------------------------------------


def test_a_new_connection_is_handshaking_and_not_tls() -> None:
    c = Conn(NoSocket(), 1, "x", 0.0)  # type: ignore[arg-type]
    assert (c.mode, c.phase, c.tls) == (Mode.UNKNOWN, Phase.HANDSHAKE, False)
    assert not c.mode  # "if conn.mode:" still means "the mode is known"


def test_a_tls_socket_starts_in_the_tls_handshake_waiting_to_read() -> None:
    ssl = pytest.importorskip("ssl")
    ours, theirs = socket.socketpair()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).wrap_socket(ours, server_side=True, do_handshake_on_connect=False)
    try:
        c = Conn(tls, 1, "x", 0.0)
        assert (c.tls, c.phase, c.tls_want) == (True, Phase.TLS_HANDSHAKE, selectors.EVENT_READ)
    finally:
        tls.close()
        theirs.close()


def test_state_round_trip_across_processes() -> None:
    c = conn(mode=Mode.LINE)
    c.name, c.room, c.tokens = "ann", "r", 3.0
    c.out.push(OutChunk(b"abc", 1, False))
    c.out.first_sent = 1
    c.out.unsent -= 1
    back = Conn.from_state(NoSocket(), c.state(), 5.0, 100)  # type: ignore[arg-type]
    assert (back.mode, back.phase, back.name, back.room, back.tokens) == (Mode.LINE, Phase.CHATTING, "ann", "r", 3.0)
    assert (back.out.first_sent, back.out.unsent, back.out.last_progress) == (1, 2, 5.0)


def test_undelivered_counts_a_partly_written_frame_as_undelivered() -> None:
    c = conn()
    two = encode_frame(FrameType.MSG, b"ab") + encode_frame(FrameType.MSG, b"cd")
    c.out.push(OutChunk(two, 2))
    c.out.push(OutChunk(encode_frame(FrameType.PING), 0))
    c.out.push(OutChunk(b"x: y\n", 1, False))
    assert c.undelivered_msgs() == 3
    c.out.first_sent = 7  # the first frame is out, whole
    assert c.undelivered_msgs() == 2
    c.out.first_sent = 8  # one byte of the second
    assert c.undelivered_msgs() == 2


# -- rate limit -------------------------------------------------------------------------------


def test_a_client_within_its_burst_is_not_throttled() -> None:
    limiter = RateLimiter(rate=10.0, burst=5)
    c = conn()
    c.tokens, c.token_time = 5.0, 0.0
    assert not limiter.take(c, 5, 0.0)
    assert c.tokens == 0.0 and not c.throttled_until and not limiter.heap


def test_over_the_rate_the_client_waits_until_its_debt_is_paid() -> None:
    limiter = RateLimiter(rate=10.0, burst=5)
    c = conn()
    c.tokens, c.token_time = 5.0, 0.0
    assert limiter.take(c, 8, 0.0)  # 3 in debt at 10/s: 0.3 s
    assert c.throttled_until == pytest.approx(0.3)
    assert not limiter.take(c, 1, 0.1)  # already throttled: once in the timetable
    assert len(limiter.heap) == 1
    assert limiter.due(0.29) == []
    assert limiter.due(0.3) == [c] and not limiter.heap


def test_the_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    limiter = RateLimiter(rate=10.0, burst=5)
    c = conn()
    c.tokens, c.token_time = 0.0, 0.0
    assert not limiter.take(c, 2, 0.2)  # 2 refilled, 2 spent
    assert c.tokens == pytest.approx(0.0)
    assert not limiter.take(c, 0, 100.0)
    assert c.tokens == 5.0  # capped at the burst


def test_read_budget_shrinks_near_the_limit_but_always_progresses() -> None:
    limiter = RateLimiter(rate=10.0, burst=100)
    c = conn()
    c.tokens, c.token_time = 100.0, 0.0
    assert limiter.read_budget(c, 65536, 0.0) == min(65536, 100 * THROTTLED_READ_PER_TOKEN)
    c.tokens = -50.0
    assert limiter.read_budget(c, 65536, 0.0) == MIN_READ


# -- timers --------------------------------------------------------------------------------------


LIMITS = Limits(65536, ping_interval=30.0, idle_timeout=90.0, write_timeout=20.0)


def test_sweep_pings_the_quiet_times_out_the_silent_and_the_stalled() -> None:
    quiet, silent, pinged, stalled, fresh = (conn(i) for i in range(5))
    quiet.last_rx = 100.0 - 31
    silent.last_rx = 100.0 - 91
    pinged.last_rx, pinged.pinged = 100.0 - 40, True
    stalled.out.push(OutChunk(b"x"))
    stalled.out.last_progress = 100.0 - 21
    fresh.last_rx = 99.0
    ping, expired = sweep([quiet, silent, pinged, stalled, fresh], 100.0, LIMITS)
    assert ping == [quiet]
    assert expired == [(silent, Expired.IDLE), (stalled, Expired.WRITE)]


@pytest.mark.parametrize("who", ["line", "handshake", "paused", "throttled"])
def test_sweep_never_calls_idle_who_cannot_answer_or_is_not_read(who: str) -> None:
    c = conn(mode=Mode.LINE if who == "line" else Mode.FRAME,
             phase=Phase.HANDSHAKE if who == "handshake" else Phase.CHATTING)
    c.paused = who == "paused"
    c.throttled_until = 1.0 if who == "throttled" else 0.0
    c.last_rx = 0.0
    assert sweep([c], 1000.0, LIMITS) == ([], [])


def test_sweep_interval_is_a_second_or_a_quarter_of_the_shortest_timeout() -> None:
    assert sweep_interval(LIMITS) == 1.0
    assert sweep_interval(Limits(65536, 2.0, 90.0, 30.0)) == 0.5
    assert sweep_interval(Limits(65536, 0.1, 0.1, 0.1)) == 0.25


# -- rendering -------------------------------------------------------------------------------------


def test_events_as_frames_or_lines() -> None:
    f, ln = conn(mode=Mode.FRAME), conn(mode=Mode.LINE)
    paired = {"peer": "bob", "room": None}
    assert event_bytes(f, FrameType.PAIRED, paired) == encode_json_frame(FrameType.PAIRED, paired)
    assert event_bytes(ln, FrameType.PAIRED, paired) == b"* paired with bob\n"
    assert event_bytes(ln, FrameType.PEER_LEFT, {"peer": "bob", "reason": "bye"}) == (
        b"* bob left (bye); waiting for a partner\n")
    assert event_bytes(ln, FrameType.WAITING, {"room": None}) == b""  # said already
    assert event_bytes(ln, FrameType.WAITING, {"room": "r1"}) == b"* waiting for a partner in room r1\n"
    assert event_bytes(ln, FrameType.WELCOME, {}) == b""


def test_undelivered_is_one_notice_per_message_or_one_line() -> None:
    assert undelivered_notices(conn(mode=Mode.FRAME), 2, "why") == encode_notice(
        "undelivered", "message not delivered: why") * 2
    assert undelivered_notices(conn(mode=Mode.LINE), 1, "why") == b"* 1 message was not delivered: why\n"
    assert undelivered_notices(conn(mode=Mode.LINE), 3, "why") == b"* 3 messages were not delivered: why\n"


def test_a_partners_message_in_line_mode_is_one_line_per_line() -> None:
    assert line_msg_bytes("bob", "hi\nthere") == b"bob: hi\nbob: there\n"
