"""The rate limit: a client over its rate is read later, never cut short (``--rate``, ``--burst``).

PROTOCOL.md: "Flood control never drops". Each client has a token bucket
(``Conn.tokens`` as of ``Conn.token_time``) that refills at ``rate`` messages
a second up to ``burst``. Reading a client's messages takes tokens; one that
goes below zero is *throttled*: its loop stops reading it until the bucket
is back at zero, and meanwhile its bytes wait in the kernel, where TCP
slows the sender down. While it is close to the limit, each read takes
fewer bytes, so one burst cannot overshoot by a whole buffer.

:class:`RateLimiter` is the arithmetic and the timetable of throttled
clients, with the time passed in: no socket, no clock. The loop asks it and
acts (stops or resumes reading).
"""

from __future__ import annotations

import heapq

from chatpair.server.conn import Conn

#: While a client is rate limited, one read takes at most this many bytes per
#: message it may still send, so a burst cannot overshoot by a whole buffer.
THROTTLED_READ_PER_TOKEN = 128
#: ...but never less than this: a read must be able to make progress.
MIN_READ = 1024


class RateLimiter:
    """The token buckets of one loop's clients, and which of them are throttled until when."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate  # messages per second per client; 0: no limit
        self.burst = float(burst)
        #: (resume time, cid, conn) of every throttled client; cid breaks ties
        self.heap: list[tuple[float, int, Conn]] = []

    def _level(self, conn: Conn, now: float) -> float:
        """The client's tokens at ``now``: refilled since it last spent, capped at ``burst``."""
        return min(self.burst, conn.tokens + (now - conn.token_time) * self.rate)

    def take(self, conn: Conn, msgs: int, now: float) -> bool:
        """Spend ``msgs`` tokens; True if that throttled the client (stop reading it).

        A client already throttled stays throttled until its first time comes
        (its debt only grows), so it is in the timetable once.
        """
        conn.tokens = self._level(conn, now) - msgs
        conn.token_time = now
        if conn.tokens < 0 and not conn.throttled_until:
            self.throttle(conn, now + (-conn.tokens) / self.rate)
            return True
        return False

    def throttle(self, conn: Conn, until: float) -> None:
        """Do not read ``conn`` before ``until`` (also: a throttled client adopted from another loop)."""
        conn.throttled_until = until
        heapq.heappush(self.heap, (until, conn.cid, conn))

    def read_budget(self, conn: Conn, space: int, now: float) -> int:
        """How many bytes one read from ``conn`` may take, of ``space``."""
        tokens = self._level(conn, now)
        return max(MIN_READ, min(space, int(max(tokens, 1.0) * THROTTLED_READ_PER_TOKEN)))

    def due(self, now: float) -> list[Conn]:
        """Take the clients whose time has come off the timetable (the caller resumes them)."""
        heap = self.heap
        out = []
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        return out
