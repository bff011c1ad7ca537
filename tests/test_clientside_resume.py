"""The client's side of resuming (PROTOCOL.md section 6) without a socket or a clock.

ClientProtocol and ClientSession are fed exact bytes and given ``now``;
what they queue in ``outbox`` is decoded and compared. Then the pieces of
chatpair.client that decide what to do and say (ResumePlan, is_drop, the
Presenter lines, the --json events), and the CLI option.
"""

from __future__ import annotations

import json
import os

import pytest

from chatpair.client.config import ClientConfig
from chatpair.client.present import Presenter, event_json
from chatpair.client.resuming import BACKOFF, ResumePlan, expired_message, is_drop, is_expired
from chatpair.client.tui.screen import partner_text
from chatpair.errors import ConnectError, RefusedError
from chatpair.proto import FrameDecoder, encode_msg
from chatpair.proto.clientside import ClientProtocol, ClientState
from chatpair.proto.clientsession import FLOW_LIMIT, KEEPALIVE_TOKEN, ClientSession, keepalive_times
from chatpair.proto.events import Closed, Message, Paired, PeerAway, PeerBack, Pong, Reconnecting, Resumed
from chatpair.proto.events import ResumeFailed, ServerError, Waiting, Welcome
from chatpair.proto.frames import encode_frame, encode_json_frame
from chatpair.proto.wire import FrameType

BANNER = b"CHATPAIR/1 test/0 hello\r\n"
TOKEN = "t" * 32


def welcome(**extra) -> bytes:
    obj = {"version": 1, "server": "test/0", "max_frame": 65536, "ping_interval": 30, "idle_timeout": 90, **extra}
    return encode_json_frame(FrameType.WELCOME, obj)


def sent_frames(proto: ClientProtocol) -> list[tuple[int, bytes]]:
    """Decode and take everything the protocol queued."""
    data = bytes(proto.outbox)
    proto.sent(len(data))
    if not data:
        return []
    decoder = FrameDecoder()
    decoder.feed(data)
    return [(f.type, f.payload) for f in decoder.events()]


def opened(now: float = 0.0, **welcome_extra) -> ClientProtocol:
    """A protocol that asked for resume and was welcomed with a session (HELLO already taken)."""
    proto = ClientProtocol("alice", "lab", "srv:1", resume=True)
    extra = {"session": TOKEN, "resume_window": 30, **welcome_extra}
    proto.receive_data(BANNER + welcome(**extra) + encode_json_frame(FrameType.PAIRED, {"peer": "bob", "room": "lab"}),
                       now)
    events = proto.events()
    assert [type(e) for e in events] == [Welcome, Paired]
    sent_frames(proto)
    return proto


def test_hello_asks_for_resume_and_without_it_is_v1_byte_for_byte() -> None:
    proto = ClientProtocol("alice", None, "srv:1", resume=True)
    proto.receive_data(BANNER, 0.0)
    assert proto.events() == []
    [(ftype, payload)] = sent_frames(proto)
    assert ftype == FrameType.HELLO
    assert json.loads(payload) == {"version": 1, "name": "alice", "room": None, "resume": True}
    plain = ClientProtocol("alice", None, "srv:1")
    plain.receive_data(BANNER, 0.0)
    plain.events()
    assert bytes(plain.outbox) == encode_frame(FrameType.HELLO, b'{"version":1,"name":"alice","room":null}')


def test_welcome_without_session_is_a_v1_connection() -> None:
    proto = ClientProtocol("alice", None, "srv:1", resume=True)
    msgs = b"".join(encode_msg(f"m{i}") for i in range(100))
    proto.receive_data(BANNER + welcome() + encode_json_frame(FrameType.PAIRED, {"peer": "bob"}) + msgs, 0.0)
    assert len(proto.events()) == 102
    assert proto.session is None
    sent_frames(proto)  # HELLO
    assert proto.tick(100.0) is None and sent_frames(proto) == []  # no ACK, no keepalive
    proto.send_msg("hi")
    assert sent_frames(proto) == [(FrameType.MSG, b"hi")]


@pytest.mark.parametrize("token", ["", "x" * 65, 5, None])
def test_a_bad_token_is_no_session(token) -> None:
    proto = ClientProtocol("alice", None, "srv:1", resume=True)
    proto.receive_data(BANNER + welcome(session=token, resume_window=30), 0.0)
    assert isinstance(proto.events()[0], Welcome)
    assert proto.session is None


