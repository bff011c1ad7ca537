"""Cluster mode, a relay loop's side of the lanes: it reads the inbox and writes the outbox itself.

The node's first relay loop offers itself (:meth:`ClusterNode.offer_lane`);
the node's reader thread then hands it two connected sockets to Redis, and
the loop watches both in its own poller (:mod:`chatpair.cluster.lane`):

* reading (:class:`~chatpair.cluster.lane.InboxLane`): what arrives is
  handed on exactly as the reader thread would
  (:meth:`ClusterNode.dispatch`), and the entries for this loop's own
  clients are written at once, in the same turn of the loop, instead of
  waking it from another thread;
* writing (:class:`~chatpair.cluster.lane.OutboxLane`): its clients'
  messages go into the node's outbox directly (numbered there, under the
  node's lock) and, at the end of the turn, the outbox's batch goes out in
  one pipeline - one batch in transit at a time, whoever writes it, so
  numbers reach the streams in order. While a request this loop made
  (a control entry, a move) still waits for the I/O thread, its messages
  go the I/O thread's way too, behind it.

When a lane fails (Redis closed it, an error reply, no answer in time) both
are closed and logged once, the batch on its way goes back to the outbox
for the I/O thread to write (it retries while Redis is unreachable), and
the reader thread opens the next pair of sockets. A lane never blocks the
loop, so same-node pairs never notice.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from chatpair.cluster.lane import InboxLane, OutboxLane
from chatpair.cluster.nodeio import ACK_DELAY
from chatpair.cluster.resp import LaneBroken
from chatpair.cluster.results import IO_TIMEOUT, READ_BLOCK_MS
from chatpair.server.poller import EVENT_READ, EVENT_WRITE

log = logging.getLogger("chatpair")


class LaneMixin:
    """For :class:`~chatpair.server.cluster_relay.ClusterRelay`: the lanes, if this loop has them."""

    node: Any
    poller: Any
    _ready: Any  # the relay's peers with items to write
    now: float
    due: float
    running: bool

    def init_lane(self, index: int) -> None:
        self.lane: InboxLane | None = None
        self.out_lane: OutboxLane | None = None
        self._batch: list[Any] | None = None  # the outbox batch our out lane has on its way
        self.asked = 0  # requests this loop made of the I/O thread (ClusterNode._put)
        self.done = 0  # ... and how many of them it has done (written by the I/O thread)
        self.thread_id = 0  # the loop's thread, once it runs
        self.lane_worked = True  # Redis answered the lanes since they were last lost (or never lost)
        if index == 0:
            self.node.offer_lane(self)

    def run(self) -> None:
        self.thread_id = threading.get_ident()
        super().run()  # type: ignore[misc]

    # -- the loop's hooks (ConnLoop) ------------------------------------------------------------

    def on_special(self, fileobj: Any) -> None:
        if not self.on_lane_event(fileobj):
            super().on_special(fileobj)  # type: ignore[misc]

    def after_events(self) -> None:
        self.write_outbox()
        super().after_events()  # type: ignore[misc]

    def on_due(self, now: float) -> None:
        self.write_outbox(acks=True)

    def close_all(self) -> None:
        self.close_lane(ended=True)
        super().close_all()  # type: ignore[misc]

    # -- the lanes --------------------------------------------------------------------------------

    def peer_ready(self, peer: Any) -> None:
        """Whoever reads the inbox: ``peer`` has items (this loop itself, with the lanes: no wake-up)."""
        self._ready.append(peer)
        if threading.get_ident() != self.thread_id:
            self.wake()  # type: ignore[attr-defined]

    def writes_outbox(self) -> bool:
        """May this loop put its clients' messages into the outbox itself (and write them)?"""
        return self.out_lane is not None and self.asked == self.done

    def open_lane(self, reading: tuple[Any, list[bytes]], writing: tuple[Any, list[bytes]]) -> None:
        """The reader thread's sockets (each with its login commands): use them from now on."""
        if not self.running or self.lane is not None:
            reading[0].close()
            writing[0].close()
            self.node.lane_closed(self, ended=not self.running)
            return
        try:
            self.lane = InboxLane(*reading, self.node.inbox, READ_BLOCK_MS, IO_TIMEOUT, self.now)
            self.out_lane = OutboxLane(*writing, IO_TIMEOUT, self.now)
        except LaneBroken as error:
            reading[0].close()
            writing[0].close()
            self.lane = self.out_lane = None
            self._say_lost(error)
            self.node.lane_closed(self, ended=False)
            return
        for lane in (self.lane, self.out_lane):
            lane.events = self._events(lane)
            self.poller.register(lane.sock, lane.events, None)

    @staticmethod
    def _events(lane: InboxLane | OutboxLane) -> int:
        return EVENT_READ | (EVENT_WRITE if lane.conn.out else 0)

    def on_lane_event(self, fileobj: Any) -> bool:
        """If ``fileobj`` is a lane's socket, handle its event; whether it was one."""
        lane, out_lane = self.lane, self.out_lane
        try:
            if lane is not None and fileobj is lane.sock:
                lane.conn.flush()
                items = lane.on_readable()
                if items:  # (not any answer: a login's, an empty read's come while Redis refuses writes)
                    self.lane_worked = True
                    self.node.dispatch(items)
                    self.drain_ready()  # this loop's own peers: written now, not after a wake-up
                lane.read_on(self.now)
                self._interest(lane)
                return True
            if out_lane is not None and fileobj is out_lane.sock:
                out_lane.conn.flush()
                if out_lane.on_readable() and self._batch is not None:
                    self._landed()  # and the next batch goes out (if that fails, the lanes are closed)
                if self.out_lane is out_lane:
                    self._interest(out_lane)
                return True
        except LaneBroken as error:
            self._lane_failed(error)
            return True
        return False

    def _interest(self, lane: InboxLane | OutboxLane) -> None:
        """Writable too while the socket has not taken everything (and only then)."""
        want = self._events(lane)
        if want != lane.events:
            self.poller.modify(lane.sock, want, None)
            lane.events = want

    def _landed(self) -> None:
        self.lane_worked = True
        node = self.node
        with node.lock:
            node.outbox.landed(self._batch)
            node.lock.notify_all()  # the I/O thread may wait for it
        self._batch = None
        self.write_outbox()

    def write_outbox(self, acks: bool = False) -> None:
        """End of a turn of the loop: the outbox's messages (and what else is queued) to Redis.

        Acks alone wait (for messages to go with) until ``acks``: the loop's
        timer (:attr:`due`), set when this loop queued one.
        """
        out_lane = self.out_lane
        if out_lane is None:
            return
        if out_lane.unanswered:
            if acks:
                self.due = self.now + ACK_DELAY  # after the batch on its way
            return
        node = self.node
        outbox = node.outbox
        if not (acks or outbox.queued()):  # (read without the lock: a hint, checked again under it)
            return  # every turn of a loop with same-node pairs only: no lock taken
        with node.lock:
            if outbox.in_transit is not None or outbox.io_waiting:
                if acks:
                    self.due = self.now + ACK_DELAY
                return
            if not (outbox.queued() or (acks and outbox.pending())):
                return
            batch = self._batch = outbox.take()
        self.due = float("inf")  # the acks queued go with this batch: no need to wake for them
        try:
            out_lane.send(*outbox.packed(batch), self.now)
            self._interest(out_lane)
        except LaneBroken as error:
            self._lane_failed(error)

    def tick_lane(self, now: float) -> None:
        for lane in (self.lane, self.out_lane):
            if lane is not None and lane.overdue(now):
                self._lane_failed(LaneBroken(f"Redis: no answer for {lane.patience:g}s"))
                return

    def _lane_failed(self, error: LaneBroken) -> None:
        self._say_lost(error)
        self.close_lane(ended=False)

    def _say_lost(self, error: LaneBroken) -> None:
        # One line per outage: lanes that fail again before Redis answered them once (a Redis
        # that refuses writes fails each new lane at its first batch) are not news. The I/O
        # thread logs Redis going away and coming back for the whole node.
        log.log(logging.INFO if self.lane_worked else logging.DEBUG,
                "%s: cluster connection lost (%s); reconnecting", self, error)
        self.lane_worked = False

    def close_lane(self, ended: bool) -> None:
        """Close the lanes (``ended``: the loop is ending) and have the node's threads go on without."""
        lanes = [lane for lane in (self.lane, self.out_lane) if lane is not None]
        self.lane = self.out_lane = None
        for lane in lanes:
            try:
                self.poller.unregister(lane.sock)
            except (KeyError, ValueError, OSError):
                pass
            lane.close()
        node = self.node
        if self._batch is not None:  # Redis may or may not have it: the I/O thread writes it again
            with node.lock:
                node.outbox.untake(self._batch)
                node.lock.notify_all()
            self._batch = None
        if lanes or ended:
            node.requests.put(("flush",))  # what this loop queued is the I/O thread's to write now
            node.lane_closed(self, ended=ended)

    def drain_ready(self) -> None:
        """Implemented by the relay: write what its peers have received."""
        raise NotImplementedError
