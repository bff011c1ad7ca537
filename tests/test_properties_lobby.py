"""Property-based test (hypothesis) of the lobby: any sequence of join/leave/next keeps its rules.

A :class:`~hypothesis.stateful.RuleBasedStateMachine` drives
:class:`chatpair.server.lobby.Lobby` the way the listener does - newcomers
arrive (in the open lobby or a room), pairs end (NEXT from either side, or
no NEXT: bye, drop, timeout), clients rejoin (requeued or not) or leave, ids
of departed connections are reused - and keeps a small model of what
PROTOCOL.md says must happen. After every step the lobby must agree with
the model and keep its invariants:

* nobody is paired twice or with themselves; partners are mutual;
* room members are paired only within their room;
* the open lobby (and each room) is first come, first served;
* two clients one of which NEXTed the other are never paired again while
  both connections last (and a reused id carries no old exclusion);
* ``room_full`` exactly when "a client arrives at a room where a pair is
  chatting and nobody is waiting who may be paired with it";
* nobody waits who could be paired with someone waiting;
* the lobby's bookkeeping (membership, queues, rooms, pair count) is
  consistent, and is empty once everyone has left.

``tests/test_lobby.py`` has the hand-written cases and a seeded random churn;
hypothesis searches the sequences instead and shrinks a failure to the
shortest one. Settings are fixed (derandomize, no example database) so CI
never flakes; ``CHATPAIR_HYPOTHESIS_SCALE=50`` searches harder locally.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatpair.server.lobby import Lobby, Matched, Queued, RoomFull

_SCALE = max(1, int(os.environ.get("CHATPAIR_HYPOTHESIS_SCALE", "1")))

#: The open lobby and two rooms; "A" differs from "a" only by case (room codes are exact).
ROOMS: list[str | None] = [None, "a", "A"]


class LobbyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lobby = Lobby()
        # The model: every connected client and its room (queued, chatting, or just
        # unpaired and not yet back), the FIFO queue of each room, the pairs, and
        # the NEXT exclusions between connected clients.
        self.room_of: dict[int, str | None] = {}
        self.queue: dict[str | None, list[int]] = {room: [] for room in ROOMS}
        self.partner: dict[int, int] = {}
        self.excluded: set[frozenset[int]] = set()
        self.next_id = 0
        self.gone: list[int] = []  # ids of closed connections; the OS may hand them out again

    # -- the model ------------------------------------------------------------------------

    def queued(self) -> list[int]:
        return [cid for q in self.queue.values() for cid in q]

    def between(self) -> list[int]:
        """Connected, but neither queued nor chatting (unpaired, not back yet)."""
        queued = set(self.queued())
        return sorted(c for c in self.room_of if c not in queued and c not in self.partner)

    def pairs(self) -> list[tuple[int, int]]:
        return sorted((a, b) for a, b in self.partner.items() if a < b)

    def expected_join(self, cid: int, room: str | None, requeued: bool) -> Queued | Matched | RoomFull:
        for waiter in self.queue[room]:  # oldest first
            if frozenset((waiter, cid)) not in self.excluded:
                return Matched(waiter, cid)
        pair_chatting = any(self.room_of[c] == room for c in self.partner)
        if room is not None and pair_chatting and not requeued:
            return RoomFull(cid)
        return Queued(cid)

    def forget(self, cid: int) -> None:
        """The connection closed: the client and every exclusion it was part of go."""
        del self.room_of[cid]
        self.excluded = {pair for pair in self.excluded if cid not in pair}
        self.gone.append(cid)

    def join(self, cid: int, room: str | None, requeued: bool) -> None:
        expected = self.expected_join(cid, room, requeued)
        result = self.lobby.join(cid, room, requeued=requeued)
        event(f"join -> {type(result).__name__}" + (" (skipped an excluded waiter)" if isinstance(result, Matched)
                                                    and result.waiter != self.queue[room][0] else "")
              + (" (over compatible waiters: FIFO decides)" if isinstance(result, Matched) and sum(
                  frozenset((w, cid)) not in self.excluded for w in self.queue[room]) > 1 else ""))
        assert result == expected, (
            f"join({cid}, {room!r}, requeued={requeued}): got {result}, expected {expected}; "
            f"waiting {self.queue[room]}, pairs {self.pairs()}, excluded {sorted(map(sorted, self.excluded))}"
        )
        if isinstance(result, Matched):
            self.queue[room].remove(result.waiter)
            self.partner[result.waiter] = cid
            self.partner[cid] = result.waiter
            self.room_of[cid] = room
        elif isinstance(result, Queued):
            self.queue[room].append(cid)
            self.room_of[cid] = room
        else:  # refused: the server sends ERROR room_full and closes the connection
            assert cid not in self.lobby
            self.lobby.leave(cid)
            if cid in self.room_of:
                self.forget(cid)
            else:
                self.gone.append(cid)

    # -- rules ----------------------------------------------------------------------------

    @rule(room=st.sampled_from(ROOMS), reuse=st.booleans(), data=st.data())
    def arrive(self, room, reuse, data):
        """A new connection says HELLO (its id may be one a closed connection had)."""
        if reuse and self.gone:
            cid = data.draw(st.sampled_from(self.gone), label="reused id")
            self.gone.remove(cid)
        else:
            self.next_id += 1
            cid = self.next_id
        self.join(cid, room, requeued=False)

    @precondition(lambda self: self.partner)
    @rule(who=st.sampled_from(["first", "second", None]), data=st.data())
    def end_pair(self, who, data):
        """A pair ends: NEXT from one side, or no NEXT (bye, drop, timeout, error)."""
        a, b = data.draw(st.sampled_from(self.pairs()), label="pair")
        next_by = {"first": a, "second": b, None: None}[who]
        if data.draw(st.booleans(), label="swap arguments"):
            a, b = b, a
        self.lobby.unpair(a, b, next_by=next_by)
        del self.partner[a], self.partner[b]
        if next_by is not None:
            self.excluded.add(frozenset((a, b)))
        assert a not in self.lobby and b not in self.lobby

    @precondition(lambda self: self.partner)
    @rule(how=st.sampled_from(["next", "bye"]), data=st.data())
    def pair_ends_as_the_listener_does_it(self, how, data):
        """What the listener does on NEXT (both requeued, NEXT sender first) or on
        BYE/drop (the leaver goes, its partner is requeued)."""
        a, b = data.draw(st.sampled_from(self.pairs()), label="pair")
        if data.draw(st.booleans(), label="b acts"):
            a, b = b, a
        self.lobby.unpair(a, b, next_by=a if how == "next" else None)
        del self.partner[a], self.partner[b]
        if how == "next":
            self.excluded.add(frozenset((a, b)))
            self.join(a, self.room_of[a], requeued=True)
        else:
            self.lobby.leave(a)
            self.forget(a)
        self.join(b, self.room_of[b], requeued=True)

    @precondition(lambda self: self.between())
    @rule(requeued=st.booleans(), data=st.data())
    def rejoin(self, requeued, data):
        """An unpaired client goes back to its room's queue (the listener passes requeued=True)."""
        cid = data.draw(st.sampled_from(self.between()), label="client")
        self.join(cid, self.room_of[cid], requeued=requeued)

    @precondition(lambda self: self.between() or self.queued())
    @rule(data=st.data())
    def leave(self, data):
        """A connection that is not chatting closes (waiting, or just unpaired)."""
        cid = data.draw(st.sampled_from(sorted(self.between() + self.queued())), label="client")
        self.lobby.leave(cid)
        room = self.room_of[cid]
        if cid in self.queue[room]:
            self.queue[room].remove(cid)
        self.forget(cid)

    @rule(data=st.data())
    def caller_errors_change_nothing(self, data):
        """Misuse raises ValueError and leaves the lobby as it was (the invariants check that)."""
        known = sorted(self.room_of)
        if self.partner:
            cid = data.draw(st.sampled_from(sorted(self.partner)), label="chatting")
            with pytest.raises(ValueError):
                self.lobby.leave(cid)  # unpair first
            with pytest.raises(ValueError):
                self.lobby.join(cid, self.room_of[cid])
            other = self.partner[cid]
            with pytest.raises(ValueError):
                self.lobby.unpair(cid, other, next_by=-1)  # NEXT from neither of the two
            with pytest.raises(ValueError):
                self.lobby.unpair(cid, cid)
        if self.queued():
            cid = data.draw(st.sampled_from(self.queued()), label="queued")
            with pytest.raises(ValueError):
                self.lobby.join(cid, data.draw(st.sampled_from(ROOMS), label="room"))
            if known:
                other = data.draw(st.sampled_from(known), label="other")
                with pytest.raises(ValueError):
                    self.lobby.unpair(cid, other)
        self.lobby.leave(10**9)  # unknown: harmless

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self):
        lobby = self.lobby
        for room in ROOMS:
            assert lobby.waiting(room) == self.queue[room], f"queue of {room!r}: FIFO order broken"
        queued = set(self.queued())
        for cid in self.room_of:
            assert (cid in lobby) == (cid in queued or cid in self.partner), f"membership of {cid}"
            assert lobby.partner_of(cid) == self.partner.get(cid), f"partner of {cid}"
        for cid in self.gone:
            if cid not in self.room_of:
                assert cid not in lobby and lobby.partner_of(cid) is None, f"{cid} left but is still known"
        assert lobby.pairs_chatting() == len(self.partner) // 2
        assert lobby.rooms() == {self.room_of[c] for c in queued | set(self.partner)}
        if hasattr(lobby, "__len__"):
            assert len(lobby) == len(queued) + len(self.partner)

    @invariant()
    def exclusions_are_kept_only_between_connected_clients(self):
        """Internal bookkeeping: the NEXT exclusions are exactly the model's - mutual, and
        nobody who left is remembered (a reused id starts clean, memory does not grow)."""
        excluded = getattr(self.lobby, "_excluded", None)
        if not isinstance(excluded, dict):  # the layout changed: only the public checks apply
            return
        pairs = {frozenset((a, b)) for a, others in excluded.items() for b in others}
        assert pairs == self.excluded, f"lobby holds exclusions {sorted(map(sorted, pairs))}"

    @invariant()
    def pairing_rules_hold(self):
        """The rules, stated on the lobby's answers alone (a second opinion to the model)."""
        lobby = self.lobby
        waiting = {room: lobby.waiting(room) for room in ROOMS}
        everyone_waiting = [c for q in waiting.values() for c in q]
        assert len(everyone_waiting) == len(set(everyone_waiting)), "someone waits twice"
        for cid in self.room_of:
            partner = lobby.partner_of(cid)
            if partner is None:
                continue
            assert partner != cid, f"{cid} is paired with itself"
            assert lobby.partner_of(partner) == cid, f"{cid} -> {partner} is not mutual"
            assert cid not in everyone_waiting, f"{cid} chats and waits"
            assert self.room_of[partner] == self.room_of[cid], f"{cid} and {partner} are in different rooms"
            assert frozenset((cid, partner)) not in self.excluded, f"{cid} and {partner} paired again after NEXT"
        for room, queue in waiting.items():
            for cid in queue:
                assert self.room_of.get(cid, "?") == room, f"{cid} waits in {room!r}, not its room"
            for i, x in enumerate(queue):
                for y in queue[i + 1:]:
                    assert frozenset((x, y)) in self.excluded, f"{x} and {y} both wait in {room!r} but may pair"

    def teardown(self):
        """Everyone leaves (ending pairs first): nothing may be left behind."""
        for cid in list(self.room_of):
            partner = self.lobby.partner_of(cid)
            if partner is not None:
                self.lobby.unpair(cid, partner)
        for cid in list(self.room_of):
            self.lobby.leave(cid)
        lobby = self.lobby
        assert lobby.rooms() == set()
        assert lobby.pairs_chatting() == 0
        assert not any(cid in lobby for cid in self.room_of)
        for attr in ("_rooms", "_room_of", "_partner", "_excluded"):  # no leak in the bookkeeping
            assert not getattr(lobby, attr, None), f"{attr} not empty after everyone left: {getattr(lobby, attr)}"


LobbyMachine.TestCase.settings = settings(
    max_examples=150 * _SCALE,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLobbyKeepsItsRules = LobbyMachine.TestCase
