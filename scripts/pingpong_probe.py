"""A lean ping-pong load: the cheapest client that still speaks PROTOCOL.md.

``chatpair bench`` checks every message (sequence, send time, content); that
costs CPU in the load process, and on a two-core machine the load and the
server share the cores. This probe does the least a ping-pong load can do -
one process, epoll, a pre-built frame, one latency sample per message - so it
shows what the server does when the load is cheap. docs/performance.md quotes
it next to the bench.

    chatpair server --port 0 -q &        # note the port it prints
    python scripts/pingpong_probe.py PORT --pairs 100 --seconds 5

``--work-us N`` makes the load heavier on purpose: it spins N microseconds
of its own per message before answering, like a client that checks what it
receives (``chatpair bench`` spends about 4 us of Python per message). A
sweep over N shows how the ratio of two servers depends on what the load
costs (docs/performance.md, "the ceiling of the ping-pong ratio").
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import struct
import time

HEADER = struct.Struct(">IB")


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload) + 1, ftype) + payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--work-us", type=float, default=0.0,
                        help="spin this many microseconds per message before answering")
    args = parser.parse_args()

    socks = []
    for i in range(args.pairs * 2):
        s = socket.create_connection((args.host, args.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = {"version": 1, "name": f"p{i}", "room": f"probe{i // 2}"}
        s.sendall(frame(1, json.dumps(hello).encode()))
        socks.append(s)
    for s in socks:  # wait for PAIRED (its JSON has a "peer" key)
        seen = b""
        while b'"peer"' not in seen:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("the server closed a connection before pairing")
            seen += chunk

    work_ns = int(args.work_us * 1000)
    msg = frame(2, b"x" * args.size)
    size = len(msg)
    partner = {}
    for a, b in zip(socks[::2], socks[1::2]):
        partner[a], partner[b] = b, a
    sel = selectors.DefaultSelector()
    got = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        got[s] = 0
    sent_at = {}
    latencies: list[int] = []
    for a in socks[::2]:
        sent_at[partner[a]] = time.perf_counter_ns()
        a.send(msg)
    start = time.perf_counter()
    end = start + args.seconds
    while time.perf_counter() < end:
        for key, _ in sel.select(0.1):
            s = key.fileobj
            got[s] += len(s.recv(65536))
            while got[s] >= size:  # one whole message arrived: answer it
                got[s] -= size
                now = time.perf_counter_ns()
                latencies.append(now - sent_at[s])
                if work_ns:  # the load's own work on the message (a spin: it must not sleep)
                    until = now + work_ns
                    while (now := time.perf_counter_ns()) < until:
                        pass
                sent_at[partner[s]] = now
                s.send(msg)
    elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(n - 1, int(n * p))] / 1000

    print(f"{args.pairs} pairs pingpong: {n / elapsed / 1000:.1f}k msg/s "
          f"p50 {pct(0.5):.0f}us p99 {pct(0.99):.0f}us p999 {pct(0.999):.0f}us")


if __name__ == "__main__":
    main()
