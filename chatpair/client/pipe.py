"""Pipe (script) mode: lines from stdin are messages or commands, events go to stdout.

One thread, one selector over stdin and the connection. Lines typed before
we are paired are held, in order, and sent once we are; end of input is a
final /quit in the same queue. Output is one line per event, as text or
(``--json``) as JSON. :func:`run_pipe` is the entry point.

Resuming (PROTOCOL.md section 6): when the connection of a resumable
session drops, one line on stderr says so and the loop goes on without a
connection: lines typed meanwhile are held; at each planned moment
(:class:`~chatpair.client.resuming.ResumePlan`) one attempt is made, its
handshake blocking the loop for at most what is left of the server's
window. Back in, the protocol sends again what the server lacks; if the
server forgot the session, one line says so and a fresh HELLO follows. At
end of input BYE waits (up to :data:`QUIT_ACK_WAIT`) for the server to
acknowledge everything we sent, so a drop at the last moment loses nothing.

SIGTERM and SIGHUP (:class:`StopSignals`) end the run as end of input does,
within :data:`QUIT_ACK_WAIT`: what was read is sent, BYE goes out (the
partner sees "left (bye)", not a lost connection), and the exit code is
128 + the signal's number (143, 129), as for Ctrl-C (130). A second signal
leaves at once.
"""

from __future__ import annotations

import collections
import json
import selectors
import signal
import sys
import threading
import time
from typing import IO, Any

from chatpair.client.commands import HELP_TEXT, parse_input
from chatpair.client.config import ClientConfig
from chatpair.client.progress import Connecting
from chatpair.client.present import Line, LineStyle, Presenter, Transcript, event_json
from chatpair.client.resuming import ResumePlan, expired_message, is_drop, is_expired
from chatpair.client.session import Connection, SocketWatch, connect, final_error
from chatpair.client.stdin import StdinSource
from chatpair.errors import ChatpairError
from chatpair.netutil import Waker
from chatpair.proto import LineCommand, LineKind
from chatpair.proto.events import FINAL_EVENTS, Closed, Event, Pong, Reconnecting, ResumeFailed, ServerError
from chatpair.proto.events import Welcome

#: Stop reading stdin while this much is waiting to be sent: the server is
#: slowing us down (flood control), so reading more would only use memory.
OUTBOX_HIGH = 1 << 20
#: ...or while this many lines are held (not paired, reconnecting, or flow control).
PENDING_HIGH = 10_000
#: At end of input, how long BYE waits for the server to acknowledge our messages.
QUIT_ACK_WAIT = 5.0


