"""Cluster mode, the listener's side: the cluster-wide lobby instead of the local one.

With ``--cluster`` the :class:`~chatpair.server.listener.Listener` hands
every lobby decision to a :class:`ClusterDesk`. Redis calls block, so the
desk asks the node's I/O thread (:class:`chatpair.cluster.node.ClusterNode`)
and carries out the answers when they come back (the node queues them and
wakes the listener's loop, as relay threads do with their hand-backs); the
one exception, a first JOIN, is asked at the end of the loop's turn, in
one bounded batch (:mod:`chatpair.server.cluster_joins`). Meanwhile the client waits in
the listener like any waiting client (its messages are answered NOTICE
``undelivered``).

* A client arriving in the open lobby, or queued again after its partner
  left, is told WAITING at once (it cannot be refused ``room_full``); one
  arriving at a room hears WAITING or ERROR ``room_full`` with the answer.
* Matched with a client of this node: the pair goes to a relay exactly as
  on a single server. Matched with a client of another node (our join
  found it waiting, or its join found ours: a ``paired`` entry in our
  inbox): our client goes to a relay with a
  :class:`~chatpair.cluster.peer.RemotePeer` for a partner
  (:mod:`chatpair.server.cluster_relay`).
* A pair's end, reported by a relay, becomes UNPAIR (and LEAVE for whoever
  is gone) in the cluster, then JOIN for whoever is queued again - in that
  order, since the I/O thread does requests in the order they are made.
* A client that leaves while its join is on the way: its LEAVE comes after
  the JOIN, and ends a pair the JOIN may have made (the partner is told);
  a partner of ours left alone that way is queued again.
* Stopping: every client of ours hears ERROR ``shutdown`` first; the ends of
  cross-node pairs (``peer_left`` to the partners' nodes) are held until the
  listener's loop is done (:meth:`ClusterDesk.finish`). When the whole
  cluster is stopped at once, each client then hears ``shutdown`` from its
  own node, not PEER_LEFT from its partner's (PROTOCOL.md: on stop,
  everyone is told the same thing); when one node stops, its partners
  elsewhere hear PEER_LEFT ``disconnected`` once its own clients are closed
  (at most the polite close's 2 s later).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from chatpair.cluster.lobby import Matched, Queued, RoomFull
from chatpair.cluster.node import ClusterNode
from chatpair.cluster.peer import RemotePeer
from chatpair.cluster.results import Joined, Ready, RemotePaired, Result
from chatpair.proto import ErrorCode, FrameType
from chatpair.server.cluster_joins import FreshJoins
from chatpair.server.cluster_relay import ClusterRelay
from chatpair.server.cluster_sessions import ClusterSessions
from chatpair.server.config import Limits, ServerConfig
from chatpair.server.conn import Conn
from chatpair.server.processes import tell_ready
from chatpair.server.reception import log_joined
from chatpair.server.relay import Bounce, PairEnd, Relay, Report
from chatpair.server.render import event_bytes, room_full_text

log = logging.getLogger("chatpair")


class ClusterDesk:
    """The listener's cluster-mode lobby: requests out to the node, answers carried out here.

    Called on the listener's thread only (``post`` excepted: the node's threads).
    """

    def __init__(self, listener: Any, config: ServerConfig) -> None:
        """``listener``: the :class:`~chatpair.server.listener.Listener` whose lobby this is."""
        assert config.cluster
        self.listener = listener
        self.node = ClusterNode(config.cluster, config.node_id, self._post)
        self._results: deque[Result] = deque()
        self.announced: set[int] = set()  # waiting clients already told WAITING
        self.asked: set[int] = set()  # clients whose JOIN is on its way (not read meanwhile)
        self.joined: set[int] = set()  # clients the cluster lobby knows of (joined, not yet left)
        # Stopping: the ends of pairs, held until our own clients have been told (see finish).
        self._held: list[PairEnd] = []
        self._held_cids: set[int] = set()
        self.sessions = ClusterSessions(self)  # resumable sessions, across nodes too
        self.fresh = FreshJoins(self.node, config.cluster)  # first JOINs: asked by the listener itself
        self.node.start()

    def make_relay(self, limits: Limits, index: int, on_pair_end: Callable[[Report], None]) -> Relay:
        return ClusterRelay(limits, index, on_pair_end, self.node)

    def _post(self, result: Result) -> None:
        """The node's threads: an answer for the listener."""
        self._results.append(result)
        self.listener.wake()

    def pairs_chatting(self) -> int:
        """Pairs this node relays (a pair across nodes counts on both)."""
        return sum(relay.load for relay in self.listener.relays.relays)

    # -- the listener's lobby calls ------------------------------------------------------------

    def queue(self, conn: Conn, first: bytes = b"", requeued: bool = False) -> None:
        listener = self.listener
        log_joined(conn, requeued)  # (said at once: whether it waits is Redis's answer, which comes later)
        listener.waiting[conn.cid] = conn
        self.joined.add(conn.cid)
        if conn.session is not None and not requeued:
            listener.registry.add(conn.session.token, conn.cid)
        if requeued or conn.room is None:
            listener.send(conn, first + self._waiting(conn))
            self.announced.add(conn.cid)
        else:
            listener.send(conn, first)  # WAITING or ERROR room_full comes with the answer
        self._ask_join(conn, requeued)

    def _ask_join(self, conn: Conn, requeued: bool) -> None:
        """JOIN in the cluster; ``conn`` is not read until the answer is here.

        The JOIN may pair it with a client of another node, whose node tells
        its client PAIRED at once: what ours sends from then on must reach
        that partner, not be answered "you have no partner" here. So its
        input waits in the socket (and in ``conn.pending``) until the answer
        says where it goes: to a relay (paired) or to this loop (waiting).
        """
        self.asked.add(conn.cid)
        self.listener.pause(conn)
        if requeued or not self.fresh.take(conn):  # (else asked at the end of this turn: after_events)
            self.node.join(self.node.cid(conn.cid), conn.name, conn.room, requeued)

    def after_events(self) -> None:
        """The end of a turn of the listener's loop: the JOINs of the clients that arrived in it."""
        for joined in self.fresh.flush():
            self._joined(joined)

    def _answered(self, conn: Conn) -> None:
        """``conn``'s JOIN was answered and it waits here: read it again."""
        self.asked.discard(conn.cid)
        self.listener.resume(conn)
        self.listener.process_buffered(conn)

    def leave(self, conn: Conn) -> None:
        """The client left the listener (it was waiting, or never got that far)."""
        self.announced.discard(conn.cid)
        self.asked.discard(conn.cid)
        if self.fresh.drop(conn):  # its JOIN had not gone out yet
            self.joined.discard(conn.cid)
            return
        if conn.cid in self.joined:
            self.joined.discard(conn.cid)
            if conn.cid in self._held_cids:  # its pair's end is held (stopping): after it
                self._held.append(PairEnd(conn.cid, conn.cid, unpair=False, gone=[conn.cid]))
            else:
                self.node.leave(self.node.cid(conn.cid))

    def pair_end(self, end: Report) -> None:
        listener = self.listener
        if isinstance(end, Bounce):
            listener.resumes.on_bounce(end)
            return
        if not listener.running:
            self._held.append(end)  # the cluster hears of it in finish(), after our clients did
            self._held_cids.update(end.gone)
            self._held_cids.update(conn.cid for conn in end.back)
        else:
            self._end_in_cluster(end)
        for cid in end.gone:
            self.joined.discard(cid)
            listener.forget_gone(cid)
        for conn in end.back:
            if listener.take_back(conn):
                self.queue(conn, requeued=True)

    def _end_in_cluster(self, end: PairEnd) -> None:
        """UNPAIR (the partner's node hears ``peer_left``), then LEAVE for whoever is gone."""
        node = self.node
        if end.remote is not None:
            local, remote, reason = end.remote
            node.unpair(local, remote, local if end.next_by is not None else None, local, reason)
        elif end.unpair:
            next_by = node.cid(end.next_by) if end.next_by is not None else None
            node.unpair(node.cid(end.a), node.cid(end.b), next_by, None, "")
        if end.moved:
            return  # the session went on on another node: its records went with it
        for cid in end.gone:
            node.leave(node.cid(cid))

    # -- answers from the node -------------------------------------------------------------------

    def on_wake(self) -> None:
        results = self._results
        while results:
            result = results.popleft()
            if isinstance(result, Joined):
                self._joined(result)
            elif isinstance(result, RemotePaired):
                local = self.node.local_id(result.peer.local)
                conn = self.listener.waiting.get(local) if local is not None else None
                if conn is not None:  # else it left: its LEAVE ends the pair
                    self._to_relay(conn, result.peer)
            elif isinstance(result, Ready):
                self.fresh.ready = True
                tell_ready(self.listener.control)
            else:
                self.sessions.on_result(result)
        if self.sessions.deferred:
            self.sessions.retry_deferred()

    def _joined(self, joined: Joined) -> None:
        listener, node = self.listener, self.node
        local = node.local_id(joined.cid)
        conn = listener.waiting.get(local) if local is not None else None
        if conn is not None:
            self.sessions.unstash(conn)
        result = joined.result
        if isinstance(result, RoomFull):
            if conn is not None:
                del listener.waiting[conn.cid]
                self.asked.discard(conn.cid)
                self.joined.discard(conn.cid)  # the cluster lobby did not keep it
                listener.fail(conn, ErrorCode.ROOM_FULL, room_full_text(conn.room))
            return
        if isinstance(result, Queued):
            if conn is not None:
                if conn.cid not in self.announced:
                    self.announced.add(conn.cid)
                    listener.send(conn, self._waiting(conn))
                self._answered(conn)
            return
        assert isinstance(result, Matched)
        if joined.peer is not None:
            if conn is not None:  # else it left: its LEAVE ends the pair, the partner is told
                self._to_relay(conn, joined.peer)
            return
        wlocal = node.local_id(result.waiter)
        waiter = listener.waiting.get(wlocal) if wlocal is not None else None
        if conn is not None and waiter is not None:
            first = b"" if conn.cid in self.announced else self._waiting(conn)
            for cid in (conn.cid, waiter.cid):
                self.announced.discard(cid)
                self.asked.discard(cid)
            listener._pair(waiter, conn, newcomer_first=first)
        elif conn is not None or waiter is not None:
            # One of the two left while the join was on its way; its LEAVE
            # (already asked) ends the pair, and the other is queued again.
            alone = conn if conn is not None else waiter
            assert alone is not None
            self._ask_join(alone, True)

    def _to_relay(self, conn: Conn, peer: RemotePeer) -> None:
        listener = self.listener
        del listener.waiting[conn.cid]
        first = b"" if conn.cid in self.announced else self._waiting(conn)
        self.announced.discard(conn.cid)
        self.asked.discard(conn.cid)
        peer.room = conn.room
        listener.send(conn, first + event_bytes(conn, FrameType.PAIRED, {"peer": peer.name, "room": conn.room}))
        listener.release_conn(conn)
        relay: Any = listener.relays.pick()
        listener.registry.moved(conn.cid, relay)
        log.info("paired %s with %s on node %s%s", conn.label, peer.name, peer.remote.split(":", 1)[0],
                 f" in room {conn.room}" if conn.room else "")
        relay.submit_remote(conn, peer)

    @staticmethod
    def _waiting(conn: Conn) -> bytes:
        return event_bytes(conn, FrameType.WAITING, {"room": conn.room})

    # -- stopping --------------------------------------------------------------------------------

    def finish(self, leftovers: deque[Report]) -> None:
        """After the listener's loop: the cluster's side of pair ends it had no time for, then stop."""
        node = self.node
        for end in self._held:
            self._end_in_cluster(end)
        for end in leftovers:
            if isinstance(end, Bounce):
                continue
            if end.remote is not None:
                local, remote, reason = end.remote
                node.unpair(local, remote, None, local, reason)
            for cid in [] if end.moved else end.gone:
                node.leave(node.cid(cid))
            for conn in end.back:
                node.leave(node.cid(conn.cid))
                conn.sock.close()
        self.fresh.close()
        node.stop()
        node.join_threads()


def default_node_id(port: int) -> str:
    """``HOSTNAME-PORT``, in the characters a node id may have."""
    import re
    import socket

    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:50] or "node"
    return f"{host}-{port}"


def check_cluster(config: ServerConfig, port: int) -> None:
    """Before starting a clustered node: the options, the Redis client package, the URL, the node id.

    Each mistake is one ConfigError line. Redis itself is not asked here: a
    node that cannot reach it says so and keeps retrying (the listener's
    cluster thread), and prints ``listening on`` once it has joined.
    """
    from chatpair.cluster.names import check_node_id
    from chatpair.cluster.redisconn import connect
    from chatpair.errors import ConfigError

    assert config.cluster
    if config.workers:
        raise ConfigError("--cluster cannot be combined with --workers yet; use --relay-threads")
    connect(config.cluster).close()  # the package is there and the URL parses (no connection yet)
    config.node_id = check_node_id(config.node_id or default_node_id(port))
