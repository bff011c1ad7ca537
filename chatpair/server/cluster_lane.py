"""Cluster mode, a relay loop's side of a lane: it reads the node's inbox stream itself.

The node's first relay loop offers itself (:meth:`ClusterNode.offer_lane`);
the node's reader thread then hands it a connected socket to Redis, and the
loop watches it in its own poller (:class:`chatpair.cluster.lane.InboxLane`):
what arrives is handed on exactly as the reader thread would
(:meth:`ClusterNode.dispatch`), and the entries for this loop's own clients
are written at once, in the same turn of the loop, instead of waking it
from another thread. When the lane fails it is closed and logged once, and
the reader thread opens the next one (same-node pairs never notice: a lane
never blocks the loop).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from chatpair.cluster.lane import InboxLane, LaneBroken
from chatpair.cluster.results import IO_TIMEOUT, READ_BLOCK_MS
from chatpair.server.poller import EVENT_READ, EVENT_WRITE

log = logging.getLogger("chatpair")


class LaneMixin:
    """For :class:`~chatpair.server.cluster_relay.ClusterRelay`: the inbox lane, if this loop has it."""

    node: Any
    poller: Any
    now: float
    running: bool

    def init_lane(self, index: int) -> None:
        self.lane: InboxLane | None = None
        self.thread_id = 0  # the loop's thread, once it runs
        if index == 0:
            self.node.offer_lane(self)

    def run(self) -> None:
        self.thread_id = threading.get_ident()
        super().run()  # type: ignore[misc]

    def open_lane(self, sock: Any, login: list[bytes]) -> None:
        """The reader thread's socket: read the inbox on it from now on."""
        if not self.running or self.lane is not None:
            sock.close()
            self.node.lane_closed(self, ended=not self.running)
            return
        try:
            self.lane = InboxLane(sock, login, self.node.inbox, READ_BLOCK_MS, IO_TIMEOUT, self.now)
        except LaneBroken as error:
            sock.close()
            log.info("%s: cluster inbox connection lost (%s); reconnecting", self, error)
            self.node.lane_closed(self, ended=False)
            return
        self.poller.register(sock, self._lane_events(), None)

    def _lane_events(self) -> int:
        return EVENT_READ | (EVENT_WRITE if self.lane is not None and self.lane.conn.out else 0)

    def on_lane_event(self) -> None:
        lane = self.lane
        assert lane is not None
        try:
            lane.conn.flush()
            items = lane.on_readable(self.now)
            if lane.conn.out:
                self.poller.modify(lane.sock, self._lane_events(), None)
        except LaneBroken as error:
            self._lane_failed(error)
            return
        if items:
            self.node.dispatch(items)
            self.drain_ready()  # this loop's own peers: written now, not after a wake-up

    def tick_lane(self, now: float) -> None:
        if self.lane is not None and self.lane.overdue(now):
            self._lane_failed(LaneBroken(f"Redis: no answer on the inbox lane for {self.lane.patience:g}s"))

    def _lane_failed(self, error: LaneBroken) -> None:
        # One line; the I/O thread logs Redis going away and coming back for the whole node.
        log.info("%s: cluster inbox connection lost (%s); reconnecting", self, error)
        self.close_lane(ended=False)

    def close_lane(self, ended: bool) -> None:
        """Close the lane (``ended``: the loop is ending) and have the reader thread go on."""
        lane, self.lane = self.lane, None
        if lane is not None:
            try:
                self.poller.unregister(lane.sock)
            except (KeyError, ValueError, OSError):
                pass
            lane.close()
        if lane is not None or ended:
            self.node.lane_closed(self, ended=ended)

    def drain_ready(self) -> None:
        """Implemented by the relay: write what its peers have received."""
        raise NotImplementedError
