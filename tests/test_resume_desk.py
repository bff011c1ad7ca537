"""Where the listener's ResumeDesk sends a RESUME that a relay sent back (a Bounce).

A relay answers a RESUME for a session it no longer holds with a Bounce. By
the time the listener reads it, the session may have come back (its pair
ended while the RESUME was on its way) and - with a client waiting - have
been paired again at once and handed to a relay: the same relay or another.
The session is alive all along, so the RESUME must follow it there, not be
told ``session_expired``. No sockets, no threads: the listener and the
relays are stand-ins that record what the desk asks of them.
"""

from __future__ import annotations

from chatpair.proto import ErrorCode
from chatpair.server.admission import Admission
from chatpair.server.relay import Bounce
from chatpair.server.resume_desk import MAX_BOUNCES, ResumeDesk

TOKEN = "t" * 32
CID = 7


class FakeConn:
    def __init__(self, cid: int, session: object | None = None) -> None:
        self.cid = cid
        self.session = session


class FakeSession:
    ended = False


class FakeRelay:
    """A relay handle: records the RESUMEs handed to it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.resumes: list[tuple[FakeConn, int, int]] = []

    def submit_resume(self, new: FakeConn, cid: int, received: int) -> None:
        self.resumes.append((new, cid, received))


class FakeListener:
    """What the desk asks of the listener: owning connections, failing them, attaching a RESUME here."""

    running = True

    def __init__(self) -> None:
        self.sessions: dict[int, FakeConn] = {}
        self.owned: set[FakeConn] = set()
        self.failed: list[tuple[FakeConn, ErrorCode]] = []
        self.attached: list[tuple[FakeConn, FakeConn, int]] = []

    def adopt_conn(self, conn: FakeConn) -> None:
        assert conn not in self.owned
        self.owned.add(conn)

    def release_conn(self, conn: FakeConn) -> None:
        self.owned.remove(conn)

    def fail(self, conn: FakeConn, code: ErrorCode, message: str, reason: str = "error") -> None:
        self.failed.append((conn, code))

    def attach_resume(self, new: FakeConn, conn: FakeConn, received: int) -> None:
        self.attached.append((new, conn, received))


def desk_with_session_at(relay: FakeRelay) -> tuple[ResumeDesk, FakeListener]:
    listener = FakeListener()
    desk = ResumeDesk(listener, Admission(0, 0, True))  # type: ignore[arg-type]
    desk.registry.add(TOKEN, CID)
    desk.registry.moved(CID, relay)  # type: ignore[arg-type]
    return desk, listener


def test_a_bounce_follows_a_session_paired_again_into_the_same_relay() -> None:
    relay = FakeRelay("relay-0")
    desk, listener = desk_with_session_at(relay)
    new = FakeConn(99)
    listener.adopt_conn(new)  # handshaken by the listener
    # The RESUME goes to the relay holding the session...
    desk.resume_at(new, CID, 3, desk.registry.where(CID))  # type: ignore[arg-type]
    assert relay.resumes == [(new, CID, 3)]
    # ...which hands it back (its partner said NEXT) before the RESUME is read; the
    # listener queues it again, a waiting client is there, and the pair goes to the
    # same relay (one relay thread: always); then the relay's Bounce arrives.
    desk.registry.moved(CID, None)
    desk.registry.moved(CID, relay)  # type: ignore[arg-type]
    desk.on_bounce(Bounce(new, CID, 3))  # type: ignore[arg-type]
    assert listener.failed == []
    assert relay.resumes == [(new, CID, 3), (new, CID, 3)]  # once more, behind the pair in its inbox
    assert new not in listener.owned  # handed on, not kept


def test_a_bounce_follows_a_session_paired_again_into_another_relay() -> None:
    first, second = FakeRelay("worker-0"), FakeRelay("worker-1")
    desk, listener = desk_with_session_at(first)
    new = FakeConn(99)
    listener.adopt_conn(new)
    desk.resume_at(new, CID, 0, first)  # type: ignore[arg-type]
    desk.registry.moved(CID, None)
    desk.registry.moved(CID, second)  # type: ignore[arg-type]
    desk.on_bounce(Bounce(new, CID, 0))  # type: ignore[arg-type]
    assert listener.failed == []
    assert second.resumes == [(new, CID, 0)]


def test_a_bounce_for_a_session_back_in_the_listener_is_attached_there() -> None:
    relay = FakeRelay("relay-0")
    desk, listener = desk_with_session_at(relay)
    conn = FakeConn(CID, FakeSession())
    desk.registry.moved(CID, None)
    listener.sessions[CID] = conn
    new = FakeConn(99)
    desk.on_bounce(Bounce(new, CID, 0))  # type: ignore[arg-type]
    assert listener.failed == []
    assert listener.attached == [(new, conn, 0)]


def test_a_bounce_for_a_session_that_ended_is_session_expired() -> None:
    relay = FakeRelay("relay-0")
    desk, listener = desk_with_session_at(relay)
    desk.registry.forget(CID)
    new = FakeConn(99)
    desk.on_bounce(Bounce(new, CID, 0))  # type: ignore[arg-type]
    assert listener.failed == [(new, ErrorCode.SESSION_EXPIRED)]
    assert relay.resumes == []


def test_a_resume_sent_round_and_round_is_given_up() -> None:
    """A registry that kept naming a relay that does not hold the session (a bug) must not loop forever."""
    relay = FakeRelay("relay-0")
    desk, listener = desk_with_session_at(relay)
    new = FakeConn(99)
    for _ in range(MAX_BOUNCES):
        desk.on_bounce(Bounce(new, CID, 0))  # type: ignore[arg-type]  (handed to the relay again)
    assert listener.failed == [] and len(relay.resumes) == MAX_BOUNCES
    desk.on_bounce(Bounce(new, CID, 0))  # type: ignore[arg-type]
    assert listener.failed == [(new, ErrorCode.SESSION_EXPIRED)]
    assert len(relay.resumes) == MAX_BOUNCES
