"""The pairing listener process: accept, banner, handshake, lobby, hand-over.

``listener_main`` is the entry point of the process the server starts (spawn-
safe: a top-level function whose arguments all pickle, sockets included). In
that process one thread, :class:`Listener`, runs a selector loop that

1. accepts connections and sends the banner at once;
2. runs every handshake without blocking the others: each connection has one
   absolute deadline, and before HELLO nothing over 1,024 bytes is accepted;
3. keeps waiting clients (keepalive, NOTICE ``undelivered`` for their
   messages) and asks the :class:`~chatpair.server.lobby.Lobby` whom to pair;
4. hands each new pair to a room relay - a thread of this process, or a relay
   worker process - and takes clients back when their partner leaves.

A connection belongs to exactly one loop at a time; handing it over means
unregistering it here before the relay registers it there.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import logging
import socket
import sys
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Protocol

from chatpair import __version__
from chatpair.netutil import format_addr, raise_fd_limit
from chatpair.server.conn import MODE_FRAME, MODE_LINE, Conn, event_bytes
from chatpair.server.lobby import Lobby, Paired, RoomFull
from chatpair.server.config import ServerConfig, setup_logging
from chatpair.server.loop import EVENT_READ, ConnLoop
from chatpair.proto import (
    HANDSHAKE_MAX,
    NEED_DATA,
    PROTOCOL_VERSION,
    EndOfStream,
    ErrorCode,
    FrameDecoder,
    FrameType,
    Hello,
    LineDecoder,
    ProtocolError,
    encode_json_frame,
    make_banner,
    parse_hello,
    parse_name_line,
)
from chatpair.server.relay import PairEnd, RelayThread, undelivered_notices

if TYPE_CHECKING:
    from chatpair.server.workers import Stranded, WorkerHandle

log = logging.getLogger("chatpair")

#: How long accept() rests after running out of file descriptors.
ACCEPT_BACKOFF_SECONDS = 0.5
#: Connections over a limit are kept just long enough to be told why (at
#: most this many at once); beyond that they are closed without a word.
REFUSING_MAX = 256
#: ERROR ``shutdown`` to the clients of a relay worker that died (see handle_worker_lost).
WORKER_LOST_MESSAGE = "the relay serving you stopped unexpectedly; reconnect to chat again"


class RelayHandle(Protocol):
    """What the listener needs of a relay: a thread here, or a worker process."""

    @property
    def load(self) -> int: ...

    def start(self) -> None: ...

    def submit_pair(self, a: Conn, b: Conn) -> None: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def alive(self) -> bool: ...


class Listener(ConnLoop):
    """The listener's selector loop (one thread)."""

    name = "listener"

    def __init__(self, listen_sock: socket.socket, control: socket.socket | None, config: ServerConfig) -> None:
        super().__init__(config.limits())
        self.config = config
        self.listen_sock = listen_sock
        self.control = control
        self.lobby = Lobby()
        self.banner = make_banner(f"chatpair/{__version__}")
        self.welcome = encode_json_frame(FrameType.WELCOME, {
            "version": PROTOCOL_VERSION,
            "server": f"chatpair/{__version__}",
            "max_frame": config.max_frame,
            "ping_interval": config.ping_interval,
            "idle_timeout": config.idle_timeout,
        })
        self.waiting: dict[int, Conn] = {}  # cid -> conn, queued in the lobby and owned here
        self.handshaking: set[Conn] = set()
        self._cids = itertools.count(1)
        self._ended: deque[PairEnd] = deque()  # from relay threads
        self._accept_paused_until = 0.0
        self._fd_warning_logged = False
        self.tls = config.tls_context()
        self.max_clients = config.effective_max_clients()
        self.live: dict[int, str] = {}  # cid -> ip of every connection not refused, wherever it is
        self.per_ip: Counter[str] = Counter()
        self.refusing = 0
        listen_sock.setblocking(False)
        # Linux copies these options from the listening socket to every accepted
        # one: set them once here instead of five syscalls per connection.
        tune_socket(listen_sock)
        self._tune_each = not sys.platform.startswith("linux")
        self.sel.register(listen_sock, EVENT_READ, None)
        if control is not None:
            control.setblocking(False)
            self.sel.register(control, EVENT_READ, None)
        self.workers: list[WorkerHandle] = []
        #: With --workers: a relay thread of this process, started the first time
        #: a pair is made while no worker is available (all dead, restarting).
        self.fallback: RelayThread | None = None
        self.relays: list[RelayHandle]
        if config.workers:
            from chatpair.server.workers import start_workers

            self.workers = start_workers(config, self.post_pair_end, self.handle_worker_lost, self.sel)
            self.relays = list(self.workers)
        else:
            self.relays = [
                RelayThread(self.limits, i, self.post_pair_end) for i in range(max(1, config.relay_threads))
            ]
        for relay in self.relays:
            relay.start()

    # -- special sockets ---------------------------------------------------------------

    def on_special(self, fileobj: Any) -> None:
        if fileobj is self.listen_sock:
            self._accept()
        elif fileobj is self.control:
            self._on_control()
        else:
            for worker in self.workers:  # a handful at most; their channels change on restart
                if worker.owns(fileobj):
                    worker.on_channel_event()
                    return
            super().on_special(fileobj)

    def _on_control(self) -> None:
        try:
            data = self.control.recv(64)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        # "stop", or end of file because the main process went away: either way, stop.
        if not data or b"stop" in data:
            self.begin_stop()

    def _accept(self) -> None:
        if not self.running:
            return
        for _ in range(256):
            try:
                sock, addr = self.listen_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accept(err)
                else:
                    log.warning("accept failed: %s", err)
                return
            self._new_connection(sock, addr)

    def _pause_accept(self, err: OSError) -> None:
        """Out of descriptors: rest instead of spinning; pairs already chatting go on."""
        if not self._fd_warning_logged:
            log.warning("cannot accept more connections (%s); new ones wait until descriptors free up",
                        err.strerror)
            self._fd_warning_logged = True
        self._accept_paused_until = self.now + ACCEPT_BACKOFF_SECONDS
        try:
            self.sel.unregister(self.listen_sock)
        except (KeyError, ValueError):
            pass

    def _resume_accept(self) -> None:
        self._accept_paused_until = 0.0
        if self.running:
            self.sel.register(self.listen_sock, EVENT_READ, None)

    def _new_connection(self, sock: socket.socket, addr: Any) -> None:
        sock.setblocking(False)
        if self._tune_each:
            tune_socket(sock)
        label = format_addr(addr)
        ip = str(addr[0]) if isinstance(addr, tuple) else label
        refusal = self._over_limit(ip)
        if refusal is not None and self.refusing >= REFUSING_MAX:
            sock.close()  # a flood: no more sockets spent on saying no
            return
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:
                sock.close()
                return
        conn = Conn(sock, next(self._cids), label, self.now)
        conn.deadline = self.now + self.config.handshake_timeout
        if refusal is not None:
            conn.refusal = refusal
            self.refusing += 1
            log.info("%s: refused: %s", label, refusal[1])
        else:
            self.live[conn.cid] = ip
            self.per_ip[ip] += 1
        self.handshaking.add(conn)
        log.info("%s: connected", label)
        if self.tls is not None:
            conn.tls_state = 1
            self.adopt_conn(conn)
        else:
            self.adopt_conn(conn)
            self.send(conn, self.banner)

    def on_tls_ready(self, conn: Conn) -> None:
        self.send(conn, self.banner)

    def _over_limit(self, ip: str) -> tuple[str, str] | None:
        if len(self.live) >= self.max_clients:
            return (ErrorCode.SERVER_FULL.value,
                    f"the server is full ({self.max_clients} clients); try again later")
        limit = self.config.max_per_ip
        if limit and self.per_ip[ip] >= limit and (self.config.per_ip_loopback or not _is_loopback(ip)):
            return (ErrorCode.TOO_MANY_CONNECTIONS.value,
                    f"too many connections from {ip} (the limit is {limit})")
        return None

    def on_closed(self, conn: Conn) -> None:
        self._forget(conn.cid)
        if conn.refusal is not None:
            conn.refusal = None
            self.refusing -= 1

    def _forget(self, cid: int) -> None:
        ip = self.live.pop(cid, None)
        if ip is not None:
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]

    # -- handshake --------------------------------------------------------------------------

    def on_handshake_readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            log.info("%s: closed during the handshake", conn.label)
            self.drop(conn, "disconnected")
            return
        decoder = conn.decoder
        if decoder is None:
            if data[0] == 0:
                conn.mode = MODE_FRAME
                decoder = conn.decoder = FrameDecoder(HANDSHAKE_MAX)
            else:
                conn.mode = MODE_LINE
                decoder = conn.decoder = LineDecoder(HANDSHAKE_MAX)
        if conn.refusal is not None:
            self.fail(conn, *conn.refusal)
            return
        decoder.feed(data)
        try:
            hello = self._parse_handshake(conn, decoder)
        except ProtocolError as err:
            self.fail(conn, err.code, err.message)
            return
        if hello is not None:
            self._complete_handshake(conn, hello)

    def _parse_handshake(self, conn: Conn, decoder: FrameDecoder | LineDecoder) -> Hello | None:
        if isinstance(decoder, FrameDecoder):
            event = decoder.next_event()
            if event is NEED_DATA:
                return None
            if isinstance(event, EndOfStream):
                raise ProtocolError(ErrorCode.BAD_HELLO, "the first frame must be HELLO")
            return parse_hello(event)  # type: ignore[arg-type]
        while True:
            line = decoder.next_line()
            if line is NEED_DATA:
                return None
            if isinstance(line, EndOfStream):
                raise ProtocolError(ErrorCode.BAD_HELLO, "type your name first")
            if line.strip():  # type: ignore[union-attr]
                return parse_name_line(line)  # type: ignore[arg-type]

    def _complete_handshake(self, conn: Conn, hello: Hello) -> None:
        conn.name, conn.room = hello.name, hello.room
        conn.deadline = 0.0
        conn.tokens, conn.token_time = float(self.config.burst), self.now
        self.handshaking.discard(conn)
        if conn.mode == MODE_FRAME:
            conn.pending = conn.decoder.buffered  # type: ignore[union-attr]
            conn.decoder = None
        else:
            conn.decoder.max_line = self.config.max_frame - 1  # type: ignore[union-attr]
        log.info("%s: hello%s (%s mode)", conn.label, f" room {conn.room}" if conn.room else "",
                 "frame" if conn.mode == MODE_FRAME else "line")
        # WELCOME, WAITING (and PAIRED, if a partner is there) leave in one
        # send: fewer syscalls is most of what connect+pair costs.
        self._queue(conn, requeued=False, first=self.welcome if conn.mode == MODE_FRAME else b"")

    # -- the lobby ------------------------------------------------------------------------------

    def _queue(self, conn: Conn, requeued: bool, first: bytes = b"") -> None:
        """Join the lobby; ``first`` is sent ahead of WAITING in the same write."""
        result = self.lobby.join(conn.cid, conn.room, requeued=requeued)
        if isinstance(result, RoomFull):
            self.send(conn, first)
            self.fail(conn, ErrorCode.ROOM_FULL,
                      f"room {conn.room} is full: a pair is already chatting there")
            return
        self.waiting[conn.cid] = conn
        waiting = first + event_bytes(conn, FrameType.WAITING, {"room": conn.room})
        if isinstance(result, Paired):
            self._pair(self.waiting[result.waiter], conn, newcomer_first=waiting)
        else:
            self.send(conn, waiting)
            self.process_buffered(conn)

    def _pair(self, a: Conn, b: Conn, newcomer_first: bytes = b"") -> None:
        for me, peer, first in ((a, b, b""), (b, a, newcomer_first)):
            del self.waiting[me.cid]
            self.send(me, first + event_bytes(me, FrameType.PAIRED, {"peer": peer.name, "room": me.room}))
            self.release_conn(me)
        relay = self._pick_relay()
        log.info("paired %s with %s%s", a.label, b.label, f" in room {a.room}" if a.room else "")
        relay.submit_pair(a, b)

    def _pick_relay(self) -> RelayHandle:
        """The least loaded relay; never a dead worker."""
        if not self.workers:
            return min(self.relays, key=lambda r: r.load)
        ready = [w for w in self.workers if w.available]
        if ready:
            return min(ready, key=lambda w: w.load)
        # Every worker is dead or waiting out its restart backoff. Relay here
        # rather than hold the pair back: its clients were told PAIRED and
        # expect to chat now, and a worker that keeps crashing may take long.
        # The thread serves its pairs until they end; new pairs go to workers
        # again as soon as one is back.
        if self.fallback is None:
            log.warning("no relay worker is running; relaying new pairs in the listener process meanwhile")
            self.fallback = RelayThread(self.limits, len(self.workers), self.post_pair_end)
            self.fallback.start()
            self.relays.append(self.fallback)
        return self.fallback

    def detach(self, conn: Conn, reason: str) -> None:
        self.handshaking.discard(conn)
        if self.waiting.pop(conn.cid, None) is not None:
            log.info("%s: left while waiting (%s)", conn.label, reason)
        if conn.cid in self.lobby:
            self.lobby.leave(conn.cid)

    def on_msg_run(self, conn: Conn, view: memoryview, start: int, end: int, count: int) -> None:
        self.send(conn, undelivered_notices(conn, count, "you have no partner yet"))

    def on_line_msg(self, conn: Conn, text: str) -> None:
        self.send(conn, undelivered_notices(conn, 1, "you have no partner yet"))

    def on_next(self, conn: Conn) -> None:
        # Already waiting: NEXT changes nothing, but say where the client stands.
        self.send_event(conn, FrameType.WAITING, {"room": conn.room})

    # -- clients coming back from relays -------------------------------------------------------

    def post_pair_end(self, end: PairEnd) -> None:
        """Called from relay threads (or the worker channel): queue it and wake up."""
        self._ended.append(end)
        self.wake()

    def on_wake(self) -> None:
        while self._ended:
            self.handle_pair_end(self._ended.popleft())

    def handle_pair_end(self, end: PairEnd) -> None:
        self.lobby.unpair(end.a, end.b, next_by=end.next_by)
        for cid in end.gone:
            self.lobby.leave(cid)
            self._forget(cid)
        for conn in end.back:
            self.adopt_conn(conn)
            if not self.running:
                self.fail(conn, ErrorCode.SHUTDOWN, "the server is shutting down", reason="shutdown")
                self.lobby.leave(conn.cid)
                continue
            self._queue(conn, requeued=True)

    def handle_worker_lost(self, stranded: list[Stranded]) -> None:
        """A relay worker died: tell its clients, and forget their pairs and counts.

        Both partners of a pair always live in the same worker, so nobody on
        another loop needs a PEER_LEFT: every stranded client gets ERROR
        ``shutdown`` (PROTOCOL.md has no code for "this part of the server
        failed"; ``shutdown`` is what clients know as "the server ended the
        chat, not you"; docs/protocol.md records the choice) and is closed.
        """
        for held in stranded:
            if self.lobby.partner_of(held.cid) == held.partner:
                self.lobby.unpair(held.cid, held.partner)  # the room is free again
        for held in stranded:
            self.lobby.leave(held.cid)
            self._forget(held.cid)
            if held.sock is None:
                continue
            # Through the listener's duplicate of the descriptor, with the
            # usual polite close (ERROR, shut down our side, read until the
            # client closes or 2 s pass) so it reads the ERROR, not a reset.
            # Best effort: the worker may have died in the middle of writing
            # a frame (or a line) to this client, and then what follows is
            # misframed; nothing can tell how much it wrote. The client sees
            # a broken stream and closes, which is the truth of it.
            conn = Conn(held.sock, held.cid, held.addr, self.now)
            conn.mode, conn.name = held.mode, held.name
            self.adopt_conn(conn)
            self.fail(conn, ErrorCode.SHUTDOWN, WORKER_LOST_MESSAGE)

    # -- stopping and timers -----------------------------------------------------------------------

    def begin_stop(self) -> None:
        if not self.running:
            return
        log.info("stopping: telling %d waiting client(s) and every pair", len(self.conns))
        self.running = False
        try:
            self.sel.unregister(self.listen_sock)
        except (KeyError, ValueError):
            pass
        for conn in list(self.conns):
            if conn.mode:
                self.fail(conn, ErrorCode.SHUTDOWN, "the server is shutting down", reason="shutdown")
            else:
                self.drop(conn, "disconnected")
        for relay in self.relays:
            relay.stop()

    def busy(self) -> bool:
        return any(relay.alive() for relay in self.relays)

    def tick(self, now: float) -> None:
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._resume_accept()
        expired = [c for c in self.handshaking if now >= c.deadline]
        for conn in expired:
            if conn.mode:
                self.fail(conn, ErrorCode.HANDSHAKE_TIMEOUT,
                          f"no valid hello within {self.config.handshake_timeout:g} seconds")
            else:
                log.info("%s: sent nothing; closed at the handshake deadline", conn.label)
                self.drop(conn, "disconnected")
        for worker in self.workers:
            worker.tick(now)
        super().tick(now)

    def join_relays(self, timeout: float = 10.0) -> None:
        for relay in self.relays:
            relay.join(timeout)


@functools.lru_cache(maxsize=4096)
def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def tune_socket(sock: socket.socket) -> None:
    """Low latency (no Nagle) and TCP keepalive, which finds dead line-mode peers."""
    for level, opt, value in (
        (socket.IPPROTO_TCP, getattr(socket, "TCP_NODELAY", None), 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), 60),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 15),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 4),
    ):
        if opt is None:
            continue
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass


def listener_main(listen_sock: socket.socket, control: socket.socket, config: ServerConfig) -> None:
    """Entry point of the listener process."""
    from chatpair.server.main import ignore_stop_signals, stop_resource_tracker

    # Ctrl-C, a hang-up or SIGTERM to the whole process group reach us too; the
    # main process decides when we stop and tells us through ``control``. The
    # worker processes we start inherit the ignoring.
    ignore_stop_signals()
    setup_logging(config.log_level)
    raise_fd_limit()
    listener = Listener(listen_sock, control, config)
    try:
        listener.run()
    finally:
        listener.join_relays()
        listen_sock.close()
        control.close()
        # Workers share the main process's resource tracker; only if it had died
        # did starting them launch one of ours, which must not outlive us.
        stop_resource_tracker()
