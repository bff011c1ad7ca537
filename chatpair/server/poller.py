"""The readiness poller under every server loop: ``epoll`` itself on Linux, ``selectors`` elsewhere.

A relay hop (read one message, write it to the partner) costs a few
microseconds of Python, and ``selectors`` added about 0.8 us of them to
every wait (a ``SelectorKey`` per ready socket, a list built and walked
again) and about 1.5 us to every register/unregister (a namedtuple, a
lookup by file object). :class:`EpollPoller` keeps only what the loops need
- one dict from descriptor to its owner's data - and lets the loop walk
``epoll.poll()``'s own list. ``docs/performance.md`` has the figures.

Both pollers keep the ``selectors`` calling convention for registering
(``register(fileobj, events, data)``, ``modify``, ``unregister``, with
``EVENT_READ``/``EVENT_WRITE``), so code that registers a socket of its own
(the acceptor, a worker channel) does not care which one runs. Waiting is
:meth:`poll`: a list of ``(fd, ready)``, where ``ready`` is tested against
:data:`READ_READY` and :data:`WRITE_READY`; the loop looks ``fd`` up in
:attr:`data` (a connection) or :attr:`files` (a socket of its own,
registered with ``data=None``). An error or hang-up counts as both, as in
``selectors``: the next read or write says what happened.
"""

from __future__ import annotations

import select
import selectors
from typing import Any

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

# epoll's bits (numbers from the Linux ABI, so that the fallback can speak
# them where the select module has no EPOLL* names).
_IN, _PRI, _OUT, _ERR, _HUP, _RDHUP = 0x001, 0x002, 0x004, 0x008, 0x010, 0x2000
#: A ready mask with any of these bits: read (an error or hang-up too).
READ_READY = _IN | _PRI | _ERR | _HUP | _RDHUP
#: A ready mask with any of these bits: write (an error or hang-up too).
WRITE_READY = _OUT | _ERR | _HUP
#: selectors' EVENT_* combination -> epoll's interest bits.
_INTEREST = (0, _IN, _OUT, _IN | _OUT)
#: At most this many ready descriptors per wait; the rest come next time (epoll keeps them queued fairly).
MAX_EVENTS = 1024


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else fileobj.fileno()


def _interest(events: int) -> int:
    if not 0 < events <= EVENT_READ | EVENT_WRITE:
        raise ValueError(f"invalid events: {events!r}")
    return _INTEREST[events]


class _Registry:
    """What both pollers keep: descriptor -> data, and the loop's own file objects."""

    def __init__(self) -> None:
        self.data: dict[int, Any] = {}  # fd -> its connection (None: see files)
        self.files: dict[int, Any] = {}  # fd -> file object registered with data=None

    def _known_fd(self, fileobj: Any) -> int:
        """The descriptor ``fileobj`` was registered under, even once it is closed (fileno() -1)."""
        fd = _fd(fileobj)
        if fd < 0:
            fd = next((known for known, f in self.files.items() if f is fileobj), fd)
        if fd not in self.data:
            raise KeyError(f"{fileobj!r} is not registered")
        return fd

    def _remember(self, fd: int, fileobj: Any, data: Any) -> None:
        self.data[fd] = data
        if data is None:
            self.files[fd] = fileobj
        else:
            self.files.pop(fd, None)

    def _forget(self, fd: int) -> None:
        self.data.pop(fd, None)
        self.files.pop(fd, None)


class EpollPoller(_Registry):
    """``select.epoll`` with a descriptor -> data dict. Used by whoever holds its loop's turn."""

    #: A descriptor registered by another thread joins a wait already in progress.
    live_registration = True

    def __init__(self) -> None:
        super().__init__()
        self._epoll = select.epoll()

    def register(self, fileobj: Any, events: int, data: Any = None) -> None:
        fd = _fd(fileobj)
        if fd in self.data:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self._epoll.register(fd, _interest(events))
        self._remember(fd, fileobj, data)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> None:
        fd = self._known_fd(fileobj)
        try:
            self._epoll.modify(fd, _interest(events))
        except OSError:
            self._forget(fd)  # the kernel no longer has it (closed): neither do we
            raise
        self._remember(fd, fileobj, data)

    def unregister(self, fileobj: Any) -> None:
        fd = self._known_fd(fileobj)
        self._forget(fd)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # already closed: the kernel forgot it by itself

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        """Wait up to ``timeout`` seconds (< 0: for ever); ``(fd, ready bits)`` of what is ready.

        (An interrupted wait is retried by Python itself, PEP 475.)
        """
        return self._epoll.poll(timeout, MAX_EVENTS)

    def fileno(self) -> int:
        """The epoll descriptor: readable while something registered here is ready (busypoll.py
        peeks); -1 once closed (a loop that ended)."""
        return -1 if self._epoll.closed else self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()
        self.data.clear()
        self.files.clear()


class SelectorPoller(_Registry):
    """The same on a ``selectors`` selector (macOS, BSD, Windows): ready masks in epoll's bits."""

    #: ``select()`` and ``poll()`` wait on the descriptors they were given: one
    #: registered meanwhile is seen only at the next wait, so nobody else adopts
    #: connections into a loop that waits on this (``Relay.adopt_pair_now``).
    live_registration = False

    def __init__(self, selector: selectors.BaseSelector | None = None) -> None:
        super().__init__()
        self._sel = selector if selector is not None else selectors.DefaultSelector()

    def register(self, fileobj: Any, events: int, data: Any = None) -> None:
        key = self._sel.register(fileobj, events, data)
        self._remember(key.fd, fileobj, data)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> None:
        fd = self._known_fd(fileobj)
        try:
            self._sel.modify(fd, events, data)
        except OSError:
            self._forget(fd)  # selectors dropped it too
            raise
        self._remember(fd, fileobj, data)

    def unregister(self, fileobj: Any) -> None:
        fd = self._known_fd(fileobj)
        self._forget(fd)
        self._sel.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        return [(key.fd, (_IN if mask & EVENT_READ else 0) | (_OUT if mask & EVENT_WRITE else 0))
                for key, mask in self._sel.select(None if timeout < 0 else timeout)]

    def fileno(self) -> int:
        """The kernel queue's descriptor (kqueue, epoll), or -1 where there is none (select, poll)."""
        fileno = getattr(self._sel, "fileno", None)
        try:
            return fileno() if fileno is not None else -1
        except (ValueError, OSError):  # closed
            return -1

    def close(self) -> None:
        self._sel.close()
        self.data.clear()
        self.files.clear()


Poller = EpollPoller | SelectorPoller


def make_poller() -> Poller:
    """The fastest poller this platform has."""
    return EpollPoller() if hasattr(select, "epoll") else SelectorPoller()
