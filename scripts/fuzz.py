#!/usr/bin/env python3
"""Fuzz a live chatpair server over real sockets, for as long as you like.

Usage::

    python scripts/fuzz.py                       # 60 s, seed 1, 50 connections a round
    python scripts/fuzz.py --seconds 600 --seed 7 --connections 200
    python scripts/fuzz.py --server-arg=--workers=2 --server-arg=--rate=500

Options:

``--seconds N``       how long to run (default 60); rounds run until the time is up.
``--seed N``          seed of the random generator (default 1). The same seed
                      gives the same bytes on the wire, round after round (the
                      server's timing still varies, so a failure may need a
                      few runs to show again).
``--connections N``   fuzzing connections open at once in each round (default 50).
``--server-arg ARG``  extra option for ``chatpair server`` (repeatable).
``-v``                print one line per round.

It starts ``python -m chatpair server --host 127.0.0.1 --port 0 -q
--handshake-timeout 2`` itself, then in rounds:

1. opens ``--connections`` connections at once; each sends one kind of
   hostile input in random chunks: random bytes; line-mode garbage (control
   characters, escapes, overlong lines, bad UTF-8, telnet IAC); a HELLO that
   is mutated (flipped bits, truncated, length or type changed); or a valid
   handshake followed by a stream of valid and mutated frames (or lines) -
   those get paired with each other, so the relay path is fuzzed too. Each
   connection reads what the server says, and is closed politely, abruptly
   (RST), or left for the server's deadline;
2. checks that two honest clients still pair and exchange a message both
   ways within 5 s, that the listener process is the same one as at the
   start (a crash would be hidden by the automatic restart otherwise), and
   that the server has not logged a traceback.

It stops the server with SIGTERM at the end (the exit code must be 0) and
exits 0 if the server survived every round, or 1 with the round, the seed
and the server's last log lines.

The generators here (:func:`mutate`, :func:`hostile_stream`, :func:`fuzz_round`)
are also used by ``tests/test_fuzz.py`` for a short run in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HELLO, MSG, NEXT, BYE, PING, PONG = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
WELCOME, WAITING, PAIRED, ERROR = 0x10, 0x11, 0x12, 0x1F
ALL_TYPES = list(range(0x00, 0x21)) + [0x7F, 0x80, 0xFF]


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", len(payload) + 1, ftype) + payload


def hello(name: str, room: str | None = None) -> bytes:
    return frame(HELLO, json.dumps({"version": 1, "name": name, "room": room}).encode())


def random_text(rng: random.Random, n: int) -> str:
    """Text with the nasty parts of Unicode: controls, escapes, bidi, combining, astral."""
    pools = [
        "abcxyz ABC 0123456789 .,-_",
        "\x1b[2J\x1b]0;title\x07\x1b]8;;http://x\x07\x9b\x07\x08\r\t\x7f\x00",
        "\u202e\u2066\u2069\u200e\u2028\u2029\ufeff\ufffd",
        "éüßЖ中文🎉\U0010ffff\u0301",
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def valid_frame(rng: random.Random) -> bytes:
    """One frame a well-behaved client may send after HELLO."""
    kind = rng.random()
    if kind < 0.6:
        return frame(MSG, (random_text(rng, rng.randint(1, 200)) or "x").encode())
    if kind < 0.75:
        return frame(PING, rng.randbytes(rng.randint(0, 64)))
    if kind < 0.85:
        return frame(PONG, rng.randbytes(rng.randint(0, 64)))
    if kind < 0.95:
        return frame(NEXT)
    return frame(BYE)


def random_hello(rng: random.Random) -> bytes:
    """A HELLO frame with odd but well-formed JSON (valid or not as a HELLO)."""
    values = [1, 2, 0, -1, True, None, "1", 1.0, 2**64, [], {}, "x" * 40, "Zoë", "a b", "", "\x1b[31m"]
    obj = {"version": rng.choice(values[:8]) if rng.random() < 0.3 else 1,
           "name": rng.choice(values) if rng.random() < 0.3 else f"f{rng.randrange(10**6)}",
           "room": rng.choice(values) if rng.random() < 0.3 else None}
    if rng.random() < 0.1:
        obj["extra"] = {"nested": [1, 2, {"deep": "x" * rng.randint(0, 300)}]}
    return frame(HELLO, json.dumps(obj).encode())


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random mutation of ``data``: bits flipped, cut, length or type changed, bytes spliced."""
    buf = bytearray(data)
    op = rng.randrange(8)
    if op == 0 and buf:  # flip a few bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif op == 1 and buf:  # truncate
        del buf[rng.randrange(len(buf)):]
    elif op == 2 and len(buf) >= 4:  # change the length field
        new = rng.choice([0, 1, 2, len(buf) - 4 + rng.randint(-3, 3), 1024, 1025, 65536, 65537,
                          2**24 - 1, 2**24, 2**31, 2**32 - 1, rng.randrange(2**32)])
        buf[0:4] = struct.pack(">I", max(0, min(new, 2**32 - 1)))
    elif op == 3 and len(buf) >= 5:  # change the type
        buf[4] = rng.choice(ALL_TYPES)
    elif op == 4:  # insert random bytes
        i = rng.randrange(len(buf) + 1)
        buf[i:i] = rng.randbytes(rng.randint(1, 16))
    elif op == 5 and buf:  # delete a slice
        i = rng.randrange(len(buf))
        del buf[i:i + rng.randint(1, 16)]
    elif op == 6:  # bad UTF-8 in the payload
        buf += bytes([rng.choice([0x80, 0xC0, 0xC3, 0xED, 0xF4, 0xF8, 0xFF])])
        if len(buf) >= 4:
            buf[0:4] = struct.pack(">I", len(buf) - 4)
    else:  # duplicate a slice
        if buf:
            i = rng.randrange(len(buf))
            buf[i:i] = buf[i:i + rng.randint(1, 32)]
    return bytes(buf)


