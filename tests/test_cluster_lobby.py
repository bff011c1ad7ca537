"""The cluster lobby (chatpair/cluster/lobby.py) against a real redis-server.

Every pairing rule of the single-server lobby, across two "nodes" (two
ClusterLobby handles with their own Redis connections); a seeded random
churn run against both lobbies side by side must give the same answers;
threads racing to join never pair anyone twice; a dead node's waiting
clients are skipped and purged, never paired; its partners elsewhere are
told; a restarted node replaces its stale registration; heartbeats say when
to rebuild, and the rebuild after Redis lost its data restores pairs and
queues. DeathWatch (pure) decides when a missing node is dead.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
from redisserver import RedisServer, needs_redis, rclient, redis_server  # noqa: F401 (fixtures)

from chatpair.cluster.liveness import DeathWatch
from chatpair.cluster.lobby import (
    Chatting,
    ClusterLobby,
    Matched,
    NodeGone,
    PeerGone,
    Queued,
    RoomFull,
    Waiting,
)
from chatpair.server.lobby import Lobby
from chatpair.server.lobby import Matched as LocalMatched
from chatpair.server.lobby import Queued as LocalQueued

pytestmark = needs_redis


def entries(client: Any, lobby: ClusterLobby, node: str) -> list[dict[str, str]]:
    """The control entries in ``node``'s inbox, decoded."""
    out = []
    for _, fields in client.xrange(lobby.keys.inbox(node)):
        out.append({k.decode(): v.decode() for k, v in fields.items()})
    return out


@pytest.fixture
def nodes(redis_server: RedisServer, rclient: Any):  # noqa: F811
    """Two registered nodes, A and B, each with its own connection."""
    made = []

    def make(name: str, **options: Any) -> ClusterLobby:
        lobby = ClusterLobby(redis_server.client(), name, **options)
        lobby.register()
        made.append(lobby)
        return lobby

    yield make
    for lobby in made:
        lobby.close()


@pytest.fixture
def ab(nodes):
    return nodes("A"), nodes("B")


# -- the rules, across two nodes ------------------------------------------------------------


def test_open_lobby_is_fifo_across_nodes(ab):
    a, b = ab
    c = [a.cid(1), b.cid(2), b.cid(3), a.cid(4), b.cid(5)]
    assert a.join(c[0], None, name="ann") == Queued(c[0])
    m = b.join(c[1], None, name="bob")
    assert m == Matched(c[0], c[1]) and m.waiter_name == "ann"
    assert b.join(c[2], None) == Queued(c[2])
    assert a.join(c[3], None) == Matched(c[2], c[3])
    assert b.join(c[4], None) == Queued(c[4])
    assert a.partner_of(c[0]) == c[1] and a.partner_of(c[1]) == c[0]
    assert a.waiting() == [c[4]] and a.pairs_chatting() == 2


def test_cross_node_match_tells_the_waiters_node(rclient, ab):  # noqa: F811
    a, b = ab
    a.join(a.cid(1), None, name="ann")
    b.join(b.cid(1), None, name="bob")
    assert entries(rclient, a, "A") == [{"t": a.cid(1), "s": b.cid(1), "q": "0", "k": "paired", "p": "bob"}]
    assert entries(rclient, b, "B") == []
    a.join(a.cid(2), None)
    a.join(a.cid(3), None)  # same node: nothing in any inbox
    assert len(entries(rclient, a, "A")) == 1


def test_joins_in_one_pipeline_answer_as_one_by_one_also_after_redis_lost_its_scripts(rclient, ab):  # noqa: F811
    a, b = ab
    a.join(a.cid(1), None, name="ann")
    got = b.join_many([(b.cid(1), None, "bob", False), (b.cid(2), None, "bea", False)])
    assert got == [Matched(a.cid(1), b.cid(1)), Queued(b.cid(2))] and got[0].waiter_name == "ann"
    rclient.script_flush()  # as after a restart without persistence: EVALSHA is refused (NOSCRIPT)
    got = a.join_many([(a.cid(3), None, "amy", False), (a.cid(4), "r", "ada", False), (a.cid(5), None, "al", False)])
    assert got == [Matched(b.cid(2), a.cid(3)), Queued(a.cid(4)), Queued(a.cid(5))]
    assert a.partner_of(b.cid(2)) == a.cid(3) and a.waiting() == [a.cid(5)] and a.waiting("r") == [a.cid(4)]
    with pytest.raises(ValueError):
        a.join_many([(b.cid(9), None, "not ours", False)])


