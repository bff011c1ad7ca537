"""The I/O thread's mirror of this node's clients: what a join, or a match, changes in it.

The mirror (:class:`chatpair.cluster.nodeio.NodeIo`'s ``waiting``, in queue
order, and ``chatting``) is what the node writes back to Redis when its
registration lapsed or Redis lost its data (:func:`chatpair.cluster.upkeep.heartbeat`).
Only the I/O thread touches it; the joins the listener makes itself reach
it through ``node.seen_joins`` (:func:`take_seen`).
"""

from __future__ import annotations

from typing import Any

from chatpair.cluster.lobby import Chatting, Matched, Queued, Waiting
from chatpair.cluster.names import node_of


def remember_join(io: Any, cid: str, name: str, room: str | None, result: Any, noted: bool = False) -> None:
    """Where ``cid``'s join left it (a match: :func:`note_match` too). ``noted``: a join the listener
    made, heard of late (a match made since, on this node, stands)."""
    io.waiting.pop(cid, None)
    early = io.paired_early.pop(cid, None)
    if early is not None:  # its partner's node paired it before we heard of its join
        io.chatting[cid] = Chatting(cid, early[0], name, early[1], room)
    elif isinstance(result, Queued) and not (noted and cid in io.chatting):
        io.waiting[cid] = Waiting(cid, name, room)


def note_match(io: Any, result: Any, name: str, room: str | None) -> None:
    """A match a join made (nothing for other answers): both of ours chatting."""
    if isinstance(result, Matched):
        cid, waiter = result.newcomer, result.waiter
        mine = io.waiting.pop(waiter, None)
        if node_of(waiter) == io.node.node:
            if mine is None:  # it left meanwhile: its LEAVE ends this pair, and cid is queued again
                return
            io.chatting[waiter] = Chatting(waiter, cid, mine.name, name, room)
        io.chatting[cid] = Chatting(cid, waiter, name, result.waiter_name, room)


def take_seen(io: Any) -> None:
    """The joins the listener made itself (:mod:`chatpair.server.cluster_joins`): before any
    request (the listener adds them before asking anything they lead to) and before a restore."""
    seen = io.node.seen_joins
    while seen:
        cid, name, room, result = seen.popleft()
        remember_join(io, cid, name, room, result, noted=True)
        note_match(io, result, name, room)