def test_msgs_are_counted_and_acknowledged_by_the_rules() -> None:
    proto = opened()
    session = proto.session
    assert session is not None and session.token == TOKEN and session.window == 30
    proto.receive_data(encode_msg("one") + encode_msg("two"), 1.0)
    assert [e.text for e in proto.events()] == ["one", "two"]  # type: ignore[union-attr]
    assert sent_frames(proto) == []  # 2 < 64, and no time has passed
    assert session.deadline() <= 1.0 + 1.0  # an ACK falls due within the spec's second
    assert proto.tick(1.4) is None and sent_frames(proto) == []
    assert proto.tick(1.5) is None
    assert sent_frames(proto) == [(FrameType.ACK, b'{"received":2}')]
    # 300 read at once: one ACK covers them all, sent at the end of the batch.
    proto.receive_data(b"".join(encode_msg(f"m{i}") for i in range(300)), 2.0)
    assert len(proto.events()) == 300
    assert sent_frames(proto) == [(FrameType.ACK, b'{"received":302}')]
    # 64 since the last ACK: due at once, whatever the time.
    for i in range(64):
        proto.receive_data(encode_msg("x"), 2.0)
        proto.events()
        expected = [(FrameType.ACK, b'{"received":366}')] if i == 63 else []
        assert sent_frames(proto) == expected


def test_sent_msgs_are_kept_until_acked_and_flow_control_holds_back() -> None:
    proto = opened()
    session = proto.session
    assert session is not None
    proto.send_msg("a")
    proto.send_msg("b" * 70000)  # two frames (max_frame 65536)
    assert [t for t, _ in sent_frames(proto)] == [FrameType.MSG] * 3
    assert (session.sent.sent, session.sent.unacked) == (3, 3)
    proto.receive_data(encode_json_frame(FrameType.ACK, {"received": 2}), 1.0)
    assert proto.events() == []
    assert session.sent.unacked == 1
    assert not session.blocked
    big = "z" * 60000
    while not session.blocked:
        proto.send_msg(big)
    assert session.sent.nbytes >= FLOW_LIMIT
    proto.receive_data(encode_json_frame(FrameType.ACK, {"received": session.sent.sent}), 2.0)
    proto.events()
    assert not session.blocked and session.sent.nbytes == 0


@pytest.mark.parametrize("ack", [{"received": 9}, {"received": -1}, {"received": "2"}, {}])
def test_an_impossible_ack_is_a_broken_server(ack) -> None:
    proto = opened()
    proto.send_msg("a")
    proto.receive_data(encode_json_frame(FrameType.ACK, ack), 1.0)
    [ev] = proto.events()
    assert isinstance(ev, Closed) and ev.reason.startswith("srv:1 broke the protocol: ")
    assert proto.state is ClientState.CLOSED


def test_ack_and_resumed_outside_a_session_are_ignored() -> None:
    proto = ClientProtocol("alice", None, "srv:1")
    proto.receive_data(BANNER + welcome() + encode_json_frame(FrameType.ACK, {"received": 5})
                       + encode_json_frame(FrameType.RESUMED, {"received": 0, "peer": "x", "room": None}), 0.0)
    assert [type(e) for e in proto.events()] == [Welcome]


def test_resume_sends_again_exactly_what_the_server_lacks_in_order() -> None:
    first = opened()
    session = first.session
    assert session is not None
    first.receive_data(encode_msg("r1") + encode_msg("r2") + encode_msg("r3"), 1.0)
    first.events()
    for text in ("s1", "s2", "s3", "s4"):
        first.send_msg(text)
    first.receive_data(encode_json_frame(FrameType.ACK, {"received": 1}), 1.1)
    first.receive_data(b"", 1.2)  # the connection drops
    assert isinstance(first.events()[-1], Closed)

    second = ClientProtocol("alice", "lab", "srv:1", session=session)
    second.receive_data(BANNER, 5.0)
    assert second.events() == []
    [(ftype, payload)] = sent_frames(second)
    assert ftype == FrameType.RESUME
    assert json.loads(payload) == {"version": 1, "session": TOKEN, "received": 3}
    second.receive_data(welcome(session=TOKEN, resume_window=30), 5.1)
    assert isinstance(second.events()[0], Welcome)
    second.send_msg("typed before RESUMED")  # kept, and sent after what is sent again
    assert sent_frames(second) == []
    second.receive_data(encode_json_frame(FrameType.RESUMED, {"received": 2, "peer": "bob", "room": "lab"})
                        + encode_msg("r4"), 5.2)
    events = second.events()
    assert events == [Resumed("bob", "lab", 3), Message("bob", "r4")]
    assert sent_frames(second) == [(FrameType.MSG, b"s3"), (FrameType.MSG, b"s4"),
                                   (FrameType.MSG, b"typed before RESUMED")]
    assert session.clock.received == 4 and session.sent.acked == 2
    second.send_msg("after")
    assert sent_frames(second) == [(FrameType.MSG, b"after")]


