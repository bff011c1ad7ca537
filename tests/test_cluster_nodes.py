"""Cluster mode end to end: a real redis-server and real ``chatpair server --cluster`` nodes.

Every node is a subprocess on 127.0.0.1, port 0, started with
``--cluster unix://...`` and its own ``--node-id``; clients are raw frame
clients (tests/conftest.py). Checked here: clients on different nodes are
paired (each exactly once) and chat both ways with nothing lost or
reordered; the open lobby's FIFO and rooms (``room_full`` too) hold across
nodes; NEXT and BYE cross nodes; a node killed with SIGKILL (the whole node)
or stopped with SIGTERM; Redis stopped and started again (empty). Skipped
only when redis-server or the redis package is missing.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import threading
import time

import pytest
from conftest import RawClient, ServerProcess, wait_for
from redisserver import RedisServer, needs_redis, rclient, redis_server  # noqa: F401 (fixtures)

pytestmark = needs_redis

WELCOME, WAITING, PAIRED, PEER_LEFT, NOTICE, ERROR = 0x10, 0x11, 0x12, 0x13, 0x14, 0x1F
MSG, NEXT, BYE = 0x02, 0x03, 0x04


@pytest.fixture
def nodes(redis_server: RedisServer, rclient, start_server):  # noqa: F811 (fixtures)
    """``nodes(n)`` -> n nodes n0..n(n-1) of one cluster on a freshly emptied Redis."""

    def start(n: int = 3) -> list[ServerProcess]:
        return [start_server("--cluster", redis_server.url, "--node-id", f"n{i}") for i in range(n)]

    return start


def join(node: ServerProcess, name: str, room: str | None = None, timeout: float = 5.0) -> RawClient:
    """A client on ``node`` that sent HELLO and read WELCOME and WAITING (or whatever came instead)."""
    client = RawClient(node.port, timeout)
    client.hello(name, room)
    client.expect(WELCOME)
    return client


def frames(client: RawClient, count: int) -> list[tuple[int, bytes]]:
    return [client.read_frame() for _ in range(count)]


def expect_json(client: RawClient, ftype: int) -> dict:
    got = client.expect(ftype)
    assert isinstance(got, dict)
    return got


def chat(a: RawClient, b: RawClient, count: int) -> None:
    """``count`` messages each way at once; each side gets the other's, in order, exactly once."""
    for i in range(count):
        a.send_frame(MSG, f"from a {i}".encode())
        b.send_frame(MSG, f"from b {i}".encode())
    for i in range(count):
        assert b.expect(MSG) == f"from a {i}".encode()
    for i in range(count):
        assert a.expect(MSG) == f"from b {i}".encode()


def paired(a: RawClient, b: RawClient, a_name: str, b_name: str) -> None:
    assert expect_json(a, PAIRED)["peer"] == b_name
    assert expect_json(b, PAIRED)["peer"] == a_name



def join_and_pair(node_a: ServerProcess, name_a: str, node_b: ServerProcess, name_b: str) -> tuple[RawClient, RawClient]:
    """``name_a`` joins on ``node_a`` and waits, ``name_b`` on ``node_b``; both hear PAIRED."""
    a = join(node_a, name_a)
    a.expect(WAITING)
    b = join(node_b, name_b)
    b.expect(WAITING)
    paired(a, b, name_a, name_b)
    return a, b

def left_after_false_alarms(client: RawClient) -> dict:
    """PEER_LEFT, after any NOTICE ``undelivered`` for messages whose ack the dead node never sent.

    (docs/cluster.md: a node killed after writing a message but before its ack
    went out makes that a false alarm, never a silent loss.)
    """
    while True:
        ftype, payload = client.read_frame()
        got = json.loads(payload)
        if ftype == PEER_LEFT:
            return got
        assert ftype == NOTICE and got["code"] == "undelivered", (hex(ftype), got)


# -- pairing and chat ------------------------------------------------------------------------