def test_joins_in_one_pipeline_take_one_round_trip(rclient, ab):  # noqa: F811
    a, _ = ab
    a.join(a.cid(1), None)  # the script is loaded
    rclient.config_resetstat()
    a.join_many([(a.cid(2), None, "", False), (a.cid(3), None, "", False)])
    stats = rclient.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 2
    assert not any(name.startswith("cmdstat_script") for name in stats)  # no SCRIPT EXISTS first


def test_rooms_pair_only_within_themselves(ab):
    a, b = ab
    assert a.join(a.cid(1), "x") == Queued(a.cid(1))
    assert b.join(b.cid(1), None) == Queued(b.cid(1))
    assert b.join(b.cid(2), "X") == Queued(b.cid(2))  # room codes are exact
    assert b.join(b.cid(3), "x") == Matched(a.cid(1), b.cid(3))
    assert a.pairs_in("x") == 1 and a.pairs_in(None) == 0 and a.waiting("X") == [b.cid(2)]


def test_room_full_for_an_arrival_but_never_for_a_requeued_client(ab):
    a, b = ab
    a.join(a.cid(1), "r")
    b.join(b.cid(1), "r")
    assert a.join(a.cid(2), "r") == RoomFull(a.cid(2))
    assert a.state_of(a.cid(2)) is None and a.waiting("r") == []
    assert a.join(a.cid(2), None) == Queued(a.cid(2))  # the open lobby is never full
    # The pair ends (bye from b:1): a:1 is requeued, and waits although the room had a pair.
    b.join(b.cid(2), "s")
    b.join(b.cid(3), "s")
    assert a.unpair(a.cid(1), b.cid(1), leaver=b.cid(1), reason="bye")
    b.leave(b.cid(1))
    assert a.pairs_in("r") == 0
    assert a.join(a.cid(1), "r", requeued=True) == Queued(a.cid(1))
    assert b.join(b.cid(4), "r") == Matched(a.cid(1), b.cid(4))
    # Requeued into a full room: waits, never refused.
    assert b.unpair(b.cid(2), b.cid(3), next_by=b.cid(2))
    assert b.join(b.cid(5), "s") == Queued(b.cid(5))
    assert b.join(b.cid(6), "s") == Matched(b.cid(5), b.cid(6))
    assert b.join(b.cid(2), "s", requeued=True) == Queued(b.cid(2))
    assert b.join(b.cid(3), "s", requeued=True) == Queued(b.cid(3))  # excluded from b:2: waits too


def test_next_excludes_while_both_last(ab):
    a, b = ab
    x, y, z = a.cid(1), b.cid(1), b.cid(2)
    a.join(x, None)
    b.join(y, None)
    assert a.unpair(x, y, next_by=x)
    assert a.join(x, None, requeued=True) == Queued(x)
    assert b.join(y, None, requeued=True) == Queued(y)  # excluded: both wait
    assert a.waiting() == [x, y]
    assert b.join(z, None) == Matched(x, z)
    # y is still excluded from x; once x leaves, the exclusion is gone with it.
    assert a.unpair(x, z, leaver=z, reason="bye")
    b.leave(z)
    a.leave(x)
    assert a.redis.exists(a.keys.excluded(y)) == 0
    assert b.join(b.cid(3), None) == Matched(y, b.cid(3))


def test_exclusion_does_not_outlive_a_connection_with_a_new_id(ab):
    a, b = ab
    a.join(a.cid(1), None)
    b.join(b.cid(1), None)
    a.unpair(a.cid(1), b.cid(1), next_by=b.cid(1))
    b.leave(b.cid(1))
    a.join(a.cid(1), None, requeued=True)
    assert b.join(b.cid(2), None) == Matched(a.cid(1), b.cid(2))