@pytest.mark.parametrize("resumed", [{"received": 9, "peer": None}, {"received": "1"}, {"peer": "bob"}])
def test_a_resumed_with_an_impossible_count_is_a_broken_server(resumed) -> None:
    session = opened().session
    assert session is not None
    proto = ClientProtocol("alice", "lab", "srv:1", session=session)
    proto.receive_data(BANNER + welcome(session=TOKEN) + encode_json_frame(FrameType.RESUMED, resumed), 0.0)
    events = proto.events()
    assert isinstance(events[-1], Closed) and "broke the protocol" in events[-1].reason


def test_session_expired_is_an_error_before_welcome() -> None:
    session = opened().session
    proto = ClientProtocol("alice", "lab", "srv:1", session=session)
    proto.receive_data(BANNER + encode_json_frame(FrameType.ERROR, {"code": "session_expired",
                                                                    "message": "that conversation is over"}), 0.0)
    assert proto.events() == [ServerError("session_expired", "that conversation is over")]


def test_keepalive_pings_when_silent_then_declares_the_connection_dead() -> None:
    proto = opened(ping_interval=1)
    session = proto.session
    assert session is not None
    assert (session.ping_after, session.dead_after) == keepalive_times(1, 30) == (1.0, 3.0)
    assert proto.tick(0.9) is None and sent_frames(proto) == []
    assert session.deadline() == 1.0
    assert proto.tick(1.0) is None
    assert sent_frames(proto) == [(FrameType.PING, KEEPALIVE_TOKEN)]
    assert proto.tick(2.0) is None and sent_frames(proto) == []  # one PING per silence
    proto.receive_data(encode_frame(FrameType.PONG, KEEPALIVE_TOKEN), 2.5)
    assert proto.events() == []  # not a Pong event: the user did not ask
    assert proto.tick(3.4) is None and sent_frames(proto) == []  # heard at 2.5
    assert proto.tick(3.5) is None
    assert sent_frames(proto) == [(FrameType.PING, KEEPALIVE_TOKEN)]
    assert session.deadline() == 5.5
    ev = proto.tick(5.5)
    assert isinstance(ev, Closed) and ev.reason == "srv:1 stopped answering (nothing for 3 s)"
    assert proto.state is ClientState.CLOSED


def test_user_pings_still_give_pong_events() -> None:
    proto = opened()
    proto.send_ping(1.0)
    [(_, token)] = sent_frames(proto)
    proto.receive_data(encode_frame(FrameType.PONG, token), 1.25)
    assert proto.events() == [Pong(0.25)]


@pytest.mark.parametrize("ping_interval,window,expected", [
    (30, 30, (10.0, 15.0)),  # the defaults: a dead link noticed within 15 s of silence
    (1, 30, (1.0, 3.0)),
    (0, 30, (10.0, 15.0)),  # unknown interval
    (30, 3, (1.0, 3.0)),  # a short window: ping sooner
    (0.1, 30, (0.5, 2.5)),
    (30, 0, (10.0, 15.0)),
])
def test_keepalive_times(ping_interval, window, expected) -> None:
    assert keepalive_times(ping_interval, window) == expected


def test_peer_away_and_back_notices() -> None:
    proto = opened()
    proto.receive_data(encode_json_frame(FrameType.NOTICE, {"code": "peer_away", "message": "bob lost it"})
                       + encode_json_frame(FrameType.NOTICE, {"code": "peer_back", "message": "bob is back"})
                       + encode_json_frame(FrameType.NOTICE, {"code": "undelivered", "message": "x"}), 0.0)
    away, back, other = proto.events()
    assert isinstance(away, PeerAway) and isinstance(back, PeerBack) and type(other).__name__ == "Notice"
    assert event_json(away) == {"event": "peer_away", "message": "bob lost it"}
    assert event_json(back) == {"event": "peer_back", "message": "bob is back"}