def garbage_line(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.3:
        return random_text(rng, rng.randint(0, 120)).encode() + b"\n"
    if kind < 0.45:
        return rng.choice([b"/next", b"/quit", b"/help", b"/bogus", b"//slash", b"", b"\r"]) + b"\r\n"
    if kind < 0.55:
        return b"\xff\xfb\x01\xff\xfa\x18\x01\xff\xf0" + rng.randbytes(rng.randint(0, 20)) + b"\n"
    if kind < 0.65:
        return b"y" * rng.choice([1023, 1024, 1025, 65535, 65536, 70000]) + b"\n"
    return bytes(rng.randrange(1, 256) for _ in range(rng.randint(1, 200))) + b"\n"


KINDS = ("random", "line_garbage", "mutated_hello", "frames", "lines")


def hostile_stream(rng: random.Random, kind: str, n: int) -> tuple[bytes, bytes]:
    """(handshake, rest) for connection number ``n`` of the given kind."""
    if kind == "random":
        return b"", rng.randbytes(rng.randint(1, 3000))
    if kind == "line_garbage":
        return b"", b"".join(garbage_line(rng) for _ in range(rng.randint(1, 6)))
    if kind == "mutated_hello":
        data = random_hello(rng) if rng.random() < 0.5 else hello(f"m{n}")
        for _ in range(rng.randint(1, 3)):
            data = mutate(rng, data)
        return b"", data + b"".join(mutate(rng, valid_frame(rng)) for _ in range(rng.randint(0, 3)))
    if kind == "frames":
        frames = [valid_frame(rng) if rng.random() < 0.6 else mutate(rng, valid_frame(rng))
                  for _ in range(rng.randint(1, 40))]
        return hello(f"fz{n}"), b"".join(frames)
    # "lines": a valid name line, then garbage lines
    return f"ln{n}\n".encode(), b"".join(garbage_line(rng) for _ in range(rng.randint(1, 20)))


# --------------------------------------------------------------------------
# One round of hostile connections
# --------------------------------------------------------------------------


class _Fuzzer:
    __slots__ = ("sock", "first", "rest", "chunks", "got", "ending", "done", "kind", "paired_at")

    def __init__(self, sock: socket.socket, kind: str, first: bytes, rest: bytes, rng: random.Random) -> None:
        self.sock = sock
        self.kind = kind
        self.first = first
        self.chunks: list[bytes] = []
        pos = 0
        while pos < len(rest):  # random chunking of what follows the handshake
            step = rng.choice([1, 2, 3, 5, 7, 64, 500, 4096, len(rest)])
            self.chunks.append(rest[pos:pos + step])
            pos += step
        self.rest = rest
        self.got = bytearray()
        self.ending = rng.choice(["close", "close", "rst", "linger"])
        self.done = False
        self.paired_at = 0.0


def fuzz_round(port: int, rng: random.Random, connections: int, max_seconds: float = 6.0) -> dict[str, int]:
    """Open ``connections`` hostile connections at once and run them; returns counts by outcome.

    Never raises for what the server does (closing, resetting, refusing):
    surviving that is the server's job, and the caller checks it afterwards.
    """
    stats = {"connections": 0, "closed_by_server": 0, "errors_received": 0, "paired": 0}
    sel = selectors.DefaultSelector()
    fuzzers: list[_Fuzzer] = []
    try:
        for n in range(connections):
            kind = rng.choice(KINDS)
            first, rest = hostile_stream(rng, kind, n)
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                continue
            sock.setblocking(False)
            fz = _Fuzzer(sock, kind, first, rest, rng)
            fuzzers.append(fz)
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, fz)
            stats["connections"] += 1
        deadline = time.monotonic() + max_seconds
        handshake_wait = time.monotonic() + 1.0  # handshaken ones wait this long for a partner
        while time.monotonic() < deadline and any(not f.done for f in fuzzers):
            for key, mask in sel.select(0.05):
                fz: _Fuzzer = key.data
                if mask & selectors.EVENT_READ:
                    try:
                        data = fz.sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        data = b""
                    if data == b"":
                        stats["closed_by_server"] += 1
                        fz.done = True
                        sel.unregister(fz.sock)
                        continue
                    if data:
                        fz.got += data
                        if not fz.paired_at and (b"* paired with" in fz.got or _has_frame(fz.got, PAIRED)):
                            fz.paired_at = time.monotonic()
                            stats["paired"] += 1
                if mask & selectors.EVENT_WRITE and not fz.done:
                    _write_some(fz, handshake_wait)
            for fz in fuzzers:
                if not fz.done and not fz.first and not fz.chunks:
                    _finish(fz, sel)
        for fz in fuzzers:
            stats["errors_received"] += _has_frame(fz.got, ERROR) or b"* error:" in fz.got
    finally:
        for fz in fuzzers:
            try:
                fz.sock.close()
            except OSError:
                pass
        sel.close()
    return stats


