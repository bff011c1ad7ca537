"""When is a node dead? Its heartbeat key stayed gone for a grace period. Pure logic.

A node's key (``P node:NODE``, :mod:`chatpair.cluster.lobby`) lapses when the
node stops renewing it - or when Redis was unreachable for longer than the
TTL, in which case *every* node's key may have lapsed though all are fine.
So a node is purged only after it has been seen missing, continuously, for
``grace`` seconds by the node that purges it, and a node that just got its
Redis connection back forgets what it saw (:meth:`DeathWatch.reset`): node
death detection pauses while Redis is unreachable, and a node that really
died meanwhile is purged ``grace`` seconds after Redis returns (its partners
are told then).

Time is passed in (``now``, monotonic seconds); no clock, no Redis here.
"""

from __future__ import annotations

#: Seconds a node must be seen missing before it is purged.
DEFAULT_GRACE = 2.0


class DeathWatch:
    """Feed it the nodes missing at each look; it names those to purge."""

    def __init__(self, grace: float = DEFAULT_GRACE) -> None:
        self.grace = grace
        self._missing_since: dict[str, float] = {}

    def observe(self, missing: set[str], now: float) -> list[str]:
        """The nodes missing now; returns those missing for at least ``grace`` seconds, sorted."""
        for node in list(self._missing_since):
            if node not in missing:
                del self._missing_since[node]  # it came back (or was purged by someone else)
        for node in missing:
            self._missing_since.setdefault(node, now)
        return sorted(n for n, since in self._missing_since.items() if now - since >= self.grace)

    def purged(self, node: str) -> None:
        """``node`` was purged (by us or found alive): stop watching it."""
        self._missing_since.pop(node, None)

    def reset(self) -> None:
        """Redis was unreachable: what was seen before says nothing now."""
        self._missing_since.clear()

    def watching(self) -> dict[str, float]:
        """Missing nodes and since when (for logs and tests)."""
        return dict(self._missing_since)
