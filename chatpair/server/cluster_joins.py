"""Cluster mode: clients arriving are joined by the listener itself, one round trip per turn of its loop.

Every other Redis call of the listener's goes to the node's I/O thread
(:class:`~chatpair.server.cluster_desk.ClusterDesk`). A first JOIN is the
exception because it is most of a connect+pair's cost: through the I/O
thread it is a queue hand-over, a wake-up of that thread, the GIL handed
back and forth at each of its system calls while the listener works, and
the answer posted back with another wake-up. Here the JOINs of the clients
that arrived during one turn of the loop go out at its end as one batch of
EVALSHA on the listener's own connection (a
:class:`~chatpair.cluster.scriptline.ScriptLine`), and are answered in the
same turn: 1.17x the pairs per second with 3 nodes, side by side
(``docs/performance.md``).

That round trip blocks the loop, so it is bounded:

* only first JOINs go this way: a client queued again after its pair ended
  goes through the I/O thread, behind the UNPAIR asked before it (one
  thread does them in order);
* each read waits :data:`JOIN_TIMEOUT` at most, and after any failure
  it is left alone for :data:`RETRY_SECONDS` and until the I/O thread can
  reach Redis again; meanwhile JOINs go through the I/O thread;
* the JOINs of a batch that failed may or may not have been done by Redis:
  the I/O thread asks Redis what it knows of each client first
  (:func:`chatpair.cluster.nodeio.join_unsure`).

A client that leaves before its JOIN went out never had one (no LEAVE
either); anything else the I/O thread is asked about such a client (a
session kept away) goes after its JOIN, handed to that thread first.

The node's mirror of its clients (what it re-registers after Redis lost its
data) is the I/O thread's: these JOINs go into ``node.seen_joins``, which
that thread takes in before its next request and before a restore, so
before anything the answers lead to.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from chatpair.cluster import scripts
from chatpair.cluster.lane import lanes_possible
from chatpair.cluster.lobby import Matched, NodeGone
from chatpair.cluster.nodeio import log_ghosts
from chatpair.cluster.peer import RemotePeer
from chatpair.cluster.redisconn import connect, describe
from chatpair.cluster.results import CONNECT_TIMEOUT, RETRY_SECONDS, Joined
from chatpair.cluster.scriptline import Scripts

log = logging.getLogger("chatpair")

#: Seconds the listener waits for Redis to answer a batch of JOINs before it gives them to the I/O thread.
JOIN_TIMEOUT = 0.5


class FreshJoins:
    """The listener's own JOINs of clients arriving (see the module's docstring)."""

    def __init__(self, node: Any, url: str) -> None:
        """``node``: the :class:`~chatpair.cluster.node.ClusterNode`; ``url``: its Redis."""
        self.node = node
        client = connect(url, socket_timeout=JOIN_TIMEOUT, socket_connect_timeout=min(JOIN_TIMEOUT, CONNECT_TIMEOUT))
        # (no line possible - rediss://, no hiredis: every JOIN through the I/O thread, as before)
        self.scripts = Scripts(client, {"join": scripts.JOIN}) if lanes_possible(client) else None
        self.ready = False  # the node has joined the cluster (its first registration)
        self.resting_until = 0.0  # after a failure: not before this (and Redis reachable again)
        self.pending: dict[int, Any] = {}  # the conns of this turn (by connection number), in arrival order
        self.holds = 0  # barriers asked of the I/O thread (see hold); it has passed node.io.barrier of them

    def take(self, conn: Any) -> bool:
        """Join ``conn`` (a first JOIN) at the end of this turn? False: the I/O thread's way."""
        if not (self.ready and self.scripts is not None) or self._held():
            return False
        if self.resting_until:
            if time.monotonic() < self.resting_until or self.node.io.down_since is not None:
                return False
            self.resting_until = 0.0
        self.pending[conn.cid] = conn
        return True

    def drop(self, conn: Any) -> bool:
        """``conn`` left before its JOIN went out: it never will (True), so Redis needs no LEAVE."""
        return self.pending.pop(conn.cid, None) is not None

    def hold(self) -> None:
        """The I/O thread was just asked to take a waiting client out of pairing (kept away, moved to
        another node): until it has done so, JOINs go its way too, behind that request, lest one
        made here first pairs a newcomer with that client (a barrier in its queue says when)."""
        self.holds += 1
        self.node.requests.put(("barrier", self.holds))

    def _held(self) -> bool:
        return self.node.io.barrier < self.holds

    def release(self, conn: Any) -> None:
        """Something about ``conn`` goes to the I/O thread: its JOIN, if still here, goes first."""
        if self.pending.pop(conn.cid, None) is not None:
            self.node.join(self.node.cid(conn.cid), conn.name, conn.room, False)

    def flush(self) -> list[Joined]:
        """The end of the turn: this turn's JOINs in one round trip; the answers to carry out, in order.

        The mirror hears of them first (``node.seen_joins``). A JOIN Redis refused because
        this node's registration lapsed, and a batch that failed, go to the
        I/O thread (which renews, retries, and finds out what was done).
        """
        if not self.pending:
            return []
        batch = list(self.pending.values())
        self.pending.clear()
        node = self.node
        if self._held():  # (a hold came later in this turn)
            for conn in batch:
                node.join(node.cid(conn.cid), conn.name, conn.room, False)
            return []
        joins = [(node.cid(conn.cid), conn.room, conn.name, False) for conn in batch]
        try:
            results = node.lobby.join_many(joins, via=self.scripts)
        except node.errors as error:
            self.resting_until = time.monotonic() + RETRY_SECONDS
            log.info("cluster: joins go through the node's I/O thread for now (%s)", describe(error))
            for cid, room, name, _ in joins:
                node.requests.put(("join_unsure", cid, name, room))
            return []
        seen, answers, again = [], [], []
        for (cid, room, name, _), result in zip(joins, results):
            if isinstance(result, NodeGone):
                again.append((cid, name, room))
            elif isinstance(result, Exception):
                log.warning("cluster: join not done: %s", result)
            else:
                seen.append((cid, name, room, result))
                answers.append(self._answer(cid, room, result))
        node.seen_joins.extend(seen)  # (before anything the answers lead to is asked)
        for cid, name, room in again:  # our registration lapsed: the I/O thread renews it, then joins
            node.join(cid, name, room, False)
        return answers

    def _answer(self, cid: str, room: str | None, result: Any) -> Joined:
        """As the I/O thread would answer: a match across nodes gets its route first."""
        log_ghosts(result.ghosts)
        peer = RemotePeer.for_match(result, self.node.node, room) if isinstance(result, Matched) else None
        if peer is not None:
            self.node.routes.add(peer)
        return Joined(cid, result, peer)

    def close(self) -> None:
        if self.scripts is not None:
            self.scripts.close()
