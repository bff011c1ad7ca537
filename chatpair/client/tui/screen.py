"""Drawing the chat screen with curses: the only module that calls drawing functions.

Layout (rows from the top)::

    0 .. h-3   the conversation, newest at the bottom, wrapped by cells
               (scrolled back: "N new messages below (PgDn)" on its last row)
    h-2        status: server, your name, partner (or "waiting..."), RTT
    h-1        "> " and the line being typed

Every change redraws the whole screen from state (:mod:`.widgets`), so a
message arriving never touches what the person is typing.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from chatpair.client.config import ClientConfig
from chatpair.client.present import LineStyle, Presenter, format_rtt
from chatpair.client.tui.keys import DISABLE_PASTE, ENABLE_PASTE
from chatpair.client.tui.terminal import ZWJ, clip, cluster_width, clusters, input_view, str_width, wrap
from chatpair.client.tui.widgets import ChatLog, InputLine
from chatpair.proto import sanitize

try:  # curses is missing on Windows and in some minimal Pythons: pipe mode is the fallback
    import curses
except ImportError:  # pragma: no cover - depends on the platform
    curses = None  # type: ignore[assignment]

PROMPT = "> "
#: How a line break (from a paste) is shown in the input line.
NEWLINE_MARK = "\u21b5"


def set_paste(on: bool) -> None:
    """Ask the terminal for bracketed paste (or stop asking); terminals without it ignore this."""
    try:
        sys.stdout.write(ENABLE_PASTE if on else DISABLE_PASTE)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def want_color(color: bool | None) -> bool:
    """--no-color wins, then NO_COLOR (any non-empty value, see no-color.org)."""
    if color is False:
        return False
    return not os.environ.get("NO_COLOR")


def status_line(config: ClientConfig, partner: str, rtt: float | None) -> str:
    """The status row: server, your name and room, ``partner`` as given, round-trip time."""
    shown_rtt = f"rtt {format_rtt(rtt)}" if rtt is not None else "rtt -"
    room = f" | room {config.room}" if config.room else ""
    return f" {config.label} | you: {sanitize(config.name, False)}{room} | {partner} | {shown_rtt} | /help"


def partner_text(presenter: Presenter) -> str:
    """The status line's partner part while connected: who, and whether they are away."""
    if not presenter.paired:
        return "waiting..."
    return f"partner: {presenter.peer}" + (" (away)" if presenter.away else "")


