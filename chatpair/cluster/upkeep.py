"""The cluster I/O thread's upkeep: the node's key renewed, dead nodes found and purged, leaving.

Functions of :class:`chatpair.cluster.nodeio.NodeIo`'s loop (``io``) that
keep this node's standing in the cluster rather than carry out a request:
:func:`heartbeat` renews the node's key and, when it had lapsed or Redis
lost its data, writes the mirror back (pairs that could not be rebuilt end
with PEER_LEFT ``disconnected``; after a loss, messages written but not
acknowledged are answered NOTICE ``undelivered``); :func:`watch` purges
nodes that stopped their heartbeat; :func:`leave_cluster` is the last call
of a node that stops.
"""

from __future__ import annotations

import logging
from typing import Any

from chatpair.cluster.mirror import take_seen

log = logging.getLogger("chatpair")


def watch(io: Any, now: float) -> None:
    """Look for nodes whose key is gone; purge those gone long enough (their partners are told)."""
    missing = io.lobby.dead_nodes() - {io.node.node}
    for dead in io.watch.observe(missing, now):
        told = io.lobby.purge_node(dead)
        io.watch.purged(dead)
        if told is not None:
            log.warning("node %s stopped its heartbeat: purged; %d of its partners told", dead, len(told))


def heartbeat(io: Any) -> None:
    """Renew our key; if it had lapsed, or Redis lost its data, write back what we know (the mirror)."""
    take_seen(io)  # (the listener's own joins too)
    status = io.lobby.heartbeat()
    if status == "ok":
        return
    if status == "taken":
        log.error("another server took node id %s: this one stops pairing across the cluster", io.node.node)
        return
    rebuild = status == "reset"
    log.warning("%s: re-registering %d waiting and %d chatting clients of node %s",
                "Redis lost its data" if rebuild else "this node's registration had lapsed",
                len(io.waiting), len(io.chatting), io.node.node)
    restored = io.lobby.restore(list(io.waiting.values()), list(io.chatting.values()), rebuild=rebuild)
    for matched in restored.matched:
        mine = io.waiting.get(matched.newcomer)
        if mine is not None:
            io.waiting.pop(matched.newcomer)
            io.announce(matched, mine.name, mine.room)
    for local, partner in restored.ended:
        io.chatting.pop(local, None)
        ended_meanwhile(io.node, local, partner)
    if rebuild:
        forfeit(io.node)


def ended_meanwhile(node: Any, local: str, partner: str) -> None:
    """A pair Redis no longer has (the partner's node was purged meanwhile): PEER_LEFT disconnected."""
    peer = node.routes.remove(local, partner)
    if peer is None:
        return
    with node.lock:
        lost = node.outbox.drop_pair(local, partner)
    node.inbox.forget(partner, local)
    peer.push(("left", "disconnected", len(lost)))
    peer.notify()


def forfeit(node: Any) -> None:
    """Redis lost its data: our messages written but unacknowledged come back as NOTICE undelivered."""
    with node.lock:
        gone = node.outbox.forfeit()
    for source, target, seqs in gone:
        peer = node.routes.get(source)
        if peer is not None and peer.remote == target:
            peer.push(("acked", 0, len(seqs)))
            peer.notify()


def leave_cluster(node: Any) -> None:
    """Stopping: our key goes, and the purge tells every partner elsewhere still paired with us."""
    lobby = node.lobby
    lobby.redis.delete(lobby.keys.node(node.node))
    told = lobby.purge_node(node.node) or []
    log.info("node %s left the cluster%s", node.node, f" ({len(told)} partners told)" if told else "")
