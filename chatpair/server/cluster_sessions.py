"""Cluster mode, the listener's side of resumable sessions (PROTOCOL.md section 6).

A session lives on the node that made it, in the loop holding its client
(as on one server: :mod:`chatpair.server.resuming`), and its token names
that node (:func:`chatpair.cluster.names.session_token`). What
:class:`ClusterSessions` adds to the :class:`~chatpair.server.cluster_desk.ClusterDesk`:

* **Waiting clients**: one that drops keeps its place in the cluster-wide
  queue marked away (``set_away``: no node pairs it); when it is back,
  ``back`` may pair it at once (answered like a JOIN; it is not read
  meanwhile, as a joining client is not).
* **A RESUME for another node's session** (B got it, A holds the session):
  B gives the connection a client id, asks A through A's inbox
  (``handover``) and does not read it meanwhile. A takes the session off
  its socket if it still had one, has the partner's node stop sending,
  and moves it (:meth:`ClusterLobby.move`: the records follow, B's inbox
  gets ``adopt`` with the state). B places the away session where it
  belongs - waiting in its lobby, or in a relay with its remote partner
  (maybe on B itself: the pair then goes on through Redis) - and resumes
  it there exactly as a RESUME that reached the holding node.
* Unknown or ended tokens, a holding node that is not alive, or no answer
  within :data:`HANDOVER_TIMEOUT`: ERROR ``session_expired``, the same
  words as on one server.
"""

from __future__ import annotations

import logging
from typing import Any

from chatpair.cluster.names import session_token, token_tag
from chatpair.cluster.peer import RemotePeer
from chatpair.cluster.results import Adopted, HandoverAsked, Refused
from chatpair.proto import ErrorCode
from chatpair.proto.resume import Resume
from chatpair.server.cluster_resume import handover_state
from chatpair.server.conn import Conn
from chatpair.server.session import EXPIRED_MESSAGE, Session
from chatpair.server.states import Mode, Phase

log = logging.getLogger("chatpair")

#: Seconds a RESUME for another node's session waits for that node's answer.
HANDOVER_TIMEOUT = 2.0


