"""Cross-node relay through Redis Streams (chatpair/cluster/inbox.py) against a real redis-server.

Order and exactly-once per pair (duplicates dropped, gaps reported), the
messages of one direction batched into one entry as MSG frames, trimming
with MAXLEN ~ and of what was read, acknowledgements settling what was written and what
was lost, the flow-control window, XREAD BLOCK waking on arrival, and a
flush that fails while Redis is down keeping its batch for the retry.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from redisserver import RedisServer, needs_redis, rclient, redis_server  # noqa: F401 (fixtures)

from chatpair.cluster.entries import (
    Acked,
    Entry,
    Gap,
    decode_entry,
    frame_msgs,
    skip_frames,
    split_frames,
)
from chatpair.cluster.inbox import MAX_ENTRY_BYTES, Inbox, Outbox, SeqCheck
from chatpair.cluster.lobby import ClusterLobby
from chatpair.cluster.names import Keys, make_cid
from chatpair.cluster.redisconn import redis_errors

pytestmark = needs_redis


KEYS = Keys()
A1, A2 = make_cid("A", "b00t", 1), make_cid("A", "b00t", 2)
B1, B2 = make_cid("B", "b00t", 1), make_cid("B", "b00t", 2)


def msgs(items: list[Any]) -> list[Entry]:
    return [e for e in items if isinstance(e, Entry) and e.kind == "msg"]


def each(items: list[Any]) -> list[tuple[str, str, int, bytes]]:
    """Every message of the ``msg`` entries: (source, target, seq, payload)."""
    return [(e.source, e.target, e.seq + i, p) for e in msgs(items) for i, p in enumerate(e.payloads())]


def read_all(inbox: Inbox) -> list[Any]:
    out: list[Any] = []
    while True:
        got = inbox.read()
        if not got:
            return out
        out += got


# -- SeqCheck (pure) ------------------------------------------------------------------------


def test_seqcheck_in_order_duplicate_and_gap():
    s = SeqCheck()
    assert [s.check("a", "b", n) for n in (1, 2, 3)] == ["ok", "ok", "ok"]
    assert s.check("a", "b", 2) == "dup"
    assert s.check("a", "b", 7) == Gap("a", "b", 4, 6)
    assert s.check("a", "b", 8) == "ok"
    assert s.check("b", "a", 1) == "ok"  # each direction counts for itself
    s.forget("a", "b")
    assert s.check("a", "b", 1) == "ok"
    # batches: seq .. seq + count - 1
    assert s.check("a", "b", 2, 5) == "ok"  # 2-6
    assert s.check("a", "b", 3, 2) == "dup"
    assert s.check("a", "b", 5, 4) == 2  # 5-8: 5 and 6 seen before
    assert s.check("a", "b", 12, 3) == Gap("a", "b", 9, 11)


def test_frames_both_ways():
    payloads = [b"a", "é".encode() * 3, b"x" * 70000]
    frames = frame_msgs(payloads)
    assert frames[:6] == b"\x00\x00\x00\x02\x02a"
    assert split_frames(frames) == payloads and split_frames(skip_frames(frames, 2)) == payloads[2:]


# -- order, exactly once ---------------------------------------------------------------------


def test_messages_arrive_in_order_exactly_once(rclient):  # noqa: F811
    out = Outbox(rclient, KEYS)
    inbox = Inbox(rclient, KEYS, "B", count=97)
    payloads = {(A1, B1): [f"m{i}".encode() for i in range(500)],
                (A2, B2): [bytes([i % 256, 0, 0xFF]) + "é".encode() for i in range(500)]}
    for i in range(500):
        for (src, dst), items in payloads.items():
            assert out.send(src, dst, items[i]) == i + 1
        if i % 50 == 49:
            assert out.flush() == 2  # the 50 messages of each direction: one entry each
    assert out.flush() == 0 and out.pending() == 0
    got = read_all(inbox)
    assert not any(isinstance(g, Gap) for g in got)
    for (src, dst), items in payloads.items():
        mine = [(seq, p) for s_, d_, seq, p in each(got) if (s_, d_) == (src, dst)]
        assert [seq for seq, _ in mine] == list(range(1, 501))
        assert [p for _, p in mine] == items


def test_an_entry_grows_up_to_its_limit(rclient):  # noqa: F811
    out = Outbox(rclient, KEYS)
    big = b"b" * (MAX_ENTRY_BYTES // 4)
    for _ in range(6):
        out.send(A1, B1, big)
    assert out.flush() == 2  # 3 fit in an entry (with their headers, a 4th does not)
    got = read_all(Inbox(rclient, KEYS, "B"))
    assert [(e.seq, e.count) for e in msgs(got)] == [(1, 3), (4, 3)]
    assert [seq for _, _, seq, _ in each(got)] == [1, 2, 3, 4, 5, 6]


def test_a_batch_written_twice_is_delivered_once(rclient):  # noqa: F811
    out = Outbox(rclient, KEYS)
    for i in range(3):
        out.send(A1, B1, b"x%d" % i)
    out.flush()
    # A retried batch: the same entries again (as after a Redis error mid-pipeline).
    for _, fields in rclient.xrange(KEYS.inbox("B")):
        rclient.xadd(KEYS.inbox("B"), fields)
    # and an entry whose head was seen (2-4: 2 and 3 were delivered above)
    rclient.xadd(KEYS.inbox("B"), {"t": B1, "s": A1, "q": 2, "k": "msg", "n": 3,
                                   "p": frame_msgs([b"x1", b"x2", b"x3"])})
    inbox = Inbox(rclient, KEYS, "B")
    got = read_all(inbox)
    assert [(seq, p) for _, _, seq, p in each(got)] == [(1, b"x0"), (2, b"x1"), (3, b"x2"), (4, b"x3")]
    assert inbox.duplicates == 5


def test_trimmed_entries_show_up_as_a_gap(rclient):  # noqa: F811
    out = Outbox(rclient, KEYS, maxlen=100)
    for i in range(1000):
        out.send(A1, B1, b"%d" % i)
        out.flush()  # an entry each
    length = rclient.xlen(KEYS.inbox("B"))
    assert 100 <= length <= 200  # MAXLEN ~ trims whole stream nodes (100 entries each)
    inbox = Inbox(rclient, KEYS, "B")
    got = read_all(inbox)
    first = 1000 - length + 1
    assert got[0] == Gap(A1, B1, 1, first - 1)
    assert [seq for _, _, seq, _ in each(got)] == list(range(first, 1001))
    inbox.trim()  # what was read goes (all but the last entry, give or take a stream node)
    assert rclient.xlen(KEYS.inbox("B")) < length


# -- acknowledgements, window, undelivered ---------------------------------------------------


def test_acks_settle_delivered_and_lost(rclient):  # noqa: F811
    a_out, b_out = Outbox(rclient, KEYS), Outbox(rclient, KEYS)
    for i in range(10):
        a_out.send(A1, B1, b"m")
    a_out.flush()
    # B wrote 1-6 to its client, then learned 7-8 were lost, then wrote 9.
    for seq in range(1, 7):
        b_out.ack(A1, B1, seq)
    b_out.ack(A1, B1, 8, lost=(7, 8))
    b_out.ack(A1, B1, 9)
    assert b_out.flush() == 1  # coalesced into one ack entry
    acks = [e for e in read_all(Inbox(rclient, KEYS, "A")) if e.kind == "ack"]
    assert len(acks) == 1 and acks[0].seq == 9 and acks[0].lost == ((7, 8),)
    assert a_out.on_ack(acks[0]) == Acked(A1, B1, 7, 2)  # 1-6 and 9 written, 7-8 lost
    assert a_out.in_flight(A1, B1) == 1
    assert a_out.on_ack(acks[0]).delivered == 0  # an old ack again settles nothing
    assert a_out.drop_pair(A1, B1) == (10,)  # the pair ended: 10 was never written
    assert a_out.in_flight(A1, B1) == 0


def test_window_slows_the_sender_until_acked(rclient):  # noqa: F811
    out = Outbox(rclient, KEYS, window=5)
    for _ in range(5):
        assert out.can_send(A1, B1)
        out.send(A1, B1, b"m")
    assert not out.can_send(A1, B1) and out.can_send(A2, B1)
    out.on_ack(Entry(b"0-1", A1, B1, 2, "ack", b""))
    assert out.can_send(A1, B1) and out.in_flight(A1, B1) == 3


def test_a_dead_nodes_unacked_messages_are_undelivered(rclient):  # noqa: F811
    c1 = make_cid("C", "b00t", 1)
    out = Outbox(rclient, KEYS)
    out.send(A1, B1, b"1")
    out.send(A1, B1, b"2")
    out.send(A2, B2, b"3")
    out.send(A2, c1, b"4")
    out.flush()
    out.on_ack(Entry(b"0-1", A1, B1, 1, "ack", b""))
    assert sorted(out.drop_node("B")) == [(A1, B1, (2,)), (A2, B2, (1,))]
    assert out.drop_node("B") == [] and out.in_flight(A2, c1) == 1


def test_control_entries(rclient):  # noqa: F811
    out = Outbox(rclient, KEYS)
    out.control(B1, A1, "peer_left", b"bye")
    with pytest.raises(ValueError, match="unknown control kind"):
        out.control(B1, A1, "msg")
    out.flush()
    (entry,) = read_all(Inbox(rclient, KEYS, "B"))
    assert (entry.target, entry.source, entry.seq, entry.kind, entry.payload) == (B1, A1, 0, "peer_left", b"bye")


def test_lobby_notifications_are_inbox_entries(redis_server, rclient):  # noqa: F811
    a, b = ClusterLobby(redis_server.client(), "A"), ClusterLobby(redis_server.client(), "B")
    try:
        a.register()
        b.register()
        a.join(a.cid(1), None, name="ann")
        b.join(b.cid(1), None, name="bob")
        b.unpair(a.cid(1), b.cid(1), leaver=b.cid(1), reason="bye")
        got = read_all(Inbox(rclient, a.keys, "A"))
        assert [(e.kind, e.target, e.source, e.payload) for e in got] == [
            ("paired", a.cid(1), b.cid(1), b"bob"), ("peer_left", a.cid(1), b.cid(1), b"bye")]
    finally:
        a.close()
        b.close()


# -- blocking reads --------------------------------------------------------------------------


def test_xread_block_wakes_when_something_arrives(redis_server, rclient):  # noqa: F811
    inbox = Inbox(redis_server.client(), KEYS, "B")
    got: list[Any] = []
    done = threading.Event()

    def reader() -> None:
        while not got:
            got.extend(inbox.read(block_ms=20_000))
        done.set()

    t = threading.Thread(target=reader)
    t.start()
    try:
        out = Outbox(rclient, KEYS)
        out.send(A1, B1, b"hello")
        started = time.monotonic()
        out.flush()
        assert done.wait(10), "the blocked reader did not wake"
        assert time.monotonic() - started < 5
        assert [p for _, _, _, p in each(got)] == [b"hello"]
    finally:
        inbox.wake()
        t.join(10)
        inbox.redis.close()
    assert not t.is_alive()


def test_wake_ends_a_wait_and_is_not_delivered(redis_server):  # noqa: F811
    inbox = Inbox(redis_server.client(), KEYS, "W")
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(inbox.read(block_ms=20_000)))
    t.start()
    started = time.monotonic()
    # The wake may come before or after the reader blocks: either way it returns.
    inbox.wake()
    t.join(10)
    assert not t.is_alive() and result == [[]] and time.monotonic() - started < 5
    with pytest.raises(ValueError, match="positive"):
        inbox.read(block_ms=0)
    inbox.redis.close()


def test_decode_entry():
    e = decode_entry(b"1-0", {b"t": b"B:x-1", b"s": b"A:x-1", b"q": b"12", b"k": b"ack", b"p": b"",
                              b"l": b"3-4,7-7"})
    assert e == Entry(b"1-0", "B:x-1", "A:x-1", 12, "ack", b"", ((3, 4), (7, 7)))


# -- Redis down ------------------------------------------------------------------------------


def test_a_flush_while_redis_is_down_is_kept_and_retried(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    import redis  # here: the module is skipped without it

    # No retries inside redis-py: the Outbox's caller is the one that retries.
    client = server.client(socket_timeout=5, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
    try:
        out = Outbox(client, KEYS)
        out.send(A1, B1, b"before")
        out.flush()
        server.stop()
        out.send(A1, B1, b"during")
        with pytest.raises(redis_errors()):
            out.flush()
        assert out.pending() == 1
        server.start()  # back, and empty (no persistence)
        out.send(A1, B1, b"after")
        assert out.flush() == 2
        inbox = Inbox(client, KEYS, "B")
        got = read_all(inbox)
        assert got[0] == Gap(A1, B1, 1, 1)  # "before" went with the old Redis: reported, not silent
        assert [(seq, p) for _, _, seq, p in each(got)] == [(2, b"during"), (3, b"after")]
    finally:
        client.close()
        server.stop()


# -- the optional dependency ------------------------------------------------------------------


def test_connect_and_its_errors(redis_server, monkeypatch):  # noqa: F811
    from chatpair.cluster import redisconn
    from chatpair.errors import ConfigError

    client = redisconn.connect(redis_server.url)
    try:
        assert client.ping() is True
        client.set("k", b"\xff")
        assert client.get("k") == b"\xff"  # bytes in, bytes out
    finally:
        client.close()
    with pytest.raises(ConfigError, match="bad Redis URL"):
        redisconn.connect("http://example.org")
    assert redisconn.describe(ConnectionError("Error 111\n connecting")) == "Redis: Error 111 connecting"
    monkeypatch.setitem(__import__("sys").modules, "redis", None)
    with pytest.raises(ConfigError, match=r"pip install 'chatpair\[cluster\]'"):
        redisconn.redis_module()
