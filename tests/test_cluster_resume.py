"""Resume (PROTOCOL.md section 6) in cluster mode: three real nodes, a real redis-server.

A client paired with a client of another node drops (a reset, as a dying
network does) while messages are in flight both ways, and comes back on
the node that held its session, on its partner's node, or on the third
node: it finds the same partner, and nothing is lost or doubled in either
direction. A token that expired, one no node made, and one whose node was
killed: ERROR ``session_expired``, the words of a single server.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import ServerProcess
from redisserver import RedisServer, needs_redis, rclient, redis_server  # noqa: F401 (fixtures)
from test_resume_server import Peer, msg
from wire import ERROR, MSG, NOTICE, PAIRED, PEER_LEFT, RESUMED, WAITING, WELCOME

pytestmark = [needs_redis, pytest.mark.timeout(60)]

EXPIRED = "that conversation can no longer be resumed; start a new one"


@pytest.fixture
def cluster(redis_server: RedisServer, rclient, start_server):  # noqa: F811 (fixtures)
    """``cluster(window)`` -> three nodes n0, n1, n2 with that resume window, on an emptied Redis."""

    def start(window: float = 10.0) -> list[ServerProcess]:
        return [start_server("--cluster", redis_server.url, "--node-id", f"n{i}", "--resume-window", str(window))
                for i in range(3)]

    return start


def come_back(old: Peer, port: int) -> Peer:
    """A new connection to ``port`` that RESUMEs ``old``'s session with its count."""
    new = Peer(port, old.timeout)
    new.session, new.received = old.session, old.received
    new.send_frame(0x08, json.dumps({"version": 1, "session": new.session, "received": new.received}).encode())
    return new


def paired_across(a_port: int, b_port: int) -> tuple[Peer, Peer]:
    alice, bob = Peer(a_port), Peer(b_port)
    welcome = alice.start("alice")
    assert welcome["session"] and welcome["resume_window"] > 0
    bob.start("bob")
    assert alice.want(PAIRED)["peer"] == "bob"
    assert bob.want(PAIRED)["peer"] == "alice"
    return alice, bob


def drop_and_come_back(nodes: list[ServerProcess], back_to: int, bob_on: int = 1) -> None:
    """alice (node 0) and bob (node ``bob_on``) chat; alice drops mid-flight and resumes on node ``back_to``."""
    alice, bob = paired_across(nodes[0].port, nodes[bob_on].port)
    a_sent = [f"a{i}" for i in range(40)]
    b_sent = [f"b{i}" for i in range(40)]
    for i in range(40):
        alice.send(msg(a_sent[i]))
        bob.send(msg(b_sent[i]))
    a_got = alice.msgs(10)  # alice has read 10 of bob's; the rest is in flight when she drops
    alice.cut()
    b_got: list[str] = []
    while True:  # bob: alice's messages that got through, then peer_away
        ftype, payload = bob.next_frame()
        if ftype == NOTICE:
            notice = json.loads(payload)
            assert notice["code"] == "peer_away", notice
            assert "alice lost the connection" in notice["message"]
            break
        assert ftype == MSG, (ftype, payload)
        b_got.append(payload.decode())
    for i in range(40, 60):  # bob goes on sending to the absent alice
        b_sent.append(f"b{i}")
        bob.send(msg(b_sent[-1]))
    new = come_back(alice, nodes[back_to].port)
    welcome = new.want(WELCOME)
    assert welcome["session"] == alice.session
    resumed = new.want(RESUMED)
    assert resumed["peer"] == "bob"
    assert resumed["room"] is None
    server_has = resumed["received"]
    assert len(b_got) <= server_has <= 40
    for text in a_sent[server_has:]:  # what the server never got, sent again
        new.send(msg(text))
    for i in range(40, 50):
        a_sent.append(f"a{i}")
        new.send(msg(a_sent[-1]))
    a_got += new.msgs(50)
    assert a_got == b_sent  # every one of bob's, once, in order
    back_seen = False
    while len(b_got) < 50 or not back_seen:
        ftype, payload = bob.next_frame()
        if ftype == NOTICE:
            notice = json.loads(payload)
            assert notice["code"] == "peer_back" and notice["message"] == "alice is back", notice
            back_seen = True
            continue
        assert ftype == MSG, (ftype, payload)
        b_got.append(payload.decode())
    assert b_got == a_sent  # every one of alice's, once, in order
    # the pair goes on, both ways, and ends as any pair does
    new.send(msg("still here"))
    assert bob.msgs(1) == ["still here"]
    bob.send(msg("me too"))
    assert new.msgs(1) == ["me too"]
    bob.send_frame(0x04)
    assert new.want(PEER_LEFT) == {"peer": "bob", "reason": "bye"}
    assert new.want(WAITING) == {"room": None}
    if back_to:  # the session moved from node 0 to the node alice came back to
        nodes[back_to].wait_stderr("took over a session from node n0", 2)
        nodes[0].wait_stderr("resumed on another node; the session moved there", 2)
    for node in nodes:
        assert "Traceback" not in node.stderr()
        assert alice.session not in node.stderr()  # the token is never logged


def test_resume_on_the_node_that_holds_the_session(cluster) -> None:
    drop_and_come_back(cluster(), back_to=0)


def test_resume_on_the_partners_node(cluster) -> None:
    drop_and_come_back(cluster(), back_to=1)


def test_resume_on_a_third_node(cluster) -> None:
    drop_and_come_back(cluster(), back_to=2)


