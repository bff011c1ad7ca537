"""Busy polling (server/busypoll.py): when a loop spins, when it sleeps, and what it holds meanwhile.

The rules are decided on real loops (relays that are not running) over a real
epoll poller and a real socket pair: a recording ``poll`` says whether a wait
spun (``poll(0)``) or slept (``poll(timeout)``). Nothing here times anything
but deadlines: each step waits on the event it needs (a spin begun, a sleep
begun) before the test acts.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import raw_pair

from chatpair.server.busypoll import QUIET_SECONDS, BusyPoll
from chatpair.server.channel import Channel
from chatpair.server.config import Limits, ServerConfig
from chatpair.server.poller import EVENT_READ, make_poller
from chatpair.server.relay import Relay
from chatpair.server.relay_pool import RelayPool
from chatpair.server.workers import WorkerRelay

pytestmark = pytest.mark.timeout(30)

DEADLINE = 10.0
LIMITS = Limits(65536, ping_interval=30.0, idle_timeout=90.0, write_timeout=20.0)
MSG = 0x02
LONG_SPIN = 20.0  # longer than any test: a spin that ends did so for a reason other than its time


@pytest.fixture
def quiet_relay() -> Iterator[Callable[[], Relay]]:
    """``quiet_relay()``: a relay loop that is not running, last awake long ago (closed after the test)."""
    made: list[Relay] = []

    def make() -> Relay:
        relay = Relay(LIMITS, 0, lambda report: None)
        relay.now = time.monotonic() - 10 * QUIET_SECONDS
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close_all()


class Recorded:
    """A loop's real poller with every wait recorded; events say when a spin or a sleep begins."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.timeouts: list[float] = []
        self.spinning = threading.Event()
        self.sleeping = threading.Event()

    def __call__(self, timeout: float) -> list[tuple[int, int]]:
        self.timeouts.append(timeout)
        (self.spinning if timeout == 0 else self.sleeping).set()
        return self.relay.poller.poll(timeout)

    @property
    def slept(self) -> bool:
        return any(t > 0 for t in self.timeouts)


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def waiting(busy: BusyPoll, relay: Relay, poll: Recorded, wake_at: float) -> tuple[threading.Thread, list]:
    """Run ``busy.wait`` in a thread of its own, as the loop's thread (holding its turn)."""
    result: list = []

    def run() -> None:
        relay.now = time.monotonic()  # as after the loop's last wake-up
        relay.turn.acquire()
        try:
            result.append(busy.wait(relay, poll, wake_at))
        finally:
            relay.turn.release()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


# -- who counts as quiet (no socket) ----------------------------------------------------------------


def test_other_loops_asleep_long_enough_are_quiet(quiet_relay) -> None:
    listener, relay = quiet_relay(), quiet_relay()
    busy = BusyPoll(LONG_SPIN, watched=(listener,))
    busy.add(relay)
    relay.now = time.monotonic()  # the spinner itself has just woken: that is no reason to stop
    assert busy.others_quiet(relay)


def test_another_loop_awake_is_not_quiet(quiet_relay) -> None:
    listener, relay = quiet_relay(), quiet_relay()
    busy = BusyPoll(LONG_SPIN, watched=(listener,))
    busy.add(relay)
    with listener.turn:  # held while it is not asleep in poll()
        assert not busy.others_quiet(relay)


def test_another_loop_that_woke_just_now_is_not_quiet(quiet_relay) -> None:
    listener, relay = quiet_relay(), quiet_relay()
    busy = BusyPoll(LONG_SPIN, watched=(listener,))
    busy.add(relay)
    relay.now = listener.now = time.monotonic()
    assert not busy.others_quiet(relay)


def test_only_added_loops_spin_and_the_watched_never(quiet_relay) -> None:
    listener, relay, bare = quiet_relay(), quiet_relay(), quiet_relay()
    busy = BusyPoll(0.000_05, watched=(listener,))
    busy.add(relay)
    assert (listener.spin_seconds, relay.spin_seconds, bare.spin_seconds) == (0.0, 0.000_05, 0.0)
    assert listener.busy_poll is busy and relay.busy_poll is busy


# -- when a wait spins, and when it sleeps ----------------------------------------------------------


def test_a_short_sleep_makes_the_next_wait_spin_and_a_long_one_does_not(quiet_relay, socket_pair) -> None:
    ours, theirs = socket_pair
    relay = quiet_relay()
    busy = BusyPoll(LONG_SPIN)
    busy.add(relay)
    relay.poller.register(ours, EVENT_READ, ours)
    theirs.send(b"x")  # ready before the wait: it sleeps (the loop had no reason to spin) and wakes at once
    poll = Recorded(relay)
    with relay.turn:
        assert busy.wait(relay, poll, time.monotonic() + DEADLINE)
    assert poll.slept and relay.spin_ok
    ours.recv(16)
    relay.spin_seconds, relay.spin_ok = 0.01, False
    with relay.turn:  # nothing comes: a sleep longer than a spin, which says nothing about the next wait
        assert busy.wait(relay, Recorded(relay), time.monotonic() + 0.05) == []
    assert not relay.spin_ok


