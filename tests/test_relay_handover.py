"""Handing a pair to a relay thread: adopted at once while it sleeps, or queued behind its inbox; never to one that ended.

Real relay threads over real socket pairs (no server process): the listener's
side is played by the test thread, which is what ``RelayThread.submit_pair``
runs in.
"""

from __future__ import annotations

import queue
import selectors
import socket
import time
from collections.abc import Iterator

import pytest

from chatpair.proto import FrameType, encode_frame
from chatpair.server.config import Limits, ServerConfig
from chatpair.server.conn import Conn
from chatpair.server.poller import EVENT_READ, SelectorPoller, make_poller
from chatpair.server.relay import PairEnd, Relay, RelayThread, Report
from chatpair.server.relay_pool import RelayPool
from chatpair.server.states import Mode, Phase

pytestmark = pytest.mark.timeout(30)

DEADLINE = 10.0


LIMITS = Limits(65536, ping_interval=30.0, idle_timeout=90.0, write_timeout=20.0)


class Relayed:
    """A relay thread and the test's ends of the sockets it relays."""

    def __init__(self, relay: Relay | None = None) -> None:
        self.ended: queue.Queue[Report] = queue.Queue()
        self.thread = RelayThread(LIMITS, 0, self.ended.put, relay)
        self.clients: list[socket.socket] = []
        self._cid = 0
        self.wakes = 0  # how often another thread woke the relay
        relay, wake = self.thread.relay, self.thread.relay.wake

        def counted_wake() -> None:
            self.wakes += 1
            wake()

        relay.wake = counted_wake  # type: ignore[method-assign]

    def conn(self, name: str, pending: bytes = b"") -> Conn:
        """A chatting frame-mode connection the listener would hand over (its HELLO already read)."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.settimeout(DEADLINE)
        self.clients.append(theirs)
        self._cid += 1
        conn = Conn(ours, self._cid, name, time.monotonic())
        conn.name, conn.mode, conn.phase, conn.pending = name, Mode.FRAME, Phase.CHATTING, pending
        return conn

    def close(self) -> None:
        for sock in self.clients:  # gone first: the relay's polite close need not wait for them
            sock.close()
        self.thread.stop()
        self.thread.join(DEADLINE)


@pytest.fixture
def relayed() -> Iterator[Relayed]:
    r = Relayed()
    r.thread.start()
    try:
        yield r
    finally:
        r.close()
    assert not r.thread.alive()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def wait_asleep(relayed: Relayed) -> None:
    """Until the relay thread waits in poll() (it holds its turn whenever it does not)."""
    relay = relayed.thread.relay
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if relay.turn.acquire(timeout=0.05):
            relay.turn.release()
            return
    pytest.fail("the relay never waited")


def hand_over_asleep(relayed: Relayed, a: Conn, b: Conn) -> None:
    """Hand ``a`` and ``b`` over as the listener does, while the relay sleeps.

    The relay may wake for its tick just then; the hand-over then does nothing
    (the listener would use the inbox) and is tried again.
    """
    relay = relayed.thread.relay
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        wait_asleep(relayed)
        if relay.adopt_pair_now(a, b):
            return
    pytest.fail("the relay was never asleep when the pair came")


def test_a_pair_handed_to_a_sleeping_relay_is_relayed_without_waking_it(relayed: Relayed) -> None:
    a, b = relayed.conn("ann"), relayed.conn("bob")
    hand_over_asleep(relayed, a, b)
    relay = relayed.thread.relay
    assert not relay._inbox and relay.pairs == 1 and a.owner is relay and b.owner is relay
    assert relayed.wakes == 0
    hello = encode_frame(FrameType.MSG, b"hi bob")
    relayed.clients[0].sendall(hello)
    assert read_exactly(relayed.clients[1], len(hello)) == hello
    back = encode_frame(FrameType.MSG, b"hi ann")
    relayed.clients[1].sendall(back)
    assert read_exactly(relayed.clients[0], len(back)) == back


def test_input_that_came_before_the_hand_over_is_acted_on_at_once(relayed: Relayed) -> None:
    early = encode_frame(FrameType.MSG, b"sent before PAIRED arrived")
    wait_asleep(relayed)
    a, b = relayed.conn("ann", pending=early), relayed.conn("bob")
    relayed.thread.submit_pair(a, b)
    assert read_exactly(relayed.clients[1], len(early)) == early


def test_a_pair_that_ends_during_the_hand_over_wakes_the_relay_to_report_it(relayed: Relayed) -> None:
    # ann's BYE was read with her HELLO: the pair ends while the listener adopts
    # it, and only the relay's own loop reports that - so it must be woken.
    a, b = relayed.conn("ann", pending=encode_frame(FrameType.BYE, b"")), relayed.conn("bob")
    hand_over_asleep(relayed, a, b)
    assert relayed.wakes == 1
    end = relayed.ended.get(timeout=DEADLINE)
    assert isinstance(end, PairEnd) and (end.a, end.b, end.gone) == (a.cid, b.cid, [a.cid])
    assert [conn.name for conn in end.back] == ["bob"]


def test_commands_waiting_in_the_inbox_come_first(relayed: Relayed) -> None:
    wait_asleep(relayed)
    relay = relayed.thread.relay
    first_a, first_b = relayed.conn("ann"), relayed.conn("bob")
    relay.submit_pair(first_a, first_b, wake=False)  # queued, the relay not told yet
    a, b = relayed.conn("cat"), relayed.conn("dan")
    relayed.thread.submit_pair(a, b)
    assert [what for what, _ in relay._inbox] == ["pair", "pair"] and a.owner is None
    relayed.thread.flush()
    hello = encode_frame(FrameType.MSG, b"both pairs run")
    for sender, receiver in ((0, 1), (2, 3)):
        relayed.clients[sender].sendall(hello)
        assert read_exactly(relayed.clients[receiver], len(hello)) == hello
    assert relay.pairs == 2


def test_a_relay_winding_down_is_not_handed_pairs_directly(relayed: Relayed) -> None:
    relay = relayed.thread.relay
    relayed.thread.stop()
    relayed.thread.join(DEADLINE)
    a, b = relayed.conn("ann"), relayed.conn("bob")
    assert relay.adopt_pair_now(a, b) is False
    assert a.owner is None and b.owner is None


def test_a_busy_relay_is_not_waited_for_its_pairs_go_to_the_inbox(relayed: Relayed) -> None:
    relay = relayed.thread.relay
    a, b = relayed.conn("ann"), relayed.conn("bob")
    with relay.turn:  # as if the relay were busy with a batch of events
        relayed.thread.submit_pair(a, b)  # returns at once: the listener must not wait on a relay
        assert [what for what, _ in relay._inbox] == ["pair"] and a.owner is None
    relayed.thread.flush()
    hello = encode_frame(FrameType.MSG, b"relayed after all")
    relayed.clients[0].sendall(hello)
    assert read_exactly(relayed.clients[1], len(hello)) == hello


def test_a_relay_waiting_in_select_is_woken_for_its_pairs() -> None:
    # select() and poll() do not see a socket registered during a wait: such a
    # relay gets its pairs through the inbox, with a wake-up.
    relay = Relay(LIMITS, 0, lambda report: None)
    relay.poller = SelectorPoller(selectors.SelectSelector())
    relay.poller.register(relay.waker.reader, EVENT_READ, None)
    relayed = Relayed(relay)
    relayed.thread.start()
    try:
        wait_asleep(relayed)
        a, b = relayed.conn("ann"), relayed.conn("bob")
        relayed.thread.submit_pair(a, b)
        relayed.thread.flush()
        assert relayed.wakes == 1
        hello = encode_frame(FrameType.MSG, b"seen at once")
        relayed.clients[0].sendall(hello)
        assert read_exactly(relayed.clients[1], len(hello)) == hello
    finally:
        relayed.close()


class BrokenRelay(Relay):
    """A relay with a bug in taking a pair (what it did before this test is not the point)."""

    def adopt_pair(self, a: Conn, b: Conn) -> None:
        for conn in (a, b):
            self.adopt_conn(conn)
        raise RuntimeError("a bug")


def test_a_bug_in_taking_a_pair_stops_that_relay_not_the_listener(caplog: pytest.LogCaptureFixture) -> None:
    relayed = Relayed(BrokenRelay(LIMITS, 0, lambda report: None))
    relayed.thread.start()
    try:
        a, b = relayed.conn("ann"), relayed.conn("bob")
        hand_over_asleep(relayed, a, b)  # does not raise into the caller
        assert "taking a pair failed" in caplog.text
        for client in relayed.clients:  # both told, and the relay winds down
            frame = client.recv(4096)
            assert frame[4] == FrameType.ERROR and b"shutting down" in frame
            client.close()  # read: the relay's polite close need not wait
        relayed.thread.join(DEADLINE)
        assert not relayed.thread.alive()
    finally:
        relayed.close()


def test_pairs_never_go_to_a_relay_thread_that_ended() -> None:
    pool = RelayPool(ServerConfig(relay_threads=1), lambda report: None, lambda stranded: None, make_poller())
    try:
        ended = pool.relays[0]
        ended.stop()  # the thread ends as a crashed one would: nobody reads its inbox again
        ended.join(DEADLINE)
        assert not ended.alive()
        fresh = pool.pick()
        assert fresh is not ended and fresh.alive()
        assert pool.pick() is fresh  # one replacement, not one per pair
    finally:
        pool.stop()
        pool.join(DEADLINE)
    assert not pool.busy()
    relays = list(pool.relays)
    assert pool.pick() in relays and pool.relays == relays  # stopping: no new thread for a pair
    assert not pool.busy()