def test_clients_on_different_nodes_pair_and_chat_both_ways(nodes) -> None:
    n0, n1, n2 = nodes(3)
    for node, name in zip((n0, n1, n2), ("n0", "n1", "n2")):
        node.wait_stderr(f"node {name} joined the cluster", 5)
    alice = join(n0, "alice")
    assert expect_json(alice, WAITING) == {"room": None}
    bob = join(n1, "bob")
    assert expect_json(bob, WAITING) == {"room": None}
    paired(alice, bob, "alice", "bob")
    chat(alice, bob, 500)
    # byte for byte, any UTF-8, sizes up to well over one read
    big = ("é" * 30000).encode()
    alice.send_frame(MSG, big)
    assert bob.expect(MSG) == big
    # a line-mode client on a third node talks to a frame-mode client across nodes
    carol = join(n2, "carol")
    assert expect_json(carol, WAITING) == {"room": None}
    dave = socket.create_connection(("127.0.0.1", n0.port), timeout=5)
    dave_file = dave.makefile("rb")
    assert dave_file.readline().startswith(b"CHATPAIR/1 ")
    dave.sendall(b"dave\n")
    assert dave_file.readline() == b"* waiting for a partner\n"
    assert dave_file.readline() == b"* paired with carol\n"
    assert expect_json(carol, PAIRED)["peer"] == "dave"
    dave.sendall(b"hello there\n")
    assert carol.expect(MSG) == b"hello there"
    carol.send_frame(MSG, b"two\nlines")
    assert dave_file.readline() == b"carol: two\n"
    assert dave_file.readline() == b"carol: lines\n"
    dave_file.close()
    dave.close()
    assert expect_json(carol, PEER_LEFT) == {"peer": "dave", "reason": "disconnected"}
    assert expect_json(carol, WAITING) == {"room": None}


def test_many_clients_over_three_nodes_are_each_paired_exactly_once(nodes) -> None:
    ns = nodes(3)
    clients = []
    for i in range(30):
        client = RawClient(ns[i % 3].port, 10)
        client.hello(f"c{i}")
        clients.append(client)
    partner_of = {}
    for i, client in enumerate(clients):
        client.expect(WELCOME)
        client.expect(WAITING)
        partner_of[f"c{i}"] = expect_json(client, PAIRED)["peer"]
    assert all(partner_of[partner_of[name]] == name for name in partner_of)
    # each pair chats a little: the right partner gets it
    by_name = {f"c{i}": c for i, c in enumerate(clients)}
    for name, client in by_name.items():
        client.send_frame(MSG, f"hi from {name}".encode())
    for name, client in by_name.items():
        assert client.expect(MSG) == f"hi from {partner_of[name]}".encode()


def test_fifo_and_rooms_hold_across_nodes(nodes) -> None:
    n0, n1, n2 = nodes(3)
    first = join(n0, "first")
    first.expect(WAITING)
    second = join(n1, "second")
    second.expect(WAITING)
    paired(first, second, "first", "second")  # FIFO: the oldest waiter, whatever its node
    third = join(n2, "third")
    third.expect(WAITING)
    blue1 = join(n0, "blue1", "blue")
    assert expect_json(blue1, WAITING) == {"room": "blue"}
    red1 = join(n1, "red1", "red")
    assert expect_json(red1, WAITING) == {"room": "red"}
    blue2 = join(n2, "blue2", "blue")
    assert expect_json(blue2, WAITING) == {"room": "blue"}
    paired(blue1, blue2, "blue1", "blue2")  # rooms pair within themselves, across nodes
    blue3 = join(n1, "blue3", "blue")
    assert expect_json(blue3, ERROR)["code"] == "room_full"
    assert blue3.at_eof()
    fourth = join(n1, "fourth")
    fourth.expect(WAITING)
    paired(third, fourth, "third", "fourth")  # the open lobby ignored the rooms
    red2 = join(n0, "red2", "red")
    red2.expect(WAITING)
    paired(red1, red2, "red1", "red2")


def test_next_and_bye_across_nodes(nodes) -> None:
    n0, n1, n2 = nodes(3)
    alice, bob = join_and_pair(n0, "alice", n1, "bob")
    alice.send_frame(MSG, b"before next")
    alice.send_frame(NEXT)
    assert bob.expect(MSG) == b"before next"  # messages first, then PEER_LEFT
    assert expect_json(bob, PEER_LEFT) == {"peer": "alice", "reason": "next"}
    assert expect_json(bob, WAITING) == {"room": None}
    assert expect_json(alice, WAITING) == {"room": None}
    # alice and bob both wait, and may not be paired again: carol takes the older waiter
    carol = join(n2, "carol")
    carol.expect(WAITING)
    got = expect_json(carol, PAIRED)["peer"]
    assert got in ("alice", "bob")
    other = alice if got == "bob" else bob
    mine = bob if got == "bob" else alice
    assert expect_json(mine, PAIRED)["peer"] == "carol"
    dave = join(n2, "dave")
    dave.expect(WAITING)
    assert expect_json(dave, PAIRED)["peer"] == ("alice" if got == "bob" else "bob")
    assert expect_json(other, PAIRED)["peer"] == "dave"
    carol.send_frame(BYE)
    assert expect_json(mine, PEER_LEFT) == {"peer": "carol", "reason": "bye"}
    assert expect_json(mine, WAITING) == {"room": None}
    assert carol.at_eof()


