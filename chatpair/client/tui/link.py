"""The chat screen's connection, kept up: watched on the app's selector, retried with backoff.

:class:`Link` holds the current :class:`~chatpair.client.session.Connection`
(or none, while disconnected), keeps the selector watching it for what it
needs, and knows when to try again: 0.5 s, doubling to 15 s. The attempts
run on a thread owned by its :class:`Reconnector` (one at a time, joined
before the next and at exit), which hands back a Connection or a
:class:`Failure` and wakes the loop. What to tell the user is the app's.
No curses here.

A dropped resumable session (PROTOCOL.md section 6) is retried on its own
schedule (:class:`~chatpair.client.resuming.ResumePlan`: 0.2, 0.5, 1, 2 s...
within the server's resume window) with RESUME; if the server forgot it, or
the window passes, a fresh HELLO follows on the usual schedule.

An outage is told once, not once per attempt: :meth:`Link.failed_once`
says whether a failed attempt is the first since the connection was lost
(the app says that one in the conversation); :meth:`Link.state` carries the
count of the others for the status line.
"""

from __future__ import annotations

import collections
import queue
import selectors
import threading
from dataclasses import dataclass
from typing import Callable

from chatpair.client.config import ClientConfig
from chatpair.client.resuming import ResumePlan, expired_message, is_drop, is_expired
from chatpair.client.session import Connection, SocketWatch, connect
from chatpair.errors import ChatpairError, RefusedError
from chatpair.proto.clientsession import ClientSession
from chatpair.proto.events import Closed, Event, Reconnecting, ResumeFailed, ServerError

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
#: Error codes after which trying again cannot help: the same hello would be
#: refused the same way (a full room stays full while its pair chats; pipe
#: mode stops there too, with exit code 3).
FATAL_CODES = frozenset({"bad_hello", "unsupported_version", "bad_frame", "frame_too_large", "room_full"})


def is_fatal(err: ChatpairError) -> bool:
    """True for a refusal that the same hello would get again."""
    return isinstance(err, RefusedError) and err.code in FATAL_CODES


@dataclass(frozen=True)
class Failure:
    """A connection attempt that failed, and what the server said before it did (a NOTICE)."""

    error: ChatpairError
    heard: tuple[Event, ...]


class Reconnector:
    """One connection attempt at a time, on a thread this object owns."""

    def __init__(self, config: ClientConfig, wake: Callable[[], None]) -> None:
        self.config = config
        self.wake = wake
        self.results: queue.Queue[Connection | Failure] = queue.Queue()
        self.thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, config: ClientConfig | None = None, session: ClientSession | None = None) -> None:
        """Try to connect (``session``: resume it), with ``config`` if given (a shorter timeout)."""
        self.join()
        self.thread = threading.Thread(target=self._attempt, args=(config or self.config, session),
                                       name="chatpair-reconnect", daemon=True)
        self.thread.start()

    def _attempt(self, config: ClientConfig, session: ClientSession | None) -> None:
        heard: list[Event] = []
        try:
            result: Connection | Failure = connect(config, heard, session)
        except ChatpairError as err:
            result = Failure(err, tuple(heard))
        self.results.put(result)
        self.wake()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(self.config.timeout + 1)  # connect() is bounded by this timeout
            self.thread = None

    def stop(self) -> None:
        """Wait for an attempt in flight and close a connection nobody will use."""
        self.join()
        while not self.results.empty():
            result = self.results.get_nowait()
            if isinstance(result, Connection):
                result.close()


