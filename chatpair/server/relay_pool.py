"""The listener's relays, and which one gets the next pair.

A pair is relayed either by a room relay thread of the listener process
(``--relay-threads``, the default) or by a relay worker process
(``--workers``, POSIX). :class:`RelayPool` starts them, picks the least
loaded one for each new pair - never a dead worker, nor a relay thread that
ended after a bug (a new thread takes over if none is left) - and stops and
joins them all. When every worker is dead or waiting out its restart backoff, a relay
thread of the listener process takes new pairs meanwhile (the *fallback*).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from chatpair.server.busypoll import BusyPoll, Loop
from chatpair.server.config import Limits, ServerConfig
from chatpair.server.conn import Conn
from chatpair.server.poller import Poller
from chatpair.server.relay import Relay, RelayThread, Report
from chatpair.server.workers import Stranded, WorkerHandle

log = logging.getLogger("chatpair")


class RelayHandle(Protocol):
    """What the listener needs of a relay: a thread here, or a worker process."""

    @property
    def load(self) -> int: ...

    def start(self) -> None: ...

    def submit_pair(self, a: Conn, b: Conn) -> None: ...

    def submit_resume(self, new: Conn, cid: int, received: int) -> None: ...

    def flush(self) -> None: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def alive(self) -> bool: ...


class RelayPool:
    """Every relay of the listener process: started here, stopped and joined here.

    ``on_pair_end`` hears from every relay when a pair ends (from relay
    threads, on their thread); ``on_lost`` hears when a worker died with
    clients. Runs in the listener's loop thread, whose poller ``poller`` also
    watches the workers' channels.
    """

    def __init__(self, config: ServerConfig, on_pair_end: Callable[[Report], None],
                 on_lost: Callable[[list[Stranded]], None], poller: Poller,
                 make_relay: Callable[[Limits, int, Callable[[Report], None]], Relay] | None = None,
                 watched: Loop | None = None) -> None:
        self._limits = config.limits()
        self._on_pair_end = on_pair_end
        # The relay threads may busy-poll while the listener's loop (``watched``) and each other sleep.
        self._busy_poll = BusyPoll(config.busy_poll_us / 1e6, watched=(watched,) if watched is not None else ())
        self.workers = [WorkerHandle(config, i, on_pair_end, on_lost, poller) for i in range(config.workers)]
        #: With --workers: a relay thread of this process, started the first time
        #: a pair is made while no worker is available (all dead, restarting).
        self.fallback: RelayThread | None = None
        #: cluster mode: relay loops that also serve pairs across nodes (server/cluster_relay.py)
        self._make_relay = make_relay
        self.relays: list[RelayHandle] = list(self.workers) or [
            self._thread(i) for i in range(max(1, config.relay_threads))
        ]
        for relay in self.relays:
            relay.start()
        self._stopping = False

    def pick(self) -> RelayHandle:
        """The least loaded relay; never a dead worker, nor a relay thread that ended (a bug, logged)."""
        if not self.workers:
            relay = min(self.relays, key=lambda r: r.load)
            if relay.alive() or self._stopping:  # (one check per pair; the rest only after a crash)
                return relay
            live = [r for r in self.relays if r.alive()]
            if live:
                return min(live, key=lambda r: r.load)
            # Every relay thread ended: their crash is in the log. A pair handed to a dead
            # loop would wait in vain, so relay new pairs in a new thread.
            log.warning("no relay thread is running; starting a new one")
            replacement = self._thread(len(self.relays))
            replacement.start()
            self.relays.append(replacement)
            return replacement
        ready = [w for w in self.workers if w.available]
        if ready:
            return min(ready, key=lambda w: w.load)
        # Every worker is dead or waiting out its restart backoff. Relay here
        # rather than hold the pair back: its clients were told PAIRED and
        # expect to chat now, and a worker that keeps crashing may take long.
        # The thread serves its pairs until they end; new pairs go to workers
        # again as soon as one is back.
        if self.fallback is None:
            log.warning("no relay worker is running; relaying new pairs in the listener process meanwhile")
            self.fallback = self._thread(len(self.workers))
            self.fallback.start()
            self.relays.append(self.fallback)
        return self.fallback

    def _thread(self, index: int) -> RelayThread:
        make = self._make_relay
        relay = make(self._limits, index, self._on_pair_end) if make is not None else None
        thread = RelayThread(self._limits, index, self._on_pair_end, relay)
        self._busy_poll.add(thread.relay)
        return thread

    def flush(self) -> None:
        """After a batch of events: let every relay start on the pairs it was given."""
        for relay in self.relays:
            relay.flush()

    def on_channel(self, fileobj: Any) -> bool:
        """If ``fileobj`` is a worker's channel, handle its event; whether it was one."""
        for worker in self.workers:  # a handful at most; their channels change on restart
            if worker.owns(fileobj):
                worker.on_channel_event()
                return True
        return False

    def tick(self, now: float) -> None:
        for worker in self.workers:
            worker.tick(now)

    def stop(self) -> None:
        self._stopping = True
        for relay in self.relays:
            relay.stop()

    def busy(self) -> bool:
        """Is any relay still running (winding down its pairs)?"""
        return any(relay.alive() for relay in self.relays)

    def join(self, timeout: float = 10.0) -> None:
        for relay in self.relays:
            relay.join(timeout)
