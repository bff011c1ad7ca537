"""The interactive client: the curses chat screen's loop, and :func:`run_tui`.

Everything happens on one thread. A selector waits on the terminal (stdin),
the server socket and a :class:`~chatpair.netutil.Waker` (poked by SIGWINCH
and by the reconnect thread); every change redraws the whole screen from
state (:mod:`.screen`), so a message arriving never touches what the person
is typing. The state itself (:mod:`.widgets`), the key map (:mod:`.keys`)
and the connection with its reconnecting (:mod:`.link`) are separate and
mostly free of curses.

The terminal is always given back: :func:`run_tui` saves the termios modes
before curses starts and restores them in a ``finally``, after Ctrl-C,
Ctrl-D, /quit, SIGTERM, or an exception.

Reconnecting: when the connection is lost (server gone, ERROR shutdown or
timeout), the UI says so and retries with exponential backoff, then says
hello again with the same name and room. A refusal that would repeat
(a bad name...) is not retried. When the server keeps a session for us
(PROTOCOL.md section 6), a dropped connection is resumed instead: the status
line says "reconnecting...", lines typed meanwhile are shown and sent once
the connection is back, and the conversation goes on with nothing missing or
doubled; the status line also says when the partner is away. An outage is
told in the conversation by its first line and its first failed attempt,
then by one line when the connection is back (or given up); the attempts in
between only count up in the status line.

A message entered while there is no partner leaves the input line at once
(it is not lost: one line says so) and is sent, in order, once we are paired.
"""

from __future__ import annotations

import locale
import os
import selectors
import signal
import sys
import time
from typing import Any

from chatpair.client.commands import HELP_TEXT, parse_input
from chatpair.client.config import ClientConfig
from chatpair.client.pipe import PipeClient, show_early
from chatpair.client.present import Line, LineStyle, Presenter, Transcript
from chatpair.client.progress import Connecting
from chatpair.client.session import Connection, connect, final_error
from chatpair.client.tui.keys import KeyAction, Paste, PasteReader, apply_key
from chatpair.client.tui.link import Failure, Link, is_fatal
from chatpair.client.tui.outage import Outage
from chatpair.client.tui.screen import Painter, partner_text, set_paste, status_line, want_color
from chatpair.client.trust import ask_in_terminal
from chatpair.client.tui.widgets import ChatLog, InputLine
from chatpair.errors import ChatpairError
from chatpair.netutil import Waker
from chatpair.proto import LineKind, sanitize
from chatpair.proto.events import FINAL_EVENTS, Closed, Event, Pong, ServerError, Waiting, Welcome

try:  # curses is missing on Windows and in some minimal Pythons: pipe mode is the fallback
    import curses
except ImportError:  # pragma: no cover - depends on the platform
    curses = None  # type: ignore[assignment]

#: RTT in the status line is refreshed this often (a PING is 10 bytes).
PING_EVERY = 10.0
#: The loop looks at its timers at least this often (the status line's countdown).
TICK = 1.0


def available() -> bool:
    """True if curses can run here (the caller has already checked for a tty)."""
    return curses is not None and os.environ.get("TERM", "") not in ("", "dumb")


