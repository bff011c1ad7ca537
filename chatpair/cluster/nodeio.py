"""The cluster I/O thread: every Redis call that changes something, in order, retried.

:class:`NodeIo` runs in the thread :class:`chatpair.cluster.node.ClusterNode`
starts. Its loop takes requests from the node's queue (from the listener:
join, unpair, leave; from relay threads: messages and acks) and does them
in the order they were made, then writes what the outbox holds in one
pipeline. Between requests it renews the node's heartbeat (a fifth of the
TTL), and four times a second asks which nodes lost theirs (the
:class:`~chatpair.cluster.liveness.DeathWatch` decides when one is dead;
then it is purged, and its clients' partners hear ``peer_left``).

It keeps a *mirror* of what Redis should know about this node: its waiting
clients in queue order, and its clients in a pair. When the heartbeat
finds the registration lapsed (``expired``) or Redis empty (``reset``), the
mirror is written back (:meth:`ClusterLobby.restore`); pairs that could not
be rebuilt end with PEER_LEFT ``disconnected``; after a reset every message
written to Redis but not yet acknowledged is answered NOTICE
``undelivered`` (it may have been lost with Redis's data).

Redis unreachable: the request that failed stays first in line, nothing
behind it overtakes it, one log line says Redis went and one that it came
back (with how long it was gone), and node-death detection starts afresh
then. A request Redis refuses as a caller's mistake is logged and dropped.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections import deque
from typing import Any

from chatpair.cluster.liveness import DeathWatch
from chatpair.cluster.lobby import Chatting, Matched, NodeGone, Queued, Waiting
from chatpair.cluster.mirror import note_match, remember_join, take_seen
from chatpair.cluster.names import node_of, node_tag, token_hash
from chatpair.cluster.peer import RemotePeer
from chatpair.cluster.redisconn import ClusterError, describe, is_outage, refusing
from chatpair.cluster.results import IO_TIMEOUT, RETRY_SECONDS, Joined, Ready, Refused
from chatpair.cluster.upkeep import heartbeat, leave_cluster, watch

log = logging.getLogger("chatpair")

#: Seconds between two looks for dead nodes.
WATCH_INTERVAL = 0.25
#: Seconds acks queued with no message wait for one to share its pipeline (in
#: ping-pong the partner's reply usually comes first: one round trip, not two).
ACK_DELAY = 0.002
#: Consecutive joins sent in one pipeline at most.
JOIN_BATCH = 64
#: Once asked to stop, how long to keep trying while Redis is unreachable.
STOP_PATIENCE = 2.0


class NodeIo:
    """The I/O thread's loop and its bookkeeping (the mirror). Only that thread calls it."""

    def __init__(self, node: Any, *, grace: float) -> None:
        """``node``: the :class:`chatpair.cluster.node.ClusterNode` whose thread this is."""
        self.node = node
        self.lobby = node.lobby
        self.outbox = node.outbox
        self.watch = DeathWatch(grace)
        self.beat_interval = node.lobby.ttl_ms / 5000
        self.pending: deque[tuple[Any, ...]] = deque()
        self.stop_asked = 0.0  # when "stop" came (0: not yet)
        self.stop_reached = False  # "stop" was taken off the queue: leave as soon as Redis lets us
        self.down_since: float | None = None
        self.next_retry = 0.0
        self.next_beat = 0.0
        self.acks_due = float("inf")  # when acks queued alone are flushed anyway
        self.waiting: dict[str, Waiting] = {}  # the mirror, in queue order
        self.chatting: dict[str, Chatting] = {}
        self.paired_early: dict[str, tuple[str, str]] = {}  # see mirror.remember_join: cid -> (partner, its name)
        self.barrier = 0  # the last barrier request done (server/cluster_joins.py FreshJoins.hold)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self._register():
                self._serve()
        except Exception:  # a bug must not pass silently, nor take the listener down
            log.exception("cluster I/O thread crashed; this node no longer pairs across the cluster")
        finally:
            self.node.halt()
            self.lobby.close()  # (redis-py's client reconnects if asked again, e.g. by a test)

    def _take(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a request, then take every request there is."""
        requests = self.node.requests
        try:
            item = requests.get(timeout=timeout) if timeout > 0 else requests.get_nowait()
        except queue.Empty:
            return
        while True:
            self.pending.append(item)
            if item[0] == "stop" and not self.stop_asked:
                self.stop_asked = time.monotonic()
            try:
                item = requests.get_nowait()
            except queue.Empty:
                return

    def _register(self) -> bool:
        """Join the cluster, retrying while Redis is unreachable; False if asked to stop first."""
        warned = False
        while True:
            try:
                told = self.lobby.register()
            except self.node.errors as error:
                if not warned:
                    log.warning("cannot reach Redis at %s (%s); retrying every %gs",
                                self.node.url, describe(error), RETRY_SECONDS)
                    warned = True
                self._take(RETRY_SECONDS)
                if self.stop_asked:
                    return False
                continue
            log.info("node %s joined the cluster at %s%s", self.node.node, self.node.url,
                     f" (replacing its earlier run: {len(told)} partners told)" if told else "")
            self.node.post(Ready(self.node.node))
            return True

    def _serve(self) -> None:
        next_watch = 0.0
        while True:
            now = time.monotonic()
            if self.down_since is not None:
                timeout = max(0.0, self.next_retry - now)
            elif self.pending:
                timeout = 0.0
            else:
                timeout = max(0.0, min(self.next_beat, next_watch, self.acks_due) - now)
            self._take(timeout)
            now = time.monotonic()
            if self.down_since is not None and now < self.next_retry:
                continue
            if self.stop_asked and self.down_since is not None and now - self.stop_asked > STOP_PATIENCE:
                log.warning("leaving the cluster without telling Redis (unreachable); "
                            "other nodes will find this node gone")
                return
            try:
                if self.down_since is not None:
                    self._beat(now)  # first: a Redis that came back empty is refilled before anything
                # (A stop reached stays reached: a flush or a leave that fails is retried, not forgotten.)
                stop = self.stop_reached = self.stop_reached or self._run_pending()
                if self._flush_due(time.monotonic(), stop):
                    flush_outbox(self.node)
                    self.acks_due = float("inf")
                if stop:
                    leave_cluster(self.node)
                    return
                now = time.monotonic()
                if now >= self.next_beat:
                    self._beat(now)
                if now >= next_watch:
                    watch(self, now)
                    next_watch = now + WATCH_INTERVAL
                if self.down_since is not None:
                    log.warning("Redis is reachable again (after %.1fs)", now - self.down_since)
                    self.down_since = None
                    self.watch.reset()
            except self.node.errors as error:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    log.warning("Redis %s (%s): same-node pairs go on; pairing and cross-node "
                                "messages wait; retrying every %gs",
                                "refuses our commands" if refusing(error) else "unreachable",
                                describe(error), RETRY_SECONDS)
                self.watch.reset()  # nobody can tell a dead node from a missing Redis now
                self.next_retry = time.monotonic() + RETRY_SECONDS

    def _flush_due(self, now: float, stop: bool) -> bool:
        """Flush now? Messages at once; acks alone wait up to :data:`ACK_DELAY` to go with them."""
        if self.outbox.queued() or stop:
            return bool(self.outbox.pending())
        if not self.outbox.pending():
            self.acks_due = float("inf")  # flushed meanwhile (before a join or an unpair)
            return False
        if self.acks_due == float("inf"):
            self.acks_due = now + ACK_DELAY
        return now >= self.acks_due

    def _run_pending(self) -> bool:
        """Do the requests in order; True when "stop" was reached. Redis errors propagate."""
        pending = self.pending
        retried = False
        while pending:
            take_seen(self)
            request = pending[0]
            if request[0] == "stop":
                pending.clear()
                return True
            now = time.monotonic()
            if now >= self.next_beat:  # a long queue under load must not let our key lapse
                self._beat(now)
            if request[0] == "join" and not retried and len(pending) > 1 and pending[1][0] == "join":
                done = join_batch(self)  # consecutive joins: one round trip
                if done:
                    for _ in range(done):
                        pending.popleft()
                    continue
            try:
                self._do(request)
            except NodeGone:
                if not retried:  # our registration lapsed: renew (and restore), then once more
                    retried = True
                    heartbeat(self)
                    continue
                log.warning("cluster: %s not done: this node is not registered", request[0])
            except (ValueError, ClusterError) as error:
                log.warning("cluster: %s not done: %s", request[0], error)
            except self.node.errors as error:
                if is_outage(error):
                    raise  # waited out, then this request again
                log.warning("cluster: %s not done: %s", request[0], describe(error))  # it would fail again
            retried = False
            pending.popleft()
            if request[0] == "by":
                request[1].done += 1  # the relay may write to the outbox itself again
        return False

    # -- requests ----------------------------------------------------------------------------

    def _do(self, request: tuple[Any, ...]) -> None:
        kind = request[0]
        if kind == "by":  # a relay's request (it counts them: see ClusterRelay.ask)
            self._do(request[2])
        elif kind == "msgs":
            _, source, target, frames, count = request
            with self.node.lock:
                self.outbox.send_frames(source, target, frames, count)
        elif kind in ("acks", "flush"):
            pass  # queued already: the flush after the requests writes them (acks: see _flush_due)
        elif kind == "join":
            self.do_join(*request[1:])
        elif kind == "unpair":
            self._unpair(*request[1:])
        elif kind == "leave":
            self._leave(request[1])
        elif kind == "paired_seen":
            _, local, remote, name = request
            mine = self.waiting.pop(local, None)
            if mine is not None:
                self.chatting[local] = Chatting(local, remote, mine.name, name, mine.room)
            elif local not in self.chatting:  # the listener's note of its join is still on its way
                self.paired_early[local] = (remote, name)
        elif kind == "join_unsure":
            join_unsure(self, *request[1:])
        elif kind == "barrier":  # the listener's: requests before this one are done
            self.barrier = request[1]
        elif kind == "left_seen":
            self.chatting.pop(request[1], None)
            self.paired_early.pop(request[1], None)
        else:
            sessions_request(self, request)

    def do_join(self, cid: str, name: str, room: str | None, requeued: bool) -> None:
        if self.outbox.pending() or self.outbox.in_transit:
            flush_outbox(self.node)  # what was asked before (messages, acks) is in Redis before the answer
        self.joined(cid, name, room, self.lobby.join(cid, room, name=name, requeued=requeued))

    def joined(self, cid: str, name: str, room: str | None, result: Any, peer: RemotePeer | None = None) -> None:
        remember_join(self, cid, name, room, result)
        log_ghosts(result.ghosts)
        self.announce(result, name, room, peer)

    def announce(self, result: Any, name: str, room: str | None, peer: RemotePeer | None = None) -> None:
        """Tell the listener how a join (or a restore) ended; a match across nodes gets a route
        (``peer``: made and routed already)."""
        note_match(self, result, name, room)
        if peer is None and isinstance(result, Matched):
            peer = RemotePeer.for_match(result, self.node.node, room)
            if peer is not None:
                self.node.routes.add(peer)
        self.node.post(Joined(result.newcomer if isinstance(result, Matched) else result.cid, result, peer))

    def _unpair(self, a: str, b: str, next_by: str | None, leaver: str | None, reason: str) -> None:
        flush_outbox(self.node)  # messages (and acks) before the partner hears peer_left
        self.lobby.unpair(a, b, next_by=next_by, leaver=leaver, reason=reason)
        forget_pair(self, a, b)

    def _leave(self, cid: str) -> None:
        pair = self.chatting.get(cid)
        if pair is None:
            try:
                self.lobby.leave(cid)
            except ValueError:  # paired meanwhile, and we have not heard yet
                partner = self.lobby.partner_of(cid)
                pair = Chatting(cid, partner, "", "", None) if partner else None
        if pair is not None:
            self._unpair(cid, pair.partner, None, cid, "disconnected")
            self.lobby.leave(cid)
        self.waiting.pop(cid, None)
        self.paired_early.pop(cid, None)
        self.node.routes.forget(cid)

    # -- liveness and restore ------------------------------------------------------------------

    def _beat(self, now: float) -> None:
        heartbeat(self)
        self.next_beat = now + self.beat_interval


def flush_outbox(node: Any) -> None:
    """Write what the outbox holds, after the batch a relay's lane may have on its way
    (:meth:`Outbox.flush_shared`); then the lane writes what was queued meanwhile."""
    node.outbox.flush_shared(node.lock, IO_TIMEOUT)
    owner = node.lane_owner
    if owner is not None and node.outbox.queued():  # (a hint: read without the lock)
        owner.wake()


def forget_pair(io: NodeIo, a: str, b: str) -> None:
    """The pair (a, b) ended: its routes, sequence numbers and unacknowledged messages go."""
    routed = io.node.routes.get(b)
    if routed is not None and routed.remote == a:  # both ours, through Redis (after a resume moved one):
        b = ""  # b hears peer_left from our inbox like any remote partner, and that forgets its side
    with io.node.lock:
        io.outbox.drop_pair(a, b)
        io.outbox.drop_pair(b, a)
    io.node.inbox.forget(a, b)
    io.node.inbox.forget(b, a)
    io.node.routes.remove(a, b)
    if b:
        io.node.routes.remove(b, a)
        io.chatting.pop(b, None)
    io.chatting.pop(a, None)


def sessions_request(io: NodeIo, request: tuple[Any, ...]) -> None:
    """Resumable sessions (:mod:`chatpair.server.cluster_sessions`): the I/O thread's part."""
    kind = request[0]
    node = io.node
    if kind == "control":
        _, target, source, what, payload = request
        with node.lock:
            node.outbox.control(target, source, what, payload)
    elif kind == "set_away":
        io.lobby.set_away(request[1])
    elif kind == "back":  # an away waiting client is back: it may be paired now (answered as a join)
        _, cid, name, room = request
        matched = io.lobby.back(cid)
        if matched is None:
            node.post(Joined(cid, Queued(cid)))
        else:
            io.waiting.pop(cid, None)
            log_ghosts(matched.ghosts)
            io.announce(matched, name, room)
    elif kind == "handover":  # ask the node the token names; none alive: refused at once
        _, tag, token, new, received = request
        live = io.lobby.live_nodes()
        moved = io.lobby.moved_to(token_hash(token))  # it moved since the node the token names made it
        holder = node_of(moved) if moved is not None else next((n for n in sorted(live) if node_tag(n) == tag), None)
        if holder is None or holder not in live or holder == node.node:
            node.post(Refused(new))
            return
        with node.lock:
            node.outbox.control(holder + ":", new, "handover",
                                json.dumps({"token": token, "received": received}).encode())
    elif kind == "move":
        _, old, new, partner, tell, state = request
        flush_outbox(node)  # acks and notices asked before go first (the partner's node sees them before moved)
        io.lobby.move(old, new, partner, tell, json.dumps(state), token_hash(state["session"]["token"]))
        io.waiting.pop(old, None)
        io.chatting.pop(old, None)
        if partner is not None:
            renamed(io, partner, new)
    elif kind == "moved_seen":
        renamed(io, request[1], request[2])
    elif kind == "adopted":  # our mirror learns the client
        _, cid, name, room, partner, partner_name = request
        if partner is None:
            io.waiting[cid] = Waiting(cid, name, room)
        else:
            io.chatting[cid] = Chatting(cid, partner, name, partner_name, room)


def renamed(io: NodeIo, local: str, partner: str) -> None:
    """Our client ``local``'s partner moved to ``partner`` (the mirror follows)."""
    pair = io.chatting.get(local)
    if pair is not None:
        io.chatting[local] = Chatting(local, partner, pair.name, pair.partner_name, pair.room)


def join_unsure(io: NodeIo, cid: str, name: str, room: str | None, again: bool = True) -> None:
    """A first join the listener sent when its connection failed: Redis may or may not have done it.

    Unknown to Redis: joined now. Waiting: that is the answer. Chatting:
    matched (unless its partner's node's ``paired`` entry made the route
    first: that entry tells the listener; the mirror learns it here). Idle:
    it was paired (by a ``paired`` entry, or a newcomer of ours) and the
    pair has ended, whose end queues it again: nothing to do. A join refused
    as "already in the lobby" (the listener's late command ran meanwhile)
    is looked at once more.
    """
    state = io.lobby.state_of(cid)
    if state == "idle":
        return
    if state not in ("waiting", "chatting"):
        try:
            io.do_join(cid, name, room, False)
        except ValueError:
            if not again:
                raise
            join_unsure(io, cid, name, room, again=False)
        return
    partner = io.lobby.partner_of(cid) if state == "chatting" else None
    if partner is None:
        io.joined(cid, name, room, Queued(cid))
        return
    matched = Matched(partner, cid, io.lobby.name_of(partner))
    peer = RemotePeer.for_match(matched, io.node.node, room)
    if peer is not None and io.node.routes.claim(peer) is not None:
        remember_join(io, cid, name, room, matched)
        note_match(io, matched, name, room)
        return
    io.joined(cid, name, room, matched, peer)


def join_batch(io: NodeIo) -> int:
    """The joins at the head of ``pending`` (up to :data:`JOIN_BATCH`) in one pipeline.

    Returns how many are done; a join refused because our registration
    lapsed, and all after it, stay first in line for the one-by-one path
    (which renews the registration and retries).
    """
    batch = []
    for request in io.pending:
        if request[0] != "join" or len(batch) == JOIN_BATCH:
            break
        batch.append(request)
    if io.outbox.pending() or io.outbox.in_transit:
        flush_outbox(io.node)
    results = io.lobby.join_many([(cid, room, name, requeued) for _, cid, name, room, requeued in batch])
    for done, ((_, cid, name, room, _), result) in enumerate(zip(batch, results)):
        if isinstance(result, NodeGone):
            return done
        if isinstance(result, Exception):
            log.warning("cluster: join not done: %s", result)
            continue
        io.joined(cid, name, room, result)
    return len(batch)


def log_ghosts(ghosts: tuple[str, ...]) -> None:
    if ghosts:
        log.info("cluster: skipped %d waiting client%s of dead nodes", len(ghosts), "" if len(ghosts) == 1 else "s")
