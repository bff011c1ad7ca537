"""The interactive client: a curses chat screen.

Layout (rows from the top)::

    0 .. h-3   the conversation, newest at the bottom, wrapped by cells
    h-2        status: server, your name, partner (or "waiting..."), RTT
    h-1        "> " and the line being typed

Everything happens on one thread. A selector waits on the terminal (stdin),
the server socket and a wake-up socketpair (poked by SIGWINCH and by the
reconnect thread); every change redraws the whole screen from state, so a
message arriving never touches what the person is typing. The state itself
(:class:`InputLine`, :class:`ChatLog`) is plain Python, tested without a
terminal.

The terminal is always given back: :func:`run_tui` saves the termios modes
before curses starts and restores them in a ``finally``, after Ctrl-C,
Ctrl-D, /quit, SIGTERM, or an exception.

Reconnecting: when the connection is lost (server gone, ERROR shutdown or
timeout), the UI says so and retries with exponential backoff (0.5 s
doubling to 15 s) in a helper thread owned by :class:`TuiApp` (one attempt
at a time, joined before the next and at exit), then says hello again with
the same name and room.
"""

from __future__ import annotations

import locale
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from chatpair.client import (
    HELP_TEXT,
    ClientConfig,
    Closed,
    Connection,
    Event,
    Line,
    Pong,
    Presenter,
    ServerError,
    SocketWatch,
    Transcript,
    Welcome,
    connect,
    format_rtt,
    parse_input,
    show_early,
)
from chatpair.errors import ChatpairError, ConnectError, RefusedError
from chatpair.protocol import sanitize
from chatpair.terminal import char_width, clip, expand_tabs, input_view, str_width, wrap

try:  # curses is missing on Windows and in some minimal Pythons: pipe mode is the fallback
    import curses
except ImportError:  # pragma: no cover - depends on the platform
    curses = None  # type: ignore[assignment]

#: Error codes after which trying again cannot help: the same hello would be
#: refused the same way.
FATAL_CODES = frozenset({"bad_hello", "unsupported_version", "bad_frame", "frame_too_large"})
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
#: RTT in the status line is refreshed this often (a PING is 10 bytes).
PING_EVERY = 10.0
MAX_LOG = 2000
MAX_HISTORY = 500
PROMPT = "> "


def available() -> bool:
    """True if curses can run here (the caller has already checked for a tty)."""
    return curses is not None and os.environ.get("TERM", "") not in ("", "dumb")


def want_color(color: bool | None) -> bool:
    """--no-color wins, then NO_COLOR (any non-empty value, see no-color.org)."""
    if color is False:
        return False
    return not os.environ.get("NO_COLOR")


# --------------------------------------------------------------------------
# State without curses
# --------------------------------------------------------------------------


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

    def left(self) -> None:
        # Step over zero-width characters so the cursor lands on a glyph.
        while self.cursor > 0:
            self.cursor -= 1
            if char_width(self.chars[self.cursor]) > 0:
                break

    def right(self) -> None:
        if self.cursor < len(self.chars):
            self.cursor += 1
            while self.cursor < len(self.chars) and char_width(self.chars[self.cursor]) == 0:
                self.cursor += 1

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
    kind: str
    name_len: int = 0


class ChatLog:
    """The conversation as :class:`Line` s, and its layout into rows."""

    def __init__(self) -> None:
        self.lines: list[Line] = []
        self.scroll = 0  # rows scrolled back from the bottom (PgUp/PgDn)

    def add(self, line: Line) -> None:
        self.lines.append(line)
        del self.lines[:-MAX_LOG]
        if self.scroll:
            self.scroll += len(self.layout_line(line, 80))  # keep the view still while scrolled back

    @staticmethod
    def layout_line(line: Line, width: int) -> list[Row]:
        text = expand_tabs(line.text)
        if line.kind in ("message", "self"):
            # A no-break space after the name: never a row holding just "bob:".
            prefix = f"{line.name}:\u00a0"
            rows = wrap(prefix + text, width)
            rows[0] = rows[0].replace("\u00a0", " ", 1)
            first = min(len(prefix), len(rows[0]))
            return [Row(rows[0], line.kind, first)] + [Row(r, line.kind) for r in rows[1:]]
        return [Row(r, line.kind) for r in wrap(f"* {text}", width)]

    def rows(self, width: int, height: int) -> list[Row]:
        """The ``height`` rows to show (fewer if the log is short), oldest first."""
        need = height + self.scroll
        out: list[Row] = []
        for line in reversed(self.lines):
            out[:0] = self.layout_line(line, width)
            if len(out) >= need:
                break
        self.scroll = max(0, min(self.scroll, len(out) - height))
        end = len(out) - self.scroll
        return out[max(0, end - height):end]