def test_resume_elsewhere_when_the_partner_was_on_the_same_node(cluster) -> None:
    drop_and_come_back(cluster(), back_to=2, bob_on=0)  # the pair goes on across nodes from then on


def test_a_client_whose_partner_left_while_it_was_away_resumes_elsewhere_and_waits_again(cluster) -> None:
    n0, n1, n2 = cluster()
    alice, bob = paired_across(n0.port, n1.port)
    bob.send(msg("bye soon"))
    alice.cut()
    assert bob.want(NOTICE)["code"] == "peer_away"
    bob.send_frame(0x04)  # bob leaves while alice is away
    bob.expect_closed()
    new = come_back(alice, n2.port)
    assert new.want(WELCOME)["session"] == alice.session
    resumed = new.want(RESUMED)
    assert resumed["room"] is None
    if resumed["peer"] == "bob":  # "bye soon" had not reached alice: it comes again, before bob left
        assert new.msgs(1) == ["bye soon"]
    assert new.want(PEER_LEFT) == {"peer": "bob", "reason": "bye"}
    assert new.want(WAITING) == {"room": None}
    carol = Peer(n1.port)
    carol.start("carol")
    assert new.want(PAIRED)["peer"] == "carol"
    assert carol.want(PAIRED)["peer"] == "alice"
    new.send(msg("hello carol"))
    assert carol.msgs(1) == ["hello carol"]


def test_a_waiting_client_resumes_on_another_node_and_is_paired_there(cluster) -> None:
    n0, n1, n2 = cluster()
    alice = Peer(n0.port)
    alice.start("alice")
    alice.cut()  # the drop and the RESUME race: either order must work
    new = come_back(alice, n1.port)
    assert new.want(WELCOME)["session"] == alice.session
    assert new.want(RESUMED) == {"received": 0, "peer": None, "room": None}
    bob = Peer(n2.port)
    bob.start("bob")
    assert new.want(PAIRED)["peer"] == "bob"
    assert bob.want(PAIRED)["peer"] == "alice"
    new.send(msg("hi"))
    assert bob.msgs(1) == ["hi"]
    n1.wait_stderr("took over a session from node n0", 2)


def test_expired_unknown_and_foreign_tokens_get_session_expired(cluster) -> None:
    n0, n1, n2 = cluster(window=1.0)
    alice, bob = paired_across(n0.port, n1.port)
    alice.cut()
    assert bob.want(NOTICE)["code"] == "peer_away"
    for i in range(3):  # kept for alice, who never comes back in time
        bob.send(msg(f"lost {i}"))
    for _ in range(3):  # the window passed: each one alice never acknowledged is said undelivered
        assert bob.want(NOTICE, timeout=5)["code"] == "undelivered"
    assert bob.want(PEER_LEFT) == {"peer": "alice", "reason": "disconnected"}
    assert bob.want(WAITING) == {"room": None}
    for port in (n0.port, n1.port, n2.port):
        late = come_back(alice, port)
        assert late.want(ERROR) == {"code": "session_expired", "message": EXPIRED}
    for token in ("n2~" + "x" * 24, "nobody~" + "y" * 24, "z" * 32):
        stranger = Peer(n1.port)
        stranger.session = token
        stranger = come_back(stranger, n1.port)
        assert stranger.want(ERROR) == {"code": "session_expired", "message": EXPIRED}


def test_a_session_whose_node_was_killed_is_expired_elsewhere(cluster) -> None:
    n0, n1, n2 = cluster()
    alice, bob = paired_across(n0.port, n1.port)
    alice.send(msg("before"))
    assert bob.msgs(1) == ["before"]
    n0.kill()
    started = time.monotonic()
    late = come_back(alice, n2.port)
    assert late.want(ERROR, timeout=5) == {"code": "session_expired", "message": EXPIRED}
    assert time.monotonic() - started < 4.0


def test_a_live_connection_is_taken_over_elsewhere_and_the_session_moves_again(cluster) -> None:
    n0, n1, n2 = cluster()
    alice, bob = paired_across(n0.port, n1.port)
    alice.send(msg("one"))
    assert bob.msgs(1) == ["one"]
    bob.send(msg("to alice"))
    assert alice.msgs(1) == ["to alice"]
    alice.ack()
    # a second device (or a drop n0 has not noticed): the old connection is closed without a word
    second = come_back(alice, n2.port)
    assert second.want(WELCOME)["session"] == alice.session
    assert second.want(RESUMED) == {"received": 1, "peer": "bob", "room": None}
    alice.expect_closed()
    second.send(msg("two"))
    assert bob.msgs(1) == ["two"]  # and no peer_away, no peer_back before it
    # it drops on n2 and comes back on n0, whose name the token carries: Redis knows it moved
    second.cut()
    assert bob.want(NOTICE)["code"] == "peer_away"
    third = come_back(second, n0.port)
    assert third.want(WELCOME)["session"] == alice.session
    assert third.want(RESUMED) == {"received": 2, "peer": "bob", "room": None}
    assert bob.want(NOTICE) == {"code": "peer_back", "message": "alice is back"}
    third.send(msg("three"))
    assert bob.msgs(1) == ["three"]
    bob.send(msg("hi"))
    assert third.msgs(1) == ["hi"]
    third.send_frame(0x04)  # BYE ends the session: its token is dead everywhere
    assert bob.want(PEER_LEFT) == {"peer": "alice", "reason": "bye"}
    for port in (n0.port, n1.port, n2.port):
        assert come_back(third, port).want(ERROR) == {"code": "session_expired", "message": EXPIRED}
