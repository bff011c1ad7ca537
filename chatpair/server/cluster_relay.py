"""Cluster mode's relay loop: same-node pairs as always, and clients whose partner is on another node.

A :class:`ClusterRelay` is a :class:`~chatpair.server.relay.Relay` (the
same-node path is the inherited one, untouched: Redis is not on it) that
also serves *remote pairs*: one local connection whose partner is a
:class:`~chatpair.cluster.peer.RemotePeer`. For those:

* a run of MSG frames from the local client is handed, as it is (one copy
  of the bytes), to the cluster I/O thread (:meth:`ClusterNode.send_msgs`),
  which writes it to the partner's node's inbox stream, several runs of a
  pair to one entry, every entry of a batch in one pipeline;
* what the partner sends arrives in ``peer.incoming`` (filled by whoever
  reads the node's inbox: this loop itself if it has the node's lane,
  :mod:`chatpair.server.cluster_lane`, else another thread, which wakes it)
  and is written to the local client
  in order: a frame-mode client gets an entry's frames byte for byte, a
  line-mode one ``name: text`` lines;
* acknowledgements go both ways: this loop acknowledges, per pair, the
  partner's messages it has *written* to the socket (what still sits in the
  connection's output queue is not written yet), once per batch it wrote
  (and again at the loop's tick for what a slow socket took since); the
  I/O thread coalesces acks per pair into one entry per flush; the
  partner's node does the same for ours, and each of ours it never wrote
  comes back as NOTICE ``undelivered``;
* flow control: at most ``window`` of the local client's messages may be
  unacknowledged; past that the client is not read (a slow reader on the
  other node slows the sender here, as a slow partner does on one server);
* leaving: NEXT, BYE, a disconnect or an error here is reported to the
  listener (``PairEnd.remote``), which has the cluster end the pair (the
  partner's node hears ``peer_left`` after the messages sent before it);
  ``left`` from the partner's node becomes PEER_LEFT here, and the client
  goes back to the listener to be queued again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from chatpair.cluster.entries import frame_msgs, split_frames
from chatpair.cluster.nodeio import ACK_DELAY
from chatpair.cluster.peer import RemotePeer
from chatpair.proto import PEER_LEFT_REASONS, ErrorCode, FrameType, split_utf8
from chatpair.server.cluster_lane import LaneMixin
from chatpair.server.cluster_resume import ClusterResumeMixin
from chatpair.server.config import Limits
from chatpair.server.conn import Conn
from chatpair.server.output import LOW_WATER
from chatpair.server.relay import PairEnd, Relay, Report
from chatpair.server.render import event_bytes, line_msg_bytes, undelivered_notices
from chatpair.server.session import SESSION_HIGH_WATER
from chatpair.server.states import Mode, Phase

log = logging.getLogger("chatpair")

_FRAME = Mode.FRAME
_AWAY = Phase.AWAY


class ClusterRelay(LaneMixin, ClusterResumeMixin, Relay):
    """A relay loop that also relays clients paired with a client of another node."""

    def __init__(self, limits: Limits, index: int, on_pair_end: Callable[[Report], None], node: Any) -> None:
        super().__init__(limits, index, on_pair_end)
        self.node = node  # chatpair.cluster.node.ClusterNode
        self.window: int = node.window
        self.peers: dict[Conn, RemotePeer] = {}
        self._ready: deque[RemotePeer] = deque()  # peers with incoming items (from the inbox reader)
        self.init_cluster_resume()
        self.init_lane(index)

    # -- commands and wake-ups --------------------------------------------------------------

    def on_command(self, what: str, arg: object) -> None:
        if what == "remote":
            self.adopt_remote(*arg)  # type: ignore[misc]
        elif what == "lane":
            self.open_lane(*arg)  # type: ignore[misc]
        else:
            self.on_session_command(what, arg)

    def on_wake(self) -> None:
        super().on_wake()
        self.drain_ready()

    def drain_ready(self) -> None:
        ready = self._ready
        while ready:
            peer = ready.popleft()
            peer.scheduled = False  # before draining: an item pushed from now on wakes us again
            self._drain(peer)

    def adopt_remote(self, conn: Conn, peer: RemotePeer) -> None:
        """Relay ``conn`` with ``peer`` from now on (PAIRED was already queued to it)."""
        self.peers[conn] = peer
        peer.conn = conn
        self.pairs += 1
        self.stats.pair_started(conn.cid, -1 - conn.cid, self.now)
        self.adopt_conn(conn)
        peer.attach(self.peer_ready)
        if conn.phase is _AWAY:  # a session handed over by another node, its client not back yet
            self.adopted_away(conn, peer)
            return
        if not self.running:
            self.fail(conn, ErrorCode.SHUTDOWN, "the server is shutting down", reason="shutdown")
            return
        self._drain(peer)
        self.process_buffered(conn)

    # -- from the partner ---------------------------------------------------------------------

    def _drain(self, peer: RemotePeer) -> None:
        conn = peer.conn
        if conn is None or self.peers.get(conn) is not peer:
            return
        incoming = peer.incoming
        frame = conn.mode is _FRAME
        chunks: list[bytes] = []
        count = 0
        while incoming:
            kind, a, b = incoming.popleft()
            if kind == "msg":
                first, n = a
                if frame:
                    chunks.append(b)  # MSG frames already, byte for byte
                else:
                    chunks.extend(line_msg_bytes(peer.name, p.decode("utf-8", "replace")) for p in split_frames(b))
                peer.given.append((first, n, False))
                peer.given_msgs += n
                count += n
            elif kind == "gap":
                peer.given.append((a, b - a + 1, True))
            elif kind == "acked":
                peer.in_flight -= a + b
                if b:
                    count = self._write(conn, chunks, frame, count)
                    self.send(conn, undelivered_notices(conn, b, f"{peer.name} never got it"))
                if conn.paused:
                    self.resume(conn)
            elif kind == "left":
                self._write(conn, chunks, frame, count)
                self._remote_left(conn, peer, a, b)
                return
            else:  # resume: the partner away, back, moving to another node
                count = self._write(conn, chunks, frame, count)
                if not self.on_session_item(conn, peer, kind, a, b):
                    return
        self._write(conn, chunks, frame, count)
        self._ack(peer)  # one per drain; the I/O thread coalesces them per pair per flush

    def _write(self, conn: Conn, chunks: list[bytes], frame: bool, count: int) -> int:
        """Partner messages (``count`` of them in ``chunks``) to our client, in one send; 0."""
        if chunks:
            self.send(conn, b"".join(chunks), count, frame)
            chunks.clear()
        return 0

    def _ack(self, peer: RemotePeer, everything: bool = False) -> None:
        """Acknowledge what has been written to our client (``everything``: it will be)."""
        given = peer.given
        if not given:
            return
        conn = peer.conn
        if conn is not None and conn.session is not None and conn.session.log_bytes > SESSION_HIGH_WATER \
                and not everything:
            return  # held for a resumable client that does not acknowledge: the partner's node slows down
        unwritten = 0 if everything or conn is None or not conn.out else conn.undelivered_msgs()
        written = peer.given_msgs - unwritten
        upto, lost = peer.acked_upto, []
        while given:
            first, n, missing = given[0]
            if missing:
                lost.append((first, first + n - 1))
            elif written <= 0:
                break
            elif n > written:  # part of a batch is written
                given[0] = (first + written, n - written, False)
                peer.given_msgs -= written
                upto = max(upto, first + written - 1)
                break
            else:
                written -= n
                peer.given_msgs -= n
            given.popleft()
            upto = max(upto, first + n - 1)
        if upto > peer.acked_upto or lost:
            peer.acked_upto = upto
            mine = self.writes_outbox()  # then this loop writes the acks too: at the latest in ACK_DELAY
            self.node.ack(peer.target, peer.local, upto, lost, io_times=not mine)
            if mine and self.due == float("inf"):
                self.due = self.now + ACK_DELAY

    def tick(self, now: float) -> None:
        super().tick(now)
        self.tick_lane(now)
        if self.moving:
            self.tick_moving(now)
        for peer in self.peers.values():
            if peer.given:
                self._ack(peer)  # a slow reader's socket took more since the last look

    # -- to the partner ------------------------------------------------------------------------

    def on_msg_run(self, conn: Conn, view: memoryview, start: int, end: int, count: int) -> None:
        peer = self.peers.get(conn) if conn.partner is None else None
        if peer is None:
            super().on_msg_run(conn, view, start, end, count)
            return
        self._forward(conn, peer, bytes(view[start:end]), count, end - start)

    def on_line_msg(self, conn: Conn, text: str) -> None:
        peer = self.peers.get(conn) if conn.partner is None else None
        if peer is None:
            super().on_line_msg(conn, text)
            return
        pieces = split_utf8(text, self.limits.max_frame - 1)
        if pieces:
            self._forward(conn, peer, frame_msgs(pieces), len(pieces), sum(len(p) for p in pieces))

    def _forward(self, conn: Conn, peer: RemotePeer, frames: bytes, count: int, size: int) -> None:
        """``count`` MSG frames from our client to its partner's node (batched: see cluster_lane)."""
        node = self.node
        if self.writes_outbox():
            with node.lock:
                node.outbox.send_frames(peer.local, peer.target, frames, count)
        else:
            node.send_msgs(peer.local, peer.target, frames, count, by=self)
        peer.in_flight += count
        self.stats.msgs += count
        self.stats.bytes += size
        if peer.in_flight >= self.window:
            self.pause(conn)  # read again when the partner's node has acknowledged enough

    def may_read(self, conn: Conn) -> bool:
        if conn.partner is None:
            peer = self.peers.get(conn)
            if peer is not None:
                return conn.out.unsent < LOW_WATER and peer.in_flight < self.window and not peer.frozen
        return super().may_read(conn)

    # -- leaving ---------------------------------------------------------------------------------

    def on_next(self, conn: Conn) -> None:
        peer = self.peers.get(conn) if conn.partner is None else None
        if peer is None:
            super().on_next(conn)
            return
        log.info("%s: next (leaves %s on another node)", conn.label, peer.name)
        self._end_remote(conn, peer, "next", closing=False)

    def detach(self, conn: Conn, reason: str) -> None:
        peer = self.peers.get(conn) if conn.partner is None else None
        if peer is None:
            super().detach(conn, reason)
            return
        log.info("%s: left (%s); its partner %s on another node is told", conn.label, reason, peer.name)
        self._end_remote(conn, peer, reason, closing=True)

    def _unhook(self, conn: Conn, peer: RemotePeer) -> None:
        del self.peers[conn]
        peer.attach(None)
        self.pairs -= 1
        self.stats.pair_ended(conn.cid, -1 - conn.cid, self.now)

    def _end_remote(self, conn: Conn, peer: RemotePeer, reason: str, closing: bool) -> None:
        """Our client left the pair: the listener has the cluster tell the partner's node."""
        self._ack(peer, everything=not closing)  # NEXT: what is queued for it is still written
        if conn.phase is _AWAY and conn.session is not None and conn.session.unacked:
            # Its window passed: what it never acknowledged may never have reached it (section 6).
            self.node.control(peer.remote, peer.local, "lost", str(conn.session.unacked).encode(), by=self)
        self._unhook(conn, peer)
        peer.conn = None
        if reason not in PEER_LEFT_REASONS:
            reason = "disconnected"  # e.g. shutdown: to the partner, this node went away
        end = PairEnd(conn.cid, conn.cid, next_by=None if closing else conn.cid, unpair=False,
                      remote=(peer.local, peer.remote, reason))
        if closing:
            end.gone.append(conn.cid)
        else:
            self.release_conn(conn)
            end.back.append(conn)
        self._ended.append(end)

    def _remote_left(self, conn: Conn, peer: RemotePeer, reason: str, lost: int) -> None:
        """The partner left (or its node died): PEER_LEFT, and back to the listener."""
        self._unhook(conn, peer)
        peer.conn = None
        if conn.phase is _AWAY:  # kept here, PEER_LEFT in its replay log, until it returns or expires
            if lost:
                self.enqueue(conn, undelivered_notices(conn, lost, f"{peer.name} left"))
            self.enqueue(conn, event_bytes(conn, FrameType.PEER_LEFT, {"peer": peer.name, "reason": reason}))
            if conn in self.moving:
                # Its session was to move once the partner's node stopped
                # sending; the partner has left instead, so nothing more will
                # come (the PEER_LEFT is in the log): it moves now, partnerless.
                new, _, was_away = self.moving.pop(conn)
                self._hand_over(conn, None, new, was_away)
            return
        log.info("%s: its partner %s on another node left (%s); queued again", conn.label, peer.name, reason)
        if lost:
            self.enqueue(conn, undelivered_notices(conn, lost, f"{peer.name} left"))
        self.enqueue(conn, event_bytes(conn, FrameType.PEER_LEFT, {"peer": peer.name, "reason": reason}))
        self.release_conn(conn)
        self._ended.append(PairEnd(conn.cid, conn.cid, back=[conn], unpair=False))
