"""Pairing rules, without sockets: the lobby is plain methods on integer ids."""

from __future__ import annotations

import random

import pytest

from chatpair.server.lobby import Lobby, Matched, Queued, RoomFull


@pytest.fixture
def lobby() -> Lobby:
    return Lobby()


def assert_empty(lobby: Lobby, *cids: int) -> None:
    """Nothing left behind: no rooms, no pairs, none of ``cids`` known."""
    assert lobby.rooms() == set()
    assert lobby.pairs_chatting() == 0
    for cid in cids:
        assert cid not in lobby
        assert lobby.partner_of(cid) is None


# -- FIFO pairing ---------------------------------------------------------------------------


def test_first_client_waits(lobby):
    assert lobby.join(1, None) == Queued(1)
    assert lobby.waiting() == [1]
    assert 1 in lobby
    assert lobby.partner_of(1) is None
    assert lobby.rooms() == {None}


def test_second_client_is_paired_with_the_first(lobby):
    lobby.join(1, None)
    assert lobby.join(2, None) == Matched(waiter=1, newcomer=2)
    assert lobby.partner_of(1) == 2 and lobby.partner_of(2) == 1
    assert lobby.waiting() == []
    assert lobby.pairs_chatting() == 1
    assert 1 in lobby and 2 in lobby


def test_open_lobby_is_first_come_first_served(lobby):
    results = [lobby.join(cid, None) for cid in range(1, 9)]
    assert results == [Queued(1), Matched(1, 2), Queued(3), Matched(3, 4),
                       Queued(5), Matched(5, 6), Queued(7), Matched(7, 8)]
    assert lobby.pairs_chatting() == 4


def test_open_lobby_is_never_full(lobby):
    for cid in range(100):
        assert not isinstance(lobby.join(cid, None), RoomFull)
    assert lobby.pairs_chatting() == 50


def test_oldest_waiter_is_taken_first(lobby):
    # 1 and 2 wait (they refused each other via NEXT), then 3 arrives: 1 is older.
    lobby.join(1, None)
    lobby.join(2, None)
    lobby.unpair(1, 2, next_by=1)
    lobby.join(1, None, requeued=True)
    lobby.join(2, None, requeued=True)
    assert lobby.waiting() == [1, 2]
    assert lobby.join(3, None) == Matched(1, 3)
    assert lobby.join(4, None) == Matched(2, 4)


def test_joining_twice_is_a_caller_error(lobby):
    lobby.join(1, None)
    with pytest.raises(ValueError):
        lobby.join(1, None)
    with pytest.raises(ValueError):
        lobby.join(1, "other")
    lobby.join(2, None)
    with pytest.raises(ValueError):  # chatting counts too
        lobby.join(2, None)


# -- rooms ----------------------------------------------------------------------------------


def test_rooms_are_isolated_from_each_other_and_from_the_lobby(lobby):
    assert lobby.join(1, "red") == Queued(1)
    assert lobby.join(2, None) == Queued(2)
    assert lobby.join(3, "blue") == Queued(3)
    assert lobby.join(4, "Red") == Queued(4)  # room codes are exact
    assert lobby.waiting("red") == [1]
    assert lobby.waiting() == [2]
    assert lobby.waiting("blue") == [3]
    assert lobby.rooms() == {"red", None, "blue", "Red"}
    assert lobby.join(5, "blue") == Matched(3, 5)
    assert lobby.join(6, None) == Matched(2, 6)
    assert lobby.join(7, "red") == Matched(1, 7)
    assert lobby.waiting("Red") == [4]


def test_room_full_for_a_third_arrival(lobby):
    lobby.join(1, "r")
    lobby.join(2, "r")
    assert lobby.join(3, "r") == RoomFull(3)
    assert 3 not in lobby
    assert lobby.waiting("r") == []
    assert lobby.partner_of(1) == 2  # the pair is untouched
    # a refused client left nothing behind and may try again later
    assert lobby.join(3, "elsewhere") == Queued(3)


def test_room_not_full_when_someone_compatible_waits(lobby):
    lobby.join(1, "r")
    lobby.join(2, "r")
    lobby.join(3, "r", requeued=True)  # e.g. back after its partner left: waits
    assert lobby.join(4, "r") == Matched(3, 4)
    assert lobby.join(5, "r") == RoomFull(5)