def test_a_message_after_a_long_sleep_does_not_start_spinning(quiet_relay, socket_pair) -> None:
    """Clients typing at human speed: every sleep is longer than a spin, so nobody spins."""
    ours, theirs = socket_pair
    relay = quiet_relay()
    BusyPoll(0.000_001).add(relay)  # 1 us: shorter than any sleep a thread can be woken from
    relay.poller.register(ours, EVENT_READ, ours)
    poll = Recorded(relay)
    thread, result = waiting(relay.busy_poll, relay, poll, time.monotonic() + DEADLINE)
    assert poll.sleeping.wait(DEADLINE)
    theirs.send(b"x")  # the message comes while the loop sleeps
    thread.join(DEADLINE)
    assert result and result[0]
    assert not relay.spin_ok and not poll.spinning.is_set()


def ready_to_spin(quiet_relay, ours: socket.socket) -> tuple[Relay, Relay, Recorded]:
    """A listener and a relay of one process, both quiet; the relay's last sleep was short."""
    listener, relay = quiet_relay(), quiet_relay()
    BusyPoll(LONG_SPIN, watched=(listener,)).add(relay)
    relay.poller.register(ours, EVENT_READ, ours)
    relay.spin_ok = True
    return listener, relay, Recorded(relay)


def test_a_spinning_wait_catches_what_comes_without_sleeping(quiet_relay, socket_pair) -> None:
    ours, theirs = socket_pair
    _, relay, poll = ready_to_spin(quiet_relay, ours)
    thread, result = waiting(relay.busy_poll, relay, poll, time.monotonic() + DEADLINE)
    assert poll.spinning.wait(DEADLINE)
    assert relay.turn.locked()  # a spinning loop is awake: nobody may act as it meanwhile
    sent_at = time.monotonic()
    theirs.send(b"x")
    thread.join(DEADLINE)
    assert result and result[0] and result[0][0][0] == ours.fileno()
    assert not poll.slept  # caught by a poll(0)
    assert relay.now >= sent_at  # the loop's clock is the time it found the message, as after a sleep


def test_a_spin_stops_when_another_loop_wakes(quiet_relay, socket_pair) -> None:
    ours, theirs = socket_pair
    listener, relay, poll = ready_to_spin(quiet_relay, ours)
    thread, result = waiting(relay.busy_poll, relay, poll, time.monotonic() + DEADLINE)
    assert poll.spinning.wait(DEADLINE)
    with listener.turn:  # the listener wakes: the relay gives up the interpreter and sleeps
        assert poll.sleeping.wait(DEADLINE)
        assert not relay.turn.locked()  # asleep in poll(): its turn is free
    theirs.send(b"x")
    thread.join(DEADLINE)
    assert result and result[0][0][0] == ours.fileno()


def test_a_spin_stops_when_another_loop_has_work_waiting(quiet_relay, socket_pair) -> None:
    """Woken but not yet running (it needs the GIL first): its poller says it has work, and the spin gives way."""
    ours, theirs = socket_pair
    listener, relay, poll = ready_to_spin(quiet_relay, ours)
    lis_ours, lis_theirs = socket.socketpair()
    try:
        listener.poller.register(lis_ours, EVENT_READ, lis_ours)
        thread, result = waiting(relay.busy_poll, relay, poll, time.monotonic() + DEADLINE)
        assert poll.spinning.wait(DEADLINE)
        lis_theirs.send(b"a client")  # for the listener, which nobody runs here: its turn stays free
        assert poll.sleeping.wait(DEADLINE)
        theirs.send(b"x")
        thread.join(DEADLINE)
        assert result and result[0][0][0] == ours.fileno()
    finally:
        lis_ours.close()
        lis_theirs.close()


def test_a_loop_that_ended_does_not_stop_the_others_spinning(quiet_relay, socket_pair) -> None:
    ours, theirs = socket_pair
    listener, relay, _ = ready_to_spin(quiet_relay, ours)
    for ended in (False, True):
        if ended:
            listener.poller.close()  # as a loop that ended closes it: its descriptor is gone
        relay.spin_ok = True
        poll = Recorded(relay)
        thread, result = waiting(relay.busy_poll, relay, poll, time.monotonic() + DEADLINE)
        assert poll.spinning.wait(DEADLINE)
        theirs.send(b"x")
        thread.join(DEADLINE)
        assert result and result[0] and not poll.slept, f"ended={ended}: slept instead of spinning"
        ours.recv(16)


