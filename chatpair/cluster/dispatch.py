"""What each entry of a node's inbox does: :func:`dispatch`, in stream order.

Called by whoever reads the node's inbox (the relay loop with the lanes,
:mod:`chatpair.server.cluster_lane`, or the node's reader thread): a
partner's messages, gaps, acks and notices go to the
:class:`~chatpair.cluster.peer.RemotePeer` of the client they are for (its
relay is told once per batch); a ``paired`` entry, and the entries of a
session resumed on another node, go to the listener (``node.post``) and the
I/O thread (``node.requests``). Only thread-safe hand-overs: any thread may
call it, one at a time.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from chatpair.cluster.entries import Entry, Gap
from chatpair.cluster.peer import RemotePeer
from chatpair.cluster.results import Adopted, HandoverAsked, Refused, RemotePaired

log = logging.getLogger("chatpair")


def dispatch(node: Any, items: list[Entry | Gap]) -> None:
    """Hand what ``node``'s inbox brought on, in order."""
    touched: set[RemotePeer] = set()
    for item in items:
        try:
            _hand_on(node, item, touched)
        except Exception:  # a bug, or an entry from another version: that entry is lost, not the reading
            log.exception("cluster: inbox entry %r not handled", item)
    for peer in touched:
        peer.notify()


def _hand_on(node: Any, item: Entry | Gap, touched: set[RemotePeer]) -> None:
    """One entry (or gap) to whom it is for; the peers given something are added to ``touched``."""
    routes = node.routes
    if isinstance(item, Gap):
        peer = routes.get(item.target)
        if peer is not None and peer.remote == item.source:
            peer.push(("gap", item.first, item.last))
            touched.add(peer)
        return
    kind = item.kind
    if kind == "msg":
        peer = routes.get(item.target)
        entry = ("msg", (item.seq, item.count), item.payload)
        if peer is not None and peer.remote == item.source:
            peer.push(entry)
            touched.add(peer)
        elif peer is None and node.local_id(item.target) is not None:
            found = routes.orphan(item.target, item.source, entry)
            if found is not None:
                touched.add(found)
    elif kind == "ack":
        with node.lock:
            acked = node.outbox.on_ack(item)
        if acked.delivered or acked.undelivered:
            peer = routes.get(acked.source)
            if peer is not None and peer.remote == acked.target:
                peer.push(("acked", acked.delivered, acked.undelivered))
                touched.add(peer)
    elif kind == "paired":
        if node.local_id(item.target) is None:
            return  # for a client of an earlier run of this node
        name = item.payload.decode("utf-8", "replace")
        peer = RemotePeer(item.target, item.source, name)
        if routes.claim(peer) is not None:
            return  # our JOIN's answer, asked again after a lost reply, found this pair first (NodeIo.join_unsure)
        node.requests.put(("paired_seen", item.target, item.source, name))
        node.post(RemotePaired(peer))
    elif kind in ("notice", "lost", "freeze", "frozen", "thaw"):
        peer = routes.get(item.target)
        if peer is not None and peer.remote == item.source:
            peer.push((kind, item.payload.decode("utf-8", "replace"), None))
            touched.add(peer)
        elif kind == "freeze":
            # The pair ended here (our client left; its peer_left went
            # out before this answer): nothing more will be sent.
            node.control(item.source, item.target, "frozen")
    elif kind in ("handover", "refused", "adopt", "moved"):
        found = _session_entry(node, item)
        if found is not None:
            touched.add(found)
    elif kind == "peer_left":
        peer = routes.remove(item.target, item.source)
        if peer is None:
            return  # the pair had ended here already
        with node.lock:
            lost = node.outbox.drop_pair(item.target, item.source)
        node.inbox.forget(item.source, item.target)
        peer.push(("left", item.payload.decode("utf-8", "replace") or "disconnected", len(lost)))
        touched.add(peer)
        node.requests.put(("left_seen", item.target))


def _session_entry(node: Any, item: Entry) -> RemotePeer | None:
    """A session resumed on another node (see :mod:`chatpair.server.cluster_sessions`)."""
    kind = item.kind
    if kind == "handover":
        ask = json.loads(item.payload)
        node.post(HandoverAsked(str(ask["token"]), item.source, int(ask["received"])))
    elif node.local_id(item.target) is None:
        return None  # for a client of an earlier run of this node
    elif kind == "refused":
        node.post(Refused(item.target))
    elif kind == "adopt":
        node.post(Adopted(item.target, item.source, json.loads(item.payload)))
    else:  # moved: our client's partner now lives at another cid; it goes on from 1 there
        peer = node.routes.get(item.target)
        if peer is None or peer.remote != item.source:
            return None
        new = item.payload.decode()
        peer.remote = new  # from here on entries from ``new`` are this peer's
        with node.lock:
            lost = node.outbox.drop_pair(item.target, item.source)
        node.inbox.forget(item.source, item.target)
        peer.push(("moved", new, len(lost)))
        node.requests.put(("moved_seen", item.target, new))
        return peer
    return None