def test_presenter_lines_and_away_state() -> None:
    p = Presenter("alice")
    p.lines(Paired("bob", None))
    assert partner_text(p) == "partner: bob"
    assert [l.plain() for l in p.lines(PeerAway("peer_away", "bob lost the connection\x1b[2J; waiting"))] == [
        "* bob lost the connection^[[2J; waiting"]
    assert p.away and partner_text(p) == "partner: bob (away)"
    assert [l.plain() for l in p.lines(PeerBack("peer_back", ""))] == ["* bob is back"]
    assert not p.away and partner_text(p) == "partner: bob"
    assert [l.plain() for l in p.lines(Reconnecting("reset\x07"))] == ["* connection lost: reset^G; reconnecting..."]
    assert p.paired  # still paired while we reconnect
    assert [l.plain() for l in p.lines(Resumed("bob", None, 0))] == ["* reconnected"]
    assert p.paired and p.peer == "bob"
    assert [l.plain() for l in p.lines(ResumeFailed("gone", 2))] == [
        "* the conversation could not be resumed: gone; starting afresh "
        "(2 messages you sent may not have reached your partner)"]
    assert not p.paired and partner_text(p) == "waiting..."
    p.lines(Resumed(None, "lab", 0))
    assert not p.paired
    p.lines(Waiting(None))


def test_event_json_of_resume_events() -> None:
    assert event_json(Resumed("bob", "lab", 3)) == {"event": "resumed", "peer": "bob", "room": "lab", "resent": 3}
    assert event_json(Reconnecting("reset")) == {"event": "reconnecting", "reason": "reset"}
    assert event_json(ResumeFailed("gone", 1)) == {"event": "resume_failed", "message": "gone", "unconfirmed": 1}


def test_what_counts_as_a_drop() -> None:
    session = ClientSession(TOKEN, 30, 30, 0.0)
    assert is_drop(session, Closed("reset"))
    assert is_drop(session, ServerError("timeout", "you were idle"))
    assert not is_drop(session, ServerError("shutdown", "bye"))
    assert not is_drop(session, ServerError("bad_frame", "no"))
    assert not is_drop(None, Closed("reset"))  # v1: a lost connection ends the client
    assert is_expired(RefusedError("session_expired", "x")) and not is_expired(RefusedError("room_full", "x"))
    assert not is_expired(ConnectError("refused"))
    err = RefusedError("session_expired", "h:1 refused: that conversation is over")
    assert expired_message(err, "h:1") == "that conversation is over"


def test_resume_plan_backs_off_within_the_window() -> None:
    session = ClientSession(TOKEN, 5.0, 30, 0.0)
    plan = ResumePlan(session, 100.0)
    assert plan.retry_at == 100.0 + BACKOFF[0] == 100.2
    delays = []
    now = plan.retry_at
    while plan.failed(now):
        delays.append(round(plan.retry_at - now, 3))
        now = plan.retry_at
    assert delays == [0.5, 1.0, 2.0]  # then the next one would start after the window (105)
    config = ClientConfig(name="a", timeout=10.0)
    assert plan.attempt_config(config, 101.0).timeout == 4.0
    assert plan.attempt_config(config, 104.5).timeout == 1.0  # never below a second
    assert "5 s" in str(plan.gave_up("h:1", ConnectError("refused")))


def test_cli_no_resume_option_and_env(monkeypatch) -> None:
    from click.testing import CliRunner

    import chatpair.client
    from chatpair.cli import cli

    seen: list = []
    monkeypatch.setattr(chatpair.client, "run_client", lambda config, **kw: seen.append(config) or 0)
    for var in [v for v in os.environ if v.startswith("CHATPAIR_")]:
        monkeypatch.delenv(var)
    runner = CliRunner()
    assert runner.invoke(cli, ["client"]).exit_code == 0 and seen[-1].resume is True
    assert runner.invoke(cli, ["client", "--no-resume"]).exit_code == 0 and seen[-1].resume is False
    result = runner.invoke(cli, ["client"], env={"CHATPAIR_CLIENT_NO_RESUME": "1"})
    assert result.exit_code == 0 and seen[-1].resume is False
    assert "CHATPAIR_CLIENT_NO_RESUME" in runner.invoke(cli, ["client", "--help"]).output