def test_room_full_when_the_only_waiters_are_excluded_for_a_requeued_client(lobby):
    # room r: 1-2 chatting; 3 and 4 had been partners, 3 sent NEXT, both requeued
    lobby.join(1, "r")
    lobby.join(2, "r")
    lobby.join(3, "r", requeued=True)
    lobby.join(4, "r")
    lobby.unpair(3, 4, next_by=3)
    assert lobby.join(3, "r", requeued=True) == Queued(3)
    assert lobby.join(4, "r", requeued=True) == Queued(4)  # never refused, never 3 again
    assert lobby.waiting("r") == [3, 4]
    assert lobby.join(5, "r") == Matched(3, 5)  # a newcomer may pair with either


def test_room_frees_up_when_the_pair_ends(lobby):
    lobby.join(1, "r")
    lobby.join(2, "r")
    lobby.unpair(1, 2)
    lobby.leave(1)
    lobby.leave(2)
    assert_empty(lobby, 1, 2)
    assert lobby.join(3, "r") == Queued(3)


def test_requeued_clients_are_never_refused(lobby):
    lobby.join(1, "r")
    lobby.join(2, "r")
    lobby.join(3, "r", requeued=True)
    lobby.join(4, "r")  # pairs with 3: two pairs chatting, nobody waiting
    assert lobby.pairs_chatting() == 2
    lobby.unpair(1, 2)
    lobby.leave(2)
    assert lobby.join(1, "r", requeued=True) == Queued(1)
    assert lobby.join(5, "r") == Matched(1, 5)
    lobby.unpair(3, 4, next_by=4)
    assert lobby.join(3, "r", requeued=True) == Queued(3)
    assert lobby.join(4, "r", requeued=True) == Queued(4)


# -- NEXT exclusions ------------------------------------------------------------------------


def test_next_pair_is_never_rematched_while_both_connected(lobby):
    lobby.join(1, None)
    lobby.join(2, None)
    lobby.unpair(1, 2, next_by=2)
    assert 1 not in lobby and 2 not in lobby
    assert lobby.join(2, None, requeued=True) == Queued(2)
    assert lobby.join(1, None, requeued=True) == Queued(1)
    assert lobby.pairs_chatting() == 0
    # each gets someone else, in arrival order
    assert lobby.join(3, None) == Matched(2, 3)
    assert lobby.join(4, None) == Matched(1, 4)
    # and after more partners come and go they still never meet
    lobby.unpair(2, 3)
    lobby.leave(3)
    lobby.unpair(1, 4)
    lobby.leave(4)
    lobby.join(1, None, requeued=True)
    assert lobby.join(2, None, requeued=True) == Queued(2)
    assert lobby.waiting() == [1, 2]


def test_next_exclusion_is_symmetric_whoever_sent_it(lobby):
    for sender in (1, 2):
        lobby = Lobby()
        lobby.join(1, "r")
        lobby.join(2, "r")
        lobby.unpair(1, 2, next_by=sender)
        lobby.join(2, "r", requeued=True)
        assert lobby.join(1, "r", requeued=True) == Queued(1)


def test_exclusions_accumulate(lobby):
    lobby.join(1, None)
    lobby.join(2, None)
    lobby.unpair(1, 2, next_by=1)
    lobby.join(2, None, requeued=True)
    lobby.join(1, None, requeued=True)
    assert lobby.join(3, None) == Matched(2, 3)
    lobby.unpair(2, 3, next_by=2)
    lobby.join(3, None, requeued=True)  # 3 may pair with 1
    assert lobby.partner_of(1) == 3
    assert lobby.join(2, None, requeued=True) == Queued(2)  # 1 and 3 are busy; 2 waits
    lobby.unpair(1, 3)
    assert lobby.join(1, None, requeued=True) == Queued(1)  # 1 never with 2
    assert lobby.waiting() == [2, 1]
    assert lobby.join(3, None, requeued=True) == Matched(1, 3)  # skips 2, the older waiter
    assert lobby.waiting() == [2]


