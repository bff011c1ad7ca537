"""The chat screen's state, without curses: the input line and the conversation.

:class:`InputLine` is the line being typed (editing keys, history);
:class:`ChatLog` is the conversation and its layout into screen rows by
cells (:mod:`chatpair.client.tui.terminal`). Both are plain Python, tested
without a terminal; :mod:`chatpair.client.tui.screen` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatpair.client.present import Line, LineStyle
from chatpair.client.tui.terminal import boundaries, expand_tabs, wrap

#: Lines of conversation kept (older ones scroll away for good).
MAX_LOG = 2000
#: Typed lines kept for Up/Down.
MAX_HISTORY = 500


class InputLine:
    """The line being typed: editing keys and history, no drawing."""

    def __init__(self) -> None:
        self.chars: list[str] = []
        self.cursor = 0
        self.offset = 0  # first character shown (horizontal scrolling)
        self.history: list[str] = []
        self._hist_pos = 0  # == len(history) when editing a fresh line
        self._draft = ""

    @property
    def text(self) -> str:
        return "".join(self.chars)

    def set_text(self, text: str) -> None:
        self.chars = list(text)
        self.cursor = len(self.chars)

    def insert(self, text: str) -> None:
        # Controls typed or pasted never enter the line (they would reach the screen).
        clean = [ch for ch in text if ch >= " " and not 0x7F <= ord(ch) < 0xA0]
        self.chars[self.cursor:self.cursor] = clean
        self.cursor += len(clean)

    def paste(self, text: str) -> None:
        """A bracketed paste: inserted whole; its line breaks stay (the message keeps them).

        CRLF and CR become LF, a tab becomes four spaces; other controls are dropped.
        """
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
        clean = [ch for ch in text if ch == "\n" or ch >= " " and not 0x7F <= ord(ch) < 0xA0]
        self.chars[self.cursor:self.cursor] = clean
        self.cursor += len(clean)

    def left(self) -> None:
        """To the start of the cluster before the cursor (a family emoji is one step)."""
        self.cursor = max((b for b in boundaries(self.chars) if b < self.cursor), default=0)

    def right(self) -> None:
        self.cursor = min((b for b in boundaries(self.chars) if b > self.cursor), default=len(self.chars))

    def home(self) -> None:
        self.cursor = 0

    def end(self) -> None:
        self.cursor = len(self.chars)

    def backspace(self) -> None:
        if self.cursor > 0:
            start = self.cursor
            self.left()
            del self.chars[self.cursor:start]

    def delete(self) -> None:
        if self.cursor < len(self.chars):
            start = self.cursor
            self.right()
            del self.chars[start:self.cursor]
            self.cursor = start

    def kill_to_start(self) -> None:
        """Ctrl-U."""
        del self.chars[:self.cursor]
        self.cursor = 0

    def kill_to_end(self) -> None:
        """Ctrl-K."""
        del self.chars[self.cursor:]

    def kill_word(self) -> None:
        """Ctrl-W: the word before the cursor and the spaces after it."""
        i = self.cursor
        while i > 0 and self.chars[i - 1] == " ":
            i -= 1
        while i > 0 and self.chars[i - 1] != " ":
            i -= 1
        del self.chars[i:self.cursor]
        self.cursor = i

    def history_up(self) -> None:
        if self._hist_pos == 0:
            return
        if self._hist_pos == len(self.history):
            self._draft = self.text
        self._hist_pos -= 1
        self.set_text(self.history[self._hist_pos])

    def history_down(self) -> None:
        if self._hist_pos >= len(self.history):
            return
        self._hist_pos += 1
        self.set_text(self.history[self._hist_pos] if self._hist_pos < len(self.history) else self._draft)

    def take(self) -> str:
        """Enter: return the line, remember it, start a fresh one."""
        text = self.text
        if text.strip() and (not self.history or self.history[-1] != text):
            self.history.append(text)
            del self.history[:-MAX_HISTORY]
        self._hist_pos = len(self.history)
        self._draft = ""
        self.chars, self.cursor, self.offset = [], 0, 0
        return text


@dataclass(frozen=True)
class Row:
    """One screen row of the conversation: text, and how much of it is the name."""

    text: str
    kind: LineStyle
    name_len: int = 0


class ChatLog:
    """The conversation as :class:`Line` s, and its layout into rows.

    While scrolled back (``scroll`` > 0) the view stays still as lines
    arrive, and :attr:`unseen` counts the partner's messages below it
    ("N new messages"), until the view is back at the bottom.
    """

    def __init__(self) -> None:
        self.lines: list[Line] = []
        self.scroll = 0  # rows scrolled back from the bottom (PgUp/PgDn)
        self.width = 80  # of the last layout: how many rows a new line adds
        #: Messages from the partner that arrived below a scrolled-back view.
        self.unseen = 0

    def add(self, line: Line) -> None:
        self.lines.append(line)
        del self.lines[:-MAX_LOG]
        if self.scroll:
            self.scroll += len(self.layout_line(line, self.width))  # keep the view still while scrolled back
            if line.kind is LineStyle.MESSAGE:
                self.unseen += 1

    def scroll_by(self, rows: int) -> None:
        """PgUp (positive) or PgDn (negative); at the bottom nothing is unseen."""
        self.scroll = max(0, self.scroll + rows)
        if not self.scroll:
            self.unseen = 0

    @staticmethod
    def layout_line(line: Line, width: int) -> list[Row]:
        text = expand_tabs(line.text)
        if line.kind in (LineStyle.MESSAGE, LineStyle.OWN):
            # A no-break space after the name: never a row holding just "bob:".
            prefix = f"{line.name}:\u00a0"
            rows = wrap(prefix + text, width)
            rows[0] = rows[0].replace("\u00a0", " ", 1)
            first = min(len(prefix), len(rows[0]))
            return [Row(rows[0], line.kind, first)] + [Row(r, line.kind) for r in rows[1:]]
        return [Row(r, line.kind) for r in wrap(f"* {text}", width)]

    def rows(self, width: int, height: int) -> list[Row]:
        """The ``height`` rows to show (fewer if the log is short), oldest first."""
        self.width = width
        need = height + self.scroll
        out: list[Row] = []
        for line in reversed(self.lines):
            out[:0] = self.layout_line(line, width)
            if len(out) >= need:
                break
        self.scroll = max(0, min(self.scroll, len(out) - height))
        if not self.scroll:
            self.unseen = 0
        end = len(out) - self.scroll
        return out[max(0, end - height):end]