# --------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------


class Painter:
    """Draws the state with curses. Only this class calls drawing functions."""

    def __init__(self, scr: Any, color: bool) -> None:
        self.scr = scr
        self.attrs = {"message": curses.A_BOLD, "self": curses.A_BOLD, "notice": curses.A_DIM,
                      "error": curses.A_BOLD, "status": curses.A_REVERSE, "plain": curses.A_NORMAL}
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
            self.attrs.update({"message": curses.color_pair(1) | curses.A_BOLD,
                               "self": curses.color_pair(2) | curses.A_BOLD,
                               "notice": curses.color_pair(3), "error": curses.color_pair(4) | curses.A_BOLD})

    def put(self, y: int, x: int, text: str, attr: int) -> None:
        try:
            self.scr.addstr(y, x, text, attr)
        except curses.error:
            pass  # writing the very last cell of the screen "fails" after drawing it

    def draw(self, log: ChatLog, status: str, line: InputLine) -> None:
        h, w = self.scr.getmaxyx()
        self.scr.erase()
        if h < 2 or w < 4:
            self.scr.refresh()
            return
        body = h - 2
        for y, row in enumerate(log.rows(w, body)):
            if row.name_len:
                self.put(y, 0, row.text[:row.name_len], self.attrs[row.kind])
                self.put(y, str_width(row.text[:row.name_len]), row.text[row.name_len:], self.attrs["plain"])
            else:
                attr = self.attrs[row.kind] if row.kind in ("notice", "error") else self.attrs["plain"]
                self.put(y, 0, row.text, attr)
        status_text = wrap(status, w)[0]
        self.put(h - 2, 0, status_text + " " * (w - str_width(status_text)), self.attrs["status"])
        room = w - str_width(PROMPT)
        line.offset, col = input_view(line.chars, line.cursor, room, line.offset)
        visible = clip("".join(line.chars[line.offset:]), room - 1)
        self.put(h - 1, 0, PROMPT + visible, self.attrs["plain"])
        try:
            self.scr.move(h - 1, min(w - 1, str_width(PROMPT) + col))
        except curses.error:
            pass
        self.scr.refresh()


# --------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------


class Reconnector:
    """One connection attempt at a time, on a thread this object owns."""

    def __init__(self, config: ClientConfig, wake: Callable[[], None]) -> None:
        self.config = config
        self.wake = wake
        self.results: queue.Queue[Connection | ChatpairError] = queue.Queue()
        self.thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        self.join()
        self.thread = threading.Thread(target=self._attempt, name="chatpair-reconnect", daemon=True)
        self.thread.start()

    def _attempt(self) -> None:
        try:
            result: Connection | ChatpairError = connect(self.config)
        except ChatpairError as err:
            result = err
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


