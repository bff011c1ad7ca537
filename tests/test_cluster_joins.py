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

from typing import Any

import pytest
from redisserver import RedisServer, needs_redis, rclient, redis_server  # noqa: F401 (fixtures)
from test_cluster_nodes import WAITING, join, nodes, paired  # noqa: F401 (fixture)

from chatpair.cluster.lobby import ClusterLobby, Matched, Queued
from chatpair.cluster.node import ClusterNode
from chatpair.cluster.nodeio import join_unsure, note_joined
from chatpair.cluster.results import Joined

pytestmark = [needs_redis, pytest.mark.timeout(60)]


def test_pairs_keep_forming_across_nodes_while_redis_connections_are_killed(nodes, rclient):  # noqa: F811
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
    assert node.routes.get(ours) is not None
    join_unsure(node.io, ours, "ann", None)
    assert isinstance(node.posted[-1], Joined) and node.posted[-1].result == Queued(ours)
    assert node.routes.get(ours).remote == theirs  # the one route, from the paired entry


def test_the_mirror_is_right_when_the_partners_node_paired_first(node):
    ours, theirs = node.cid(1), "B:x-1"
    node.io._do(("paired_seen", ours, theirs, "bob"))  # before the listener's note of our JOIN
    note_joined(node.io, ours, "ann", None, Queued(ours))
    assert ours not in node.io.waiting
    assert node.io.chatting[ours].partner == theirs and node.io.chatting[ours].partner_name == "bob"
