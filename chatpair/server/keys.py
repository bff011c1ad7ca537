"""The main process's terminal: "press any key to stop" (it asks first), and whether there is a terminal.

POSIX puts the terminal in cbreak mode (keys arrive one by one, Ctrl-C still
sends SIGINT) and polls it with ``select``; Windows polls ``msvcrt``. Nothing
here touches a terminal the server does not own in the foreground.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TextIO


class KeyWatcher:
    """'Press any key to stop' for a terminal in the foreground; inert otherwise.

    Callers: check :attr:`active`, poll :meth:`pressed`, and always call
    :meth:`restore` (it gives the terminal its settings back).
    """

    def __init__(self, stream: TextIO) -> None:
        self.active = False
        self._fd = -1
        self._saved: list | None = None  # termios settings to restore; None: nothing changed
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            return
        if not os.isatty(fd):
            return
        if os.name == "nt":
            self.active = True
            return
        try:
            import termios
            import tty

            if os.getpgrp() != os.tcgetpgrp(fd):
                return  # in the background: reading the terminal would stop us (SIGTTIN)
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)  # keys arrive one by one; Ctrl-C still sends SIGINT
        except (ImportError, OSError):
            return
        self._fd = fd
        self.active = True

    def pressed(self) -> bool:
        return self.read() is not None

    def read(self) -> str | None:
        """The key(s) pressed since the last call; None: none; "": the terminal is gone."""
        if not self.active:
            return None
        if os.name == "nt":
            import msvcrt

            if msvcrt.kbhit():  # type: ignore[attr-defined]
                return msvcrt.getwch() or " "  # type: ignore[attr-defined]
            return None
        import select

        try:
            ready, _, _ = select.select([self._fd], [], [], 0)
            if ready:
                # b"" once the terminal hung up
                return os.read(self._fd, 64).decode("utf-8", "replace")
        except OSError:
            return ""  # the terminal is gone
        return None

    def discard(self) -> None:
        """Drop keys typed ahead, so only a key pressed after a question answers it."""
        if not self.active:
            return
        try:
            if os.name == "nt":
                import msvcrt

                while msvcrt.kbhit():  # type: ignore[attr-defined]
                    msvcrt.getwch()  # type: ignore[attr-defined]
            else:
                import termios

                termios.tcflush(self._fd, termios.TCIFLUSH)
        except OSError:
            pass

    def restore(self) -> None:
        if self._saved is not None:
            import termios

            saved, self._saved = self._saved, None
            try:
                termios.tcsetattr(self._fd, termios.TCSADRAIN, saved)
            except (termios.error, OSError):
                pass  # the terminal hung up: there is nothing left to restore


class StopPrompt:
    """'Any key stops the server', with a question first: ``poll`` returns True to stop.

    A key asks ``stop the server and disconnect N clients? [y/N]`` (N from
    ``count``; None leaves the number out); ``y`` stops, any other key (or no
    answer for ``answer_seconds``) says ``still running``. With no client
    connected a key stops at once. Never blocks: :meth:`poll` is called by the
    supervising loop, which still reacts to signals while the question is shown.
    """

    def __init__(self, keys: KeyWatcher, count: Callable[[], int | None], out: TextIO,
                 answer_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.keys, self.count, self.out = keys, count, out
        self.answer_seconds, self.clock = answer_seconds, clock
        self.deadline: float | None = None  # set while the question waits for its answer

    def _say(self, text: str, end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    def poll(self) -> bool:
        key = self.keys.read()
        if key == "":
            return True  # the terminal is gone: nobody is left to answer
        if self.deadline is None:
            if key is None:
                return False
            clients = self.count()
            if clients == 0:
                self._say("no clients connected; stopping")
                return True
            what = f"disconnect {clients} client{'s' if clients != 1 else ''}" if clients is not None else ""
            self.keys.discard()
            self._say(f"stop the server{' and ' + what if what else ''}? [y/N] ", end="")
            self.deadline = self.clock() + self.answer_seconds
            return False
        if key is None:
            if self.clock() < self.deadline:
                return False
            self._say("")
            self._say("no answer: still running")
        elif key in ("y", "Y"):
            self._say("y")
            return True
        else:
            self._say("")
            self._say("still running")
        self.deadline = None
        return False


def stdin_is_terminal(stream: TextIO | None) -> bool:
    """Whether the server runs in a terminal (SIGHUP then means it went away)."""
    try:
        return stream is not None and os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