class Painter:
    """Draws the state with curses."""

    def __init__(self, scr: Any, color: bool) -> None:
        self.scr = scr
        #: Clusters joined by ZWJ on screen now, as (row, column, text): curses would drop
        #: the joiners, so they are drawn as blanks of their width and written after refresh.
        self.aside: list[tuple[int, int, str]] = []
        self.plain = curses.A_NORMAL
        self.status = curses.A_REVERSE
        self.styles = {LineStyle.MESSAGE: curses.A_BOLD, LineStyle.OWN: curses.A_BOLD,
                       LineStyle.NOTICE: curses.A_DIM, LineStyle.ERROR: curses.A_BOLD}
        if color and curses.has_colors():
            try:
                curses.start_color()
                curses.use_default_colors()
                bg = -1
            except curses.error:
                bg = curses.COLOR_BLACK
            for n, fg in ((1, curses.COLOR_CYAN), (2, curses.COLOR_GREEN), (3, curses.COLOR_YELLOW),
                          (4, curses.COLOR_RED)):
                curses.init_pair(n, fg, bg)
            self.styles.update({LineStyle.MESSAGE: curses.color_pair(1) | curses.A_BOLD,
                                LineStyle.OWN: curses.color_pair(2) | curses.A_BOLD,
                                LineStyle.NOTICE: curses.color_pair(3),
                                LineStyle.ERROR: curses.color_pair(4) | curses.A_BOLD})

    def put(self, y: int, x: int, text: str, attr: int) -> None:
        if not text.isascii():
            text = self._set_aside(y, x, text)
        try:
            self.scr.addstr(y, x, text, attr)
        except curses.error:
            pass  # writing the very last cell of the screen "fails" after drawing it

    def resize(self) -> None:
        """After SIGWINCH: take the terminal's new size and repaint all of it."""
        try:
            size = os.get_terminal_size(sys.__stdout__.fileno())
            curses.resizeterm(size.lines, size.columns)
        except (OSError, ValueError, curses.error):
            pass  # no size to be had: keep the old one
        self.scr.clear()  # a full repaint: the terminal may have reflowed what was there

    def _set_aside(self, y: int, x: int, text: str) -> str:
        """Clusters curses would break (it drops ZWJ) become blanks of their width, written after refresh."""
        out: list[str] = []
        for cluster in clusters(text):
            width = cluster_width(cluster)
            if ZWJ in cluster:
                self.aside.append((y, x, cluster))
                cluster = " " * width
            out.append(cluster)
            x += width
        return "".join(out)

    def _write_aside(self, cursor: tuple[int, int]) -> None:
        """Write the set-aside clusters straight to the terminal, then put the cursor back."""
        if not self.aside:
            return
        out = "".join(f"\x1b[{y + 1};{x + 1}H{cluster}" for y, x, cluster in self.aside)
        try:
            sys.stdout.write(out + f"\x1b[{cursor[0] + 1};{cursor[1] + 1}H")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass

    def suspend(self) -> bool:
        """Ctrl-Z: give the terminal back, stop like any job, take it again on ``fg`` (SIGCONT); False."""
        if not hasattr(signal, "SIGTSTP"):
            return False  # no job control here (Windows)
        curses.def_prog_mode()
        set_paste(False)
        curses.endwin()
        os.kill(0, signal.SIGTSTP)  # the whole job stops, as a shell's Ctrl-Z would; SIGCONT resumes here
        curses.reset_prog_mode()
        set_paste(True)
        self.resize()  # the size may have changed meanwhile: repaint all of it
        return False

    def draw(self, log: ChatLog, status: str, line: InputLine) -> None:
        h, w = self.scr.getmaxyx()
        stale = {y for y, _, _ in self.aside}  # curses does not know what is there: repaint those rows
        self.aside.clear()
        self.scr.erase()
        if h < 2 or w < 4:
            self.scr.refresh()
            return
        body = h - 2
        for y, row in enumerate(log.rows(w, body)):
            if row.name_len:  # only the name is styled in a message row
                self.put(y, 0, row.text[:row.name_len], self.styles[row.kind])
                self.put(y, str_width(row.text[:row.name_len]), row.text[row.name_len:], self.plain)
            else:
                notice = row.kind in (LineStyle.NOTICE, LineStyle.ERROR)
                self.put(y, 0, row.text, self.styles[row.kind] if notice else self.plain)
        if log.scroll and log.unseen:  # scrolled back while the partner spoke: say so, over the last row
            many = "s" if log.unseen > 1 else ""
            note = clip(f" {log.unseen} new message{many} below (PgDn) ", w)
            self.put(body - 1, max(0, w - str_width(note)), note, self.status)
        status_text = wrap(status, w)[0]
        self.put(h - 2, 0, status_text + " " * (w - str_width(status_text)), self.status)
        room = w - str_width(PROMPT)
        shown = [NEWLINE_MARK if ch == "\n" else ch for ch in line.chars]  # a pasted line break
        line.offset, col = input_view(shown, line.cursor, room, line.offset)
        visible = clip("".join(shown[line.offset:]), room - 1)
        self.put(h - 1, 0, PROMPT + visible, self.plain)
        cursor = (h - 1, min(w - 1, str_width(PROMPT) + col))
        try:
            self.scr.move(*cursor)
        except curses.error:
            pass
        for y in stale:
            if y < h:
                self.scr.redrawln(y, 1)
        self.scr.refresh()
        self._write_aside(cursor)
