"""What a key does on the chat screen: readline-style editing, and the keys the app handles.

:func:`apply_key` edits the :class:`~chatpair.client.tui.widgets.InputLine`
for editing keys and returns a :class:`KeyAction` for the rest (Enter,
leaving, scrolling...), so the key map is in one place and the app only
acts on what is not editing. docs/client.md lists the keys.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from chatpair.client.tui.widgets import InputLine

try:  # curses is missing on Windows and in some minimal Pythons: pipe mode is the fallback
    import curses
except ImportError:  # pragma: no cover - depends on the platform
    curses = None  # type: ignore[assignment]


class KeyAction(enum.Enum):
    """What the app must do after a key; EDITED: nothing but redraw."""

    EDITED = "edited"
    ENTER = "enter"
    QUIT = "quit"
    REPAINT = "repaint"  # Ctrl-L
    PAGE_UP = "page_up"
    PAGE_DOWN = "page_down"
    RESIZE = "resize"
    SUSPEND = "suspend"  # Ctrl-Z (raw mode: a key, not a signal)


#: Bracketed paste (xterm, tmux, most terminals once ``ENABLE_PASTE`` is sent):
#: a paste arrives between these, so its line breaks are text, not Enter.
ENABLE_PASTE = "\x1b[?2004h"
DISABLE_PASTE = "\x1b[?2004l"
PASTE_START = "\x1b[200~"
PASTE_END = "\x1b[201~"


@dataclass(frozen=True)
class Paste:
    """Text pasted in one go (bracketed paste): one insertion, line breaks kept."""

    text: str


class PasteReader:
    """Finds bracketed pastes in the keys from ``get_wch()``.

    :meth:`feed` takes one key and returns what it completes: keys to
    handle as typed, or one :class:`Paste`. A key that might begin
    :data:`PASTE_START` (ESC, then ``[2``...) is held until it does or
    cannot; inside a paste everything is text until :data:`PASTE_END`.
    """

    def __init__(self) -> None:
        self.pending = ""  # a possible start of PASTE_START
        self.text: list[str] | None = None  # inside a paste: what it holds so far

    def feed(self, key: str | int) -> list[str | int | Paste]:
        if self.text is not None:
            if isinstance(key, str):
                self.text.append(key)
                if key == "~" and "".join(self.text[-len(PASTE_END):]) == PASTE_END:
                    text, self.text = "".join(self.text[:-len(PASTE_END)]), None
                    return [Paste(text)]
            return []
        if isinstance(key, str) and PASTE_START.startswith(self.pending + key):
            self.pending += key
            if self.pending == PASTE_START:
                self.pending, self.text = "", []
            return []
        held: list[str | int | Paste] = list(self.pending)
        self.pending = ""
        if isinstance(key, str) and key == PASTE_START[0]:
            self.pending = key  # ESC again: it may begin a paste
            return held
        return held + [key]


def apply_key(line: InputLine, key: str | int) -> KeyAction:
    """Apply one key from ``get_wch()`` (a character, or a curses KEY_ code)."""
    if isinstance(key, str) and (len(key) == 1 and ord(key) < 0x20 or key == "\x7f"):
        return _control(line, key)
    if isinstance(key, str):
        line.insert(key)
        return KeyAction.EDITED
    edits: dict[int, Callable[[], None]] = {
        curses.KEY_LEFT: line.left, curses.KEY_RIGHT: line.right, curses.KEY_HOME: line.home,
        curses.KEY_END: line.end, curses.KEY_BACKSPACE: line.backspace, curses.KEY_DC: line.delete,
        curses.KEY_UP: line.history_up, curses.KEY_DOWN: line.history_down,
    }
    if key in edits:
        edits[key]()
        return KeyAction.EDITED
    actions = {curses.KEY_ENTER: KeyAction.ENTER, curses.KEY_PPAGE: KeyAction.PAGE_UP,
               curses.KEY_NPAGE: KeyAction.PAGE_DOWN, curses.KEY_RESIZE: KeyAction.RESIZE}
    return actions.get(key, KeyAction.EDITED)


def _control(line: InputLine, key: str) -> KeyAction:
    """Control characters: Emacs/readline keys, Enter, Ctrl-C and Ctrl-D."""
    if key == "\x04":  # Ctrl-D: leave on an empty line, else delete like readline
        if not line.chars:
            return KeyAction.QUIT
        line.delete()
        return KeyAction.EDITED
    actions = {"\r": KeyAction.ENTER, "\n": KeyAction.ENTER, "\x0c": KeyAction.REPAINT,
               "\x03": KeyAction.QUIT, "\x1a": KeyAction.SUSPEND}  # Ctrl-C is a key here (raw mode): leave with BYE
    if key in actions:
        return actions[key]
    edits: dict[str, Callable[[], None]] = {
        "\x7f": line.backspace, "\x08": line.backspace, "\x01": line.home, "\x05": line.end,
        "\x02": line.left, "\x06": line.right, "\x15": line.kill_to_start, "\x17": line.kill_word,
        "\x0b": line.kill_to_end, "\x10": line.history_up, "\x0e": line.history_down,
    }
    if key in edits:
        edits[key]()
    return KeyAction.EDITED
