"""The readiness poller under the server loops: epoll on Linux and the selectors fallback behave alike.

Real socket pairs; readiness is what the kernel says, so nothing waits on time.
"""

from __future__ import annotations

import select
import selectors
import socket
from collections.abc import Callable, Iterator

import pytest

from chatpair.server.poller import (
    EVENT_READ,
    EVENT_WRITE,
    READ_READY,
    WRITE_READY,
    EpollPoller,
    Poller,
    SelectorPoller,
    make_poller,
)


# The fallback is tried on each selector this platform has, not only on the default one.
def _fallback_on(selector_class: type[selectors.BaseSelector]) -> Callable[[], Poller]:
    return lambda: SelectorPoller(selector_class())


KINDS: dict[str, Callable[[], Poller]] = {
    f"SelectorPoller-{name}": _fallback_on(getattr(selectors, name))
    for name in ("SelectSelector", "PollSelector", "EpollSelector", "KqueueSelector") if hasattr(selectors, name)
}
if hasattr(select, "epoll"):
    KINDS["EpollPoller"] = EpollPoller


@pytest.fixture(params=sorted(KINDS))
def poller(request: pytest.FixtureRequest) -> Iterator[Poller]:
    p = KINDS[request.param]()
    yield p
    p.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def ready(poller: Poller, timeout: float = 0.0) -> dict[int, int]:
    return dict(poller.poll(timeout))


def test_read_write_and_the_data_of_each_descriptor(poller: Poller, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller.register(a.fileno(), EVENT_READ, "conn-a")
    assert poller.data == {a.fileno(): "conn-a"} and poller.files == {}
    assert ready(poller) == {}  # nothing to read yet
    b.send(b"x")
    got = ready(poller, 5.0)
    assert got[a.fileno()] & READ_READY and not got[a.fileno()] & WRITE_READY
    poller.modify(a.fileno(), EVENT_READ | EVENT_WRITE, "conn-a2")
    got = ready(poller, 5.0)
    assert got[a.fileno()] & READ_READY and got[a.fileno()] & WRITE_READY
    assert poller.data[a.fileno()] == "conn-a2"
    poller.modify(a.fileno(), EVENT_WRITE, "conn-a2")
    got = ready(poller, 5.0)
    assert got[a.fileno()] & WRITE_READY and not got[a.fileno()] & READ_READY
    poller.unregister(a.fileno())
    assert ready(poller) == {} and poller.data == {}


def test_a_socket_of_the_loops_own_is_kept_as_its_file_object(poller: Poller,
                                                             pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller.register(a, EVENT_READ, None)
    assert poller.files == {a.fileno(): a}
    b.send(b"x")
    assert a.fileno() in ready(poller, 5.0)
    poller.unregister(a)
    assert poller.files == {} and poller.data == {}


def test_a_hang_up_is_ready_for_what_was_asked(poller: Poller, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller.register(a.fileno(), EVENT_READ, "conn")
    b.close()
    got = ready(poller, 5.0)
    assert got[a.fileno()] & READ_READY
    assert a.recv(10) == b""  # the read says what happened


def test_a_hang_up_reaches_a_socket_that_only_waits_to_write(poller: Poller,
                                                             pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller.register(a.fileno(), EVENT_WRITE, "conn")
    b.close()
    assert ready(poller, 5.0)[a.fileno()] & WRITE_READY  # the write then says what happened


def test_a_socket_closed_before_it_is_unregistered_is_forgotten(poller: Poller,
                                                                pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    c, d = socket.socketpair()
    try:
        poller.register(c, EVENT_READ, None)
        c.close()  # fileno() is -1 now: the poller still knows which descriptor it had
        poller.unregister(c)
        assert poller.data == {} and poller.files == {}
        poller.register(a.fileno(), EVENT_READ, "conn")  # the number may be reused at once
        b.send(b"x")
        assert a.fileno() in ready(poller, 5.0)
    finally:
        d.close()


def test_a_wait_for_ever_returns_as_soon_as_something_is_ready(poller: Poller,
                                                               pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    poller.register(a.fileno(), EVENT_WRITE, "conn")  # a fresh socket is writable at once
    assert a.fileno() in ready(poller, -1)


def test_mistakes_are_the_errors_selectors_gives(poller: Poller, pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    poller.register(a.fileno(), EVENT_READ, "conn")
    with pytest.raises(KeyError):
        poller.register(a.fileno(), EVENT_READ, "again")
    poller.unregister(a.fileno())
    with pytest.raises(KeyError):
        poller.unregister(a.fileno())
    with pytest.raises(KeyError):
        poller.modify(a.fileno(), EVENT_READ, "conn")
    with pytest.raises((ValueError, OSError)):
        poller.register(-1, EVENT_READ, "closed")
    with pytest.raises(ValueError):
        poller.register(a.fileno(), 0, "nothing to wait for")
    assert poller.data == {} and poller.files == {}


def test_the_platforms_best_is_chosen() -> None:
    p = make_poller()
    try:
        assert isinstance(p, EpollPoller if hasattr(select, "epoll") else SelectorPoller)
    finally:
        p.close()



def test_the_pollers_descriptor_is_readable_while_something_is_ready(poller: Poller, pair) -> None:
    """What busy polling peeks at (server/busypoll.py): a kernel queue's descriptor, or -1."""
    ours, theirs = pair
    fd = poller.fileno()
    if isinstance(poller, SelectorPoller) and not hasattr(poller._sel, "fileno"):
        assert fd == -1  # select() and poll() keep no descriptor: nothing to peek at
        return
    peek = select.poll()
    peek.register(fd, select.POLLIN)
    poller.register(ours, EVENT_READ, ours)
    assert not peek.poll(0)
    theirs.send(b"x")
    assert peek.poll(5000)
    ours.recv(16)
    assert not peek.poll(0)


def test_a_closed_poller_has_no_descriptor() -> None:
    poller = make_poller()
    if poller.fileno() < 0:  # (Windows' select(): never a descriptor)
        poller.close()
        return
    poller.close()
    assert poller.fileno() == -1
