"""Cluster mode: resumable sessions in a relay whose clients may have a partner on another node.

The resume machinery of one server (:mod:`chatpair.server.resuming`) works
in a :class:`~chatpair.server.cluster_relay.ClusterRelay` unchanged for
same-node pairs. This mixin adds what a partner on another node needs:

* **Away and back**: when a client with a remote partner drops (its session
  kept), the partner's node hears ``notice`` ``peer_away`` through Redis,
  after the messages sent before it; ``peer_back`` when it returns. The
  partner's messages go on into the away client's replay log; the node
  acknowledges them as written (they are the session's now), except while
  the log holds more than the flow-control mark (then the partner's node
  stops sending, as a slow reader would make it).
* **Expiry**: the partner's node hears ``lost`` (how many of its messages
  the client never acknowledged: NOTICE ``undelivered`` each), then
  ``peer_left`` ``disconnected``.
* **Handing a session over** to another node, where its client came back
  (:mod:`chatpair.server.cluster_sessions`): the session is taken off its
  socket if it still had one, the partner's node is asked to ``freeze``
  (stop sending; its ``frozen`` comes after everything it sent, so the
  replay log is complete), then the state goes to the I/O thread's ``move``
  (Redis records follow, the adopting node gets ``adopt``, the partner's
  node ``moved``). A partner on this node gets a remote peer instead.
  No ``frozen`` within :data:`FREEZE_TIMEOUT`: the hand-over is refused and
  the partner's node ``thaw``\\ s.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from chatpair.cluster.peer import RemotePeer
from chatpair.proto import ErrorCode
from chatpair.server.conn import Conn
from chatpair.server.relay import PairEnd
from chatpair.server.render import presence_notice, undelivered_notices
from chatpair.server.session import EXPIRED_MESSAGE
from chatpair.server.states import Phase

if TYPE_CHECKING:
    from chatpair.server.config import Limits

log = logging.getLogger("chatpair")

#: Seconds the holding node waits for the partner's node to stop sending before it refuses a hand-over.
FREEZE_TIMEOUT = 1.5

_AWAY = Phase.AWAY


def handover_state(conn: Conn, old: str, partner: str | None, partner_name: str | None, *,
                   told: bool, where: str, now: float) -> dict[str, Any]:
    """An away session as plain data for the node that adopts it."""
    session = conn.session
    assert session is not None
    return {"name": conn.name, "room": conn.room, "old": old, "session": session.state(),
            "left": max(0.0, session.away_until - now), "partner": partner, "partner_name": partner_name,
            "told": told, "where": where}


class ClusterResumeMixin:
    """Resume with remote partners, for :class:`~chatpair.server.cluster_relay.ClusterRelay`."""

    if TYPE_CHECKING:  # provided by ClusterRelay and its bases
        node: Any
        now: float
        limits: Limits
        running: bool
        peers: dict[Conn, RemotePeer]
        sessions: dict[int, Conn]
        away: set[Conn]
        pairs: int
        _ended: list[Any]

        def send(self, conn: Conn, data: bytes | memoryview, msgs: int = 0, framed: bool = True) -> None: ...
        def pause(self, conn: Conn) -> None: ...
        def resume(self, conn: Conn) -> None: ...
        def fail(self, conn: Conn, code: Any, message: str, reason: str = "error") -> None: ...
        def adopt_conn(self, conn: Conn) -> None: ...
        def adopt_remote(self, conn: Conn, peer: RemotePeer) -> None: ...
        def attach_resume(self, new: Conn, conn: Conn, received: int) -> None: ...
        def _ack(self, peer: RemotePeer, everything: bool = False) -> None: ...
        def _unhook(self, conn: Conn, peer: RemotePeer) -> None: ...
        def _drain(self, peer: RemotePeer) -> None: ...
        def peer_ready(self, peer: RemotePeer) -> None: ...

    def init_cluster_resume(self) -> None:
        self.told_away: set[Conn] = set()  # away clients whose remote partner heard peer_away
        self.moving: dict[Conn, tuple[str, float, bool]] = {}  # waiting for ``frozen``: new cid, deadline, was away

    # -- away and back --------------------------------------------------------------------------

    def go_away(self, conn: Conn, last: bytes = b"", tell_partner: bool = True) -> None:
        super().go_away(conn, last, tell_partner)  # type: ignore[misc]
        peer = self.peers.get(conn)
        if peer is not None and tell_partner:
            self.told_away.add(conn)
            self._notice(peer, "peer_away")

    def _notice(self, peer: RemotePeer, code: str) -> None:
        payload = json.dumps({"code": code, "window": self.limits.resume_window}).encode()
        self.node.control(peer.remote, peer.local, "notice", payload, by=self)

    def on_resumed(self, conn: Conn) -> None:
        told = conn in self.told_away
        self.told_away.discard(conn)
        peer = self.peers.get(conn)
        if peer is None:
            super().on_resumed(conn)  # type: ignore[misc]
            return
        if told:
            self._notice(peer, "peer_back")
        self.resume(conn)

    def take_resume(self, new: Conn, cid: int, received: int) -> None:
        conn = self.sessions.get(cid)
        if conn is not None and conn in self.moving:  # on its way to another node
            self.adopt_conn(new)
            self.fail(new, ErrorCode.SESSION_EXPIRED, EXPIRED_MESSAGE)
            return
        super().take_resume(new, cid, received)  # type: ignore[misc]

    def on_session_item(self, conn: Conn, peer: RemotePeer, kind: str, a: Any, b: Any) -> bool:
        """An item about the partner's session (see chatpair.cluster.peer); False if ``conn`` left the pair."""
        if kind == "notice":
            code = json.loads(a)
            window = float(code.get("window", self.limits.resume_window))
            self.send(conn, presence_notice(conn, code["code"], peer.name, window))
        elif kind == "lost":
            self.send(conn, undelivered_notices(conn, int(a), f"{peer.name} left"))
        elif kind == "freeze":  # stop sending to the partner until it has moved: ``frozen`` follows our last
            peer.frozen = True
            self.pause(conn)
            self.node.control(peer.remote, peer.local, "frozen", by=self)
        elif kind == "thaw":
            peer.frozen = False
            self.resume(conn)
        elif kind == "moved":  # the partner's session lives at ``a`` now; numbering starts afresh there
            peer.target = a
            peer.given.clear()
            peer.given_msgs = peer.acked_upto = peer.in_flight = 0
            peer.frozen = False
            if b:
                self.send(conn, undelivered_notices(conn, int(b), f"{peer.name} never got it"))
            self.resume(conn)
        elif kind == "frozen" and conn in self.moving:
            new, _, was_away = self.moving.pop(conn)
            self._hand_over(conn, peer, new, was_away)
            return False
        return True

    # -- handing a session over to another node -----------------------------------------------

    def on_session_command(self, what: str, arg: Any) -> None:
        if what == "handover":
            self.take_handover(*arg)
        elif what == "adopt_remote":  # an away session another node handed us, with its remote partner
            conn, peer, told = arg
            if told:
                self.told_away.add(conn)
            self.adopt_remote(conn, peer)
        elif what == "adopt_away":  # ...whose partner left while it was away
            self.adopt_conn(arg)

    def adopted_away(self, conn: Conn, peer: RemotePeer) -> None:
        """``conn`` (away) was adopted with ``peer``: what the partner sends goes to the replay log."""
        self._drain(peer)

    def take_handover(self, cid: int, new: str) -> None:
        """Another node's client ``new`` resumed the session of our client ``cid``."""
        conn = self.sessions.get(cid)
        if conn is None or conn.session is None or conn.session.ended or not self.running or conn in self.moving:
            self.node.control(new, "", "refused", by=self)
            return
        was_away = conn.phase is _AWAY
        if not was_away:
            self.go_away(conn, tell_partner=False)  # taken over elsewhere: the old socket closes without a word
        peer = self.peers.get(conn)
        if peer is None:
            self._hand_over(conn, None, new, was_away)
            return
        self.moving[conn] = (new, self.now + FREEZE_TIMEOUT, was_away)
        self.node.control(peer.remote, peer.local, "freeze", by=self)

    def tick_moving(self, now: float) -> None:
        """Hand-overs whose partner's node never said ``frozen``: refused, and the partner goes on."""
        for conn in [c for c, (_, deadline, _) in self.moving.items() if now >= deadline]:
            new, _, _ = self.moving.pop(conn)
            peer = self.peers.get(conn)
            if peer is not None:
                self.node.control(peer.remote, peer.local, "thaw", by=self)
            self.node.control(new, "", "refused", by=self)
            log.info("%s: its partner's node did not answer; the session stays here", conn.label)

    def _hand_over(self, conn: Conn, peer: RemotePeer | None, new: str, was_away: bool) -> None:
        session = conn.session
        assert session is not None
        partner: str | None = None
        partner_name: str | None = None
        local = conn.partner
        if peer is not None:
            self._ack(peer, everything=True)  # what the partner sent is in the replay log: it travels with it
            self._unhook(conn, peer)
            peer.conn = None
            self.node.routes.forget(peer.local)
            partner, partner_name = peer.remote, peer.name
        elif local is not None:
            partner, partner_name = self.node.cid(local.cid), local.name
            self._partner_goes_remote(local, conn, new)
        state = handover_state(conn, self.node.cid(conn.cid), partner, partner_name,
                               told=was_away and partner is not None,
                               where="chatting" if partner is not None else "idle", now=self.now)
        self.told_away.discard(conn)
        self.away.discard(conn)
        self.sessions.pop(conn.cid, None)
        session.ended = True  # this copy: the session goes on at ``new``
        conn.phase = Phase.CLOSING
        log.info("%s: resumed on another node; the session moved there", conn.label)
        self.node.move(self.node.cid(conn.cid), new, partner, peer is not None, state, by=self)
        self._ended.append(PairEnd(conn.cid, conn.cid, gone=[conn.cid], unpair=False, moved=True))

    def _partner_goes_remote(self, stayer: Conn, mover: Conn, new: str) -> None:
        """``mover`` leaves for another node (as ``new``): ``stayer`` keeps chatting with it through Redis."""
        stayer.partner = mover.partner = None
        peer = RemotePeer(self.node.cid(stayer.cid), new, mover.name, stayer.room)
        self.node.routes.add(peer)
        self.peers[stayer] = peer
        peer.conn = stayer
        peer.attach(self.peer_ready)
        self.resume(stayer)