def test_an_away_client_keeps_its_place_but_is_not_paired(ab):
    a, b = ab
    x, y, z = a.cid(1), b.cid(1), b.cid(2)
    assert a.join(x, "r") == Queued(x)
    assert a.set_away(x)
    assert b.join(y, "r") == Queued(y)  # x is away: y waits behind it
    assert a.waiting("r") == [x, y]
    assert a.back(x) == Matched(y, x)  # back: paired with the first it may join
    assert a.waiting("r") == [] and a.partner_of(y) == x
    assert not a.set_away(x)  # only a waiting client can be away
    assert a.back(x) is None  # was not away
    assert b.join(z, None) == Queued(z) and b.set_away(z)
    assert b.back(z) is None and a.waiting() == [z]  # back, nobody to pair with: still waits
    b.set_away(z)
    b.leave(z)
    assert a.waiting() == [] and a.state_of(z) is None


def test_caller_errors(ab):
    a, b = ab
    a.join(a.cid(1), None)
    with pytest.raises(ValueError, match="already in the lobby"):
        a.join(a.cid(1), "room")
    b.join(b.cid(1), None)
    with pytest.raises(ValueError, match="already in the lobby"):
        b.join(b.cid(1), None)
    with pytest.raises(ValueError, match="still paired"):
        a.leave(a.cid(1))
    with pytest.raises(ValueError, match="neither"):
        a.unpair(a.cid(1), b.cid(1), next_by=a.cid(9))
    with pytest.raises(ValueError, match="not on node A"):
        a.join(b.cid(5), None)
    assert not a.unpair(a.cid(1), b.cid(7))  # not a pair: nothing done, False
    assert a.partner_of(a.cid(1)) == b.cid(1)


def test_unpair_tells_a_partner_on_another_node(rclient, ab):  # noqa: F811
    a, b = ab
    a.join(a.cid(1), None)
    b.join(b.cid(1), None)
    rclient.delete(a.keys.inbox("A"))
    assert b.unpair(a.cid(1), b.cid(1), next_by=b.cid(1), leaver=b.cid(1), reason="next")
    assert entries(rclient, a, "A") == [{"t": a.cid(1), "s": b.cid(1), "q": "0", "k": "peer_left", "p": "next"}]
    assert not b.unpair(a.cid(1), b.cid(1))  # already ended
    assert a.state_of(a.cid(1)) == "idle" and a.pairs_chatting() == 0


def test_everything_is_forgotten_when_all_leave(rclient, ab):  # noqa: F811
    a, b = ab
    ids = [a.cid(i) for i in range(4)] + [b.cid(i) for i in range(4)]
    for i, cid in enumerate(ids):
        (a if cid.startswith("A") else b).join(cid, "r" if i % 2 else None, name=f"n{i}")
    for cid in ids:
        partner = a.partner_of(cid)
        if partner:
            a.unpair(cid, partner, next_by=cid)
        a.leave(cid)
    kinds = {k.decode().split(":")[1] for k in rclient.keys("*")}
    assert kinds <= {"nodes", "node", "epoch", "inbox"}, kinds


# -- dead nodes -----------------------------------------------------------------------------


def test_a_dead_nodes_waiting_clients_are_skipped_and_purged(rclient, ab):  # noqa: F811
    a, b = ab
    ghost, ghost2 = b.cid(1), b.cid(2)
    b.join(ghost, None)
    b.join(ghost2, "r")
    rclient.delete(b.keys.node("B"))  # B's heartbeat lapsed
    m = a.join(a.cid(1), None)
    assert m == Queued(a.cid(1)) and m.ghosts == (ghost,)
    assert a.state_of(ghost) is None and ghost not in a.waiting()
    assert a.join(a.cid(2), "r").ghosts == (ghost2,)
    assert a.clients_of("B") == set()
    with pytest.raises(NodeGone, match="node B is not registered"):
        b.join(b.cid(3), None)


