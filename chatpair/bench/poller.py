"""Level-triggered readiness by descriptor for the load processes.

The load loop looks clients up by descriptor, so it wants ``(fd, events)``
pairs, not selector keys: :class:`Poller` is ``select.epoll`` where there is
one (Linux) and a thin adapter over :mod:`selectors` elsewhere. The event
bits are epoll's (``READ`` = EPOLLIN, ``WRITE`` = EPOLLOUT), so the hot loop
tests plain ints on both.
"""

from __future__ import annotations

import select
import selectors


class Poller:
    """Level-triggered readiness by descriptor: epoll where there is one."""

    READ = 1
    WRITE = 4

    def __init__(self) -> None:
        self._ep = select.epoll() if hasattr(select, "epoll") else None
        self._sel = None if self._ep else selectors.DefaultSelector()

    def register(self, fd: int, events: int) -> None:
        if self._ep:
            self._ep.register(fd, events)
        else:
            self._sel.register(fd, self._to_sel(events))  # type: ignore[union-attr]

    def modify(self, fd: int, events: int) -> None:
        if self._ep:
            self._ep.modify(fd, events)
        else:
            self._sel.modify(fd, self._to_sel(events))  # type: ignore[union-attr]

    def unregister(self, fd: int) -> None:
        try:
            if self._ep:
                self._ep.unregister(fd)
            else:
                self._sel.unregister(fd)  # type: ignore[union-attr]
        except (KeyError, ValueError, OSError):
            pass

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        if self._ep:
            return self._ep.poll(timeout)
        out = []
        for key, ev in self._sel.select(timeout):  # type: ignore[union-attr]
            out.append((key.fd, (self.READ if ev & selectors.EVENT_READ else 0)
                        | (self.WRITE if ev & selectors.EVENT_WRITE else 0)))
        return out

    @staticmethod
    def _to_sel(events: int) -> int:
        return ((selectors.EVENT_READ if events & 1 else 0) | (selectors.EVENT_WRITE if events & 4 else 0))

    def close(self) -> None:
        if self._ep:
            self._ep.close()
        else:
            self._sel.close()  # type: ignore[union-attr]