class Link:
    """The connection of the chat screen, or None while it is down; see the module docstring."""

    def __init__(self, config: ClientConfig, sel: selectors.BaseSelector, wake: Callable[[], None],
                 on_ready: Callable[[int], None]) -> None:
        self.sel = sel
        #: Registered as the connection's selector data: called with the ready mask.
        self.on_ready = on_ready
        self.conn: Connection | None = None
        self.watch: SocketWatch | None = None
        #: When to try again (None: not scheduled, or connected).
        self.retry_at: float | None = None
        self.backoff = BACKOFF_FIRST
        self.reconnector = Reconnector(config, wake)
        #: While a dropped session is being resumed: its attempts.
        self.plan: ResumePlan | None = None
        #: Messages typed while resuming (or held back by flow control), sent in order once possible.
        self.held: collections.deque[str] = collections.deque()
        #: Messages typed while we had no partner: sent, in order, once we are paired.
        self.unpaired: collections.deque[str] = collections.deque()
        #: Attempts that failed since the connection was lost (0: connected, or none failed yet).
        self.failures = 0

    def attach(self, conn: Connection) -> None:
        self.conn = conn
        self.retry_at = None
        self.failures = 0
        self.watch = SocketWatch(conn, self.on_ready)
        self.watch.set(self.sel, selectors.EVENT_READ)

    def detach(self) -> None:
        """Stop watching the connection and close it."""
        if self.conn is None or self.watch is None:
            return
        self.watch.clear(self.sel)
        self.watch = None
        self.conn.close()
        self.conn = None

    def follow(self, now: float) -> float | None:
        """Watch the connection for what it needs; return when to look again if reading is paused."""
        if self.watch is None:
            return None
        pause = self.watch.follow(self.sel, now)
        return now + pause if pause else None

    def wake_times(self, now: float) -> list[float]:
        """When the loop must look again: a paused read's end, the next attempt, the session's timers."""
        due = self.conn.deadline() if self.conn is not None else None
        return [t for t in (self.follow(now), self.retry_at, due) if t is not None]

    def schedule_retry(self, now: float) -> float:
        """Plan the next attempt; returns the delay, which doubles each time (up to BACKOFF_MAX)."""
        delay = self.backoff
        self.retry_at = now + delay
        self.backoff = min(delay * 2, BACKOFF_MAX)
        return delay

    def retry_if_due(self, now: float) -> None:
        if self.conn is None and self.retry_at is not None and now >= self.retry_at \
                and not self.reconnector.busy:
            self.retry_at = None
            if self.plan is None:
                self.reconnector.start()
            else:
                self.reconnector.start(self.plan.attempt_config(self.reconnector.config, now), self.plan.session)

    def drop(self, ev: Event, now: float) -> Reconnecting | None:
        """A final event: if a resume can repair it, detach and plan the attempts (returned: what to say)."""
        conn = self.conn
        if conn is None or conn.session is None or not is_drop(conn.session, ev):
            return None
        self.detach()
        self.plan = ResumePlan(conn.session, now)
        self.retry_at = self.plan.retry_at
        return Reconnecting(ev.reason if isinstance(ev, Closed) else ev.message if isinstance(ev, ServerError) else "")

    def send_held(self) -> None:
        """Send what was typed while resuming, as far as flow control allows (ChatpairError if a send fails)."""
        conn = self.conn
        while conn is not None and self.held and conn.can_send and not conn.closed:
            conn.send_msg(self.held.popleft())

    def resume_failed(self, err: ChatpairError, now: float) -> ResumeFailed | float:
        """An attempt to resume failed: plan the next (returned: its delay), or give the session up.

        Given up (returned: what to say), lines typed meanwhile are dropped
        with it, and counted in what may not have reached the partner.
        """
        plan = self.plan
        assert plan is not None
        if not is_expired(err) and plan.failed(now):
            self.retry_at = plan.retry_at
            return plan.retry_at - now
        self.plan = None
        unsent = len(self.held)
        self.held.clear()
        label = self.reconnector.config.label
        why = (expired_message(err, label) if is_expired(err)
               else f"not back within the server's {plan.session.window:g} s ({err})")
        self.retry_at = now if is_expired(err) else None  # expired: the server is there, say hello at once
        return ResumeFailed(why, plan.session.sent.unacked + unsent)

    def results(self) -> list[Connection | Failure]:
        """Finished attempts (the thread joined)."""
        out: list[Connection | Failure] = []
        while not self.reconnector.results.empty():
            out.append(self.reconnector.results.get_nowait())
            self.reconnector.join()
        return out

    def welcomed(self) -> None:
        """The server took us in (WAITING): the next loss starts the backoff afresh.

        Not on connect: a server that accepts and then refuses (server_full,
        too_many_connections) must see the delay grow, not a retry every 0.5 s.
        """
        self.backoff = BACKOFF_FIRST

    def failed_once(self) -> bool:
        """Count a failed attempt; True for the first of this outage (the one told in the conversation)."""
        self.failures += 1
        return self.failures == 1

    def state(self, now: float) -> str:
        """For the status line while disconnected (with the count of failed attempts, once there are some)."""
        failed = f" ({self.failures} failed)" if self.failures else ""
        if self.plan is not None:
            return f"reconnecting...{failed}"
        if self.reconnector.busy:
            return f"connecting...{failed}"
        if self.retry_at is None:
            return f"disconnected{failed}"
        return f"disconnected{failed}, retry in {max(0.0, self.retry_at - now):.0f}s"

    def close(self) -> None:
        """Say BYE if connected; stop the reconnect thread."""
        if self.conn is not None:
            if self.watch is not None:
                self.watch.clear(self.sel)
                self.watch = None
            self.conn.bye()
            self.conn = None
        self.reconnector.stop()
