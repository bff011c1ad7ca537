"""What a cluster node tells its listener, and the timings every node keeps.

:class:`chatpair.cluster.node.ClusterNode` hands these to the ``post``
callback its owner gave it (the listener queues them and wakes its loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatpair.cluster.lobby import Matched, Queued, RoomFull
from chatpair.cluster.peer import RemotePeer

#: A node's heartbeat key lives this long (ms) unless renewed; renewed every fifth of it.
NODE_TTL_MS = 2000
#: A node's key must stay gone this long (s) before the node is purged (see liveness.py).
DEATH_GRACE = 1.25
#: How long the inbox reader waits in one XREAD (ms).
READ_BLOCK_MS = 500
#: Seconds between two tries while Redis is unreachable.
RETRY_SECONDS = 0.5
#: Socket timeouts (s) for the I/O thread's calls and for connecting.
IO_TIMEOUT = 2.0
CONNECT_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class Ready:
    """The node has joined the cluster (registered in Redis)."""

    node: str


@dataclass(frozen=True, slots=True)
class Joined:
    """The answer to a join; ``peer`` when matched with a client of another node."""

    cid: str
    result: Queued | Matched | RoomFull
    peer: RemotePeer | None = None


@dataclass(frozen=True, slots=True)
class RemotePaired:
    """A waiting client of ours (``peer.local``) was paired by another node's client (``peer.remote``)."""

    peer: RemotePeer


@dataclass(frozen=True, slots=True)
class HandoverAsked:
    """Another node got a RESUME for a session of ours (``token``): hand it to ``new``."""

    token: str
    new: str  # the cid the other node gave the returning client
    received: int


@dataclass(frozen=True, slots=True)
class Adopted:
    """The node that held a session handed it to our client ``cid`` (was ``old``): its ``state``."""

    cid: str
    old: str
    state: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Refused:
    """The node a RESUME of our client ``cid`` named will not hand the session over (or is gone)."""

    cid: str


Result = Ready | Joined | RemotePaired | HandoverAsked | Adopted | Refused
