"""The main process's terminal: "press any key to stop", and whether there is a terminal.

POSIX puts the terminal in cbreak mode (keys arrive one by one, Ctrl-C still
sends SIGINT) and polls it with ``select``; Windows polls ``msvcrt``. Nothing
here touches a terminal the server does not own in the foreground.
"""

from __future__ import annotations

import os
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
        if not self.active:
            return False
        if os.name == "nt":
            import msvcrt

            if msvcrt.kbhit():  # type: ignore[attr-defined]
                msvcrt.getwch()  # type: ignore[attr-defined]
                return True
            return False
        import select

        try:
            ready, _, _ = select.select([self._fd], [], [], 0)
            if ready:
                os.read(self._fd, 64)  # b"" once the terminal hung up: a reason to stop too
                return True
        except OSError:
            return True  # the terminal is gone
        return False

    def restore(self) -> None:
        if self._saved is not None:
            import termios

            saved, self._saved = self._saved, None
            try:
                termios.tcsetattr(self._fd, termios.TCSADRAIN, saved)
            except (termios.error, OSError):
                pass  # the terminal hung up: there is nothing left to restore


def stdin_is_terminal(stream: TextIO | None) -> bool:
    """Whether the server runs in a terminal (SIGHUP then means it went away)."""
    try:
        return stream is not None and os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
