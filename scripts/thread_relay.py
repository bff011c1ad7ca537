"""A minimal thread-per-direction relay, kept only to measure against.

The teaching demo chatpair grew from gave each chat room its own thread.
The obvious full-duplex version of that is two blocking threads per room,
one per direction. ``docs/performance.md`` compares it with chatpair's
selector relays using ``chatpair bench --target``; this script is that
comparison's other side, so the numbers can be reproduced:

    python scripts/thread_relay.py --port 7900 &
    chatpair bench --target 127.0.0.1:7900 --mode pingpong --pairs 100

It speaks just enough of the protocol for the benchmark (banner, HELLO,
WELCOME, WAITING, PAIRED by room, verbatim relay). It validates nothing, has
no keepalive, no line mode, no limits: it is an upper bound for the thread
model's speed, not a server anyone should run.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import threading

HEADER = struct.Struct(">IB")


def frame(ftype: int, obj: dict) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(len(payload) + 1, ftype) + payload


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def pump(src: socket.socket, dst: socket.socket) -> None:
    """One direction of one room: copy bytes until either side closes."""
    try:
        while True:
            data = src.recv(262144)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Rooms:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[str | None, tuple[socket.socket, str]] = {}

    def join(self, sock: socket.socket, name: str, room: str | None) -> None:
        with self.lock:
            other = self.waiting.pop(room, None)
            if other is None:
                self.waiting[room] = (sock, name)
                return
        peer, peer_name = other
        peer.sendall(frame(0x12, {"peer": name, "room": room}))
        sock.sendall(frame(0x12, {"peer": peer_name, "room": room}))
        for src, dst in ((sock, peer), (peer, sock)):
            threading.Thread(target=pump, args=(src, dst), daemon=True).start()


def handshake(sock: socket.socket, rooms: Rooms) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"CHATPAIR/1 thread-relay/0 measurement only\r\n")
        length, ftype = HEADER.unpack(read_exact(sock, 5))
        hello = json.loads(read_exact(sock, length - 1))
        sock.sendall(frame(0x10, {"version": 1, "server": "thread-relay/0", "max_frame": 65536,
                                  "ping_interval": 3600, "idle_timeout": 7200})
                     + frame(0x11, {"room": hello.get("room")}))
        rooms.join(sock, hello["name"], hello.get("room"))
    except (OSError, ValueError, KeyError):
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7900)
    args = parser.parse_args()
    threading.stack_size(256 * 1024)
    rooms = Rooms()
    server = socket.create_server((args.host, args.port), backlog=4096)
    print(f"listening on {args.host}:{server.getsockname()[1]}", flush=True)
    try:
        while True:
            sock, _ = server.accept()
            threading.Thread(target=handshake, args=(sock, rooms), daemon=True).start()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
