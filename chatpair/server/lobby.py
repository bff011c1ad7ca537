"""Pairing rules: the open lobby, rooms, requeue and NEXT exclusions. No sockets.

The lobby knows clients only by an integer id. The listener asks it what to
do and carries out the answer, so every rule here is tested without a
socket (tests/test_lobby.py).

Rules (docs/protocol.md, "Pairing" and "Requeue"):

* Clients without a room are paired first come, first served.
* Clients with the same room code are paired with each other only.
* A client *arriving* at a room where a pair is chatting and nobody waiting
  may be paired with it is refused with ``room_full``. A client *requeued*
  after its partner left is never refused: it waits (chatpair's reading of
  "paired again as if it had just arrived" - it is queued like a newcomer,
  but we do not throw out someone who was already in).
* After NEXT the two clients are never paired with each other again while
  both connections last.
* A waiting client whose connection dropped while its session is kept for
  a RESUME (PROTOCOL.md section 6) is *away*: it keeps its place in the
  queue but is never paired until it is back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Queued:
    """The client is queued; nobody to pair with yet."""

    cid: int


@dataclass(frozen=True, slots=True)
class Matched:
    """``waiter`` (queued earlier) and ``newcomer`` now form a pair."""

    waiter: int
    newcomer: int


@dataclass(frozen=True, slots=True)
class RoomFull:
    """Refused: the room has a pair chatting and nobody this client may join."""

    cid: int


@dataclass(slots=True)
class _Room:
    queue: deque[int] = field(default_factory=deque)
    chatting: int = 0  # pairs currently chatting in this room


class Lobby:
    """Queues, rooms and exclusions. Methods are plain and fast; ids are ints."""

    def __init__(self) -> None:
        self._rooms: dict[str | None, _Room] = {}
        self._room_of: dict[int, str | None] = {}  # queued or chatting clients
        self._partner: dict[int, int] = {}
        self._excluded: dict[int, set[int]] = {}
        self._away: set[int] = set()  # queued, but not to be paired until back

    # -- queries -----------------------------------------------------------

    def waiting(self, room: str | None = None) -> list[int]:
        r = self._rooms.get(room)
        return list(r.queue) if r else []

    def partner_of(self, cid: int) -> int | None:
        return self._partner.get(cid)

    def pairs_chatting(self) -> int:
        return len(self._partner) // 2

    def __contains__(self, cid: int) -> bool:
        return cid in self._room_of

    def rooms(self) -> set[str | None]:
        """Rooms (``None``: the open lobby) with someone waiting or chatting."""
        return set(self._rooms)

    # -- transitions -------------------------------------------------------

    def join(self, cid: int, room: str | None, *, requeued: bool = False) -> Queued | Matched | RoomFull:
        """A client arrives (or comes back after its partner left)."""
        if cid in self._room_of:
            raise ValueError(f"client {cid} is already in the lobby")
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        excluded = self._excluded.get(cid, ())
        for waiter in state.queue:
            if waiter not in excluded and waiter not in self._away:
                state.queue.remove(waiter)
                self._room_of[cid] = room
                self._partner[waiter] = cid
                self._partner[cid] = waiter
                state.chatting += 1
                return Matched(waiter, cid)
        if room is not None and state.chatting and not requeued:
            self._drop_room_if_empty(room)
            return RoomFull(cid)
        state.queue.append(cid)
        self._room_of[cid] = room
        return Queued(cid)

    def set_away(self, cid: int) -> None:
        """A queued client's connection dropped: keep its place, pair nobody with it."""
        if cid in self._room_of and cid not in self._partner:
            self._away.add(cid)

    def back(self, cid: int) -> Matched | None:
        """An away client is back: pair it now if someone it may join is waiting."""
        if cid not in self._away:
            return None
        self._away.discard(cid)
        room = self._room_of[cid]
        state = self._rooms[room]
        excluded = self._excluded.get(cid, ())
        for waiter in state.queue:
            if waiter != cid and waiter not in excluded and waiter not in self._away:
                state.queue.remove(waiter)
                state.queue.remove(cid)
                self._partner[waiter] = cid
                self._partner[cid] = waiter
                state.chatting += 1
                return Matched(waiter, cid)
        return None

    def unpair(self, a: int, b: int, *, next_by: int | None = None) -> None:
        """End the pair (a, b); both leave the lobby until they join again.

        ``next_by`` names the one who sent NEXT: then the two are never paired
        with each other again while both are connected.
        """
        if self._partner.get(a) != b:
            raise ValueError(f"{a} and {b} are not a pair")
        if next_by is not None and next_by not in (a, b):
            raise ValueError(f"next_by={next_by} is neither {a} nor {b}")
        room = self._room_of.pop(a)
        self._room_of.pop(b, None)
        del self._partner[a], self._partner[b]
        self._rooms[room].chatting -= 1
        if next_by is not None:
            self._excluded.setdefault(a, set()).add(b)
            self._excluded.setdefault(b, set()).add(a)
        self._drop_room_if_empty(room)

    def leave(self, cid: int) -> None:
        """The connection is gone: forget the client everywhere.

        Call :meth:`unpair` first if it was chatting.
        """
        if cid in self._partner:
            raise ValueError(f"client {cid} is still paired; unpair first")
        self._away.discard(cid)
        room = self._room_of.pop(cid, _MISSING)
        if room is not _MISSING:
            state = self._rooms[room]  # type: ignore[index]
            try:
                state.queue.remove(cid)
            except ValueError:
                pass
            self._drop_room_if_empty(room)  # type: ignore[arg-type]
        for other in self._excluded.pop(cid, ()):
            others = self._excluded.get(other)
            if others is not None:
                others.discard(cid)
                if not others:
                    del self._excluded[other]

    def _drop_room_if_empty(self, room: str | None) -> None:
        state = self._rooms.get(room)
        if state is not None and not state.queue and not state.chatting:
            del self._rooms[room]


_MISSING = object()