def test_a_ghost_is_never_paired_even_when_its_key_expires_by_itself(redis_server, nodes):  # noqa: F811
    """Redis's own PX expiry (not a DEL): wait for the key's "expired" event, then join."""
    a = nodes("A")
    events = redis_server.client()
    events.config_set("notify-keyspace-events", "Ex")
    pubsub = events.pubsub()
    try:
        pubsub.subscribe("__keyevent@0__:expired")
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        short = nodes("S", ttl_ms=50)
        short.join(short.cid(1), None)
        expired = a.keys.node("S").encode()
        message = pubsub.get_message(timeout=10)
        while message is not None and message.get("data") != expired:
            message = pubsub.get_message(timeout=10)
        assert message is not None, "S's node key did not expire within 10 s"
        joined = a.join(a.cid(1), None)
        assert joined == Queued(a.cid(1)) and joined.ghosts == (short.cid(1),)
    finally:
        pubsub.close()
        events.config_set("notify-keyspace-events", "")
        events.close()


def test_purge_tells_partners_on_live_nodes(rclient, nodes):  # noqa: F811
    a, b, c = nodes("A"), nodes("B"), nodes("C")
    a.join(a.cid(1), None)
    b.join(b.cid(1), None)  # A1-B1
    b.join(b.cid(2), "r")
    c.join(c.cid(1), "r")  # B2-C1
    b.join(b.cid(3), None)
    b.join(b.cid(4), None)  # B3-B4, both on the dead node
    b.join(b.cid(5), "q")  # waiting
    b.unpair(b.cid(3), b.cid(4), next_by=b.cid(3))
    b.join(b.cid(3), None, requeued=True)
    b.join(b.cid(4), None, requeued=True)  # excluded: both wait
    a.join(a.cid(2), None)  # takes B3 (oldest)
    rclient.delete(a.keys.inbox("A"), a.keys.inbox("C"))
    assert a.purge_node("B") is None  # alive: nothing done
    rclient.delete(b.keys.node("B"))
    assert a.dead_nodes() == {"B"}
    told = a.purge_node("B")
    assert sorted(told) == sorted([PeerGone(a.cid(1), b.cid(1)), PeerGone(c.cid(1), b.cid(2)),
                                   PeerGone(a.cid(2), b.cid(3))])
    assert sorted(e["t"] for e in entries(rclient, a, "A")) == sorted([a.cid(1), a.cid(2)])
    assert all(e["k"] == "peer_left" and e["p"] == "disconnected" for e in entries(rclient, a, "A"))
    assert entries(rclient, c, "C")[0]["t"] == c.cid(1)
    assert a.state_of(a.cid(1)) == "idle" and a.state_of(c.cid(1)) == "idle"
    assert a.pairs_chatting() == 0 and a.waiting() == [] and a.waiting("q") == []
    assert a.clients_of("B") == set() and a.dead_nodes() == set()
    assert a.redis.sismember(a.keys.nodes, "B") == 0
    assert a.purge_node("B") == []  # a second reaper finds nothing to do
    # The partners are requeued as usual.
    assert a.join(a.cid(1), None, requeued=True) == Queued(a.cid(1))
    assert c.join(c.cid(1), "r", requeued=True) == Queued(c.cid(1))


def test_a_restarted_node_replaces_its_stale_registration(redis_server, rclient, nodes):  # noqa: F811
    a, b = nodes("A"), nodes("B")
    a.join(a.cid(1), None)
    b.join(b.cid(1), None)
    b.join(b.cid(2), "r")
    b_again = ClusterLobby(redis_server.client(), "B")  # same id, new boot token
    assert b_again.boot != b.boot
    try:
        assert b_again.register() == [PeerGone(a.cid(1), b.cid(1))]
        assert a.state_of(a.cid(1)) == "idle" and a.waiting("r") == []
        assert b.heartbeat() == "taken"  # the old run learns it was replaced
        assert b_again.heartbeat() == "ok"
        assert b_again.join(b_again.cid(1), None) == Queued(b_again.cid(1))
        assert b_again.cid(1) != b.cid(1)
    finally:
        b_again.close()


