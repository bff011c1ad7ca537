"""A fault-injection TCP proxy for tests: cut, stall or starve chatpair connections.

    client ──► FaultProxy (127.0.0.1, ``.port``) ──► target (a chatpair server)

For every client connection it accepts, the proxy opens one connection to the
target and copies bytes both ways. ONE background thread runs a selector loop
over every socket. The fault methods are called from the test's thread: they
hand their work to that loop (a command queue and a wake-up socket) and wait
for it to be done, so they never race the copying. Use it as a context
manager, or ``start()`` and ``close()`` (which stops and joins the thread and
closes every socket).

Faults act on the most recent live connection (``which="last"``) or on every
live one (``which="all"``), and return how many connections they touched:

- ``cut_reset()``: both sockets are closed with SO_LINGER 0, so the client and
  the server each see a reset (ECONNRESET).
- ``cut_silent()``: a dead link. The proxy stops reading and forwarding both
  ways and drops what it had buffered, but keeps both sockets open, so
  neither side hears anything (their kernels still take bytes until the
  buffers fill, as over a dead route): the server notices by its idle
  timeout, the client by its own pings. ``release_silent()`` (or ``close()``)
  later resets those sockets.
- ``cut_mid_frame(direction, keep=None)``: the next frame that starts in that
  direction after the call is forwarded only in part, then both sides are
  closed: the receiver reads an incomplete frame, then end of stream. To know
  where frames start the proxy parses each direction as PROTOCOL.md sections
  1-3 describe it (server to client: the banner line, then frames; client to
  server: frames from the first byte on, the 0x00 that picks frame mode
  being the first byte of HELLO's length; a frame is a 4-byte big-endian
  length, then that many bytes: type and payload). ``keep`` is how many bytes
  of the frame get through: by default the header and half the rest, so the
  cut falls in the payload (or just before the type byte of an empty frame);
  1-3 cuts inside the header; larger values are capped at the frame's size
  minus one. It always cuts strictly inside the frame, however the stream is
  chunked. Returns an Event that is set once the cut is done. (A line-mode
  stream has no frames: the cut then never happens.)
- ``hold(direction)`` / ``release(direction)``: stop forwarding one direction,
  end of stream included, buffering what arrives (up to BUFFER_LIMIT bytes,
  then TCP flow control holds the sender back); release forwards it all, in
  order.
- ``refuse_new(True)``: new client connections are accepted and reset at once
  (a server that cannot be reached); ``refuse_new(False)`` ends that.

Counters, updated under ``cond``: ``received[d]`` (bytes read from the
sending side) and ``forwarded[d]`` (bytes written to the receiving side) for
d in C2S, S2C; ``connections`` (proxied) and ``refused``. ``wait_for(pred,
timeout)`` waits until ``pred()`` holds; ``wait_connections(n)`` until n
connections have been proxied (a client reconnected). Both return a bool.
"""

from __future__ import annotations

import collections
import selectors
import socket
import struct
import threading

C2S = "c2s"
S2C = "s2c"
BUFFER_LIMIT = 1 << 20  # per direction and connection
COMMAND_TIMEOUT = 5.0


def _reset_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Framing:
    """Where frames start in one direction of a chatpair stream, and an armed cut."""

    def __init__(self, direction: str) -> None:
        self.mode = "banner" if direction == S2C else "first"
        self.pos = 0  # bytes parsed so far
        self.start = 0  # stream offset of the current frame
        self.end: int | None = None  # its end, once its header is complete
        self.header = b""
        self.armed_at: int | None = None
        self.keep: int | None = None
        self.target: int | None = None  # start of the frame to cut
        self.cut: int | None = None  # stream offset to cut at

    def arm(self, keep: int | None) -> None:
        self.armed_at, self.keep, self.target, self.cut = self.pos, keep, None, None

    def feed(self, data: bytes) -> int | None:
        """Parse ``data``; if an armed cut falls in it, return how many of its bytes to forward."""
        base, i, n = self.pos, 0, len(data)
        while i < n:
            if self.mode == "banner":
                nl = data.find(b"\n", i)
                i = n if nl < 0 else nl + 1
                if nl >= 0:
                    self.mode, self.start = "frames", base + i
            elif self.mode == "first":  # peeked, not consumed: it starts the HELLO frame
                self.mode = "frames" if data[i] == 0 else "lines"
            elif self.mode == "lines":
                i = n
            elif self.end is None:  # in a frame header
                if not self.header and self.target is None and self.armed_at is not None \
                        and self.start >= self.armed_at:
                    self.target = self.start
                    if self.keep is not None and self.keep < 4:
                        self.cut = self.start + self.keep
                take = data[i:i + 4 - len(self.header)]
                self.header += take
                i += len(take)
                if len(self.header) == 4:
                    length = int.from_bytes(self.header, "big")
                    self.end = self.start + 4 + length
                    if self.target == self.start and self.cut is None:
                        keep = 4 + length // 2 if self.keep is None else min(self.keep, 3 + length)
                        self.cut = self.start + keep
            else:  # in a frame body
                i += min(n - i, self.end - (base + i))
                if base + i == self.end:
                    self.start, self.end, self.header = self.end, None, b""
        self.pos = base + n
        if self.cut is not None and self.cut <= self.pos:
            return self.cut - base
        return None