class TuiApp:
    """The chat screen's loop. ``run()`` returns the exit code."""

    def __init__(self, scr: Any, conn: Connection, config: ClientConfig, *, color: bool,
                 reconnect: bool, transcript: Transcript) -> None:
        self.scr = scr
        self.conn: Connection | None = conn
        self.config = config
        self.reconnect = reconnect
        self.transcript = transcript
        self.painter = Painter(scr, color)
        self.log = ChatLog()
        self.line = InputLine()
        self.presenter = Presenter(config.name)
        self.rtt: float | None = None
        self.show_next_pong = False
        self.next_ping = time.monotonic() + 1.0
        self.retry_at: float | None = None
        self.backoff = BACKOFF_FIRST
        self.exit_code = 0
        self.done = False
        self.failure: ChatpairError | None = None
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.resized = False
        self.reconnector = Reconnector(config, self.wake)
        self.watch: SocketWatch | None = None

    # -- plumbing ------------------------------------------------------------

    def wake(self) -> None:
        """Thread- and signal-safe: make the selector return."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # buffer full (already awake) or closing

    def on_sigwinch(self, signum: int, frame: Any) -> None:
        self.resized = True
        self.wake()

    def show(self, lines: list[Line]) -> None:
        for line in lines:
            self.log.add(line)
            self.transcript.write(line)

    def say(self, text: str, kind: str = "notice") -> None:
        self.show([Line(kind, text)])

    def status(self) -> str:
        if self.conn is None:
            if self.reconnector.busy:
                partner = "connecting..."
            elif self.retry_at is None:
                partner = "disconnected"
            else:
                partner = f"disconnected, retry in {max(0.0, self.retry_at - time.monotonic()):.0f}s"
        elif self.presenter.paired:
            partner = f"partner: {self.presenter.peer}"
        else:
            partner = "waiting..."
        rtt = f"rtt {format_rtt(self.rtt)}" if self.rtt is not None and self.conn else "rtt -"
        room = f" | room {self.config.room}" if self.config.room else ""
        return (f" {self.config.label} | you: {sanitize(self.config.name, False)}{room} | {partner} | {rtt}"
                " | /help")

    def redraw(self) -> None:
        self.painter.draw(self.log, self.status(), self.line)

    # -- events from the server ------------------------------------------------

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, Pong):
            self.rtt = ev.rtt
            if not self.show_next_pong:
                return
            self.show_next_pong = False
        if isinstance(ev, Welcome):
            return
        self.show(self.presenter.lines(ev))
        if isinstance(ev, (ServerError, Closed)):
            self.lost(ev)

    def lost(self, ev: ServerError | Closed) -> None:
        if self.conn is not None:
            self.detach()
        self.rtt = None
        fatal = isinstance(ev, ServerError) and ev.code in FATAL_CODES
        if not self.reconnect or fatal:
            # The same error (and exit code) pipe mode would give.
            if isinstance(ev, ServerError):
                self.failure = RefusedError(ev.code, f"{self.config.label}: {sanitize(ev.message, False)}")
            else:
                self.failure = ConnectError(sanitize(ev.reason, False))
            self.exit_code = self.failure.exit_code
            self.say("not reconnecting (press any key to leave)" if fatal else
                     "connection lost; not reconnecting (--no-reconnect); press any key to leave", "error")
            self.done_after_key = True
            return
        self.schedule_retry()

    def schedule_retry(self, why: str = "connection lost") -> None:
        self.retry_at = time.monotonic() + self.backoff
        self.say(f"{why}; reconnecting in {self.backoff:g}s", "error")
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def on_reconnect_result(self) -> None:
        while not self.reconnector.results.empty():
            result = self.reconnector.results.get_nowait()
            self.reconnector.join()
            if self.done:
                if isinstance(result, Connection):
                    result.close()
                continue
            if isinstance(result, Connection):
                self.attach(result)
                self.say(f"reconnected to {self.config.label}")
                self.backoff = BACKOFF_FIRST
                for ev in result.receive():
                    self.on_event(ev)
                continue
            for ev in getattr(result, "early", ()):  # what the server said before refusing (a NOTICE)
                self.show(self.presenter.lines(ev))
            if getattr(result, "code", "") in FATAL_CODES:
                self.failure = result
                self.exit_code = result.exit_code
                self.say(f"{result}; not reconnecting (press any key to leave)", "error")
                self.done_after_key = True
            else:
                self.schedule_retry(str(result))

    def attach(self, conn: Connection) -> None:
        self.conn = conn
        self.retry_at = None
        self.next_ping = time.monotonic() + 1.0
        self.watch = SocketWatch(conn, "conn")
        self.watch.set(self.sel, selectors.EVENT_READ)

    def detach(self) -> None:
        """Stop watching the connection and close it."""
        assert self.conn is not None and self.watch is not None
        self.watch.clear(self.sel)
        self.watch = None
        self.conn.close()
        self.conn = None

    def watch_conn(self, now: float) -> float | None:
        """Watch the connection for what it needs; return when to look again if reading is paused."""
        if self.conn is None or self.watch is None:
            return None
        pause = self.conn.read_pause(now)
        self.watch.set(self.sel, (0 if pause else selectors.EVENT_READ)
                       | (selectors.EVENT_WRITE if self.conn.wants_write else 0))
        return now + pause if pause else None

    # -- keys ------------------------------------------------------------------

    done_after_key = False

    def on_key(self, key: str | int) -> None:
        if self.done_after_key:
            self.done = True
            return
        line = self.line
        if isinstance(key, str) and len(key) == 1 and ord(key) < 0x20 or key == "\x7f":
            self.on_control(key)  # type: ignore[arg-type]
        elif isinstance(key, str):
            line.insert(key)
        elif key in (curses.KEY_ENTER,):
            self.on_enter()
        elif key == curses.KEY_LEFT:
            line.left()
        elif key == curses.KEY_RIGHT:
            line.right()
        elif key == curses.KEY_HOME:
            line.home()
        elif key in (curses.KEY_END,):
            line.end()
        elif key == curses.KEY_BACKSPACE:
            line.backspace()
        elif key == curses.KEY_DC:
            line.delete()
        elif key == curses.KEY_UP:
            line.history_up()
        elif key == curses.KEY_DOWN:
            line.history_down()
        elif key == curses.KEY_PPAGE:
            self.log.scroll += max(1, self.scr.getmaxyx()[0] - 3)
        elif key == curses.KEY_NPAGE:
            self.log.scroll = max(0, self.log.scroll - max(1, self.scr.getmaxyx()[0] - 3))
        elif key == curses.KEY_RESIZE:
            self.resized = True

    def on_control(self, key: str) -> None:
        line = self.line
        actions: dict[str, Callable[[], None]] = {
            "\r": self.on_enter, "\n": self.on_enter, "\x7f": line.backspace, "\x08": line.backspace,
            "\x01": line.home, "\x05": line.end, "\x02": line.left, "\x06": line.right,
            "\x15": line.kill_to_start, "\x17": line.kill_word, "\x0b": self._kill_to_end,
            "\x10": line.history_up, "\x0e": line.history_down, "\x0c": self.scr.clear,
            "\x03": self.quit,
        }
        if key == "\x04":  # Ctrl-D: leave on an empty line, else delete like readline
            self.quit() if not line.chars else line.delete()
        elif key in actions:
            actions[key]()

    def _kill_to_end(self) -> None:
        del self.line.chars[self.line.cursor:]

    def on_enter(self) -> None:
        text = self.line.text
        cmd = parse_input(text)
        if cmd.kind == "empty":
            self.line.take()
            return
        if cmd.kind in ("help", "unknown"):
            self.line.take()
            prefix = f"unknown command {cmd.text}; " if cmd.kind == "unknown" else ""
            self.say(prefix + HELP_TEXT)
            return
        if cmd.kind == "quit":
            self.line.take()
            self.quit()
            return
        if self.conn is None:
            self.say("not connected; your line is kept", "error")
            return
        if cmd.kind == "msg" and not self.presenter.paired:
            self.say("no partner yet; your line is kept until you are paired")
            return
        self.line.take()
        try:
            if cmd.kind == "msg":
                self.conn.send_msg(cmd.text)
                self.show(self.presenter.own(sanitize(cmd.text)))
            elif cmd.kind == "next":
                self.conn.send_next()
                self.show(self.presenter.left_by_us())
            elif cmd.kind == "ping":
                self.show_next_pong = True
                self.conn.send_ping()
        except ChatpairError as err:
            self.on_event(Closed(str(err)))

    def quit(self) -> None:
        self.done = True

    # -- the loop ----------------------------------------------------------------

    def read_keys(self) -> None:
        while True:
            try:
                key = self.scr.get_wch()
            except curses.error:
                return  # nothing more typed
            self.on_key(key)
            if self.done:
                return

    def timers(self, now: float) -> None:
        if self.conn is not None and now >= self.next_ping:
            self.next_ping = now + PING_EVERY
            try:
                self.conn.send_ping()
            except ChatpairError as err:
                self.on_event(Closed(str(err)))
        if self.conn is None and self.retry_at is not None and now >= self.retry_at \
                and not self.reconnector.busy:
            self.retry_at = None
            self.reconnector.start()

    def on_conn_ready(self, mask: int) -> None:
        assert self.conn is not None
        try:
            if mask & selectors.EVENT_WRITE:
                self.conn.flush()
        except ChatpairError as err:
            self.on_event(Closed(str(err)))
            return
        if mask & selectors.EVENT_READ:
            for ev in self.conn.receive():
                self.on_event(ev)

    def on_resize(self) -> None:
        self.resized = False
        try:
            size = os.get_terminal_size(sys.__stdout__.fileno())
            curses.resizeterm(size.lines, size.columns)
        except (OSError, ValueError, curses.error):
            pass
        self.scr.clear()  # a full repaint: the terminal may have reflowed what was there

    def run(self) -> int:
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "keys")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        assert self.conn is not None
        conn, self.conn = self.conn, None
        self.attach(conn)
        for ev in conn.receive():
            self.on_event(ev)
        self.redraw()
        while not self.done:
            now = time.monotonic()
            self.timers(now)
            deadlines = [self.next_ping if self.conn else now + 1.0, now + 1.0]
            if self.retry_at is not None:
                deadlines.append(self.retry_at)
            resume = self.watch_conn(now)
            if resume is not None:
                deadlines.append(resume)
            timeout = max(0.0, min(deadlines) - time.monotonic())
            for key, mask in self.sel.select(timeout):
                if key.data == "conn" and self.conn is not None:
                    self.on_conn_ready(mask)
                elif key.data == "wake":
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    self.on_reconnect_result()
            self.read_keys()  # curses may hold keys it already read from the fd
            if self.resized:
                self.on_resize()
            if not self.done:
                self.redraw()
        return self.exit_code

    def close(self) -> None:
        """Say BYE if connected; stop the reconnect thread; close everything."""
        if self.conn is not None:
            if self.watch is not None:
                self.watch.clear(self.sel)
                self.watch = None
            self.conn.bye()
            self.conn = None
        self.reconnector.stop()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()


def _install_signals(app: TuiApp) -> dict[int, Any]:
    """SIGWINCH redraws; SIGTERM/SIGHUP leave through the normal path (BYE, restore)."""
    def leave(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old: dict[int, Any] = {}
    for name, handler in (("SIGWINCH", app.on_sigwinch), ("SIGTERM", leave), ("SIGHUP", leave)):
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, handler)
    return old


def run_tui(config: ClientConfig, *, log_path: str | None = None, color: bool | None = None,
            reconnect: bool = True) -> int:
    """Connect, then run the curses UI until /quit, Ctrl-C or Ctrl-D.

    The first connection is made before curses starts, so a wrong port or a
    refused name is the same one-line error as in pipe mode.
    """
    try:
        conn = connect(config)
    except ChatpairError as err:
        show_early(err, sys.stdout.buffer, config.name)  # curses is not started yet: plain lines
        raise
    transcript = Transcript(log_path)
    locale.setlocale(locale.LC_ALL, "")  # curses needs it to draw wide characters
    os.environ.setdefault("ESCDELAY", "25")  # a lone ESC should not freeze the input for 1 s
    saved = _save_tty()
    app: TuiApp | None = None
    old_signals: dict[int, Any] = {}
    scr = None
    try:
        try:
            scr = curses.initscr()
        except curses.error:
            # No terminfo entry for this TERM: chat line by line instead.
            from chatpair.client import PipeClient

            _restore_tty(saved)
            return PipeClient(conn, sys.stdout.buffer, transcript=transcript).run()
        curses.noecho()
        curses.raw()  # Ctrl-C and Ctrl-Z are keys here: Ctrl-C says BYE instead of dying
        scr.keypad(True)
        scr.nodelay(True)
        app = TuiApp(scr, conn, config, color=want_color(color), reconnect=reconnect, transcript=transcript)
        old_signals = _install_signals(app)
        try:
            code = app.run()
        except KeyboardInterrupt:
            code = 0
        return code
    finally:
        if app is not None:
            app.close()
        else:
            conn.bye()
        if scr is not None:
            try:
                scr.keypad(False)
                curses.noraw()
                curses.echo()
                curses.endwin()
            except curses.error:
                pass
        _restore_tty(saved)
        for sig, handler in old_signals.items():
            signal.signal(sig, handler)
        transcript.close()
        if app is not None and app.failure is not None:
            raise app.failure


def _save_tty() -> Any:
    try:
        import termios

        return termios.tcgetattr(sys.stdin.fileno())
    except Exception:  # not a tty, or no termios (Windows): nothing to restore
        return None


def _restore_tty(saved: Any) -> None:
    if saved is None:
        return
    try:
        import termios

        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    except Exception:
        pass