class TuiApp:
    """The chat screen's loop. ``run()`` returns the exit code; ``close()`` always follows."""

    def __init__(self, scr: Any, conn: Connection, config: ClientConfig, *, color: bool,
                 reconnect: bool, transcript: Transcript) -> None:
        self.scr = scr
        self.first_conn: Connection | None = conn  # attached when run() starts
        self.config = config
        self.reconnect = reconnect
        self.transcript = transcript
        self.painter = Painter(scr, color)
        self.log = ChatLog()
        self.line = InputLine()
        self.paste = PasteReader()
        self.presenter = Presenter(config.name)
        self.rtt: float | None = None
        self.show_next_pong = False
        self.next_ping = time.monotonic() + TICK
        self.exit_code = 0
        self.done = False
        #: After a final error: the next key leaves (so the error can be read first).
        self.done_after_key = False
        self.failure: ChatpairError | None = None
        self.resized = False
        self.sel = selectors.DefaultSelector()
        self.waker = Waker()
        self.link = Link(config, self.sel, self.waker.wake, self.on_conn_ready)
        self.outage = Outage(self.link, self.presenter, self.show)

    # -- plumbing ------------------------------------------------------------

    def on_sigwinch(self, signum: int, frame: Any) -> None:
        self.resized = True
        self.waker.wake()

    def show(self, lines: list[Line]) -> None:
        for line in lines:
            self.log.add(line)
            self.transcript.write(line)

    def say(self, text: str, kind: LineStyle = LineStyle.NOTICE) -> None:
        self.show([Line(kind, text)])

    def redraw(self) -> None:
        partner = partner_text(self.presenter) if self.link.conn else self.link.state(time.monotonic())
        rtt = self.rtt if self.link.conn else None
        self.painter.draw(self.log, status_line(self.config, partner, rtt), self.line)

    # -- events from the server ------------------------------------------------

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, Pong):
            self.rtt = ev.rtt
            if not self.show_next_pong:
                return
            self.show_next_pong = False
        if isinstance(ev, Welcome):
            return
        if isinstance(ev, Waiting):
            self.link.welcomed()
        if isinstance(ev, FINAL_EVENTS) and self.reconnect and (told := self.link.drop(ev, time.monotonic())):
            self.rtt = None
            self.show(self.presenter.lines(told))  # not the error: we are resuming
            return
        self.show(self.presenter.lines(ev))
        if isinstance(ev, FINAL_EVENTS):
            self.lost(ev)
        while self.presenter.paired and self.link.unpaired and self.link.conn is not None:
            self.send_message(self.link.unpaired.popleft())  # typed while waiting: now there is someone

    def lost(self, ev: ServerError | Closed) -> None:
        self.link.detach()
        self.rtt = None
        failure = final_error(self.config.label, ev)  # the error (and exit code) pipe mode gives
        fatal = is_fatal(failure)
        if not self.reconnect or fatal:
            self.give_up(failure, "not reconnecting (press any key to leave)" if fatal else
                         "connection lost; not reconnecting (--no-reconnect); press any key to leave")
            return
        self.outage.schedule_retry()

    def give_up(self, failure: ChatpairError, why: str) -> None:
        self.failure = failure
        self.exit_code = failure.exit_code
        self.say(why, LineStyle.ERROR)
        self.done_after_key = True

    def on_wake(self, mask: int) -> None:
        """The reconnect thread finished an attempt (or a signal woke us)."""
        self.waker.drain()
        for result in self.link.results():
            if self.done:
                if isinstance(result, Connection):
                    result.close()
            elif isinstance(result, Connection):
                self.attach(result)
                if self.link.plan is None:
                    self.say(f"reconnected to {self.config.label}")
                self.link.plan = None  # resumed: RESUMED says so
                for ev in result.receive():
                    self.on_event(ev)
            else:
                self.on_failed_attempt(result)

    def on_failed_attempt(self, failure: Failure) -> None:
        if (fatal := self.outage.failed_attempt(failure)) is not None:
            self.give_up(fatal, f"{fatal}; not reconnecting (press any key to leave)")

    def attach(self, conn: Connection) -> None:
        self.link.attach(conn)
        self.next_ping = time.monotonic() + TICK

    # -- keys ------------------------------------------------------------------

    def on_key(self, key: str | int) -> None:
        if self.done_after_key:
            self.done = True
            return
        action = apply_key(self.line, key)
        page = max(1, self.scr.getmaxyx()[0] - 3)
        if action in (KeyAction.PAGE_UP, KeyAction.PAGE_DOWN):
            self.log.scroll_by(page if action is KeyAction.PAGE_UP else -page)  # "N new messages" below
        elif action is KeyAction.ENTER:
            self.on_enter()
        elif action is KeyAction.QUIT:
            self.done = True
        elif action is KeyAction.REPAINT:
            self.scr.clear()
        elif action in (KeyAction.RESIZE, KeyAction.SUSPEND):
            self.resized = action is KeyAction.RESIZE or self.painter.suspend()  # Ctrl-Z: back after `fg`

    def on_enter(self) -> None:
        cmd = parse_input(self.line.text)
        if cmd.kind in (LineKind.EMPTY, LineKind.HELP, LineKind.UNKNOWN, LineKind.QUIT):
            self.line.take()
            if cmd.kind is LineKind.QUIT:
                self.done = True
            elif cmd.kind is not LineKind.EMPTY:
                prefix = f"unknown command {cmd.text}; " if cmd.kind is LineKind.UNKNOWN else ""
                self.say(prefix + HELP_TEXT)
            return
        conn = self.link.conn
        if conn is None and not (self.link.plan is not None and cmd.kind is LineKind.MSG):  # (resuming: kept)
            self.say("not connected; your line stays below: press Enter again once reconnected", LineStyle.ERROR)
            return
        self.line.take()
        if cmd.kind is LineKind.MSG and conn is not None and not self.presenter.paired:
            self.link.unpaired.append(cmd.text)
            self.say("you have no partner right now; your message will be sent once you are paired")
            return
        if cmd.kind is LineKind.MSG:
            self.send_message(cmd.text)
            return
        try:
            if cmd.kind is LineKind.NEXT and conn is not None:
                conn.send_next()
                self.show(self.presenter.left_by_us())
            elif cmd.kind is LineKind.PING and conn is not None:
                self.show_next_pong = True
                conn.send_ping()
        except ChatpairError as err:
            self.on_event(Closed(str(err)))

    def send_message(self, text: str) -> None:
        """Show it as ours and send it: now, or when the connection is back (and flow control allows)."""
        self.show(self.presenter.own(sanitize(text)))  # first: a message whose send fails goes again
        self.link.held.append(text)
        try:
            self.link.send_held()
        except ChatpairError as err:
            self.on_event(Closed(str(err)))

    # -- the loop ----------------------------------------------------------------

    def read_keys(self) -> None:
        while not self.done:
            try:
                key = self.scr.get_wch()
            except curses.error:
                return  # nothing more typed
            for got in self.paste.feed(key):  # a bracketed paste is one insertion: Enter sends it whole
                self.line.paste(got.text) if isinstance(got, Paste) else self.on_key(got)

    def timers(self, now: float) -> None:
        conn = self.link.conn
        try:
            if conn is not None and now >= self.next_ping:
                self.next_ping = now + PING_EVERY
                conn.send_ping()
            self.link.send_held()
        except ChatpairError as err:
            self.on_event(Closed(str(err)))
        if self.link.conn is not None:
            for ev in self.link.conn.tick(now):  # a resumable session's ACKs and keepalive
                self.on_event(ev)
        self.link.retry_if_due(now)

    def on_conn_ready(self, mask: int) -> None:
        conn = self.link.conn
        if conn is None:
            return  # lost while handling an earlier event of the same select
        try:
            if mask & selectors.EVENT_WRITE:
                conn.flush()
        except ChatpairError as err:
            self.on_event(Closed(str(err)))
            return
        if mask & selectors.EVENT_READ:
            for ev in conn.receive():
                self.on_event(ev)

    def run(self) -> int:
        # Keys are read after every select (curses may hold keys it already
        # read from the fd); the registration is only there to wake us.
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, lambda mask: None)
        self.sel.register(self.waker.reader, selectors.EVENT_READ, self.on_wake)
        conn, self.first_conn = self.first_conn, None
        assert conn is not None, "run() is called once"
        self.attach(conn)
        for ev in conn.receive():
            self.on_event(ev)
        self.redraw()
        while not self.done:
            now = time.monotonic()
            self.timers(now)
            deadlines = [self.next_ping if self.link.conn else now + TICK, now + TICK, *self.link.wake_times(now)]
            timeout = max(0.0, min(deadlines) - time.monotonic())
            for key, mask in self.sel.select(timeout):
                key.data(mask)
            self.read_keys()
            if self.resized:
                self.resized = False
                self.painter.resize()
            if not self.done:
                self.redraw()
        return self.exit_code

    def close(self) -> None:
        """Say BYE if connected; stop the reconnect thread; close everything."""
        if self.first_conn is not None:  # run() never started
            self.first_conn.bye()
            self.first_conn = None
        self.link.close()
        self.sel.close()
        self.waker.close()


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
    heard: list[Event] = []
    try:
        with Connecting(config.label, at_once=True):
            conn = connect(config, heard, ask=ask_in_terminal)  # asks about an unknown certificate
    except ChatpairError:
        show_early(heard, sys.stdout.buffer, config.name)  # curses is not started yet: plain lines
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
            _restore_tty(saved)
            return PipeClient(conn, sys.stdout.buffer, transcript=transcript).run()
        curses.noecho()
        curses.raw()  # Ctrl-C and Ctrl-Z are keys here: Ctrl-C says BYE instead of dying
        scr.keypad(True)
        scr.nodelay(True)
        set_paste(True)
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
            set_paste(False)
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
        if app is not None and scr is not None:
            print_conversation(app.log.lines)
        if app is not None and app.failure is not None:
            raise app.failure


def print_conversation(lines: list[Line]) -> None:
    """After the chat screen is gone: the conversation, as plain lines, so it stays readable."""
    try:
        for line in lines:
            sys.stdout.write(line.plain() + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


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
        pass  # the terminal is gone: nothing left to restore