def test_plain_partner_loss_adds_no_exclusion(lobby):
    lobby.join(1, None)
    lobby.join(2, None)
    lobby.unpair(1, 2)  # e.g. both sides lost, then both came back: no NEXT
    lobby.join(1, None, requeued=True)
    assert lobby.join(2, None, requeued=True) == Matched(1, 2)


def test_exclusion_forgotten_once_one_leaves(lobby):
    lobby.join(1, None)
    lobby.join(2, None)
    lobby.unpair(1, 2, next_by=1)
    lobby.join(1, None, requeued=True)
    lobby.join(2, None, requeued=True)
    lobby.leave(2)  # 2 disconnects
    assert lobby.waiting() == [1]
    # the id 2 now means someone else (a new connection): nothing holds against it
    assert lobby.join(2, None) == Matched(1, 2)


def test_exclusion_forgotten_when_the_leaver_was_not_queued(lobby):
    lobby.join(1, "r")
    lobby.join(2, "r")
    lobby.unpair(1, 2, next_by=2)
    lobby.leave(2)  # gone straight away (the NEXT sender dropped)
    lobby.join(1, "r", requeued=True)
    assert lobby.join(2, "r") == Matched(1, 2)


# -- leaving and unpair errors --------------------------------------------------------------


def test_leave_while_waiting(lobby):
    lobby.join(1, "r")
    lobby.join(2, None)
    lobby.leave(1)
    assert 1 not in lobby
    assert lobby.waiting("r") == []
    assert lobby.rooms() == {None}
    lobby.leave(2)
    assert_empty(lobby, 1, 2)


def test_leave_from_the_middle_of_the_queue_keeps_the_order(lobby):
    # build a queue 1, 2, 3 of mutually excluded clients so it does not pair
    lobby.join(1, None)
    lobby.join(2, None)
    lobby.unpair(1, 2, next_by=1)
    lobby.join(1, None, requeued=True)
    lobby.join(2, None, requeued=True)
    lobby.join(3, None)  # pairs with 1
    lobby.unpair(1, 3, next_by=3)
    lobby.join(1, None, requeued=True)
    lobby.join(3, None, requeued=True)  # 3 is excluded from 1, 2 still waits: 3 and 2 pair
    assert lobby.partner_of(3) == 2
    lobby.unpair(2, 3, next_by=2)
    lobby.join(2, None, requeued=True)
    lobby.join(3, None, requeued=True)
    assert lobby.waiting() == [1, 2, 3]
    lobby.leave(2)
    assert lobby.waiting() == [1, 3]  # 1-3 excluded: still waiting
    assert lobby.join(4, None) == Matched(1, 4)
    assert lobby.join(5, None) == Matched(3, 5)


def test_leave_unknown_or_twice_is_harmless(lobby):
    lobby.leave(42)
    lobby.join(1, None)
    lobby.leave(1)
    lobby.leave(1)
    assert_empty(lobby, 1, 42)


def test_leave_while_paired_is_refused(lobby):
    lobby.join(1, None)
    lobby.join(2, None)
    with pytest.raises(ValueError):
        lobby.leave(1)
    assert lobby.partner_of(1) == 2  # nothing changed
    assert lobby.pairs_chatting() == 1


def test_unpair_errors(lobby):
    with pytest.raises(ValueError):
        lobby.unpair(1, 2)  # unknown
    lobby.join(1, None)
    with pytest.raises(ValueError):
        lobby.unpair(1, 2)  # 1 only waits
    lobby.join(2, None)
    lobby.join(3, None)
    lobby.join(4, None)
    with pytest.raises(ValueError):
        lobby.unpair(1, 3)  # both paired, not with each other
    with pytest.raises(ValueError):
        lobby.unpair(1, 1)
    with pytest.raises(ValueError):
        lobby.unpair(1, 2, next_by=3)  # NEXT came from one of the two or nobody
    assert lobby.partner_of(1) == 2 and lobby.pairs_chatting() == 2  # nothing changed
    lobby.unpair(2, 1)  # either order
    with pytest.raises(ValueError):
        lobby.unpair(1, 2)  # already ended
    assert lobby.partner_of(3) == 4


