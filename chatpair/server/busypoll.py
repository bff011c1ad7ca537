"""How a loop waits for events, and busy polling: a relay that just had work polls on a moment.

On a quiet server most of a message's latency is not Python but waking the
relay thread: the kernel puts it to sleep in ``epoll_wait`` and has to
schedule it again when the next message comes (about half the CPU samples
of a one-pair ping-pong are the scheduler's wake-up and context switch, in
chatpair and in uvloop alike). A relay that keeps asking ``poll(0)`` for a
few tens of microseconds after a batch of events is still awake when a
quick reply comes: one-pair ping-pong p50 about a third of uvloop's
instead of 1.1x (``docs/performance.md``). Linux has the same idea for sockets
(``SO_BUSY_POLL``); Go's scheduler spins a little before it parks a thread.

Spinning costs a core's time and, in a process with more than one loop, it
competes with the others for the GIL and the CPU. So a loop spins only when
it is likely to pay and nobody else in its process needs the interpreter:

* **only after a short wait** - the loop's last sleep ended within twice the
  spin time (:data:`SHORT_SLEEP`: a sleep includes the thread's wake-up, a
  spin does not), so the next event is likely to come as soon; a spin that finds
  nothing ends in a sleep, and only another short sleep starts spinning
  again. A server whose clients type at human speed never spins;
* **only while every other loop of the process is quiet** - none of them
  holds its turn (is awake), has woken within :data:`QUIET_SECONDS`, or
  has events waiting in its poller. The listener pairing clients, or a
  second relay thread with traffic, would otherwise share the CPU and the
  GIL with a thread that has nothing to do. The last test matters most: a
  thread woken during a spin needs the GIL before it can take its turn,
  and a spinning thread takes the GIL back at once after each ``poll(0)``,
  so without it the listener waited behind a relay that kept finding
  traffic (churn with 50 pairs 0.86-0.94x of ``--busy-poll 0``; with it 0.98x);
* **for at most** ``--busy-poll`` microseconds from the end of the batch
  (``0`` turns it off), and never past the loop's next timer.

The worst case is traffic that arrives just inside twice the spin time
again and again: the relay then spins between every two messages, up to
``--busy-poll`` microseconds each, and one core is busy as long as that
lasts (at the default 50 µs that takes 10,000 messages a second to one
relay, which keeps it busy anyway; 10 ms would make 50 a second do it).
A relay worker process (``--workers``) is alone in its process, so only the
first rule and the time limit apply there: N workers may spin on N cores.
The listener takes part as a loop the others watch; it never spins (its
handshakes are not latency-bound).
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

#: Another loop of the process that woke this recently counts as busy: no spinning meanwhile.
#: (The GIL's own switch interval is 5 ms: a thread kept waiting longer would force a switch.)
QUIET_SECONDS = 0.005


#: A sleep counts as short (the next wait spins) below this many spin times: it includes the
#: thread's wake-up (tens of microseconds on a virtual machine), which a spin does not pay.
#: With 1, a one-pair ping-pong often never started spinning (p50 25-95 us from run to run).
SHORT_SLEEP = 2

#: A poller's wait: seconds to wait at most -> (descriptor, ready bits) of what is ready.
Poll = Callable[[float], list[tuple[int, int]]]


class Peek(Protocol):
    def poll(self, timeout: int) -> list[tuple[int, int]]: ...  # select.poll's


class _NoPeek:
    """Where no other loop has a descriptor to look at: never anything waiting."""

    def poll(self, timeout: int) -> list[tuple[int, int]]:
        return []


def _has_work(peek: Peek) -> bool:
    """A poller among ``peek``'s has events (POLLNVAL alone: a loop that ended, its poller closed)."""
    return any(ready & select.POLLIN for _, ready in peek.poll(0))


class Poller(Protocol):
    def fileno(self) -> int: ...  # readable while the poller has events waiting; -1: cannot tell