def _has_frame(buf: bytes | bytearray, ftype: int) -> bool:
    """Does the server's output (banner line first) contain a frame of ``ftype``?"""
    nl = buf.find(b"\n")
    pos = nl + 1 if nl >= 0 else len(buf)
    while len(buf) - pos >= 5:
        length, t = struct.unpack_from(">IB", buf, pos)
        if t == ftype:
            return True
        if length == 0:
            return False
        pos += 4 + length
    return False


def _write_some(fz: _Fuzzer, handshake_wait: float) -> None:
    try:
        if fz.first:
            sent = fz.sock.send(fz.first)
            fz.first = fz.first[sent:]
            return
        if not fz.chunks:
            return
        if fz.kind in ("frames", "lines") and not fz.paired_at and time.monotonic() < handshake_wait:
            return  # give the handshaken ones a chance to be paired, so the relay sees the rest
        chunk = fz.chunks[0]
        sent = fz.sock.send(chunk)
        if sent < len(chunk):
            fz.chunks[0] = chunk[sent:]
        else:
            fz.chunks.pop(0)
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        fz.first, fz.chunks = b"", []


def _finish(fz: _Fuzzer, sel: selectors.BaseSelector) -> None:
    """Everything is sent: end the connection the way this fuzzer was told to."""
    if fz.ending == "linger":
        return  # leave it to the server's deadlines (closed at the end of the round)
    if fz.ending == "rst":
        try:
            fz.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    try:
        sel.unregister(fz.sock)
    except (KeyError, ValueError):
        pass
    fz.sock.close()
    fz.done = True


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


class Honest:
    """A well-behaved frame-mode client with a deadline on every read."""

    def __init__(self, port: int, name: str, room: str, timeout: float = 5.0) -> None:
        self.deadline = time.monotonic() + timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        line = self._line()
        if not line.startswith(b"CHATPAIR/1 "):
            raise AssertionError(f"bad banner {line!r}")
        self.sock.sendall(hello(name, room))
        self.expect(WELCOME)
        self.expect(WAITING)

    def _more(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"honest client: no answer in time (have {self.buf[:100]!r})")
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise AssertionError(f"honest client: closed by the server (have {self.buf[:200]!r})")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            self._more()
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def expect(self, ftype: int) -> bytes:
        while len(self.buf) < 5 or len(self.buf) < 4 + struct.unpack_from(">I", self.buf)[0]:
            self._more()
        length, got = struct.unpack_from(">IB", self.buf)
        payload, self.buf = self.buf[5:4 + length], self.buf[4 + length:]
        if got != ftype:
            raise AssertionError(f"honest client: expected 0x{ftype:02x}, got 0x{got:02x} {payload[:200]!r}")
        return payload

    def close(self) -> None:
        self.sock.close()


