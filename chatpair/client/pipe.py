"""Pipe (script) mode: lines from stdin are messages or commands, events go to stdout.

One thread, one selector over stdin and the connection. Lines typed before
we are paired are held, in order, and sent once we are; end of input is a
final /quit in the same queue. Output is one line per event, as text or
(``--json``) as JSON. :func:`run_pipe` is the entry point.
"""

from __future__ import annotations

import collections
import json
import selectors
import sys
from typing import IO, Any

from chatpair.client.commands import HELP_TEXT, parse_input
from chatpair.client.config import ClientConfig
from chatpair.client.present import Line, LineStyle, Presenter, Transcript, event_json
from chatpair.client.session import Connection, SocketWatch, connect, final_error
from chatpair.client.stdin import StdinSource
from chatpair.errors import ChatpairError
from chatpair.proto import LineCommand, LineKind
from chatpair.proto.events import FINAL_EVENTS, Event, Pong, ServerError

#: Stop reading stdin while this much is waiting to be sent: the server is
#: slowing us down (flood control), so reading more would only use memory.
OUTBOX_HIGH = 1 << 20


def _new_selector() -> selectors.BaseSelector:
    # select() handles regular files (always readable) where epoll refuses them,
    # and we only ever watch two or three descriptors.
    return selectors.SelectSelector()


class PipeClient:
    """Pipe/script mode: stdin lines in, events out on stdout.

    Lines (and commands) are kept in order in ``pending``. A message waits
    at the head of the queue until we are paired, so ``printf 'hi\\n' |
    chatpair client`` delivers ``hi`` once a partner arrives. End of input
    becomes a final /quit in the same queue: BYE goes out only after every
    held line was sent. If nothing is held, end of input quits at once.
    """

    def __init__(self, conn: Connection, out: IO[bytes], json_mode: bool = False,
                 transcript: Transcript | None = None, stdin_fd: int = 0) -> None:
        self.conn = conn
        self.out = out
        self.json_mode = json_mode
        self.transcript = transcript or Transcript(None)
        self.stdin_fd = stdin_fd
        self.presenter = Presenter(conn.config.name)
        self.pending: collections.deque[LineCommand] = collections.deque()
        self.done = False
        #: A /ping holds the queue until its PONG: a script's "/ping" then
        #: end of input should print the round trip before leaving.
        self.awaiting_pong = False

    # -- output --------------------------------------------------------------

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

    def say(self, text: str, code: str = "info") -> None:
        self.emit_lines([Line(LineStyle.NOTICE, text)])
        self.emit_json({"event": "notice", "code": code, "message": text, "local": True})

    def flush_pending(self) -> None:
        """Send queued inputs in order, stopping at a message while unpaired."""
        while self.pending and not self.done and not self.awaiting_pong:
            cmd = self.pending[0]
            if cmd.kind is LineKind.MSG and not self.presenter.paired:
                return
            self.pending.popleft()
            if cmd.kind is LineKind.MSG:
                self.conn.send_msg(cmd.text)
                self.emit_lines(self.presenter.own(cmd.text))
                self.emit_json({"event": "sent", "text": cmd.text})
            elif cmd.kind is LineKind.NEXT:
                self.conn.send_next()
                self.emit_lines(self.presenter.left_by_us())
                self.emit_json({"event": "next"})
            elif cmd.kind is LineKind.PING:
                self.conn.send_ping()
                self.awaiting_pong = True
            elif cmd.kind is LineKind.QUIT:
                self.done = True

    # -- events --------------------------------------------------------------

    def show(self, ev: Event) -> None:
        self.emit_json(event_json(ev))
        self.emit_lines(self.presenter.lines(ev))

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, Pong):
            self.awaiting_pong = False
        self.show(ev)
        if isinstance(ev, FINAL_EVENTS):
            raise final_error(self.conn.label, ev)

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        sel = _new_selector()
        stdin = StdinSource(self.stdin_fd, sel)
        watch = SocketWatch(self.conn)
        try:
            for ev in self.conn.receive():  # WELCOME (and maybe more) from the handshake
                self.on_event(ev)
            while True:
                self.flush_pending()
                if self.done and not self.conn.wants_write:
                    break  # everything held was sent (or at least handed to the kernel)
                pause = watch.follow(sel)
                stdin.set_paused(self.done or len(self.conn.outbox) > OUTBOX_HIGH)
                for key, mask in sel.select(pause or None):
                    if key.data is self.conn:
                        if mask & selectors.EVENT_WRITE:
                            self.conn.flush()
                        if mask & selectors.EVENT_READ:
                            for ev in self.conn.receive():
                                self.on_event(ev)
                    else:
                        for line in stdin.read_lines():
                            self.take_line(line)
                        if stdin.eof:
                            self.pending.append(LineCommand(LineKind.QUIT))
            for ev in self.conn.bye():  # what the server sent before it saw our BYE
                self.show(ev)
                if isinstance(ev, ServerError):  # refused (room full...) as we were leaving
                    raise final_error(self.conn.label, ev)
            self.emit_json({"event": "bye"})
            return 0
        except KeyboardInterrupt:
            self.conn.bye()  # Ctrl-C still says goodbye, so the partner sees "left (bye)"
            return 130
        finally:
            stdin.close()
            sel.close()
            self.conn.close()


def run_pipe(config: ClientConfig, json_mode: bool = False, log_path: str | None = None,
             stdin_fd: int = 0, out: IO[bytes] | None = None) -> int:
    """Connect and run pipe mode; returns the exit code (errors raise ChatpairError)."""
    transcript = Transcript(log_path)
    out = out or sys.stdout.buffer
    try:
        heard: list[Event] = []
        try:
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
