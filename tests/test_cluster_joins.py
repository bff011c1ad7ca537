"""First JOINs asked by the listener itself (chatpair/server/cluster_joins.py), and what backs them up.

Against a real redis-server. End to end with two nodes: clients keep being
paired across nodes, each exactly once, while every Redis connection is
killed again and again as they arrive (the listener's batch fails, the I/O
thread takes over and finds out what Redis did). In process, on a node
whose threads are not started: the I/O thread's ``join_unsure`` answers a
JOIN whose reply was lost exactly as the JOIN would have been answered,
without joining twice; and the mirror ends right when the partner's node
paired the client before the listener's note of its JOIN came.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from conftest import wait_for
from redisserver import RedisServer, needs_redis, rclient, redis_server  # noqa: F401 (fixtures)
from test_cluster_nodes import WAITING, join, nodes, paired  # noqa: F401 (fixture)
from wire import HELLO, frame, hello_payload

from chatpair.cluster.lobby import ClusterLobby, Matched, Queued
from chatpair.cluster.mirror import take_seen
from chatpair.cluster.node import ClusterNode
from chatpair.cluster.nodeio import join_unsure
from chatpair.cluster.peer import RemotePeer, Routes
from chatpair.cluster.results import Joined

pytestmark = [needs_redis, pytest.mark.timeout(60)]


def test_pairs_keep_forming_across_nodes_while_redis_connections_are_killed(nodes, rclient):  # noqa: F811
    from chatpair.cluster.names import Keys

    keys = Keys("{chatpair}:")
    n0, n1 = nodes(2)
    for round_ in range(6):
        rclient.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        a = join(n0, f"a{round_}")
        a.expect(WAITING)
        b = join(n1, f"b{round_}")
        b.expect(WAITING)
        paired(a, b, f"a{round_}", f"b{round_}")
        a.close()
        b.close()
        # Both gone from Redis before the next round: a LEAVE the next kill catches mid-way is
        # retried 0.5 s later, and a newcomer meanwhile would meet the one who left (requeued when
        # the partner's PEER_LEFT came first): paired, then told PEER_LEFT at once, not this test.
        wait_for(f"round {round_}'s clients gone from Redis",
                 lambda: not rclient.scard(keys.node_clients("n0")) and not rclient.scard(keys.node_clients("n1")), 10)


@pytest.fixture
def node(redis_server: RedisServer, rclient) -> Any:  # noqa: F811
    """Node A, registered, its threads not started: its I/O thread's functions are called directly."""
    posted: list[Any] = []
    made = ClusterNode(redis_server.url, "A", posted.append)
    made.lobby.register()
    made.posted = posted  # type: ignore[attr-defined]
    yield made
    made.lobby.close()
    made.inbox.redis.close()


@pytest.fixture
def other(redis_server: RedisServer, rclient) -> Any:  # noqa: F811
    lobby = ClusterLobby(redis_server.client(), "B")
    lobby.register()
    yield lobby
    lobby.close()


def test_a_join_redis_never_saw_is_made(node, rclient):  # noqa: F811
    cid = node.cid(1)
    join_unsure(node.io, cid, "ann", None)
    assert node.posted == [Joined(cid, Queued(cid))]
    assert node.lobby.waiting() == [cid] and cid in node.io.waiting


def test_a_join_redis_did_is_not_made_again(node):
    cid = node.cid(1)
    node.lobby.join(cid, None, name="ann")  # done; its reply lost
    join_unsure(node.io, cid, "ann", None)
    assert node.posted == [Joined(cid, Queued(cid))]  # no "already in the lobby"
    assert node.lobby.waiting() == [cid]


def test_a_join_that_matched_a_client_elsewhere_is_answered_matched_with_a_route(node, other):
    theirs, ours = other.cid(1), node.cid(1)
    other.join(theirs, None, name="bob")
    node.lobby.join(ours, None, name="ann")  # matched with bob; its reply lost
    join_unsure(node.io, ours, "ann", None)
    (answer,) = node.posted
    assert answer.result == Matched(theirs, ours) and answer.result.waiter_name == "bob"
    assert answer.peer is not None and answer.peer.remote == theirs and node.routes.get(ours) is answer.peer
    assert node.io.chatting[ours].partner == theirs


def test_a_pair_whose_paired_entry_came_first_is_left_to_it(node, other):
    ours, theirs = node.cid(1), other.cid(1)
    node.lobby.join(ours, None, name="ann")  # waiting; its reply lost ...
    other.join(theirs, None, name="bob")  # ... bob's node pairs it, our inbox says so
    node.dispatch(node.inbox.read())
    told = list(node.posted)  # RemotePaired: the listener hears of the pair from the entry
    assert node.routes.get(ours) is not None
    join_unsure(node.io, ours, "ann", None)
    assert node.posted == told  # nothing more: no second answer to race the first
    assert node.routes.get(ours).remote == theirs  # the one route, from the paired entry
    assert node.io.chatting[ours].partner == theirs  # the mirror knows


