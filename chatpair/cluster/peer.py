"""A partner on another node, as this node's relay sees it: a mailbox the inbox reader fills.

When a client of this node is paired with a client of another node, its
relay loop gets a :class:`RemotePeer` where a same-node pair has a second
connection. What the other node sends arrives through this node's inbox
stream (:mod:`chatpair.cluster.inbox`); the inbox reader thread appends it
to the peer's ``incoming`` deque, in stream order, and asks the relay that
holds the peer to look (:meth:`RemotePeer.notify`, at most one wake-up per
peer until the relay has looked). Items are tuples:

=================================  ==================================================
``("msg", (seq, n), frames)``      ``n`` messages from the partner, numbered from
                                   ``seq``, as MSG frames
``("gap", first, last)``           the partner's messages ``first``..``last`` never
                                   arrived
``("acked", n, lost)``             ``n`` of our client's messages were written to the
                                   partner, ``lost`` were not (NOTICE undelivered each)
``("left", reason, lost)``         the partner left (PEER_LEFT ``reason``); ``lost`` of
                                   our client's messages were never written to it
``("notice", json, None)``         the partner is away or back (resume): NOTICE
``("lost", n, None)``              ``n`` of ours the away partner never acknowledged
``("freeze"/"frozen", ...)``       the partner's session moves to another node: stop
                                   sending / the partner's node stopped sending
``("moved", cid, lost)``           the partner's session now lives at ``cid``
=================================  ==================================================

:class:`Routes` maps this node's client ids to their current remote peer.
It is shared by the inbox reader (which looks up every message) and the
cluster I/O thread (which adds and removes routes), so changes take a lock
and lookups are plain dict reads. A message for a client whose route is not
there *yet* (the partner's node can write before this node has finished
its side of the pairing) is kept as an *orphan* until the route appears.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from chatpair.cluster.names import node_of

#: Orphan messages kept per client id (beyond that they are dropped: the
#: sender's node counts them unacknowledged and reports them undelivered).
MAX_ORPHANS = 4096
#: Client ids with orphans kept at most (the oldest go first).
MAX_ORPHAN_CLIENTS = 10_000


class RemotePeer:
    """One cross-node pair, seen from this node: our client ``local``, its partner ``remote``.

    ``incoming`` is appended by the inbox reader thread and drained by the
    relay thread; the other attributes below ``incoming`` belong to the relay
    thread alone.
    """

    __slots__ = (
        "_wake",
        "acked_upto",
        "conn",
        "frozen",
        "given",
        "given_msgs",
        "in_flight",
        "incoming",
        "local",
        "name",
        "remote",
        "room",
        "scheduled",
        "target",
    )

    @classmethod
    def for_match(cls, matched: Any, node: str, room: str | None) -> RemotePeer | None:
        """The newcomer's side of a match (:class:`~chatpair.cluster.lobby.Matched`) if the waiter is
        on another node than ``node``; None for a same-node pair."""
        if node_of(matched.waiter) == node:
            return None
        return cls(matched.newcomer, matched.waiter, matched.waiter_name, room)

    def __init__(self, local: str, remote: str, name: str, room: str | None = None) -> None:
        self.local = local
        self.remote = remote
        self.name = name  # the partner's name
        self.room = room
        self.incoming: deque[tuple[str, Any, Any]] = deque()
        self.scheduled = False  # a wake-up is owed to the relay (reader sets, relay clears)
        self._wake: Callable[[RemotePeer], None] | None = None
        # -- the relay thread's ---------------------------------------------------------
        self.conn: Any = None  # the local connection, while a relay holds this pair
        self.in_flight = 0  # our client's messages not yet acknowledged by the partner's node
        self.given: deque[tuple[int, int, bool]] = deque()  # (first, n, lost) given to our client, not acked
        self.given_msgs = 0  # entries of ``given`` that are not lost
        self.acked_upto = 0
        #: the partner's cid as this relay knows it (``remote`` may already name its next one, see ``moved``)
        self.target = remote
        self.frozen = False  # the partner's session is moving to another node: our client is not read

    def __repr__(self) -> str:
        return f"<RemotePeer {self.local} <-> {self.remote} ({self.name})>"

    def attach(self, wake: Callable[[RemotePeer], None] | None) -> None:
        """The relay holding this pair (None: nobody any more). Call before draining ``incoming``."""
        self._wake = wake

    def push(self, item: tuple[str, Any, Any]) -> None:
        """Reader thread: one item, in order; call :meth:`notify` after a batch."""
        self.incoming.append(item)

    def notify(self) -> None:
        """Reader thread: tell the relay (once until it has looked) that items are waiting."""
        wake = self._wake
        if wake is not None and not self.scheduled:
            self.scheduled = True
            wake(self)


class Routes:
    """This node's client id -> its :class:`RemotePeer`, and orphan messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peers: dict[str, RemotePeer] = {}
        self._orphans: dict[str, deque[tuple[str, tuple[str, Any, Any]]]] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, local: str) -> RemotePeer | None:
        return self._peers.get(local)

    def add(self, peer: RemotePeer) -> None:
        """Route ``peer.local`` to ``peer``; orphans from its partner become its first items."""
        with self._lock:
            self._add(peer)

    def claim(self, peer: RemotePeer) -> RemotePeer | None:
        """:meth:`add`, unless ``peer.local`` is routed to ``peer.remote`` already: then that peer
        (two threads may learn of one pair: one route, one RemotePeer, whoever is first)."""
        with self._lock:
            known = self._peers.get(peer.local)
            if known is not None and known.remote == peer.remote:
                return known
            self._add(peer)
            return None

    def _add(self, peer: RemotePeer) -> None:
        self._peers[peer.local] = peer
        for source, item in self._orphans.pop(peer.local, ()):
            if source == peer.remote:
                peer.push(item)

    def remove(self, local: str, remote: str | None = None) -> RemotePeer | None:
        """Drop the route of ``local`` (only if its partner is ``remote``, when given); the peer."""
        with self._lock:
            peer = self._peers.get(local)
            if peer is None or (remote is not None and peer.remote != remote):
                return None
            del self._peers[local]
            return peer

    def forget(self, local: str) -> None:
        """``local`` left: its route and its orphans go."""
        with self._lock:
            self._peers.pop(local, None)
            self._orphans.pop(local, None)

    def orphan(self, local: str, source: str, item: tuple[str, Any, Any]) -> RemotePeer | None:
        """Keep ``item`` for ``local`` until its route appears; the peer if it appeared meanwhile."""
        with self._lock:
            peer = self._peers.get(local)
            if peer is not None:
                if peer.remote != source:
                    return None  # from a former partner: nobody to give it to
                peer.push(item)
                return peer
            kept = self._orphans.get(local)
            if kept is None:
                if len(self._orphans) >= MAX_ORPHAN_CLIENTS:
                    del self._orphans[next(iter(self._orphans))]
                kept = self._orphans[local] = deque(maxlen=MAX_ORPHANS)
            kept.append((source, item))
            return None

    def peers(self) -> list[RemotePeer]:
        with self._lock:
            return list(self._peers.values())