class ClusterSessions:
    """Resumable sessions across nodes; the listener's thread only."""

    def __init__(self, desk: Any) -> None:
        """``desk``: the :class:`~chatpair.server.cluster_desk.ClusterDesk` these sessions belong to."""
        self.desk = desk
        self.listener = desk.listener
        self.node = desk.node
        #: RESUMEs waiting for another node's answer: local cid -> (connection, count, deadline)
        self.pending: dict[int, tuple[Conn, int, float]] = {}
        self._stash: dict[int, bytes] = {}  # input of a client whose ``back`` is on its way
        self.deferred: dict[int, HandoverAsked] = {}  # hand-overs waiting for a JOIN's answer

    def new_token(self) -> str:
        return session_token(self.node.node)

    # -- waiting clients that drop and come back -------------------------------------------------

    def set_away(self, conn: Conn) -> None:
        self.desk.fresh.release(conn)  # (a JOIN not yet asked goes first)
        self.desk.fresh.hold()
        self.node.set_away(self.node.cid(conn.cid))

    def on_resumed(self, conn: Conn) -> None:
        """``conn`` came back in the listener: if it waits, it may be paired now (not read meanwhile)."""
        if conn.cid not in self.listener.waiting:
            return
        self.desk.announced.add(conn.cid)  # WAITING was said (and is in the replay if need be)
        self.desk.asked.add(conn.cid)
        self._stash[conn.cid] = conn.pending  # acted on once the answer says where it goes
        conn.pending = b""
        self.listener.pause(conn)
        self.node.back(self.node.cid(conn.cid), conn.name, conn.room)

    def unstash(self, conn: Conn) -> None:
        """The answer is here: input that came with the RESUME is acted on by whoever takes ``conn``."""
        held = self._stash.pop(conn.cid, None)
        if held:
            conn.pending = held + conn.pending

    # -- a RESUME that reached this node for another node's session ----------------------------

    def resume_elsewhere(self, new: Conn, resume: Resume) -> bool:
        """True if a node may hold it: the one the token names, or the one it moved to (Redis says).

        That node is asked, and ``new`` waits for the answer (not read meanwhile).
        """
        tag = token_tag(resume.session)  # ours too: it may have moved to another node since
        if tag is None or not self.listener.running:
            return False
        self.pending[new.cid] = (new, resume.received, self.listener.now + HANDOVER_TIMEOUT)
        self.listener.pause(new)
        self.node.ask_handover(tag, resume.session, self.node.cid(new.cid), resume.received)
        return True

    def tick(self, now: float) -> None:
        for cid in [c for c, (_, _, deadline) in self.pending.items() if now >= deadline]:
            self._expired(cid, "its node did not answer")

    def _expired(self, cid: int, why: str) -> None:
        new, _, _ = self.pending.pop(cid)
        if new.owner is self.listener and new in self.listener.conns:
            log.info("%s: cannot resume a session of another node (%s)", new.label, why)
            self.listener.fail(new, ErrorCode.SESSION_EXPIRED, EXPIRED_MESSAGE)

    def on_result(self, result: HandoverAsked | Adopted | Refused) -> None:
        if isinstance(result, Refused):
            local = self.node.local_id(result.cid)
            if local in self.pending:
                self._expired(local, "unknown or ended there")
        elif isinstance(result, HandoverAsked):
            self._asked(result)
        else:
            self._adopted(result)

    # -- the holding node: hand a session over -------------------------------------------------

    def retry_deferred(self) -> None:
        """After the node's answers: hand-overs whose client's JOIN has been answered meanwhile."""
        for cid in [c for c in self.deferred if c not in self.desk.asked]:
            self._asked(self.deferred.pop(cid))

    def _asked(self, asked: HandoverAsked) -> None:
        listener = self.listener
        registry = listener.registry
        cid = registry.lookup(asked.token)
        if cid is None or not listener.running:
            self.node.control(asked.new, "", "refused")
            return
        where = registry.where(cid)
        if where is not None:
            where.relay.submit("handover", (cid, asked.new))
            return
        conn = listener.sessions.get(cid)
        if conn is None or conn.session is None or conn.session.ended or cid not in listener.waiting:
            self.node.control(asked.new, "", "refused")
            return
        if cid in self.desk.asked:  # its JOIN (or back) is on its way: hand it over once answered
            self.deferred[cid] = asked
            return
        if conn.phase is not Phase.AWAY:
            listener.go_away(conn, tell_partner=False)  # taken over elsewhere: closed without a word
        state = handover_state(conn, self.node.cid(cid), None, None, told=False, where="waiting", now=listener.now)
        del listener.waiting[cid]
        listener.away.discard(conn)
        listener.sessions.pop(cid, None)
        registry.forget(cid)
        listener.admission.forget(cid)
        self.desk.joined.discard(cid)
        self.desk.announced.discard(cid)
        conn.session.ended = True  # this copy
        conn.phase = Phase.CLOSING
        log.info("%s: resumed on another node; the session moved there", conn.label)
        self.desk.fresh.hold()
        self.node.move(self.node.cid(cid), asked.new, None, False, state)

    # -- the adopting node -----------------------------------------------------------------------

    def _adopted(self, adopted: Adopted) -> None:
        listener, node, state = self.listener, self.node, adopted.state
        local = node.local_id(adopted.cid)
        waiting = self.pending.pop(local, None) if local is not None else None
        partner: str | None = state.get("partner")
        if waiting is None or waiting[0] not in listener.conns or not listener.running:
            # The client gave up (or was told session_expired) meanwhile: the session ends here.
            if partner:
                unacked = state["session"]["sent"] - state["session"]["acked"]
                if unacked:  # what the client never acknowledged: NOTICE undelivered each, as at expiry
                    node.control(partner, adopted.cid, "lost", str(unacked).encode())
                node.unpair(adopted.cid, partner, None, adopted.cid, "disconnected")
            node.leave(adopted.cid)
            return
        new, received, _ = waiting
        now = listener.now
        conn = Conn(new.sock, new.cid, new.addr, now)
        conn.mode, conn.name, conn.room = Mode.FRAME, state["name"], state["room"]
        conn.phase = Phase.AWAY
        conn.fd = -1
        session = conn.session = Session.from_state(state["session"], now)
        session.away_until = now + max(float(state["left"]), 1.0)
        listener.registry.add(session.token, conn.cid)
        self.desk.joined.add(conn.cid)
        where = state["where"]
        node.requests.put(("adopted", adopted.cid, conn.name, conn.room, partner, state.get("partner_name")))
        relay: Any = None
        if where == "waiting":
            listener.adopt_conn(conn)
            listener.waiting[conn.cid] = conn
            self.desk.announced.add(conn.cid)
        else:
            relay = listener.relays.pick()
            listener.registry.moved(conn.cid, relay)
            if partner:
                peer = RemotePeer(adopted.cid, partner, state.get("partner_name") or "", conn.room)
                node.routes.add(peer)
                relay.relay.submit("adopt_remote", (conn, peer, bool(state.get("told"))))
            else:
                relay.relay.submit("adopt_away", conn)
        log.info("%s: took over a session from node %s", conn.label, adopted.old.split(":", 1)[0])
        listener.resumes.resume_at(new, conn.cid, received, relay)