# -- faults --------------------------------------------------------------------------------------


def test_a_node_killed_with_sigkill_its_partners_elsewhere_hear_within_5s(nodes) -> None:
    n0, n1, n2 = nodes(3)
    alice, bob = join_and_pair(n0, "alice", n1, "bob")
    chat(alice, bob, 20)
    waiting_on_dead = join(n1, "ghost")  # waiting on the node that dies: never paired afterwards
    waiting_on_dead.expect(WAITING)
    n1.kill()  # the whole node: main process, listener, everything
    killed = time.monotonic()
    alice.sock.settimeout(8)
    assert left_after_false_alarms(alice) == {"peer": "bob", "reason": "disconnected"}
    assert time.monotonic() - killed < 5.0
    assert expect_json(alice, WAITING) == {"room": None}
    carol = join(n2, "carol")
    carol.expect(WAITING)
    paired(alice, carol, "alice", "carol")  # queued again; the ghost was never a candidate
    chat(alice, carol, 10)
    wait_for("a log line about the purge", lambda: "node n1 stopped its heartbeat" in n0.stderr() + n2.stderr(), 5)


def test_a_node_stopped_with_sigterm_tells_its_clients_and_their_partners(nodes) -> None:
    n0, n1, n2 = nodes(3)
    alice, bob = join_and_pair(n0, "alice", n1, "bob")
    chat(alice, bob, 10)
    assert n1.stop() == 0
    assert expect_json(bob, ERROR)["code"] == "shutdown"
    assert expect_json(alice, PEER_LEFT) == {"peer": "bob", "reason": "disconnected"}
    assert expect_json(alice, WAITING) == {"room": None}
    assert "node n1 left the cluster" in n1.stderr_text
    carol = join(n2, "carol")
    carol.expect(WAITING)
    paired(alice, carol, "alice", "carol")


def test_redis_stopped_and_started_empty(nodes, redis_server: RedisServer) -> None:  # noqa: F811
    n0, n1, n2 = nodes(3)
    alice, bob = join_and_pair(n0, "alice", n1, "bob")
    carol, dave = join_and_pair(n2, "carol", n2, "dave")  # a same-node pair
    waiter = join(n0, "waiter")
    waiter.expect(WAITING)

    redis_server.stop()
    stopped = time.monotonic()
    for node in (n0, n1, n2):
        node.wait_stderr("Redis unreachable", 5)
    # The outage lasts 10 s (issue 12: cross-node pairs survive at least that,
    # and no node takes another for dead meanwhile). Throughout it the
    # same-node pair keeps chatting, and alice keeps writing to bob, whose
    # node is reachable only through Redis.
    sent = 0
    while time.monotonic() - stopped < 10.0:
        chat(carol, dave, 5)
        if sent < 200:  # (well within the cross-node window: alice is never held back here)
            alice.send_frame(MSG, f"during {sent}".encode())
            sent += 1
    redis_server.start()
    for node in (n0, n1, n2):
        node.wait_stderr("Redis is reachable again", 10)
    got = [bob.read_frame() for _ in range(sent)]
    delivered = [p for t, p in got if t == MSG]
    assert delivered == [f"during {i}".encode() for i in range(sent)]  # delayed, not lost
    chat(alice, bob, 20)
    chat(carol, dave, 10)
    # pairing resumes by itself: the waiter was re-registered, a newcomer on another node finds it
    erin = join(n1, "erin")
    erin.expect(WAITING)
    paired(waiter, erin, "waiter", "erin")
    chat(waiter, erin, 10)
    # and pairs that were rebuilt still end properly across nodes
    bob.send_frame(BYE)
    assert expect_json(alice, PEER_LEFT) == {"peer": "bob", "reason": "bye"}
    for node in (n0, n1, n2):
        assert "Traceback" not in node.stderr()


