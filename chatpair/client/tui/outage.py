"""What the chat screen says about a lost connection: once, not once per attempt.

An outage is told in the conversation by the line that starts it (the
connection was lost), its first failed attempt (why: ``connection
refused``...), and one line at its end: back (``reconnected``), or given up
(the conversation could not be resumed, a refusal that would repeat). The
attempts in between are only counted, in the status line
(:meth:`~chatpair.client.tui.link.Link.state`: ``reconnecting... (5
failed)``), so a server down for a minute does not push the conversation
off the screen. No curses here.
"""

from __future__ import annotations

import time
from typing import Callable

from chatpair.client.present import Line, LineStyle, Presenter
from chatpair.client.tui.link import Failure, Link, is_fatal
from chatpair.errors import ChatpairError


class Outage:
    """Plans the next attempt after a loss or a failure, and says what is worth a line."""

    def __init__(self, link: Link, presenter: Presenter, show: Callable[[list[Line]], None]) -> None:
        self.link = link
        self.presenter = presenter
        self.show = show

    def say(self, text: str) -> None:
        self.show([Line(LineStyle.ERROR, text)])

    def schedule_retry(self, why: str = "connection lost", failed: bool = False) -> None:
        """Plan the next attempt; said unless an attempt of this outage failed (and was said) before.

        ``failed``: ``why`` is a failed attempt (counted), not the loss itself.
        """
        delay = self.link.schedule_retry(time.monotonic())
        if not failed or self.link.failed_once():
            self.say(f"{why}; reconnecting in {delay:g}s")

    def failed_attempt(self, failure: Failure) -> ChatpairError | None:
        """An attempt failed: plan the next, saying only what is new; returns a refusal that would repeat."""
        for ev in failure.heard:  # what the server said before refusing (a NOTICE)
            self.show(self.presenter.lines(ev))
        if self.link.plan is not None:
            told = self.link.resume_failed(failure.error, time.monotonic())
            if isinstance(told, float):
                if self.link.failed_once():
                    self.say(f"{failure.error}; reconnecting in {told:g}s")
            else:
                self.show(self.presenter.lines(told))  # the session is gone: a fresh HELLO (now, or later)
                if self.link.retry_at is None:
                    self.schedule_retry(str(failure.error), failed=True)
            return None
        if is_fatal(failure.error):
            return failure.error
        self.schedule_retry(str(failure.error), failed=True)
        return None