def test_heartbeat_statuses(rclient, ab):  # noqa: F811
    a, b = ab
    assert a.heartbeat() == "ok"
    assert 0 < rclient.pttl(a.keys.node("A")) <= a.ttl_ms
    rclient.delete(a.keys.node("A"))
    assert a.heartbeat() == "expired"
    assert a.heartbeat() == "ok"
    epoch = a.epoch
    rclient.flushall()
    assert a.heartbeat() == "reset" and a.epoch != epoch
    assert b.heartbeat() == "reset" and b.epoch == a.epoch
    assert a.heartbeat() == "ok" and b.heartbeat() == "ok"


# -- rebuilding -----------------------------------------------------------------------------


def test_restore_after_redis_lost_everything(rclient, ab):  # noqa: F811
    a, b = ab
    a.join(a.cid(1), "r", name="ann")
    b.join(b.cid(1), "r", name="bob")  # A1-B1 in room r
    a.join(a.cid(2), None, name="al")
    a.join(a.cid(3), None, name="amy")  # A2-A3, same node
    b.join(b.cid(2), "s", name="bea")  # waiting
    a.join(a.cid(4), "t", name="ada")  # waiting
    rclient.flushall()
    assert a.heartbeat() == "reset"
    ra = a.restore([Waiting(a.cid(4), "ada", "t")],
                   [Chatting(a.cid(1), b.cid(1), "ann", "bob", "r"),
                    Chatting(a.cid(2), a.cid(3), "al", "amy", None),
                    Chatting(a.cid(3), a.cid(2), "amy", "al", None)], rebuild=True)
    assert ra.matched == () and ra.ended == ()
    assert b.heartbeat() == "reset"  # B's key was only a placeholder: B takes it back
    rb = b.restore([Waiting(b.cid(2), "bea", "s")], [Chatting(b.cid(1), a.cid(1), "bob", "ann", "r")],
                   rebuild=True)
    assert rb.matched == () and rb.ended == ()
    assert a.partner_of(a.cid(1)) == b.cid(1) and a.partner_of(b.cid(1)) == a.cid(1)
    assert a.partner_of(a.cid(2)) == a.cid(3)
    assert a.pairs_in("r") == 1 and a.pairs_in(None) == 1
    assert a.waiting("s") == [b.cid(2)] and a.waiting("t") == [a.cid(4)]
    assert a.clients_of("A") == {a.cid(i) for i in (1, 2, 3, 4)} and a.clients_of("B") == {b.cid(1), b.cid(2)}
    assert a.join(a.cid(5), "r") == RoomFull(a.cid(5))  # the room's pair is known again
    # Restoring twice changes nothing.
    again = a.restore([Waiting(a.cid(4), "ada", "t")], [Chatting(a.cid(1), b.cid(1), "ann", "bob", "r")],
                      rebuild=True)
    assert again.matched == () and again.ended == () and a.pairs_in("r") == 1


def test_restore_pairs_waiting_clients_of_different_nodes(rclient, ab):  # noqa: F811
    a, b = ab
    a.join(a.cid(1), "r")
    rclient.flushall()
    a.heartbeat()
    b.heartbeat()
    assert a.restore([Waiting(a.cid(1), "", "r")], [], rebuild=True).matched == ()
    got = b.restore([Waiting(b.cid(1), "", "r")], [], rebuild=True)
    assert got.matched == (Matched(a.cid(1), b.cid(1)),)


def test_restore_after_this_node_was_purged_reports_ended_pairs(rclient, ab):  # noqa: F811
    a, b = ab
    a.join(a.cid(1), None)
    b.join(b.cid(1), None)
    a.join(a.cid(2), "r")
    rclient.delete(a.keys.node("A"))
    assert b.purge_node("A") == [PeerGone(b.cid(1), a.cid(1))]
    assert a.heartbeat() == "expired"
    got = a.restore([Waiting(a.cid(2), "", "r")], [Chatting(a.cid(1), b.cid(1), "", "", None)], rebuild=False)
    assert got.ended == ((a.cid(1), b.cid(1)),)
    assert a.waiting("r") == [a.cid(2)]
    assert a.join(a.cid(1), None, requeued=True) == Queued(a.cid(1))