class Loop(Protocol):
    """What busy polling needs of a loop (:class:`~chatpair.server.loop.ConnLoop` has it)."""

    poller: Poller
    turn: threading.Lock  # held while the loop is awake
    now: float  # when it last woke (monotonic)
    busy_poll: BusyPoll
    spin_seconds: float
    spin_ok: bool  # its last sleep was shorter than a spin


class BusyPoll:
    """The loops of one process, and whether one of them may spin now.

    :meth:`add` every loop before it runs: the listener and each relay thread
    (or, in a worker process, its one relay). A relay thread started later (a
    replacement, the fallback) is added when it is made.
    """

    def __init__(self, seconds: float, watched: tuple[Loop, ...] = ()) -> None:
        #: The longest spin, in seconds; 0: never spin.
        self.seconds = seconds
        self.loops: list[Loop] = []
        self._peeks: dict[Loop, tuple[int, Peek]] = {}  # loop -> (len(loops) when made, its peek)
        for loop in watched:  # loops that never spin, but whose work comes first (the listener)
            self.add(loop, spins=False)

    def add(self, loop: Loop, spins: bool = True) -> None:
        """Count ``loop`` among this process's loops; ``spins``: it may busy-poll too."""
        loop.busy_poll = self
        loop.spin_seconds = self.seconds if spins else 0.0
        self.loops.append(loop)

    def others_quiet(self, loop: Loop) -> bool:
        """True when no other loop is awake or was awake in the last :data:`QUIET_SECONDS`."""
        now = loop.now
        for other in self.loops:  # a handful: the listener and the relay threads
            if other is not loop and (other.turn.locked() or now - other.now < QUIET_SECONDS):
                return False
        return True

    def wait(self, loop: Loop, poll: Poll, wake_at: float) -> list[tuple[int, int]]:
        """The loop's wait for events (until ``wake_at``, monotonic); sets ``loop.now``.

        Busy-polls first when the rules above allow; otherwise (or when the
        spin finds nothing) sleeps in ``poll()`` with the loop's turn released.
        """
        if loop.spin_ok and self.others_quiet(loop):
            events = self._spin(loop, poll, min(time.monotonic() + loop.spin_seconds, wake_at))
            if events:
                loop.now = time.monotonic()
                return events
        turn = loop.turn
        slept_at = time.monotonic()
        turn.release()
        try:
            events = poll(max(0.0, wake_at - slept_at))
        finally:
            turn.acquire()
        loop.now = now = time.monotonic()
        # Woken soon: the next event may well come as soon, and a spin would catch it.
        loop.spin_ok = now - slept_at < SHORT_SLEEP * loop.spin_seconds and bool(events)
        return events

    def _spin(self, loop: Loop, poll: Poll, deadline: float) -> list[tuple[int, int]]:
        """``poll(0)`` until something is ready, ``deadline`` passes, or another loop wakes or has work."""
        events = poll(0)
        if events:  # the commonest spin under load: something was ready already
            return events
        monotonic = time.monotonic
        others = self._peek(loop)
        while monotonic() < deadline and self.others_quiet(loop) and not _has_work(others):
            events = poll(0)
            if events:
                break
        return events

    def _peek(self, loop: Loop) -> Peek:
        """What tells ``loop`` that another loop has events waiting: their pollers' descriptors.

        A loop woken during a spin needs the GIL before it can take its turn,
        and a spinning thread takes the GIL back at once after each ``poll(0)``;
        so the spinner also polls the other loops' pollers and gives way as
        soon as one of them has work. Made once per loop, again when a loop
        joins (a relay thread started later); only ``loop``'s thread uses it.
        """
        made = self._peeks.get(loop)
        if made is not None and made[0] == len(self.loops):
            return made[1]
        fds = [fd for other in self.loops if other is not loop and (fd := other.poller.fileno()) >= 0]
        peek: Peek = _NoPeek()
        if fds and hasattr(select, "poll"):  # (Windows: no poll(); the other rules still hold)
            peek = select.poll()
            for fd in fds:
                peek.register(fd, select.POLLIN)
        self._peeks[loop] = (len(self.loops), peek)
        return peek
