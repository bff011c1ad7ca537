"""The yardstick for chatpair's speed: a bare relay on uvloop.

Not a chat server. It speaks just enough of the chatpair protocol for
``chatpair bench`` (frame mode only): the banner; a HELLO answered with
WELCOME and WAITING; PAIRED to both once a partner is there, pairs made first
come first served; then it copies bytes both ways without looking at them.
No NEXT, BYE, PING, keepalive, line mode, validation or limits: when one side
closes it closes the other. Every chatpair speed figure is a ratio against
this relay, measured in the same sitting on the same machine.

Pairing is first come first served per room, as the protocol says: clients
without a room (null) are one queue, clients with a room code only meet each
other. ``chatpair bench`` gives every pair its own room and checks that each
client is paired with the partner it expects, so a relay that ignored rooms
would cross its pairs whenever connections overlap.

uvloop is not a dependency of chatpair; it lives in a bench-only venv:

    PY=$(bash scripts/bench_env.sh)     # /tmp/chatpair-bench-venv by default
    $PY scripts/uvloop_relay.py --port 0 &      # prints: listening on 127.0.0.1:PORT
    chatpair bench --target 127.0.0.1:PORT --server-pid $! -m pingpong -P 100

Without uvloop it runs on the default asyncio loop and says so on stderr:
figures against that are not the yardstick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

from chatpair.netutil import raise_fd_limit  # scripts/bench_env.sh installs chatpair beside uvloop

NAME = "uvloop-relay/1"
BANNER = f"CHATPAIR/1 {NAME} type your name and press Enter\r\n".encode()
HELLO, WELCOME, WAITING, PAIRED = 0x01, 0x10, 0x11, 0x12
MAX_HELLO = 1024  # protocol section 2: nothing bigger before the handshake
WAIT_BUFFER = 65536  # read no more than this from a client still waiting


def frame(ftype: int, obj: dict) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return (len(payload) + 1).to_bytes(4, "big") + bytes([ftype]) + payload


GREETING = frame(WELCOME, {"version": 1, "server": NAME, "max_frame": 65536,
                           "ping_interval": 30, "idle_timeout": 90})

waiting: dict[str | None, Conn] = {}  # room -> the client waiting in it


class Conn(asyncio.Protocol):
    """One client: handshake, then a dumb pipe to its partner's transport."""

    transport: asyncio.Transport

    def __init__(self) -> None:
        self.buf = bytearray()  # the HELLO, then whatever came before PAIRED
        self.name: str | None = None
        self.room: str | None = None
        self.peer: Conn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(BANNER)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:  # the hot path: copy, look at nothing
            self.peer.transport.write(data)
            return
        self.buf += data
        if self.name is None:
            self.handshake()
        elif len(self.buf) > WAIT_BUFFER:
            self.transport.pause_reading()  # resumed once paired

    def handshake(self) -> None:
        buf = self.buf
        if len(buf) < 5:
            return
        size = int.from_bytes(buf[:4], "big")
        if buf[0] != 0:
            self.transport.write(b"* error: uvloop-relay speaks frame mode only\r\n")
        if buf[0] != 0 or not 1 <= size <= MAX_HELLO or buf[4] != HELLO:
            self.transport.close()  # line mode, too big or not HELLO: not for a yardstick
            return
        if len(buf) < 4 + size:
            return
        try:
            hello = json.loads(buf[5:4 + size])
            name, room = str(hello["name"]), hello.get("room")
        except (ValueError, TypeError, KeyError):
            self.transport.close()
            return
        self.name, self.room = name, room
        del buf[:4 + size]  # what is left goes to the partner once paired
        hello_reply = GREETING + frame(WAITING, {"room": room})
        other = waiting.pop(room, None)
        if other is None:
            waiting[room] = self
            self.transport.write(hello_reply)
        else:
            self.pair(other, hello_reply)

    def pair(self, other: Conn, hello_reply: bytes) -> None:
        """Pair this newcomer with ``other``, who was waiting; flush both buffers."""
        self.peer, other.peer = other, self
        other.transport.write(frame(PAIRED, {"peer": self.name, "room": self.room}) + self.buf)
        self.transport.write(hello_reply + frame(PAIRED, {"peer": other.name, "room": self.room})
                             + other.buf)
        self.buf = other.buf = bytearray()
        other.transport.resume_reading()

    # Flow control: when this client's outgoing buffer is over the high-water
    # mark (64 KiB by default), stop reading from the partner who fills it.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if waiting.get(self.room) is self:
            del waiting[self.room]
        if self.peer is not None:
            self.peer.transport.close()  # after what is already buffered for it


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, host, port, reuse_address=True, backlog=4096)
    bound = server.sockets[0].getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"listening on {shown}:{bound[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7878, help="0: any free port (printed)")
    args = parser.parse_args()
    raise_fd_limit()
    try:
        import uvloop
    except ImportError as err:
        print(f"uvloop-relay: WARNING: uvloop is not importable ({err}); running on the "
              "default asyncio loop, which is NOT the yardstick", file=sys.stderr, flush=True)
        run = asyncio.run
    else:
        print(f"uvloop-relay: running on uvloop {uvloop.__version__}", file=sys.stderr, flush=True)
        run = uvloop.run
    try:
        run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