def test_no_spin_while_another_loop_is_awake(quiet_relay, socket_pair) -> None:
    ours, theirs = socket_pair
    listener, relay, poll = ready_to_spin(quiet_relay, ours)
    with listener.turn:
        thread, result = waiting(relay.busy_poll, relay, poll, time.monotonic() + DEADLINE)
        assert poll.sleeping.wait(DEADLINE)
    theirs.send(b"x")
    thread.join(DEADLINE)
    assert result and result[0] and poll.timeouts and poll.timeouts[0] > 0  # slept at once


def test_a_spin_never_runs_past_the_loops_timer(quiet_relay) -> None:
    relay = quiet_relay()
    BusyPoll(LONG_SPIN).add(relay)
    relay.spin_ok = True
    poll = Recorded(relay)
    with relay.turn:
        relay.now = started = time.monotonic()
        assert relay.busy_poll.wait(relay, poll, started + 0.02) == []  # the timer, not LONG_SPIN, ends it
    assert poll.spinning.is_set()
    # A bound, not a speed: a spin that ignored the timer would last LONG_SPIN (20 s).
    assert time.monotonic() - started < LONG_SPIN / 4
    assert not relay.spin_ok  # it found nothing: the next wait sleeps


def test_spin_time_zero_never_spins(quiet_relay, socket_pair) -> None:
    ours, theirs = socket_pair
    relay = quiet_relay()
    BusyPoll(0.0).add(relay)
    relay.poller.register(ours, EVENT_READ, ours)
    theirs.send(b"x")
    poll = Recorded(relay)
    with relay.turn:
        for _ in range(3):
            assert relay.busy_poll.wait(relay, poll, time.monotonic() + DEADLINE)
    assert not relay.spin_ok and not poll.spinning.is_set()


# -- who spins in a server -------------------------------------------------------------------------


def test_relay_threads_spin_and_the_listener_is_watched(quiet_relay) -> None:
    listener = quiet_relay()
    pool = RelayPool(ServerConfig(relay_threads=2, busy_poll_us=70), lambda report: None,
                     lambda stranded: None, make_poller(), watched=listener)
    try:
        relays = [handle.relay for handle in pool.relays]  # type: ignore[attr-defined]
        assert [r.spin_seconds for r in relays] == [70e-6, 70e-6]
        assert listener.spin_seconds == 0.0
        assert all(r.busy_poll is listener.busy_poll for r in relays)
        assert set(listener.busy_poll.loops) == {listener, *relays}  # each relay watches the others too
    finally:
        pool.stop()
        pool.join(DEADLINE)
    assert not pool.busy()


def test_a_relay_worker_spins_alone() -> None:
    ours, theirs = socket.socketpair()
    try:
        worker = WorkerRelay(Channel(ours), ServerConfig(busy_poll_us=70), 0)
        assert worker.spin_seconds == 70e-6 and worker.busy_poll.loops == [worker]
        worker.close_all()
    finally:
        ours.close()
        theirs.close()


# -- the server as people run it --------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    pytest.param(("--busy-poll", "0"), id="off"),
    pytest.param(("--busy-poll", "10000"), id="10ms"),  # one relay thread for both pairs: it spins
    # Each relay thread keeps the other from spinning while both have traffic: the rule's path.
    pytest.param(("--busy-poll", "10000", "--relay-threads", "2"), id="10ms-two-relay-threads"),
    pytest.param(("--busy-poll", "10000", "--workers", "1"), id="10ms-worker"),
])
def test_ping_pong_loses_nothing_whatever_the_spin(start_server, args: tuple[str, ...]) -> None:
    server = start_server(*args)
    pairs = [raw_pair(server.port, f"a{i}", f"b{i}", f"room{i}") for i in range(2)]
    for n in range(200):  # strict turns: each message is answered before the next, as in a one-pair bench
        for alice, bob in pairs:
            alice.send_frame(MSG, f"ping {n}".encode())
            assert bob.expect(MSG) == f"ping {n}".encode()
            bob.send_frame(MSG, f"pong {n}".encode())
            assert alice.expect(MSG) == f"pong {n}".encode()


def test_a_bad_busy_poll_is_one_clear_click_error() -> None:
    result = subprocess.run([sys.executable, "-m", "chatpair", "server", "--port", "0", "--busy-poll", "-1"],
                            check=False, capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 2
    assert "Invalid value for '--busy-poll'" in result.stderr and "Traceback" not in result.stderr
