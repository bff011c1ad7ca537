"""This node's link to the cluster: the two threads that talk to Redis for a chatpair server.

A clustered listener process owns one :class:`ClusterNode` (``start`` in the
listener's constructor, ``stop`` and ``join`` in ``listener_main``). Redis
calls block, so none of them runs on a selector thread:

* the **I/O thread** (:class:`chatpair.cluster.nodeio.NodeIo`) does every
  call that changes something, in the order the requests were made: the
  lobby's scripts (join, unpair, leave), the outbox's batched writes
  (messages and acks, one pipeline per batch), the node's heartbeat, the
  watch for dead nodes and their purge, and the rebuild after Redis came
  back empty. Requests come from the listener and the relay threads through
  one queue (:meth:`ClusterNode.join`, :meth:`send_msgs`, ...); answers go
  to the listener through the ``post`` callback it gave (which queues them
  and wakes its selector).
* the **inbox reader** (:meth:`ClusterNode._read_loop`) opens the
  connection on which the node's first relay loop reads this node's inbox
  stream itself (a *lane*, :mod:`chatpair.cluster.lane`: no hand-over
  between threads on the way to its clients), and opens it again when it
  fails. Where a lane cannot be had (TLS, no hiredis) it reads the stream
  itself (XREAD BLOCK). Either way what arrives is handed on in order by
  :meth:`ClusterNode.dispatch`: to the relay holding the target client
  (:class:`chatpair.cluster.peer.RemotePeer`), or, for a ``paired`` entry
  (a client of ours was paired by another node), to the listener.

One client connection per thread (redis-py pools them); the reader's read
timeout is longer than its BLOCK. While Redis is unreachable both threads
retry every :data:`RETRY_SECONDS`; the I/O thread logs one line when it goes
and one when it comes back, and keeps every request until it can be done.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from chatpair.cluster.dispatch import dispatch
from chatpair.cluster.entries import Entry, Gap
from chatpair.cluster.inbox import DEFAULT_WINDOW, Inbox, Outbox
from chatpair.cluster.lane import lanes_possible, open_socket
from chatpair.cluster.lobby import ClusterLobby
from chatpair.cluster.names import DEFAULT_PREFIX
from chatpair.cluster.nodeio import NodeIo
from chatpair.cluster.peer import Routes
from chatpair.cluster.redisconn import (
    connect,
    describe,
    is_outage,
    public_url,
    redis_errors,
)
from chatpair.cluster.results import (
    CONNECT_TIMEOUT,
    DEATH_GRACE,
    IO_TIMEOUT,
    NODE_TTL_MS,
    READ_BLOCK_MS,
    RETRY_SECONDS,
    Result,
)

log = logging.getLogger("chatpair")


class ClusterNode:
    """One node: its id, its Redis clients, its two threads, its request queue.

    For any thread: :meth:`cid`, :meth:`local_id`, and the requests
    :meth:`join`, :meth:`unpair`, :meth:`leave`, :meth:`send_msgs`,
    :meth:`ack`. For the owner: :meth:`start`, :meth:`stop`, :meth:`join_threads`.
    """

    def __init__(self, url: str, node_id: str, post: Callable[[Result], None], *,
                 prefix: str = DEFAULT_PREFIX, ttl_ms: int = NODE_TTL_MS, grace: float = DEATH_GRACE,
                 window: int = DEFAULT_WINDOW) -> None:
        self.url = public_url(url)
        io_client = connect(url, socket_timeout=IO_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT)
        read_client = connect(url, socket_timeout=READ_BLOCK_MS / 1000 + IO_TIMEOUT,
                              socket_connect_timeout=CONNECT_TIMEOUT)
        self.lobby = ClusterLobby(io_client, node_id, prefix=prefix, ttl_ms=ttl_ms)
        self.node = self.lobby.node
        self._prefix = f"{self.node}:{self.lobby.boot}-"
        self.window = window
        self.outbox = Outbox(io_client, self.lobby.keys, window=window)
        self.inbox = Inbox(read_client, self.lobby.keys, self.node)
        self.routes = Routes()
        # The outbox: every thread queues into it and settles acks; the I/O thread and a relay's lane
        # write its batches, one at a time (waiting on this condition for the one in transit).
        self.lock = threading.Condition()
        self.requests: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        #: (cid, name, room, answer) of the joins the listener made itself, for the I/O thread's
        #: mirror (NodeIo.take_seen: before its next request, and before a restore).
        self.seen_joins: deque[tuple[str, str, str | None, Any]] = deque()
        self.post = post
        self.stopping = threading.Event()
        #: The relay loop that reads the inbox on a lane (it offers itself: :meth:`offer_lane`).
        self.lane_owner: Any = None
        self._lanes = lanes_possible(read_client)
        self._lane_done = threading.Event()  # the lane failed, or its loop ended
        self.errors = redis_errors()
        self._read_refused = ""  # what Redis last answered the reader thread's XREAD with (logged once)
        self.io = NodeIo(self, grace=grace)
        self._threads = [threading.Thread(target=self.io.run, name="chatpair-cluster-io", daemon=True),
                         threading.Thread(target=self._read_loop, name="chatpair-cluster-inbox", daemon=True)]

    # -- ids -------------------------------------------------------------------------------

    def cid(self, local: int) -> str:
        """The cluster-wide id of this node's connection number ``local``."""
        return self._prefix + str(local)

    def local_id(self, cid: str) -> int | None:
        """This node's connection number for ``cid``; None if it is not a client of this run."""
        if cid.startswith(self._prefix):
            tail = cid[len(self._prefix):]
            if tail.isdigit():
                return int(tail)
        return None

    # -- requests (any thread), done in order by the I/O thread ------------------------------

    def join(self, cid: str, name: str, room: str | None, requeued: bool) -> None:
        """Queue the client (answered with :class:`Joined` through ``post``)."""
        self.requests.put(("join", cid, name, room, requeued))

    def unpair(self, a: str, b: str, next_by: str | None, leaver: str | None, reason: str) -> None:
        """End a pair; our messages already sent go out before the partner hears ``peer_left``."""
        self.requests.put(("unpair", a, b, next_by, leaver, reason))

    def leave(self, cid: str) -> None:
        """The client is gone (a pair it may still be in, unknown to us yet, is ended too)."""
        self.requests.put(("leave", cid))

    def send_msgs(self, source: str, target: str, frames: bytes, count: int, by: Any = None) -> None:
        """``count`` messages (MSG frames) from our ``source`` to ``target`` on another node (batched)."""
        self._put(("msgs", source, target, frames, count), by)

    def ack(self, source: str, target: str, upto: int, lost: list[tuple[int, int]], io_times: bool = True) -> None:
        """We wrote ``source``'s messages up to ``upto`` to our ``target`` (``lost``: never arrived).

        Acks are queued at once (their order does not matter: each says "up
        to"); they go with the next batch of messages, or alone after
        :data:`~chatpair.cluster.nodeio.ACK_DELAY`, which the I/O thread times
        (``io_times=False``: a relay writing the outbox itself times it).
        """
        with self.lock:
            for gap in lost:
                self.outbox.ack(source, target, upto, gap)
            self.outbox.ack(source, target, upto)
        if io_times:
            self.requests.put(("acks",))

    def control(self, target: str, source: str, kind: str, payload: bytes = b"", by: Any = None) -> None:
        """A control entry for ``target`` on another node, after what ``source`` sent before it."""
        self._put(("control", target, source, kind, payload), by)

    def ask_handover(self, tag: str, token: str, new: str, received: int) -> None:
        """A RESUME for a session of the node ``tag`` names came to our client ``new``: ask that node."""
        self.requests.put(("handover", tag, token, new, received))

    def move(self, old: str, new: str, partner: str | None, tell: bool, state: dict[str, Any],
             by: Any = None) -> None:
        """Hand our session ``old`` over to ``new`` on another node (after what was asked before)."""
        self._put(("move", old, new, partner, tell, state), by)

    def _put(self, request: tuple[Any, ...], by: Any) -> None:
        """Queue a request; ``by``: the relay loop asking, which counts what it asked (``asked``) and
        what is done (``done``, counted by the I/O thread), and writes to the outbox itself only while
        nothing it asked waits (its messages must not overtake what it asked before them)."""
        if by is not None:
            by.asked += 1
            request = ("by", by, request)
        self.requests.put(request)

    def set_away(self, cid: str) -> None:
        """Our waiting client dropped, its session kept: keep its place, pair nobody with it."""
        self.requests.put(("set_away", cid))

    def back(self, cid: str, name: str, room: str | None) -> None:
        """Our away waiting client is back (answered with :class:`Joined`, maybe paired now)."""
        self.requests.put(("back", cid, name, room))

    # -- the threads -------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Leave the cluster after everything asked so far is done (partners elsewhere are told)."""
        self.requests.put(("stop",))

    def join_threads(self, timeout: float = 5.0) -> None:
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout)

    def halt(self) -> None:
        """The I/O thread is done: the reader stops too."""
        self.stopping.set()
        self._lane_done.set()

    # -- lanes (see chatpair.cluster.lane) -------------------------------------------------------

    def offer_lane(self, relay: Any) -> None:
        """A relay loop will read the inbox and write the outbox itself (``relay.submit("lane", ...)``)."""
        self.lane_owner = relay

    def lane_closed(self, relay: Any, ended: bool) -> None:
        """``relay``'s thread: its lane failed (``ended``: its loop is ending; no lane for it any more)."""
        if ended and self.lane_owner is relay:
            self.lane_owner = None
        self._lane_done.set()

    def _read_loop(self) -> None:
        """The inbox reader thread: keep a relay's lane open, or else XREAD BLOCK here."""
        while not self.stopping.is_set():
            owner = self.lane_owner if self._lanes else None
            if owner is None:
                self._read_here()
                continue
            try:
                reading = open_socket(self.inbox.redis, CONNECT_TIMEOUT)
                try:
                    writing = open_socket(self.inbox.redis, CONNECT_TIMEOUT)
                except OSError:
                    reading[0].close()
                    raise
            except OSError:  # Redis unreachable: the I/O thread says so in the log
                self.stopping.wait(RETRY_SECONDS)
                continue
            self._lane_done.clear()
            if self.lane_owner is not owner:  # its loop ended while we connected (and said so before the clear)
                reading[0].close()
                writing[0].close()
                continue
            opened = time.monotonic()
            owner.submit("lane", (reading, writing))
            while not self._lane_done.wait(RETRY_SECONDS):
                if self.lane_owner is not owner:  # belt and braces: a loop gone without a word
                    break
            if time.monotonic() - opened < RETRY_SECONDS:  # failing at once (refused?): not in a tight loop
                self.stopping.wait(RETRY_SECONDS)

    def _read_here(self) -> None:
        """One XREAD BLOCK on this thread, and what it brought handed on."""
        try:
            items = self.inbox.read(block_ms=READ_BLOCK_MS)
        except self.errors as error:
            # An outage, the I/O thread logs; an error reply here, this thread (once: it comes again).
            said = "" if is_outage(error) else describe(error)
            if said and said != self._read_refused:
                self._read_refused = said
                log.warning("cluster inbox reader: %s; cross-node messages wait", said)
            self.stopping.wait(RETRY_SECONDS)
            return
        except Exception:  # a bug must not pass silently, nor stop the reading
            log.exception("cluster inbox reader: unexpected error")
            self.stopping.wait(RETRY_SECONDS)
            return
        self._read_refused = ""
        if items:
            try:
                self.dispatch(items)
            except self.errors:
                self.stopping.wait(RETRY_SECONDS)

    def dispatch(self, items: list[Entry | Gap]) -> None:
        """Hand what the inbox brought on, in order (the reader thread, or the relay with the lanes)."""
        dispatch(self, items)
