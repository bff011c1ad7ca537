"""Churn load for ``test_churn.py``: clients that connect, pair, chat and leave every way.

Written from /work/shared/PROTOCOL.md only (it imports nothing from ``chatpair``).
One process runs ``clients`` client *slots* in one selector loop; each slot
keeps one connection at a time and, until the time is up, repeats:

    connect -> banner -> HELLO (frame mode; sometimes a ``NAME [ROOM]`` line)
    -> WELCOME, WAITING -> PAIRED (within a few seconds, else it leaves)
    -> 3 messages each way -> leave: BYE, NEXT (then waits for a new partner
    on the same connection), plain close, reset (SO_LINGER 0) or close in the
    middle of a frame (or of a line)

A few connections give up during the handshake instead (nothing sent, half a
HELLO, a reset). Two slots of each "room" share a room code; the others use
the open lobby. Every name is unique per connection, so a name identifies one
connection of the whole run.

Everything the server sends is checked against the protocol, and every
departure is a *failure* (reported, never raised): a bad banner, a frame that
cannot come in that state (MSG while not paired, PEER_LEFT without a partner,
WELCOME twice...), an ERROR other than ``room_full`` on arrival in a room, a
message from someone other than the partner or out of order or twice, pairing
again with a partner left by NEXT, a connection the server closes without a
word, and *stalls*: no banner, no WELCOME, no close after BYE, or a partner
whose messages (or departure) do not arrive, each within ``STALL_SECONDS``.
A line-mode client's last line cut short by its close may still be delivered
(the server counts a last line without newline as a line): such a message
starts with ``~`` and is accepted as that partner's last one.
Things that are the load's own business (the machine out of ephemeral ports
or descriptors) are counted as ``load_errors`` and retried, never as failures.

Run as a script it prints one JSON object with counters and failures::

    python tests/churn_load.py --port 7878 --clients 20 --seconds 5 --tag a
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import selectors
import socket
import struct
import sys
import time
from collections import Counter
from typing import Any

# frame types (PROTOCOL.md section 3)
HELLO, MSG, NEXT, BYE, PING, PONG = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
WELCOME, WAITING, PAIRED, PEER_LEFT, NOTICE, ERROR = 0x10, 0x11, 0x12, 0x13, 0x14, 0x1F
JSON_TYPES = {WELCOME, WAITING, PAIRED, PEER_LEFT, NOTICE, ERROR}
TYPE_NAMES = {MSG: "MSG", PING: "PING", PONG: "PONG", WELCOME: "WELCOME", WAITING: "WAITING",
              PAIRED: "PAIRED", PEER_LEFT: "PEER_LEFT", NOTICE: "NOTICE", ERROR: "ERROR"}
MAX_FRAME = 65_536

#: How long anything the server owes us may take (banner, WELCOME, a partner's
#: messages or departure, the close after BYE) before it counts as a stall.
STALL_SECONDS = 5.0
#: A waiting client gives up after a random time in this range (not a failure:
#: in a room, or after NEXT, nobody may be there to pair with).
PAIR_WAIT = (0.5, 2.0)
MESSAGES = 3
#: Share of connections in line mode, and of those leaving during the handshake.
LINE_SHARE = 0.2
HANDSHAKE_LEAVE_SHARE = 0.05
#: How connections leave once they have chatted (weights).
LEAVES = (("bye", 25), ("next", 20), ("close", 20), ("reset", 20), ("midframe", 15))
#: Leave right after sending, without waiting for the partner's messages (share).
HASTY_SHARE = 0.2
#: Slots per load process that use rooms (two slots share each room code).
ROOM_SLOTS = 4
MAX_FAILURE_TEXTS = 40
#: Starts the text of a message cut short by a close (a frame or a line never finished).
CUT = "~"

# connection states
CONNECTING, BANNER, HANDSHAKE, WAITING_ST, PAIRED_ST, DRAIN = range(6)
STATE_NAMES = ["connecting", "banner", "handshake", "waiting", "paired", "draining"]

_LOAD_ERRNOS = {errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", len(payload) + 1, ftype) + payload


class Conn:
    """One client connection of a slot."""

    def __init__(self, slot: "Slot", name: str, line_mode: bool, room: str | None, now: float) -> None:
        self.slot = slot
        self.name = name
        self.line_mode = line_mode
        self.room = room
        self.state = CONNECTING
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.out = bytearray()
        self.deadline = now + STALL_SECONDS
        self.deadline_what = "connect"
        self.got_welcome = False
        self.peer: str | None = None
        self.peer_seq: int | None = None  # next seq expected from the partner in this pairing
        self.received = 0  # partner messages received in this pairing
        self.sent_seq = 0
        self.excluded: set[str] = set()  # partners left by NEXT (either way): never again
        self.pending_next = 0  # NEXTs sent whose WAITING has not been seen
        self.next_sent = False  # this pairing is being left by NEXT
        self.requeue_waiting = False  # frame mode: PEER_LEFT seen, its WAITING not yet
        self.hasty = False
        self.handshake_leave: str | None = None  # leave during the handshake, this way


class Slot:
    def __init__(self, index: int, room: str | None) -> None:
        self.index = index
        self.room = room
        self.conn: Conn | None = None
        self.start_at = 0.0


class Load:
    def __init__(self, port: int, clients: int, seconds: float, tag: str, seed: int) -> None:
        self.port = port
        self.seconds = seconds
        self.tag = tag
        self.rng = random.Random(seed)
        self.sel = selectors.DefaultSelector()
        rooms = min(ROOM_SLOTS, clients - clients % 2)
        self.slots = [Slot(i, f"r{tag}x{i // 2}" if i < rooms else None) for i in range(clients)]
        self.names = 0
        self.stats: Counter[str] = Counter()
        self.failure_kinds: Counter[str] = Counter()
        self.failures: list[str] = []
        self.stopping = False
        self.t0 = 0.0

    # -- bookkeeping ------------------------------------------------------------------

    def fail(self, conn: Conn | None, kind: str, text: str) -> None:
        self.failure_kinds[kind] += 1
        if len(self.failures) < MAX_FAILURE_TEXTS:
            where = f"{conn.name} ({'line' if conn.line_mode else 'frame'} mode, {STATE_NAMES[conn.state]}" \
                    f"{', room ' + conn.room if conn.room else ''}): " if conn else ""
            self.failures.append(f"t={time.monotonic() - self.t0:.2f}s {where}{kind}: {text}")

    def result(self) -> dict[str, Any]:
        return {"stats": dict(self.stats), "failure_kinds": dict(self.failure_kinds),
                "failures": self.failures, "elapsed": time.monotonic() - self.t0}

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.t0 = now = time.monotonic()
        end = self.t0 + self.seconds
        for slot in self.slots:
            slot.start_at = now + self.rng.random() * 0.05
        while True:
            now = time.monotonic()
            if not self.stopping and now >= end:
                self.stopping = True
                for slot in self.slots:
                    if slot.conn is not None and slot.conn.state != DRAIN:
                        self.close(slot.conn, "end")
            if not self.stopping:
                for slot in self.slots:
                    if slot.conn is None and now >= slot.start_at:
                        self.start(slot, now)
            elif all(slot.conn is None for slot in self.slots):
                break
            events = self.sel.select(0.02)
            for key, mask in events:
                conn = key.data
                if conn.slot.conn is not conn:
                    continue
                if mask & selectors.EVENT_WRITE:
                    self.on_writable(conn)
                if mask & selectors.EVENT_READ and conn.slot.conn is conn:
                    self.on_readable(conn)
            now = time.monotonic()
            for slot in self.slots:
                conn = slot.conn
                if conn is not None and now >= conn.deadline:
                    self.on_deadline(conn, now)
        self.sel.close()
        return self.result()

    def start(self, slot: Slot, now: float) -> None:
        self.names += 1
        name = f"c{self.tag}x{slot.index}x{self.names}"
        conn = Conn(slot, name, self.rng.random() < LINE_SHARE, slot.room, now)
        if self.rng.random() < HANDSHAKE_LEAVE_SHARE:
            conn.handshake_leave = self.rng.choice(["silent", "half_hello", "reset"])
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:  # out of descriptors here: the load's problem, not the server's
            self.stats["load_errors"] += 1
            slot.start_at = now + 0.05
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            if err in _LOAD_ERRNOS:
                self.stats["load_errors"] += 1
                slot.start_at = now + 0.05
                return
            self.stats["connect_failed"] += 1
            self.fail(conn, "connect", f"connect failed: {errno.errorcode.get(err, err)}")
            slot.start_at = now + 0.1
            return
        conn.sock = sock
        slot.conn = conn
        self.stats["connections"] += 1
        self.sel.register(sock, selectors.EVENT_WRITE, conn)

    def retire(self, conn: Conn, pause: float = 0.0) -> None:
        """Forget the connection (its socket is already closed or closing here)."""
        slot = conn.slot
        if slot.conn is conn:
            slot.conn = None
            slot.start_at = time.monotonic() + pause
        if conn.sock is not None:
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            try:
                conn.sock.close()
            except OSError:
                pass
            conn.sock = None

    # -- output ---------------------------------------------------------------------------

    def send(self, conn: Conn, data: bytes) -> None:
        conn.out += data
        self.flush(conn)

    def flush(self, conn: Conn) -> bool:
        """Write what the socket takes; False if the connection turned out dead."""
        sock = conn.sock
        assert sock is not None
        while conn.out:
            try:
                n = sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.server_gone(conn, f"send failed: {exc}")
                return False
            del conn.out[:n]
        self.interest(conn)
        return True

    def interest(self, conn: Conn) -> None:
        if conn.sock is None:
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        try:
            if self.sel.get_key(conn.sock).events != want:
                self.sel.modify(conn.sock, want, conn)
        except KeyError:
            self.sel.register(conn.sock, want, conn)

    # -- events ----------------------------------------------------------------------------

    def on_writable(self, conn: Conn) -> None:
        if conn.state == CONNECTING:
            assert conn.sock is not None
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                if err in _LOAD_ERRNOS:
                    self.stats["load_errors"] += 1
                else:
                    self.stats["connect_failed"] += 1
                    self.fail(conn, "connect", f"connect failed: {errno.errorcode.get(err, err)}")
                self.retire(conn, 0.1)
                return
            conn.state = BANNER
            conn.deadline, conn.deadline_what = time.monotonic() + STALL_SECONDS, "the banner"
            self.interest(conn)
            return
        self.flush(conn)

    def on_readable(self, conn: Conn) -> None:
        assert conn.sock is not None
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            if conn.state == DRAIN:
                self.stats["drain_reset"] += 1
                self.retire(conn)
            else:
                self.server_gone(conn, "the server reset the connection")
            return
        except OSError as exc:
            self.server_gone(conn, f"recv failed: {exc}")
            return
        if not data:
            if conn.state == DRAIN:
                self.stats["closed_by_server"] += 1
                self.retire(conn)
            else:
                self.server_gone(conn, "the server closed the connection without a word")
            return
        conn.buf += data
        if conn.state == BANNER:
            self.on_banner(conn)
        elif conn.line_mode:
            self.on_lines(conn)
        else:
            self.on_frames(conn)

    def server_gone(self, conn: Conn, text: str) -> None:
        self.stats["server_gone"] += 1
        self.fail(conn, "closed", text)
        self.retire(conn, 0.05)

    def on_deadline(self, conn: Conn, now: float) -> None:
        if conn.state == WAITING_ST and conn.deadline_what == "pairing":
            # Nobody to pair with in time: not a failure; leave one way or another.
            self.stats["pair_wait_expired"] += 1
            self.leave(conn, self.rng.choice(["bye", "close", "reset", "midframe"]))
            return
        # Make sure nothing is waiting in the socket before calling it a stall.
        if conn.sock is not None and conn.state != CONNECTING:
            self.on_readable(conn)
            if conn.slot.conn is not conn or conn.deadline > now:
                return
        self.stats["stalls"] += 1
        self.fail(conn, "stall", f"nothing for {STALL_SECONDS:g}s while waiting for {conn.deadline_what}")
        self.reset(conn)

    # -- banner and handshake ---------------------------------------------------------------

    def on_banner(self, conn: Conn) -> None:
        i = conn.buf.find(b"\n")
        if i < 0:
            if len(conn.buf) > 200:
                self.violation(conn, f"no banner line within 200 bytes: {bytes(conn.buf[:80])!r}")
            return
        line = bytes(conn.buf[: i + 1])
        del conn.buf[: i + 1]
        if not line.startswith(b"CHATPAIR/1 ") or not line.endswith(b"\r\n") or len(line) > 200:
            self.violation(conn, f"bad banner {line[:100]!r}")
            return
        if conn.buf:
            self.violation(conn, f"bytes after the banner before HELLO: {bytes(conn.buf[:80])!r}")
            return
        if conn.handshake_leave:
            self.stats["leave_handshake_" + conn.handshake_leave] += 1
            if conn.handshake_leave == "half_hello":
                hello = self.hello_bytes(conn)
                self.send(conn, hello[: self.rng.randint(1, len(hello) - 1)])
                if conn.sock is not None:
                    self.close(conn, "close")
            elif conn.handshake_leave == "reset":
                self.reset(conn)
            else:
                self.close(conn, "close")
            return
        conn.state = HANDSHAKE
        conn.deadline, conn.deadline_what = time.monotonic() + STALL_SECONDS, "the answer to HELLO"
        self.send(conn, self.hello_bytes(conn))

    def hello_bytes(self, conn: Conn) -> bytes:
        if conn.line_mode:
            return (conn.name + (" " + conn.room if conn.room else "") + "\n").encode()
        return frame(HELLO, json.dumps({"version": 1, "name": conn.name, "room": conn.room}).encode())

    # -- frame mode ---------------------------------------------------------------------------

    def on_frames(self, conn: Conn) -> None:
        buf = conn.buf
        while len(buf) >= 5 and conn.slot.conn is conn:
            length, ftype = struct.unpack_from(">IB", buf)
            if not 1 <= length <= MAX_FRAME:
                self.violation(conn, f"frame length {length}")
                return
            if len(buf) < 4 + length:
                return
            payload = bytes(buf[5:4 + length])
            del buf[:4 + length]
            obj: Any = None
            if ftype in JSON_TYPES:
                try:
                    obj = json.loads(payload.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    obj = None
                if not isinstance(obj, dict):
                    self.violation(conn, f"{TYPE_NAMES[ftype]} payload is not a JSON object: {payload[:100]!r}")
                    return
            self.on_frame(conn, ftype, payload, obj)

    def on_frame(self, conn: Conn, ftype: int, payload: bytes, obj: Any) -> None:
        st = conn.state
        if ftype == PING:
            if st != DRAIN:
                self.send(conn, frame(PONG, payload))
            return
        if ftype == ERROR:
            self.on_error(conn, obj.get("code"), str(obj.get("message")))
            return
        if ftype == NOTICE:
            if obj.get("code") != "undelivered" or not isinstance(obj.get("message"), str):
                self.violation(conn, f"unexpected NOTICE {obj!r}")
                return
            if st == HANDSHAKE:
                self.violation(conn, f"NOTICE before WELCOME/WAITING: {obj!r}")
                return
            self.stats["undelivered"] += 1
            return
        if st == HANDSHAKE:
            if not conn.got_welcome:
                if ftype != WELCOME:
                    self.violation(conn, f"first frame {TYPE_NAMES.get(ftype, hex(ftype))}, not WELCOME")
                    return
                if obj.get("version") != 1 or not isinstance(obj.get("max_frame"), int):
                    self.violation(conn, f"bad WELCOME {obj!r}")
                    return
                conn.got_welcome = True
                return
            if ftype != WAITING:
                self.violation(conn, f"{TYPE_NAMES.get(ftype, hex(ftype))} after WELCOME, not WAITING")
                return
            if obj.get("room", "missing") != conn.room:
                self.violation(conn, f"WAITING {obj!r} for room {conn.room!r}")
                return
            self.stats["handshakes"] += 1
            self.now_waiting(conn)
            return
        if ftype == WAITING:
            if obj.get("room", "missing") != conn.room:
                self.violation(conn, f"WAITING {obj!r} for room {conn.room!r}")
            elif st == PAIRED_ST:
                self.next_answered(conn, "WAITING")
            elif st == WAITING_ST and conn.requeue_waiting:
                conn.requeue_waiting = False
            elif st == WAITING_ST and conn.pending_next > 0:
                conn.pending_next -= 1
            # else: draining, or a NEXT the server took while we waited (answered WAITING)
            return
        if ftype == PAIRED:
            self.on_paired(conn, obj.get("peer"), obj.get("room", "missing"))
            return
        if ftype == PEER_LEFT:
            self.on_peer_left(conn, obj.get("peer"), obj.get("reason"))
            return
        if ftype == MSG:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                self.violation(conn, f"MSG that is not UTF-8: {payload[:100]!r}")
                return
            self.on_msg(conn, text)
            return
        self.violation(conn, f"unexpected frame {TYPE_NAMES.get(ftype, hex(ftype))} {payload[:100]!r}")

    # -- line mode ----------------------------------------------------------------------------

    def on_lines(self, conn: Conn) -> None:
        buf = conn.buf
        while conn.slot.conn is conn:
            i = buf.find(b"\n")
            if i < 0:
                if len(buf) > MAX_FRAME:
                    self.violation(conn, f"line longer than {MAX_FRAME} bytes")
                return
            raw = bytes(buf[:i])
            del buf[: i + 1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.violation(conn, f"line that is not UTF-8: {raw[:100]!r}")
                return
            self.on_line(conn, line)

    def on_line(self, conn: Conn, line: str) -> None:
        st = conn.state
        if not line.startswith("* "):
            peer, sep, text = line.partition(": ")
            if not sep:
                self.violation(conn, f"line that is neither a notice nor a message: {line[:100]!r}")
            elif st == HANDSHAKE:
                self.violation(conn, f"a message before WAITING: {line[:100]!r}")
            elif st in (PAIRED_ST, DRAIN) and peer != conn.peer:
                self.violation(conn, f"message from {peer!r} while paired with {conn.peer!r}: {line[:100]!r}")
            else:
                self.on_msg(conn, text)
            return
        note = line[2:]
        if note.startswith("error: "):
            self.on_error(conn, "room_full" if " is full" in note else "(line mode)", note)
        elif note.startswith("waiting for a partner"):
            want = "waiting for a partner" + (f" in room {conn.room}" if conn.room else "")
            if note != want:
                self.violation(conn, f"{line!r}, expected '* {want}'")
            elif st == HANDSHAKE:
                self.stats["handshakes"] += 1
                self.now_waiting(conn)
            elif st == PAIRED_ST:
                self.next_answered(conn, repr(line))
            elif st == WAITING_ST and conn.pending_next > 0:
                conn.pending_next -= 1
        elif note.startswith("paired with "):
            if st == HANDSHAKE:
                self.violation(conn, f"{line!r} before '* waiting for a partner'")
                return
            self.on_paired(conn, note[len("paired with "):], conn.room)
        elif " left (" in note and note.endswith("); waiting for a partner"):
            who, _, rest = note.partition(" left (")
            self.on_peer_left(conn, who, rest[: -len("); waiting for a partner")])
        elif "not delivered" in note:
            if st == HANDSHAKE:
                self.violation(conn, f"{line!r} before '* waiting for a partner'")
                return
            self.stats["undelivered"] += 1
        elif note == "bye" and st == DRAIN:
            pass
        else:
            self.violation(conn, f"unexpected line {line[:100]!r}")

    # -- what both modes mean -----------------------------------------------------------------

    def on_error(self, conn: Conn, code: Any, message: str) -> None:
        if (code == "room_full" and conn.room and conn.state == HANDSHAKE
                and (conn.got_welcome or conn.line_mode)):
            self.stats["room_full"] += 1
            conn.state = DRAIN
            conn.deadline, conn.deadline_what = time.monotonic() + STALL_SECONDS, "the close after room_full"
            return
        if code == "too_many_connections":
            self.stats["too_many_connections"] += 1
        self.fail(conn, "error", f"ERROR {code}: {message[:200]}")
        conn.state = DRAIN
        conn.deadline, conn.deadline_what = time.monotonic() + STALL_SECONDS, "the close after ERROR"

    def next_answered(self, conn: Conn, what: str) -> None:
        """WAITING while paired: the answer to a NEXT of ours (perhaps one sent in an earlier pairing)."""
        if conn.pending_next <= 0:
            self.violation(conn, f"{what} while paired with {conn.peer}, with no NEXT sent")
            return
        conn.pending_next -= 1
        conn.excluded.add(conn.peer)  # whichever pairing our NEXT ended, it ended this one
        self.now_waiting(conn)

    def now_waiting(self, conn: Conn) -> None:
        conn.state = WAITING_ST
        conn.peer, conn.peer_seq, conn.received = None, None, 0
        conn.next_sent = False
        conn.requeue_waiting = False
        conn.deadline = time.monotonic() + self.rng.uniform(*PAIR_WAIT)
        conn.deadline_what = "pairing"

    def on_paired(self, conn: Conn, peer: Any, room: Any) -> None:
        if conn.state == DRAIN:
            # BYE already sent; the server may have paired us just before reading it.
            conn.peer, conn.peer_seq = peer, None
            return
        if conn.state != WAITING_ST:
            self.violation(conn, f"PAIRED with {peer!r} while {STATE_NAMES[conn.state]}"
                                 f"{' with ' + conn.peer if conn.peer else ''}")
            return
        if not isinstance(peer, str) or not peer or peer == conn.name:
            self.violation(conn, f"PAIRED with {peer!r}")
            return
        if room != conn.room:
            self.violation(conn, f"PAIRED in room {room!r}, asked for {conn.room!r}")
            return
        if conn.requeue_waiting:
            self.violation(conn, f"PAIRED with {peer} before the WAITING that follows PEER_LEFT")
            return
        if peer in conn.excluded:
            self.violation(conn, f"paired again with {peer}, left by NEXT on this connection")
            return
        conn.state = PAIRED_ST
        conn.peer, conn.peer_seq, conn.received = peer, None, 0
        self.stats["pairings"] += 1
        conn.hasty = self.rng.random() < HASTY_SHARE
        conn.deadline, conn.deadline_what = time.monotonic() + STALL_SECONDS, f"{peer}'s messages"
        for _ in range(MESSAGES):
            self.send(conn, self.msg_bytes(conn, f"{conn.name} {conn.sent_seq}"))
            conn.sent_seq += 1
            self.stats["msgs_sent"] += 1
            if conn.sock is None:
                return
        if conn.hasty:
            self.stats["hasty"] += 1
            self.leave(conn, self.pick_leave())

    def msg_bytes(self, conn: Conn, text: str) -> bytes:
        return (text + "\n").encode() if conn.line_mode else frame(MSG, text.encode())

    def on_msg(self, conn: Conn, text: str) -> None:
        if conn.state not in (PAIRED_ST, DRAIN) or conn.peer is None:
            self.violation(conn, f"a message while {STATE_NAMES[conn.state]}: {text[:100]!r}")
            return
        if text.startswith(CUT):
            # A line-mode partner's last line, cut short by its close: the server
            # may deliver a last line without newline (or not). Nothing may follow it.
            conn.peer_seq = -1
            self.stats["cut_lines_delivered"] += 1
            return
        if conn.peer_seq == -1:
            self.violation(conn, f"message {text[:100]!r} from {conn.peer} after its cut-short last line")
            return
        sender, _, seq = text.partition(" ")
        if sender != conn.peer or not seq.isdigit():
            self.violation(conn, f"message {text[:100]!r} while paired with {conn.peer}")
            return
        n = int(seq)
        if conn.peer_seq is not None and n != conn.peer_seq:
            self.violation(conn, f"from {conn.peer}: message {n}, expected {conn.peer_seq} "
                                 "(lost, repeated or out of order)")
            return
        conn.peer_seq = n + 1
        conn.received += 1
        self.stats["msgs_received"] += 1
        if conn.state == PAIRED_ST and conn.received >= MESSAGES and not conn.next_sent:
            self.stats["chats"] += 1
            self.leave(conn, self.pick_leave())

    def on_peer_left(self, conn: Conn, peer: Any, reason: Any) -> None:
        if conn.state == DRAIN:
            conn.peer = None
            return
        if conn.state != PAIRED_ST:
            self.violation(conn, f"PEER_LEFT {peer!r} ({reason}) while {STATE_NAMES[conn.state]}")
            return
        if peer != conn.peer:
            self.violation(conn, f"PEER_LEFT for {peer!r} while paired with {conn.peer!r}")
            return
        if reason not in ("bye", "next", "disconnected"):
            # timeout: nobody here is idle for 90 s; error: no one here breaks the protocol
            self.violation(conn, f"PEER_LEFT {peer} with reason {reason!r}")
            return
        self.stats["peer_left_" + reason] += 1
        if reason == "next":
            conn.excluded.add(peer)
        self.now_waiting(conn)
        conn.requeue_waiting = not conn.line_mode  # WAITING follows (line mode: said already)

    def violation(self, conn: Conn, text: str) -> None:
        self.stats["violations"] += 1
        self.fail(conn, "protocol", text)
        self.reset(conn)

    # -- leaving ----------------------------------------------------------------------------------

    def pick_leave(self) -> str:
        total = sum(w for _, w in LEAVES)
        x = self.rng.random() * total
        for kind, w in LEAVES:
            x -= w
            if x < 0:
                return kind
        return LEAVES[-1][0]

    def leave(self, conn: Conn, kind: str) -> None:
        self.stats["leave_" + kind] += 1
        if kind == "bye":
            conn.state = DRAIN
            conn.deadline, conn.deadline_what = time.monotonic() + STALL_SECONDS, "the close after BYE"
            self.send(conn, b"/quit\n" if conn.line_mode else frame(BYE))
        elif kind == "next":
            if conn.peer is not None:
                conn.excluded.add(conn.peer)
            conn.pending_next += 1
            conn.next_sent = True
            conn.deadline, conn.deadline_what = time.monotonic() + STALL_SECONDS, "WAITING after NEXT"
            self.send(conn, b"/next\n" if conn.line_mode else frame(NEXT))
        elif kind == "close":
            self.close(conn, "close")
        elif kind == "reset":
            self.reset(conn)
        else:  # midframe: part of a message, then close (or reset)
            data = self.msg_bytes(conn, f"{CUT}{conn.name} {conn.sent_seq} cut short")
            if conn.line_mode:
                data = data[:-1]  # no newline: the line never ends
            self.send(conn, data[: self.rng.randint(1, len(data) - 1)])
            if conn.sock is not None:
                if self.rng.random() < 0.5:
                    self.close(conn, "close")
                else:
                    self.reset(conn)

    def close(self, conn: Conn, why: str) -> None:
        """A plain close: FIN first (so unread input cannot turn it into a reset)."""
        if conn.sock is not None:
            if conn.out:
                self.flush(conn)
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        self.retire(conn)

    def reset(self, conn: Conn) -> None:
        if conn.sock is not None:
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.retire(conn)


def run_load(port: int, clients: int, seconds: float, tag: str = "a", seed: int = 0) -> dict[str, Any]:
    return Load(port, clients, seconds, tag, seed).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--tag", default="a", help="makes names and rooms unique across load processes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = run_load(args.port, args.clients, args.seconds, args.tag, args.seed)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