def test_restore_when_the_key_lapsed_but_nothing_was_purged(rclient, ab):  # noqa: F811
    a, b = ab
    a.join(a.cid(1), None)
    b.join(b.cid(1), None)
    rclient.delete(a.keys.node("A"))
    assert a.heartbeat() == "expired"
    got = a.restore([], [Chatting(a.cid(1), b.cid(1), "", "", None)], rebuild=False)
    assert got.ended == () and a.partner_of(a.cid(1)) == b.cid(1)


# -- same rules as the single-server lobby --------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_same_answers_as_the_single_server_lobby(ab, seed):
    """Seeded random churn through Lobby and ClusterLobby side by side: every answer equal."""
    a, b = ab
    rng = random.Random(seed)
    local = Lobby()
    cid: dict[int, str] = {}
    node: dict[int, ClusterLobby] = {}
    room_of: dict[int, str | None] = {}
    present: set[int] = set()  # in the lobby: waiting or chatting
    idle: list[int] = []  # connected, their pair just ended
    away: set[int] = set()  # waiting, connection dropped, session kept

    def as_cluster(result: Any) -> Any:
        if isinstance(result, LocalQueued):
            return Queued(cid[result.cid])
        if isinstance(result, LocalMatched):
            return Matched(cid[result.waiter], cid[result.newcomer])
        return RoomFull(cid[result.cid])

    def join(i: int, requeued: bool) -> None:
        want = local.join(i, room_of[i], requeued=requeued)
        got = node[i].join(cid[i], room_of[i], requeued=requeued)
        assert got == as_cluster(want), f"seed {seed}: client {i}"
        if not isinstance(got, RoomFull):
            present.add(i)

    for i in range(400):
        op = rng.random()
        if op < 0.4:
            node[i] = a if rng.random() < 0.5 else b
            cid[i], room_of[i] = node[i].cid(i), rng.choice([None, None, "r", "s"])
            join(i, requeued=False)
        elif op < 0.65:
            pairs = sorted({min(x, local.partner_of(x)) for x in present if local.partner_of(x) is not None})
            if pairs:
                x = rng.choice(pairs)
                y = local.partner_of(x)
                nb = rng.choice([None, x, y])
                local.unpair(x, y, next_by=nb)
                assert node[x].unpair(cid[x], cid[y], next_by=None if nb is None else cid[nb])
                present -= {x, y}
                idle += [x, y]
        elif op < 0.85 and idle:
            x = idle.pop(rng.randrange(len(idle)))
            if rng.random() < 0.3:
                local.leave(x)
                node[x].leave(cid[x])
            else:
                join(x, requeued=True)
        elif op < 0.93:
            waiting = sorted(x for x in present if local.partner_of(x) is None)
            if waiting:
                x = rng.choice(waiting)
                local.leave(x)
                node[x].leave(cid[x])
                present.discard(x)
                away.discard(x)
        elif away and rng.random() < 0.6:  # an away client comes back (RESUME)
            x = rng.choice(sorted(away))
            away.discard(x)
            want = local.back(x)
            got = node[x].back(cid[x])
            assert got == (None if want is None else as_cluster(want)), f"seed {seed}: back {x}"
        else:  # a waiting client's connection drops; its session is kept
            waiting = sorted(x for x in present if local.partner_of(x) is None and x not in away)
            if waiting:
                x = rng.choice(waiting)
                local.set_away(x)
                assert node[x].set_away(cid[x])
                away.add(x)
    for room in (None, "r", "s"):
        assert a.waiting(room) == [cid[i] for i in local.waiting(room)]
    for x in present:
        p = local.partner_of(x)
        assert a.partner_of(cid[x]) == (None if p is None else cid[p])
    assert a.pairs_chatting() == local.pairs_chatting()


# -- races ----------------------------------------------------------------------------------


