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
from collections.abc import Iterator

import pytest
from conftest import RawClient

from chatpair.server.busypoll import QUIET_SECONDS, BusyPoll
from chatpair.server.config import Limits
from chatpair.server.poller import EVENT_READ
from chatpair.server.relay import Relay

pytestmark = pytest.mark.timeout(30)

DEADLINE = 10.0
LIMITS = Limits(65536, ping_interval=30.0, idle_timeout=90.0, write_timeout=20.0)
WELCOME, WAITING, PAIRED, MSG = 0x10, 0x11, 0x12, 0x02
LONG_SPIN = 20.0  # longer than any test: a spin that ends did so for a reason other than its time


def quiet_relay() -> Relay:
    """A relay loop that is not running, last awake long ago."""
    relay = Relay(LIMITS, 0, lambda report: None)
    relay.now = time.monotonic() - 10 * QUIET_SECONDS
    return relay


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


def test_other_loops_asleep_long_enough_are_quiet() -> None:
    listener, relay = quiet_relay(), quiet_relay()
    busy = BusyPoll(LONG_SPIN, watched=(listener,))
    busy.add(relay)
    relay.now = time.monotonic()  # the spinner itself has just woken: that is no reason to stop
    assert busy.others_quiet(relay)


def test_another_loop_awake_is_not_quiet() -> None:
    listener, relay = quiet_relay(), quiet_relay()
    busy = BusyPoll(LONG_SPIN, watched=(listener,))
    busy.add(relay)
    with listener.turn:  # held while it is not asleep in poll()
        assert not busy.others_quiet(relay)


def test_another_loop_that_woke_just_now_is_not_quiet() -> None:
    listener, relay = quiet_relay(), quiet_relay()
    busy = BusyPoll(LONG_SPIN, watched=(listener,))
    busy.add(relay)
    relay.now = listener.now = time.monotonic()
    assert not busy.others_quiet(relay)


def test_only_added_loops_spin_and_the_watched_never() -> None:
    listener, relay, bare = quiet_relay(), quiet_relay(), quiet_relay()
    busy = BusyPoll(0.000_05, watched=(listener,))
    busy.add(relay)
    assert (listener.spin_seconds, relay.spin_seconds, bare.spin_seconds) == (0.0, 0.000_05, 0.0)
    assert listener.busy_poll is busy and relay.busy_poll is busy


# -- when a wait spins, and when it sleeps ----------------------------------------------------------


def test_a_short_sleep_makes_the_next_wait_spin_and_a_long_one_does_not(socket_pair) -> None:
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


def test_a_spinning_wait_catches_what_comes_without_sleeping(socket_pair) -> None:
    ours, theirs = socket_pair
    relay = quiet_relay()
    BusyPoll(LONG_SPIN, watched=(quiet_relay(),)).add(relay)
    relay.poller.register(ours, EVENT_READ, ours)
    relay.spin_ok = True
    poll = Recorded(relay)
    thread, result = waiting(relay.busy_poll, relay, poll, time.monotonic() + DEADLINE)
    assert poll.spinning.wait(DEADLINE)
    assert relay.turn.locked()  # a spinning loop is awake: nobody may act as it meanwhile
    theirs.send(b"x")
    thread.join(DEADLINE)
    assert result and result[0] and result[0][0][0] == ours.fileno()
    assert not poll.slept  # caught by a poll(0)


def test_a_spin_stops_when_another_loop_wakes(socket_pair) -> None:
    ours, theirs = socket_pair
    listener, relay = quiet_relay(), quiet_relay()
    BusyPoll(LONG_SPIN, watched=(listener,)).add(relay)
    relay.poller.register(ours, EVENT_READ, ours)
    relay.spin_ok = True
    poll = Recorded(relay)
    thread, result = waiting(relay.busy_poll, relay, poll, time.monotonic() + DEADLINE)
    assert poll.spinning.wait(DEADLINE)
    with listener.turn:  # the listener wakes: the relay gives up the interpreter and sleeps
        assert poll.sleeping.wait(DEADLINE)
        assert not relay.turn.locked()  # asleep in poll(): its turn is free
    theirs.send(b"x")
    thread.join(DEADLINE)
    assert result and result[0][0][0] == ours.fileno()


def test_no_spin_while_another_loop_is_awake(socket_pair) -> None:
    ours, theirs = socket_pair
    listener, relay = quiet_relay(), quiet_relay()
    BusyPoll(LONG_SPIN, watched=(listener,)).add(relay)
    relay.poller.register(ours, EVENT_READ, ours)
    relay.spin_ok = True
    poll = Recorded(relay)
    with listener.turn:
        thread, result = waiting(relay.busy_poll, relay, poll, time.monotonic() + DEADLINE)
        assert poll.sleeping.wait(DEADLINE)
    theirs.send(b"x")
    thread.join(DEADLINE)
    assert result and result[0] and poll.timeouts and poll.timeouts[0] > 0  # slept at once


def test_a_spin_never_runs_past_the_loops_timer() -> None:
    relay = quiet_relay()
    BusyPoll(LONG_SPIN).add(relay)
    relay.spin_ok = True
    poll = Recorded(relay)
    with relay.turn:
        relay.now = time.monotonic()
        assert relay.busy_poll.wait(relay, poll, relay.now + 0.02) == []  # the timer, not LONG_SPIN, ends it
    assert poll.spinning.is_set()
    assert not relay.spin_ok  # it found nothing: the next wait sleeps


def test_spin_time_zero_never_spins(socket_pair) -> None:
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


# -- the server as people run it --------------------------------------------------------------------


def server_pair(port: int, a: str, b: str, room: str) -> tuple[RawClient, RawClient]:
    first, second = RawClient(port), RawClient(port)
    for client, name in ((first, a), (second, b)):
        client.hello(name, room)
        client.expect(WELCOME)
        client.expect(WAITING)
    assert second.expect(PAIRED)["peer"] == a
    assert first.expect(PAIRED)["peer"] == b
    return first, second


@pytest.mark.parametrize("args", [
    pytest.param(("--busy-poll", "0"), id="off"),
    pytest.param(("--busy-poll", "10000", "--relay-threads", "2"), id="10ms-two-relay-threads"),
    pytest.param(("--busy-poll", "10000", "--workers", "1"), id="10ms-worker"),
])
def test_ping_pong_loses_nothing_whatever_the_spin(start_server, args: tuple[str, ...]) -> None:
    server = start_server(*args)
    pairs = [server_pair(server.port, f"a{i}", f"b{i}", f"room{i}") for i in range(2)]
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