def honest_pair_check(port: int, tag: str, timeout: float = 5.0) -> None:
    """Two honest clients pair (in a room of their own) and chat both ways; AssertionError if not."""
    a = Honest(port, f"honest_a{tag}", f"honest{tag}", timeout)
    try:
        b = Honest(port, f"honest_b{tag}", f"honest{tag}", timeout)
        try:
            b.expect(PAIRED)
            a.expect(PAIRED)
            a.sock.sendall(frame(MSG, b"ping from a"))
            if b.expect(MSG) != b"ping from a":
                raise AssertionError("honest client b got the wrong message")
            b.sock.sendall(frame(MSG, b"pong from b"))
            if a.expect(MSG) != b"pong from b":
                raise AssertionError("honest client a got the wrong message")
            a.sock.sendall(frame(BYE))
        finally:
            b.close()
    finally:
        a.close()


def listener_pid(server_pid: int) -> int | None:
    """The listener process: the server's child started by multiprocessing spawn (Linux /proc)."""
    try:
        with open(f"/proc/{server_pid}/task/{server_pid}/children") as fh:
            kids = [int(x) for x in fh.read().split()]
    except OSError:
        return None
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as fh:
                if b"spawn_main" in fh.read():
                    return kid
        except OSError:
            continue
    return None


def wait_listener_pid(server_pid: int, timeout: float = 10.0) -> int | None:
    """The listener's pid once it exists (it starts just after "listening on"); None without /proc."""
    if not os.path.isdir(f"/proc/{server_pid}"):
        return None
    deadline = time.monotonic() + timeout
    while (pid := listener_pid(server_pid)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid


# --------------------------------------------------------------------------
# The long run
# --------------------------------------------------------------------------


class _Server:
    def __init__(self, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", "0", "-q",
               "--handshake-timeout", "2", *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=ROOT)
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise SystemExit(f"the server did not start: {line!r}")
        self.port = int(line.split()[2].rsplit(":", 1)[1])

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self.log.append(raw.decode(errors="replace"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--connections", type=int, default=50, help="connections per round (default 50)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra chatpair server option")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per round")
    args = parser.parse_args(argv)

    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass

    rng = random.Random(args.seed)
    server = _Server(args.server_arg)
    start_pid = wait_listener_pid(server.proc.pid)
    print(f"fuzzing {server.port} for {args.seconds:g}s, seed {args.seed}, "
          f"{args.connections} connections a round", flush=True)
    end = time.monotonic() + args.seconds
    rounds = 0
    totals: dict[str, int] = {}
    failure = ""
    try:
        while time.monotonic() < end:
            rounds += 1
            # A round lasts until its connections are done, at most 6 s (less at the very end).
            stats = fuzz_round(server.port, rng, args.connections,
                               max_seconds=max(1.0, min(6.0, end - time.monotonic())))
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v
            try:
                honest_pair_check(server.port, str(rounds))
            except (AssertionError, OSError) as err:
                failure = f"round {rounds}: honest clients were not served: {err}"
                break
            pid = listener_pid(server.proc.pid)
            if start_pid is not None and pid != start_pid:
                failure = f"round {rounds}: the listener process {start_pid} died (now {pid})"
                break
            if server.proc.poll() is not None:
                failure = f"round {rounds}: the server exited with {server.proc.returncode}"
                break
            if any("Traceback" in line for line in server.log):
                failure = f"round {rounds}: the server logged a traceback"
                break
            if args.verbose:
                print(f"round {rounds}: {stats}", flush=True)
    finally:
        code = server.stop()
    if not failure and code != 0:
        failure = f"the server exited with {code} on SIGTERM"
    summary = ", ".join(f"{k} {v}" for k, v in totals.items())
    if failure:
        print(f"FAILED (seed {args.seed}): {failure}\n{summary}\nlast server log lines:\n"
              + "".join(server.log[-40:]), file=sys.stderr)
        return 1
    print(f"ok: {rounds} rounds; {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