class _Link:
    """One proxied connection: a client socket and its socket to the target."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.src = {C2S: client, S2C: server}
        self.dst = {C2S: server, S2C: client}
        self.pending = {C2S: bytearray(), S2C: bytearray()}  # read, not yet written
        self.eof = {C2S: False, S2C: False}  # the sender ended its stream
        self.shut = {C2S: False, S2C: False}  # ... and the receiver was told
        self.held = {C2S: False, S2C: False}
        self.framing = {C2S: _Framing(C2S), S2C: _Framing(S2C)}
        self.registered = {client: 0, server: 0}
        self.silent = False
        self.cutting: str | None = None  # a mid-frame cut's last bytes are queued
        self.cut_done: threading.Event | None = None
        self.closed = False


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.cond = threading.Condition()
        self.received = {C2S: 0, S2C: 0}
        self.forwarded = {C2S: 0, S2C: 0}
        self.connections = 0
        self.refused = 0
        self._refusing = False
        self._links: list[_Link] = []
        self._commands: collections.deque = collections.deque()
        self._running = True
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop, join its thread, close every socket; re-raise a loop crash."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            self._close_all()
        else:
            if self._thread.is_alive():
                self._call(lambda: setattr(self, "_running", False))
            self._thread.join(COMMAND_TIMEOUT)
            if self._thread.is_alive():
                raise RuntimeError("fault proxy thread did not stop")
        if self._error is not None:
            raise RuntimeError("fault proxy loop failed") from self._error

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- faults (any thread) --------------------------------------------------------

    def cut_reset(self, which: str = "last") -> int:
        return self._each(which, lambda link: self._close(link, reset=True))

    def cut_silent(self, which: str = "last") -> int:
        def silence(link: _Link) -> None:
            link.silent = True
            for buf in link.pending.values():
                buf.clear()
        return self._each(which, silence)

    def release_silent(self) -> int:
        """Reset the sockets of every silently cut connection."""
        def run() -> int:
            links = [link for link in self._live("all") if link.silent]
            for link in links:
                self._close(link, reset=True)
            return len(links)
        return self._call(run)

    def cut_mid_frame(self, direction: str = C2S, keep: int | None = None) -> threading.Event:
        if keep is not None and keep < 1:
            raise ValueError("keep must be at least 1")
        done = threading.Event()

        def arm() -> None:
            links = self._live("last")
            if not links:
                raise LookupError("no live connection to cut")
            links[0].framing[direction].arm(keep)
            links[0].cut_done = done
        self._call(arm)
        return done

    def hold(self, direction: str, which: str = "last") -> int:
        return self._each(which, lambda link: link.held.__setitem__(direction, True))

    def release(self, direction: str, which: str = "all") -> int:
        return self._each(which, lambda link: link.held.__setitem__(direction, False))

    def refuse_new(self, refuse: bool = True) -> None:
        self._call(lambda: setattr(self, "_refusing", refuse))

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def wait_connections(self, n: int, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda: self.connections >= n, timeout)

    # -- plumbing -------------------------------------------------------------------

    def _call(self, fn):
        """Run ``fn`` on the loop thread and return its result (or raise its exception)."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("fault proxy is not running")
        done, box = threading.Event(), []

        def run() -> None:
            try:
                box.append((True, fn()))
            except Exception as exc:  # handed back to the caller
                box.append((False, exc))
            done.set()
        self._commands.append(run)
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass  # the loop has wake-ups pending anyway
        if not done.wait(COMMAND_TIMEOUT):
            raise RuntimeError("fault proxy loop did not answer")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _live(self, which: str) -> list[_Link]:
        live = [link for link in self._links if not link.closed]
        if which == "last":
            return live[-1:]
        if which == "all":
            return live
        raise ValueError(f"which must be 'last' or 'all', not {which!r}")

    def _each(self, which: str, fn) -> int:
        def run() -> int:
            links = self._live(which)
            for link in links:
                fn(link)
            return len(links)
        return self._call(run)

    def _run(self) -> None:
        try:
            while self._running:
                for key, mask in self._sel.select():
                    if key.data == "wake":
                        while True:
                            try:
                                if not self._wake_r.recv(4096):
                                    break
                            except BlockingIOError:
                                break
                        while self._commands:
                            self._commands.popleft()()
                    elif key.data == "listen":
                        self._accept()
                    elif not key.data.closed:
                        self._pump(key.data, key.fileobj, mask)
                for link in list(self._links):
                    if not link.closed:
                        self._settle(link)
                    if link.closed:
                        self._links.remove(link)
                    else:
                        self._interest(link)
        except Exception as exc:  # reported by close()
            self._error = exc
        finally:
            self._close_all()

    def _close_all(self) -> None:
        for link in self._links:
            self._close(link)
        self._links.clear()
        self._sel.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._refusing:
            _reset_close(client)
            with self.cond:
                self.refused += 1
                self.cond.notify_all()
            return
        try:
            server = socket.create_connection(self.target, timeout=COMMAND_TIMEOUT)
        except OSError:
            _reset_close(client)
            return
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._links.append(_Link(client, server))
        with self.cond:
            self.connections += 1
            self.cond.notify_all()

    def _pump(self, link: _Link, sock: socket.socket, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._write(link, S2C if sock is link.dst[S2C] else C2S)
        if mask & selectors.EVENT_READ and not link.closed:
            self._read(link, C2S if sock is link.src[C2S] else S2C)

    def _read(self, link: _Link, d: str) -> None:
        try:
            data = link.src[d].recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # a reset on one side is passed on to the other
            self._close(link, reset=True)
            return
        if not data:
            link.eof[d] = True
            return
        with self.cond:
            self.received[d] += len(data)
            self.cond.notify_all()
        keep = link.framing[d].feed(data)
        if keep is not None:
            data, link.cutting = data[:keep], d
        link.pending[d] += data

    def _write(self, link: _Link, d: str) -> None:
        try:
            sent = link.dst[d].send(link.pending[d])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(link, reset=True)
            return
        del link.pending[d][:sent]
        with self.cond:
            self.forwarded[d] += sent
            self.cond.notify_all()

    def _settle(self, link: _Link) -> None:
        """Pass on ends of stream, finish a mid-frame cut, close a finished link."""
        for d in (C2S, S2C):
            if link.pending[d] or link.held[d] or link.silent:
                continue
            if link.cutting == d:
                self._finish_cut(link, d)
                return
            if link.eof[d] and not link.shut[d]:
                link.shut[d] = True
                try:
                    link.dst[d].shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if link.shut[C2S] and link.shut[S2C]:
            self._close(link)

    def _finish_cut(self, link: _Link, d: str) -> None:
        receiver = link.dst[d]
        try:  # unread bytes would turn the close into a reset: drop them first
            while receiver.recv(65536):
                pass
        except OSError:
            pass
        try:
            receiver.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._close(link)
        link.cut_done.set()

    def _interest(self, link: _Link) -> None:
        want = dict.fromkeys(link.registered, 0)
        if not link.silent:
            for d in (C2S, S2C):
                if link.cutting is None and not link.eof[d] and len(link.pending[d]) < BUFFER_LIMIT:
                    want[link.src[d]] |= selectors.EVENT_READ
                if link.pending[d] and not link.held[d]:
                    want[link.dst[d]] |= selectors.EVENT_WRITE
        for sock, mask in want.items():
            have = link.registered[sock]
            if mask == have:
                continue
            if not have:
                self._sel.register(sock, mask, link)
            elif not mask:
                self._sel.unregister(sock)
            else:
                self._sel.modify(sock, mask, link)
            link.registered[sock] = mask

    def _close(self, link: _Link, reset: bool = False) -> None:
        if link.closed:
            return
        link.closed = True
        for sock, mask in link.registered.items():
            if mask:
                self._sel.unregister(sock)
            _reset_close(sock) if reset else sock.close()
