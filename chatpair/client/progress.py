"""``connecting to HOST:PORT...``: feedback while the first connection is made.

Like git's progress lines, it goes to stderr and only to a person: the
chat screen says it at once (before curses starts), pipe mode only when
stderr is a terminal and connecting takes longer than :data:`DELAY` - a
script's stdout stays clean and its stderr holds nothing but errors.
"""

from __future__ import annotations

import os
import sys
import threading
from types import TracebackType
from typing import TextIO

#: Pipe mode says nothing for a connection made faster than this.
DELAY = 0.5


def is_terminal(stream: TextIO) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False


class Connecting:
    """A context manager around the first :func:`~chatpair.client.session.connect`.

    ``at_once``: say it now (the chat screen); else after ``delay`` seconds,
    from a timer thread this object owns (cancelled and joined on exit),
    and only when ``err`` is a terminal.
    """

    def __init__(self, label: str, *, at_once: bool, err: TextIO | None = None, delay: float = DELAY) -> None:
        self.text = f"connecting to {label}...\n"
        self.at_once = at_once
        self.err = err or sys.stderr
        self.delay = delay
        self.timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._done = False

    def _say(self) -> None:
        with self._lock:
            if self._done:
                return
            try:
                self.err.write(self.text)
                self.err.flush()
            except (OSError, ValueError):
                pass

    def __enter__(self) -> Connecting:
        if self.at_once:
            self._say()
        elif is_terminal(self.err):
            self.timer = threading.Timer(self.delay, self._say)
            self.timer.daemon = True
            self.timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._lock:
            self._done = True  # nothing is said after this, so an error line is never followed by it
        if self.timer is not None:
            self.timer.cancel()
            self.timer.join()
            self.timer = None