def test_a_node_that_cannot_reach_redis_says_so_and_joins_when_it_can(tmp_path, start_server) -> None:
    pytest.importorskip("redis")
    from redisserver import REDIS_SERVER

    if REDIS_SERVER is None:
        pytest.skip("needs redis-server")
    redis = RedisServer(tmp_path)
    proc = None
    try:
        import subprocess
        import sys

        from conftest import ROOT

        proc = subprocess.Popen(
            [sys.executable, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", "0",
             "--cluster", redis.url, "--node-id", "late"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        assert proc.stderr is not None and proc.stdout is not None
        line = proc.stderr.readline().decode()
        while "cannot reach Redis" not in line:
            assert line, "the node exited"
            line = proc.stderr.readline().decode()
        assert "retrying" in line
        redis.start()
        out = proc.stdout.readline().decode()
        assert out.startswith("listening on ")
        port = int(out.split()[2].rsplit(":", 1)[1])
        client = RawClient(port)
        client.hello("x")
        client.expect(WELCOME)
        assert json.loads(json.dumps(client.expect(WAITING))) == {"room": None}
        client.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
        redis.stop()


def test_a_slow_reader_on_one_node_slows_its_partner_on_another(nodes) -> None:
    """Flow control across nodes: while bob reads nothing, alice is read only up to the window."""
    n0, n1 = nodes(2)
    alice, bob = join_and_pair(n0, "alice", n1, "bob")
    payload = b"x" * (16 * 1024 - 8)
    # 128 MiB. What alice gets out before she is held back is the window (1,024
    # messages, 16 MiB) plus every socket buffer on the way (loopback buffers
    # grow to several MiB each): about 2,000 messages alone, up to 3,500 seen
    # while the rest of the suite runs beside. Half of 8,000 leaves room.
    total = 8000

    def frame_out(i: int) -> bytes:
        return struct.pack(">IB", len(payload) + 9, MSG) + b"%08d" % i + payload

    alice.sock.setblocking(False)
    sent_frames, buf = 0, b""
    stalled_since = None
    while sent_frames < total:
        if not buf:
            buf = frame_out(sent_frames)
        try:
            n = alice.sock.send(buf)
        except BlockingIOError:
            n = 0
        if n:
            stalled_since = None
            buf = buf[n:]
            if not buf:
                sent_frames += 1
            continue
        stalled_since = stalled_since or time.monotonic()
        if time.monotonic() - stalled_since > 1.0:
            break  # alice is not read any more: the server holds her back
        select.select([], [alice.sock], [], 0.05)
    assert sent_frames < total // 2, f"alice was not slowed down ({sent_frames} of {total} messages taken)"
    # bob reads now: everything alice got out arrives, in order, and alice can finish
    alice.sock.setblocking(True)
    alice.sock.settimeout(30)
    def send_the_rest() -> None:
        alice.sock.sendall(buf)
        for i in range(sent_frames + 1, total):
            alice.sock.sendall(frame_out(i))

    done = threading.Thread(target=send_the_rest)
    done.start()
    bob.sock.settimeout(30)
    for i in range(total):
        got = bob.expect(MSG)
        assert got[:8] == b"%08d" % i
    done.join(30)


# -- what a node promises: a restart after a crash, a listener that dies ----------------------------



def test_a_node_restarted_with_the_same_id_after_kill_replaces_its_stale_registration(
        nodes, start_server, redis_server: RedisServer, rclient) -> None:  # noqa: F811
    n0, n1, _ = nodes(3)
    alice, bob = join_and_pair(n0, "alice", n1, "bob")
    chat(alice, bob, 10)
    ghost = join(n1, "ghost")  # waiting on the node that dies
    ghost.expect(WAITING)
    old = wait_for("both clients of n1 in Redis",  # (WAITING in the open lobby comes before the JOIN's answer)
                   lambda: {m.decode() for m in rclient.smembers("{chatpair}:nc:n1")} if
                   rclient.scard("{chatpair}:nc:n1") == 2 else None, 5)
    n1.kill()  # the whole node, as kill -9 of its process group does
    again = start_server("--cluster", redis_server.url, "--node-id", "n1")
    killed = time.monotonic()
    alice.sock.settimeout(8)
    assert left_after_false_alarms(alice) == {"peer": "bob", "reason": "disconnected"}
    assert time.monotonic() - killed < 5.0
    assert expect_json(alice, WAITING) == {"room": None}
    # the stale run's clients are gone from Redis; the new run pairs normally
    assert not old & {m.decode() for m in rclient.smembers("{chatpair}:nc:n1")}
    carol = join(again, "carol")
    carol.expect(WAITING)
    paired(alice, carol, "alice", "carol")  # the ghost of the earlier run was never a candidate
    chat(alice, carol, 10)
    dave, erin = join_and_pair(again, "dave", n0, "erin")
    chat(dave, erin, 10)
    assert "Traceback" not in again.stderr() + n0.stderr()


def test_a_node_whose_listener_dies_restarts_it_and_its_partners_elsewhere_hear_within_5s(nodes) -> None:
    n0, n1, _ = nodes(3)
    alice, bob = join_and_pair(n0, "alice", n1, "bob")
    chat(alice, bob, 10)
    listener = n1.listener()
    os.kill(listener, signal.SIGKILL)  # only the listener: the node's main process lives on
    killed = time.monotonic()
    alice.sock.settimeout(8)
    assert left_after_false_alarms(alice) == {"peer": "bob", "reason": "disconnected"}
    assert time.monotonic() - killed < 5.0
    assert expect_json(alice, WAITING) == {"room": None}
    bob.sock.settimeout(5)
    assert bob.at_eof()  # its clients are gone with it
    n1.wait_stderr("listener process died", 5)
    wait_for("a new listener", lambda: n1.listener() != listener, 10)
    assert n1.proc.poll() is None
    carol = join(n1, "carol")  # the restarted listener serves the same port and pairs across nodes
    carol.expect(WAITING)
    paired(alice, carol, "alice", "carol")
    chat(alice, carol, 10)


def test_redis_refusing_writes_is_an_outage_not_a_crash(nodes, rclient) -> None:  # noqa: F811
    """A Redis that answers with errors (here out of memory: maxmemory reached, noeviction) is
    treated like one that is gone: one line in the log, cross-node messages wait, same-node pairs
    go on, nothing crashes; once it accepts writes again, they are delivered and pairing goes on."""
    n0, n1 = nodes(2)
    alice, bob = join_and_pair(n0, "alice", n1, "bob")
    carol, dave = join_and_pair(n1, "carol", n1, "dave")  # a same-node pair
    chat(alice, bob, 3)
    rclient.config_set("maxmemory-policy", "noeviction")
    rclient.config_set("maxmemory", "1")
    try:
        for i in range(5):
            alice.send_frame(MSG, f"refused {i}".encode())
        n0.wait_stderr("Redis refuses our commands (Redis: ", 5)
        # The outage lasts 2 s more (the lanes reconnect every 0.5 s meanwhile); the same-node pair chats.
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            chat(carol, dave, 5)
    finally:
        rclient.config_set("maxmemory", "0")
    n0.wait_stderr("Redis is reachable again", 10)
    assert [bob.expect(MSG) for _ in range(5)] == [f"refused {i}".encode() for i in range(5)]
    chat(alice, bob, 5)
    erin = join(n1, "erin")
    erin.expect(WAITING)
    fred = join(n0, "fred")
    fred.expect(WAITING)
    paired(erin, fred, "erin", "fred")
    log = n0.stderr()
    refused = next(line for line in log.splitlines() if "Redis refuses our commands" in line)
    assert "maxmemory" in refused and "refused 0" not in refused  # what Redis said, not the message
    assert log.count("cluster connection lost") <= 1  # once for the outage, not per retry
    for node in (n0, n1):
        assert "Traceback" not in node.stderr()


def test_an_inbox_that_is_not_a_stream_loses_its_messages_loudly_and_nothing_else(nodes, rclient) -> None:  # noqa: F811
    """A Redis key clobbered by hand (n1's inbox made a string): every XADD to it gets WRONGTYPE,
    which no retry mends. n0 says so and goes on; n1's reader says so; the messages sent
    meanwhile come back to alice as NOTICE undelivered, and once the key is gone all works."""
    from chatpair.cluster.names import Keys

    n0, n1 = nodes(2)
    alice, bob = join_and_pair(n0, "alice", n1, "bob")
    chat(alice, bob, 3)
    inbox = Keys("{chatpair}:").inbox("n1")
    assert rclient.type(inbox) == b"stream"
    rclient.delete(inbox)
    rclient.set(inbox, "not a stream")
    try:
        for i in range(3):
            alice.send_frame(MSG, f"lost {i}".encode())
        wait_for("n0 saying Redis refused the entries",
                 lambda: "cluster: Redis refused 1 of" in n0.stderr() or "cluster: msgs not done" in n0.stderr(), 5)
        n1.wait_stderr("(Redis: WRONGTYPE", 5)  # its reading lane, or its reader thread
    finally:
        rclient.delete(inbox)
    alice.send_frame(MSG, b"after")
    assert bob.expect(MSG) == b"after"  # the numbers in between never came: a gap, acked as lost
    undelivered = [expect_json(alice, NOTICE) for _ in range(3)]
    assert all(n["code"] == "undelivered" for n in undelivered), undelivered
    chat(alice, bob, 5)
    for node in (n0, n1):
        assert "Traceback" not in node.stderr()