def test_nodes_racing_to_join_never_pair_anyone_twice(nodes):
    """Three nodes' threads join 300 clients each at once: every pair is mutual, nobody twice."""
    lobbies = [nodes("A"), nodes("B"), nodes("C")]
    start = threading.Barrier(len(lobbies))
    results: dict[str, list[Any]] = {}
    errors: list[BaseException] = []

    def run(lobby: ClusterLobby) -> None:
        rng = random.Random(lobby.node)
        out = results.setdefault(lobby.node, [])
        try:
            start.wait(10)
            for i in range(300):
                out.append(lobby.join(lobby.cid(i), rng.choice([None, None, "r", "s"])))
        except Exception as error:  # noqa: BLE001 (reported below, in the test thread)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(lobby,)) for lobby in lobbies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    everything = [r for rs in results.values() for r in rs]
    matched = [r for r in everything if isinstance(r, Matched)]
    paired = [c for m in matched for c in (m.waiter, m.newcomer)]
    assert len(paired) == len(set(paired)), "a client was paired twice"
    a = lobbies[0]
    for m in matched:
        assert a.partner_of(m.waiter) == m.newcomer and a.partner_of(m.newcomer) == m.waiter
    waiting = {room: a.waiting(room) for room in (None, "r", "s")}
    assert all(len(q) <= 1 for q in waiting.values()), waiting  # nobody waits who could be paired
    known = set(paired) | {c for q in waiting.values() for c in q}
    refused = {r.cid for r in everything if isinstance(r, RoomFull)}
    assert known | refused == {lobby.cid(i) for lobby in lobbies for i in range(300)}
    assert a.pairs_chatting() == len(matched)


def test_a_purge_racing_joins_never_pairs_a_ghost(nodes, rclient):  # noqa: F811
    a, b, dead = nodes("A"), nodes("B"), nodes("D")
    ghosts = {dead.cid(i) for i in range(200)}
    for cid in sorted(ghosts):  # 200 waiting clients (written as JOIN would; JOIN would pair them)
        rclient.hset(a.keys.client(cid), mapping={"state": "waiting", "room": "*", "name": "", "partner": ""})
        rclient.rpush(a.keys.queue(None), cid)
        rclient.sadd(a.keys.node_clients("D"), cid)
    waiting_ghosts = set(a.waiting())
    assert waiting_ghosts == ghosts
    rclient.delete(a.keys.node("D"))
    start = threading.Barrier(3)
    got: list[Any] = []

    def joiner(lobby: ClusterLobby) -> None:
        start.wait(10)
        for i in range(100):
            got.append(lobby.join(lobby.cid(i), None))

    def purger() -> None:
        start.wait(10)
        b.purge_node("D")

    threads = [threading.Thread(target=joiner, args=(a,)), threading.Thread(target=joiner, args=(b,)),
               threading.Thread(target=purger)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not any(t.is_alive() for t in threads)
    matched = [r for r in got if isinstance(r, Matched)]
    assert len(matched) == 100  # the 200 live clients all paired with each other
    for r in matched:
        assert r.waiter not in ghosts and r.newcomer not in ghosts
    assert not set(a.waiting()) & waiting_ghosts and a.clients_of("D") == set()


# -- DeathWatch (no Redis) ------------------------------------------------------------------


def test_deathwatch_waits_for_the_grace_period():
    watch = DeathWatch(grace=2.0)
    assert watch.observe({"B"}, now=10.0) == []
    assert watch.observe({"B", "C"}, now=11.0) == []
    assert watch.observe({"B", "C"}, now=12.0) == ["B"]
    assert watch.observe({"C"}, now=13.5) == ["C"]
    watch.purged("C")
    assert watch.watching() == {}


def test_deathwatch_forgets_a_node_that_came_back_and_everything_on_reset():
    watch = DeathWatch(grace=1.0)
    watch.observe({"B"}, now=0.0)
    watch.observe(set(), now=0.5)  # B heartbeated again
    assert watch.observe({"B"}, now=1.2) == []
    watch.reset()  # Redis was unreachable: start over
    assert watch.observe({"B"}, now=2.0) == []
    assert watch.observe({"B"}, now=3.0) == ["B"]