class StopSignals:
    """SIGTERM and SIGHUP in pipe mode: the first asks the loop to leave politely, a second leaves now.

    The handler only records the signal and wakes the selector (a
    :class:`~chatpair.netutil.Waker` registered on it); the loop does the
    rest (:meth:`PipeClient.step`). A second signal raises KeyboardInterrupt,
    which still sends BYE. Installed only on the main thread, and restored.
    """

    NAMES = ("SIGTERM", "SIGHUP")

    def __init__(self, sel: selectors.BaseSelector) -> None:
        self.signum: int | None = None
        self.waker = Waker()
        self.sel = sel
        sel.register(self.waker.reader, selectors.EVENT_READ, self)
        self.old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.old[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: leave now
        self.signum = signum
        self.waker.wake()

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process a signal ended."""
        return 128 + (self.signum or signal.SIGINT)

    def close(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        try:
            self.sel.unregister(self.waker.reader)
        except (KeyError, ValueError, OSError):
            pass
        self.waker.close()


def _new_selector() -> selectors.BaseSelector:
    # select() handles regular files (always readable) where epoll refuses them,
    # and we only ever watch two or three descriptors.
    return selectors.SelectSelector()


class PipeOutput:
    """What pipe mode prints: events as lines (or ``--json`` objects) on stdout, ``--log``, stderr notes."""

    def __init__(self, name: str, out: IO[bytes], json_mode: bool, transcript: Transcript | None,
                 err: IO[str] | None) -> None:
        self.out = out
        self.err = err or sys.stderr
        self.json_mode = json_mode
        self.transcript = transcript or Transcript(None)
        self.presenter = Presenter(name)

    def emit_lines(self, lines: list[Line]) -> None:
        for line in lines:
            self.transcript.write(line)
            if not self.json_mode and line.kind is not LineStyle.OWN:
                self._write(line.plain())

    def emit_json(self, obj: dict[str, Any]) -> None:
        if self.json_mode:
            self._write(json.dumps(obj, ensure_ascii=True))

    def _write(self, text: str) -> None:
        self.out.write(text.encode("utf-8", "replace") + b"\n")
        self.out.flush()

    def show(self, ev: Event) -> None:
        self.emit_json(event_json(ev))
        self.emit_lines(self.presenter.lines(ev))

    def show_final(self, ev: Event) -> None:
        """The event that ends the run: ``--json`` and ``--log`` get it; as text it is only the error line
        the caller prints on stderr (once, not also on stdout)."""
        self.emit_json(event_json(ev))
        for line in self.presenter.lines(ev):
            self.transcript.write(line)

    def tell(self, ev: Reconnecting | ResumeFailed) -> None:
        """A line about our own connection: on stderr (``--json``: also the event on stdout)."""
        self.emit_json(event_json(ev))
        for line in self.presenter.lines(ev):
            self.transcript.write(line)
            self.err.write(line.plain() + "\n")
            self.err.flush()

    def say(self, text: str, code: str = "info") -> None:
        self.emit_lines([Line(LineStyle.NOTICE, text)])
        self.emit_json({"event": "notice", "code": code, "message": text, "local": True})


class PipeClient(PipeOutput):
    """Pipe/script mode: stdin lines in, events out on stdout.

    Lines (and commands) are kept in order in ``pending``. A message waits
    at the head of the queue until we are paired, so ``printf 'hi\\n' |
    chatpair client`` delivers ``hi`` once a partner arrives. End of input
    becomes a final /quit in the same queue: BYE goes out only after every
    held line was sent. If nothing is held, end of input quits at once.
    ``conn`` is None while a dropped session is being resumed (``plan``).
    """

    def __init__(self, conn: Connection, out: IO[bytes], json_mode: bool = False,
                 transcript: Transcript | None = None, stdin_fd: int = 0, err: IO[str] | None = None) -> None:
        super().__init__(conn.config.name, out, json_mode, transcript, err)
        self.conn: Connection | None = conn
        self.config = conn.config
        self.stdin_fd = stdin_fd
        self.pending: collections.deque[LineCommand] = collections.deque()
        self.done = False
        #: A /ping holds the queue until its PONG: a script's "/ping" then
        #: end of input should print the round trip before leaving.
        self.awaiting_pong = False
        self.sel: selectors.BaseSelector = _new_selector()
        self.watch = SocketWatch(conn)
        #: The final event of a resumable connection, handled by the loop.
        self.lost: Event | None = None
        self.plan: ResumePlan | None = None
        self.quit_by: float | None = None  # end of input: BYE waits for ACKs until then
        self.stop_by: float | None = None  # SIGTERM/SIGHUP: leave by then, whatever is still held

    # -- input ---------------------------------------------------------------

    def take_line(self, line: str) -> None:
        cmd = parse_input(line)
        if cmd.kind is LineKind.EMPTY:
            return
        if cmd.kind is LineKind.UNKNOWN:
            self.say(f"unknown command {cmd.text}; {HELP_TEXT}", code="unknown_command")
            return
        if cmd.kind is LineKind.HELP:
            self.say(HELP_TEXT, code="help")
            return
        self.pending.append(cmd)

    def flush_pending(self) -> None:
        """Send queued inputs in order, stopping at a message while unpaired or held back by flow control."""
        conn = self.conn
        while conn is not None and self.pending and not self.done and not self.awaiting_pong:
            cmd = self.pending[0]
            if cmd.kind is LineKind.MSG and not (self.presenter.paired and conn.can_send):
                return
            self.pending.popleft()
            try:
                self.send(conn, cmd)
            except ChatpairError as err:
                if conn.session is None:
                    raise
                self.on_event(Closed(str(err)))  # a drop: resumed, and what was sent goes again
                return

    def send(self, conn: Connection, cmd: LineCommand) -> None:
        if cmd.kind is LineKind.MSG:
            conn.send_msg(cmd.text)
            self.emit_lines(self.presenter.own(cmd.text))
            self.emit_json({"event": "sent", "text": cmd.text})
        elif cmd.kind is LineKind.NEXT:
            conn.send_next()
            self.emit_lines(self.presenter.left_by_us())
            self.emit_json({"event": "next"})
        elif cmd.kind is LineKind.PING:
            conn.send_ping()
            self.awaiting_pong = True
        elif cmd.kind is LineKind.QUIT:
            self.done = True
            self.quit_by = time.monotonic() + QUIT_ACK_WAIT

    # -- events --------------------------------------------------------------

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, Pong):
            self.awaiting_pong = False
        if isinstance(ev, FINAL_EVENTS) and self.conn is not None and is_drop(self.conn.session, ev):
            self.lost = ev  # the loop starts resuming
            return
        if isinstance(ev, FINAL_EVENTS):
            self.show_final(ev)
            raise final_error(self.config.label, ev)
        self.show(ev)

    def on_events(self, events: list[Event]) -> None:
        for ev in events:
            self.on_event(ev)
            if self.lost is not None:
                return

    # -- resuming --------------------------------------------------------------

    def drop(self) -> None:
        """The connection of a resumable session dropped: say so, plan the attempts."""
        conn, ev = self.conn, self.lost
        assert conn is not None and conn.session is not None and isinstance(ev, (Closed, ServerError))
        self.lost, self.conn = None, None
        self.watch.clear(self.sel)
        conn.close()
        self.awaiting_pong = False  # that PING's answer will not come
        self.tell(Reconnecting(ev.reason if isinstance(ev, Closed) else ev.message))
        self.plan = ResumePlan(conn.session, time.monotonic())

    def attempt(self) -> None:
        """One attempt to resume; on success the connection is back (or, expired, afresh)."""
        plan = self.plan
        assert plan is not None
        heard: list[Event] = []
        try:
            conn = connect(plan.attempt_config(self.config, time.monotonic()), heard, plan.session)
        except ChatpairError as err:
            for ev in heard:
                self.show(ev)
            if is_expired(err):
                self.plan = None
                self.tell(ResumeFailed(expired_message(err, self.config.label), plan.session.sent.unacked))
                self.afresh()
            elif not plan.failed(time.monotonic()):
                raise plan.gave_up(self.config.label, err) from None
            return
        self.plan = None
        self.attach(conn, [ev for ev in conn.receive() if not isinstance(ev, Welcome)])

    def afresh(self) -> None:
        """A new HELLO (same name and room) after the server forgot our session."""
        heard: list[Event] = []
        try:
            conn = connect(self.config, heard)
        except ChatpairError:
            for ev in heard:
                self.show(ev)
            raise
        self.attach(conn, conn.receive())

    def attach(self, conn: Connection, events: list[Event]) -> None:
        self.conn = conn
        self.watch = SocketWatch(conn)
        self.on_events(events)

    def settled(self, now: float) -> bool:
        """At end of input: may BYE go now (everything sent, and acknowledged or waited for)?"""
        conn = self.conn
        if conn is None:  # reconnecting: wait only if something is still to be delivered
            return not self.pending and (self.plan is None or not self.plan.session.sent.unacked)
        if conn.wants_write:
            return False
        session = conn.session
        return session is None or not session.sent.unacked or now >= (self.quit_by or now)

    # -- the loop ------------------------------------------------------------

    def wait_time(self, now: float, pause: float) -> float | None:
        """How long the selector may wait: the read pause, the session's timers, the next attempt."""
        times = [now + pause] if pause else []
        if self.conn is not None and (deadline := self.conn.deadline()) is not None:
            times.append(deadline)
        if self.plan is not None:
            times.append(self.plan.retry_at)
        if self.done and self.quit_by is not None:
            times.append(self.quit_by)
        if self.stop_by is not None:
            times.append(self.stop_by)
        return max(0.0, min(times) - now) if times else None

    def stop(self, stdin: StdinSource, now: float) -> None:
        """SIGTERM/SIGHUP: read no more; what was read goes first, then /quit, all within QUIT_ACK_WAIT."""
        self.stop_by = now + QUIT_ACK_WAIT
        if not stdin.eof:
            stdin.close()
            stdin.eof = True
            self.pending.append(LineCommand(LineKind.QUIT))

    def step(self, stdin: StdinSource, stops: StopSignals) -> bool:
        """One turn of the loop: timers and attempts, sending, then the selector. False: time to leave."""
        now = time.monotonic()
        if stops.signum is not None and self.stop_by is None:
            self.stop(stdin, now)
        if self.stop_by is not None and now >= self.stop_by:
            say_unsent(self.err, self.pending, self.conn is None)
            return False
        if self.conn is None and self.plan is not None and now >= self.plan.retry_at:
            self.attempt()
        elif self.conn is not None:
            self.on_events(self.conn.tick(now))
        if self.lost is not None:
            self.drop()
            return True
        self.flush_pending()
        if self.lost is not None:
            return True
        if self.done and self.settled(now):
            return False
        pause = self.watch.follow(self.sel) if self.conn is not None else 0.0
        held = len(self.pending) > PENDING_HIGH or (self.conn is not None and len(self.conn.outbox) > OUTBOX_HIGH)
        stdin.set_paused(self.done or held or self.stop_by is not None)
        for key, mask in self.sel.select(self.wait_time(time.monotonic(), pause)):
            conn = self.conn
            if conn is not None and key.data is conn:
                if mask & selectors.EVENT_WRITE:
                    conn.flush(quiet=True)
                if mask & selectors.EVENT_READ or conn.closed:
                    self.on_events(conn.receive())
            elif key.data is stops:
                stops.waker.drain()
            elif key.data is stdin:
                for line in stdin.read_lines():
                    self.take_line(line)
                if stdin.eof:
                    self.pending.append(LineCommand(LineKind.QUIT))
        return True

    def run(self) -> int:
        stdin = StdinSource(self.stdin_fd, self.sel)
        stops = StopSignals(self.sel)
        try:
            assert self.conn is not None
            self.on_events(self.conn.receive())  # WELCOME (and maybe more) from the handshake
            while self.step(stdin, stops):
                pass
            if self.conn is not None:
                for ev in self.conn.bye():  # what the server sent before it saw our BYE
                    if isinstance(ev, ServerError):  # refused (room full...) as we were leaving
                        self.show_final(ev)
                        raise final_error(self.config.label, ev)
                    self.show(ev)
            self.emit_json({"event": "bye"})
            return 0 if stops.signum is None else stops.exit_code
        except KeyboardInterrupt:
            if self.conn is not None:
                self.conn.bye()  # Ctrl-C still says goodbye, so the partner sees "left (bye)"
            return stops.exit_code
        finally:
            stops.close()
            stdin.close()
            self.sel.close()
            if self.conn is not None:
                self.conn.close()


def say_unsent(err: IO[str], pending: collections.deque[LineCommand], reconnecting: bool) -> None:
    """Leaving on a signal before every line could go: say how many did not (one line, stderr)."""
    held = sum(1 for cmd in pending if cmd.kind is LineKind.MSG)
    if held:
        err.write(f"chatpair: {held} line{'s' if held != 1 else ''} not sent (stopped by a signal "
                  f"{'while reconnecting' if reconnecting else 'before a partner came'})\n")
        err.flush()


def run_pipe(config: ClientConfig, json_mode: bool = False, log_path: str | None = None,
             stdin_fd: int = 0, out: IO[bytes] | None = None) -> int:
    """Connect and run pipe mode; returns the exit code (errors raise ChatpairError)."""
    transcript = Transcript(log_path)
    out = out or sys.stdout.buffer
    try:
        heard: list[Event] = []
        try:
            with Connecting(config.label, at_once=False):
                conn = connect(config, heard)
        except ChatpairError:
            show_early(heard, out, config.name, json_mode, transcript)
            raise
        client = PipeClient(conn, out, json_mode, transcript, stdin_fd)
        return client.run()
    finally:
        transcript.close()


def show_early(heard: list[Event], out: IO[bytes], name: str, json_mode: bool = False,
               transcript: Transcript | None = None) -> None:
    """Print what the server said before a failed handshake (a NOTICE), in order.

    The error itself stays the one line on stderr the caller prints.
    """
    presenter = Presenter(name)
    for ev in heard:
        if json_mode:
            out.write(json.dumps(event_json(ev), ensure_ascii=True).encode() + b"\n")
        for line in presenter.lines(ev):
            if transcript is not None:
                transcript.write(line)
            if not json_mode:
                out.write(line.plain().encode("utf-8", "replace") + b"\n")
    out.flush()