def test_the_mirror_is_right_when_the_partners_node_paired_first(node):
    ours, theirs = node.cid(1), "B:x-1"
    node.io._do(("paired_seen", ours, theirs, "bob"))  # before the listener's note of our JOIN
    node.seen_joins.append((ours, "ann", None, Queued(ours)))
    take_seen(node.io)
    assert ours not in node.io.waiting
    assert node.io.chatting[ours].partner == theirs and node.io.chatting[ours].partner_name == "bob"


def test_a_join_whose_pair_ended_meanwhile_is_left_to_that_pairs_end(node, other):
    """Idle in Redis: it was paired (the entry, or a newcomer of ours, told the listener) and the
    pair ended; that end queues it again. Joining it here as well would queue it twice."""
    ours, theirs = node.cid(1), other.cid(1)
    node.lobby.join(ours, None, name="ann")  # waiting; its reply lost ...
    other.join(theirs, None, name="bob")  # ... bob pairs with it ...
    other.unpair(ours, theirs, leaver=theirs, reason="bye")  # ... and leaves
    join_unsure(node.io, ours, "ann", None)
    assert node.posted == [] and node.lobby.state_of(ours) == "idle"


def test_joins_wait_behind_a_request_that_takes_a_waiting_client_out_of_pairing(node, redis_server):  # noqa: F811
    from chatpair.server.cluster_joins import FreshJoins

    fresh = FreshJoins(node, redis_server.url)
    try:
        fresh.ready = True
        assert fresh.take(_Conn(1, "ann"))
        fresh.hold()  # e.g. a waiting client kept away: set_away is on its way to the I/O thread
        assert fresh.flush() == []  # ann's JOIN goes behind it
        assert not fresh.take(_Conn(2, "bob"))  # and so do new ones until the I/O thread has passed it
        queued = [node.requests.get_nowait() for _ in range(2)]
        assert queued == [("barrier", 1), ("join", node.cid(1), "ann", None, False)]
        node.io._do(queued[0])
        assert fresh.take(_Conn(3, "cat"))
    finally:
        fresh.close()


def test_the_mirror_records_no_pair_with_a_waiter_of_ours_that_left(node):
    from chatpair.cluster.lobby import Waiting
    from chatpair.cluster.mirror import note_match

    io, ann, gone, cat = node.io, node.cid(1), node.cid(2), node.cid(3)
    io.waiting[ann] = Waiting(ann, "ann", None)
    note_match(io, Matched(gone, cat, "gone"), "cat", None)  # it left: its LEAVE ends this pair
    assert io.chatting == {}
    note_match(io, Matched(ann, cat, "ann"), "cat", None)
    assert set(io.chatting) == {ann, cat} and io.waiting == {}


def test_two_threads_learning_of_one_pair_make_one_route():
    routes = Routes()
    first, second = RemotePeer("A:x-1", "B:y-1", "bob"), RemotePeer("A:x-1", "B:y-1", "bob")
    assert routes.claim(first) is None and routes.claim(second) is first
    assert routes.get("A:x-1") is first
    newer = RemotePeer("A:x-1", "C:z-1", "cat")  # a later partner replaces a stale route
    assert routes.claim(newer) is None and routes.get("A:x-1") is newer


def test_clients_gone_before_their_join_went_out_leave_no_ghost_in_redis(nodes, rclient):  # noqa: F811
    """HELLO and at once end of file (or a reset): the listener drops the client in the turn that
    queued its JOIN; the JOIN must not go out after the LEAVE (a waiting ghost nobody removes)."""
    (n0,) = nodes(1)
    for i in range(60):
        with socket.create_connection(("127.0.0.1", n0.port), timeout=5) as quick:
            quick.sendall(frame(HELLO, hello_payload(f"q{i}")))
            if i % 2:
                quick.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            # else: HELLO and end of file, read together
    survivor = join(n0, "last")
    survivor.expect(WAITING)
    lobby = ClusterLobby(rclient, "probe")  # (reads only)
    wait_for("only the last client waiting in Redis", lambda: len(lobby.waiting()) == 1, 10)


class _Conn:
    """What FreshJoins reads of a connection."""

    def __init__(self, cid: int, name: str, room: str | None = None) -> None:
        self.cid, self.name, self.room = cid, name, room


def test_the_listeners_batch_leaves_out_who_left_and_hands_on_who_is_asked_about(node, redis_server):  # noqa: F811
    from chatpair.server.cluster_joins import FreshJoins

    fresh = FreshJoins(node, redis_server.url)
    try:
        fresh.ready = True
        ann, bob, cat = _Conn(1, "ann"), _Conn(2, "bob"), _Conn(3, "cat")
        assert fresh.take(ann) and fresh.take(bob) and fresh.take(cat)
        assert fresh.drop(bob) and not fresh.drop(bob)  # left before its JOIN went out: none goes
        fresh.release(cat)  # e.g. its session is kept away: its JOIN goes to the I/O thread first
        assert node.requests.get_nowait() == ("join", node.cid(3), "cat", None, False)
        answers = fresh.flush()
        assert [a.cid for a in answers] == [node.cid(1)] and answers[0].result == Queued(node.cid(1))
        assert node.lobby.waiting() == [node.cid(1)]  # bob never reached Redis
        assert list(node.seen_joins) == [(node.cid(1), "ann", None, Queued(node.cid(1)))]
        assert fresh.flush() == []
    finally:
        fresh.close()
