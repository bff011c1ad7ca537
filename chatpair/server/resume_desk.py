"""Where a RESUME that reaches the listener goes: the listener itself, or the relay holding the session.

Every connection, RESUME included, is accepted and handshaken by the
listener. The session it names lives with its client's connection: in the
listener while the client waits, in a relay thread or relay worker while it
is paired (and there it stays if it drops). :class:`ResumeDesk` looks the
token up in the :class:`~chatpair.server.registry.SessionRegistry` and
hands the new connection on: to the listener's own loop, or to that relay,
which carries the session on (or sends it back, a
:class:`~chatpair.server.relay.Bounce`, if the session left meanwhile).
Tokens that are unknown, ended or expired all hear the same
``session_expired``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from chatpair.proto import ErrorCode
from chatpair.proto.resume import Resume
from chatpair.server.conn import Conn
from chatpair.server.registry import SessionRegistry
from chatpair.server.relay import Bounce
from chatpair.server.relay_pool import RelayHandle
from chatpair.server.session import EXPIRED_MESSAGE

if TYPE_CHECKING:
    from chatpair.server.admission import Admission
    from chatpair.server.loop import ConnLoop

log = logging.getLogger("chatpair")

#: How often one RESUME may come back from relays before the listener gives
#: up on it. Each bounce answers a move of the session, so a handful is
#: already a lot; the bound keeps a registry that is wrong (a bug) from
#: sending a RESUME round forever.
MAX_BOUNCES = 8
#: Bounce counts kept at most; past it they are forgotten (resumes that
#: bounced are rare, and most of those counted were taken long ago).
BOUNCES_KEPT = 1024


class ResumeDesk:
    """The listener's RESUME desk; runs on the listener's thread."""

    def __init__(self, listener: ConnLoop, admission: Admission) -> None:
        self.listener = listener
        self.admission = admission
        #: resumable sessions: token -> client, and which relay holds it (None: the listener)
        self.registry: SessionRegistry[RelayHandle] = SessionRegistry()
        #: cluster mode: takes a RESUME whose token names another node (True: it is on its way there)
        self.elsewhere: Callable[[Conn, Resume], bool] | None = None
        self._bounces: dict[int, int] = {}  # the new connection's cid -> times its RESUME came back

    def on_resume(self, new: Conn, resume: Resume) -> None:
        """A new connection sent RESUME: carry the session on here, or hand it to the relay holding it."""
        listener = self.listener
        cid = self.registry.lookup(resume.session)
        if cid is None and self.elsewhere is not None and self.elsewhere(new, resume):
            return
        if cid is None or not listener.running:
            listener.fail(new, ErrorCode.SESSION_EXPIRED, EXPIRED_MESSAGE)
            return
        # The session holds its client's place in the limits; the new
        # connection is that client, not one more.
        self.admission.forget(new.cid)
        self.resume_at(new, cid, resume.received, self.registry.where(cid))

    def resume_at(self, new: Conn, cid: int, received: int, where: RelayHandle | None) -> None:
        """Carry the session of ``cid`` on on ``new``: here, or at the relay ``where`` holding it."""
        listener = self.listener
        if where is not None:
            listener.release_conn(new)
            where.submit_resume(new, cid, received)
            return
        conn = listener.sessions.get(cid)
        if conn is None or conn.session is None or conn.session.ended:
            listener.fail(new, ErrorCode.SESSION_EXPIRED, EXPIRED_MESSAGE)
        else:
            listener.attach_resume(new, conn, received)

    def on_bounce(self, bounce: Bounce) -> None:
        """A relay did not hold the session any more: it came back here meanwhile (and may have moved on), or it ended.

        Back here, it may have been paired again at once - with a client who
        was waiting - and handed to a relay (the same one, or another) before
        this bounce came: the registry says where, and that relay has the
        pair queued ahead of this RESUME, so the RESUME follows it there.
        Each bounce answers a move the listener made meanwhile, so this ends;
        :data:`MAX_BOUNCES` only guards against a registry that is wrong (a bug).
        """
        listener, new = self.listener, bounce.new
        listener.adopt_conn(new)
        bounces = self._bounces.pop(new.cid, 0) + 1
        if bounce.cid not in self.registry or not listener.running:
            listener.fail(new, ErrorCode.SESSION_EXPIRED, EXPIRED_MESSAGE)  # it ended
            return
        if bounces > MAX_BOUNCES:
            log.warning("a RESUME came back from the relays %d times; told session_expired", bounces)
            listener.fail(new, ErrorCode.SESSION_EXPIRED, EXPIRED_MESSAGE)
            return
        if len(self._bounces) >= BOUNCES_KEPT:
            self._bounces.clear()
        self._bounces[new.cid] = bounces
        self.resume_at(new, bounce.cid, bounce.received, self.registry.where(bounce.cid))
