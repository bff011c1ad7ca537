"""The loop's slow timers as pure decisions: keepalive PING, idle timeout, write deadline.

Every second or so a loop walks its connections and asks, for each, whether
time has run out (PROTOCOL.md section 3, "Keepalive"; and the server's own
write deadline for a partner who reads nothing). :func:`sweep` answers for
all of them at once, with ``now`` passed in, so the rules are tested
without sockets or clocks; the loop then sends the PINGs and closes the
expired. Handshake deadlines are the listener's; lingering closes are
checked by the loop at every tick.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from chatpair.server.config import Limits
from chatpair.server.conn import Conn
from chatpair.server.states import Mode, Phase

#: Timer resolution: handshake deadlines and lingering closes are checked this often.
TICK_SECONDS = 0.25
#: Keepalive, idle and write deadlines walk every connection, so they run less
#: often: with 20,000 idle connections a walk costs milliseconds, and these
#: timeouts are tens of seconds.
SWEEP_SECONDS = 1.0

_CHATTING = Phase.CHATTING
_FRAME = Mode.FRAME


class Expired(enum.Enum):
    """Why a connection's time ran out."""

    WRITE = "write"  # bytes queued for it and no progress writing them: it does not read
    IDLE = "idle"  # frame mode, no frame from it: not even an answer to PING


def sweep_interval(limits: Limits) -> float:
    """How often to sweep: every second, but never coarser than a quarter of the shortest timeout."""
    return max(TICK_SECONDS, min(SWEEP_SECONDS, limits.ping_interval / 4, limits.idle_timeout / 4,
                                 limits.write_timeout / 4))


def sweep(conns: Iterable[Conn], now: float, limits: Limits) -> tuple[list[Conn], list[tuple[Conn, Expired]]]:
    """Who is due a keepalive PING, and whose time has run out (and why).

    Only a chatting frame-mode client can answer PING, so only it can be
    idle: line mode is left to TCP keepalive, and a client we are not
    reading (paused for a backlog, throttled) or still handshaking is not
    idle by its own doing. A client already PINGed is not PINGed again
    until it sends something.
    """
    ping: list[Conn] = []
    expired: list[tuple[Conn, Expired]] = []
    write_timeout, idle_timeout, ping_interval = limits.write_timeout, limits.idle_timeout, limits.ping_interval
    for conn in conns:
        out = conn.out
        if out and now - out.last_progress > write_timeout:
            expired.append((conn, Expired.WRITE))
            continue
        if conn.mode is not _FRAME or conn.phase is not _CHATTING or conn.paused or conn.throttled_until:
            continue
        idle = now - conn.last_rx
        if idle > idle_timeout:
            expired.append((conn, Expired.IDLE))
        elif idle > ping_interval and not conn.pinged:
            ping.append(conn)
    return ping, expired