def test_unpair_takes_both_out_of_the_lobby(lobby):
    lobby.join(1, "r")
    lobby.join(2, "r")
    lobby.unpair(1, 2)
    assert_empty(lobby, 1, 2)
    lobby.leave(1)
    lobby.leave(2)
    assert_empty(lobby, 1, 2)


# -- bookkeeping ----------------------------------------------------------------------------


def test_rooms_dropped_when_empty(lobby):
    lobby.join(1, "a")
    lobby.join(2, "b")
    lobby.join(3, "b")
    lobby.join(4, None)
    assert lobby.rooms() == {"a", "b", None}
    lobby.leave(1)
    assert lobby.rooms() == {"b", None}
    lobby.unpair(2, 3)
    assert lobby.rooms() == {None}
    lobby.join(2, "b", requeued=True)
    assert lobby.rooms() == {"b", None}
    lobby.leave(2)
    lobby.leave(3)
    lobby.leave(4)
    assert_empty(lobby, 1, 2, 3, 4)


def test_refused_arrival_leaves_no_room_behind(lobby):
    lobby.join(1, "r")
    lobby.join(2, "r")
    assert lobby.join(3, "r") == RoomFull(3)
    assert lobby.rooms() == {"r"}
    lobby.unpair(1, 2)
    assert_empty(lobby, 1, 2, 3)


def test_random_churn_keeps_the_invariants():
    """Seeded random arrivals, NEXTs, drops and leaves; the rules hold at every step."""
    rng = random.Random(4242)
    lobby = Lobby()
    rooms = [None, "a", "b"]
    room_of: dict[int, str | None] = {}  # connected clients (queued or chatting)
    excluded: set[frozenset[int]] = set()
    next_id = 0
    for _ in range(5000):
        op = rng.random()
        if op < 0.35:  # a newcomer arrives
            next_id += 1
            cid, room = next_id, rng.choice(rooms)
            result = lobby.join(cid, room)
            if isinstance(result, RoomFull):
                assert room is not None
                assert any(lobby.partner_of(c) is not None for c, r in room_of.items() if r == room)
                assert lobby.waiting(room) == []  # a newcomer has no exclusions
                continue
            room_of[cid] = room
        elif op < 0.7 and lobby.pairs_chatting():  # a pair ends: NEXT, bye or a drop
            a = rng.choice([c for c in room_of if lobby.partner_of(c) is not None])
            b = lobby.partner_of(a)
            how = rng.choice(["next", "bye", "gone"])
            lobby.unpair(a, b, next_by=a if how == "next" else None)
            if how == "next":
                excluded.add(frozenset((a, b)))
            stay = [a, b] if how == "next" else [b]
            if how != "next":
                lobby.leave(a)
                del room_of[a]
                excluded = {p for p in excluded if a not in p}
            for cid in stay:
                result = lobby.join(cid, room_of[cid], requeued=True)
                assert not isinstance(result, RoomFull)
        elif room_of:  # someone waiting gives up
            waiting = [c for c in room_of if lobby.partner_of(c) is None]
            if waiting:
                cid = rng.choice(waiting)
                lobby.leave(cid)
                del room_of[cid]
                excluded = {p for p in excluded if cid not in p}
        # invariants
        for cid, room in room_of.items():
            assert cid in lobby
            partner = lobby.partner_of(cid)
            if partner is None:
                assert cid in lobby.waiting(room)
            else:
                assert lobby.partner_of(partner) == cid
                assert room_of[partner] == room
                assert frozenset((cid, partner)) not in excluded
        for room in rooms:
            queue = lobby.waiting(room)
            assert len(queue) == len(set(queue))
            for i, x in enumerate(queue):  # nobody waits who could pair with someone waiting
                for y in queue[i + 1:]:
                    assert frozenset((x, y)) in excluded
        assert lobby.rooms() == set(room_of.values())
        assert lobby.pairs_chatting() == sum(lobby.partner_of(c) is not None for c in room_of) // 2
    # everyone leaves: nothing is left
    for cid in list(room_of):
        partner = lobby.partner_of(cid)
        if partner is not None:
            lobby.unpair(cid, partner)
    for cid in room_of:
        lobby.leave(cid)
    assert_empty(lobby, *room_of)
