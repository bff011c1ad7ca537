"""Lanes: a relay loop's own Redis connections (chatpair/cluster/lane.py, resp.py, server/cluster_lane.py).

Without a socket: RESP packing, and the outbox's one-batch-in-transit rule
(take, landed, untake) that keeps numbers in order whoever writes a batch.
Over a socket pair: RespConn's queueing of what the socket does not take,
its replies in order, and each way it fails (an error reply, the peer gone,
bytes that are not RESP) as one LaneBroken. End to end, with a real
redis-server and two nodes: every Redis connection killed again and again
(``CLIENT KILL``) while a cross-node pair chats loses, duplicates and
reorders nothing.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from redisserver import needs_redis, rclient, redis_server  # noqa: F401 (fixtures)
from test_cluster_nodes import MSG, join_and_pair, nodes  # noqa: F401 (fixture)

from chatpair.cluster.names import Keys

pytestmark = pytest.mark.timeout(60)

try:
    import hiredis
except ImportError:  # the cluster extra installs it
    hiredis = None

needs_hiredis = pytest.mark.skipif(hiredis is None, reason="needs hiredis (pip install '.[cluster]')")


def test_pack_is_resp():
    from chatpair.cluster.resp import bulk, pack, pack_head

    assert pack("XADD", b"k\r\n", 7) == b"*3\r\n$4\r\nXADD\r\n$3\r\nk\r\n\r\n$1\r\n7\r\n"
    assert pack_head(3, "XADD") + bulk(b"k\r\n") + bulk(7) == pack("XADD", b"k\r\n", 7)
    assert pack("SET", "é", b"") == b"*3\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n$0\r\n\r\n"


def test_packed_batches_are_the_xadds_redis_py_would_send_several_in_one_transaction():
    from chatpair.cluster.inbox import Outbox
    from chatpair.cluster.resp import pack

    out = Outbox(None, Keys("{chatpair}:"))
    out.send("n0:a-1", "n1:b-2", b"hello")
    out.ack("n1:b-2", "n0:a-1", 3, (1, 2))
    out.control("n2:c-1", "n0:a-1", "notice", b"{}")
    batch = out.take()
    assert len(batch) == 3
    xadds = [pack("XADD", key, "MAXLEN", "~", out.maxlen, "*", *(x for kv in fields.items() for x in kv))
             for key, fields in batch]
    generic = pack("MULTI") + b"".join(xadds) + pack("EXEC")
    assert out.packed(batch) == (generic, 5)  # +OK, 3 x +QUEUED, EXEC's list
    assert out.packed(batch) == (generic, 5)  # the cached heads give the same bytes
    assert out.packed(batch[:1]) == (xadds[0], 1)  # one alone: no transaction


@needs_redis
@needs_hiredis
def test_a_message_and_the_ack_behind_it_reach_a_waiting_reader_in_one_xread(rclient):  # noqa: F811
    """Redis answers a blocked XREAD after each command; a batch in one transaction is seen whole."""
    from chatpair.cluster.inbox import Inbox, Outbox
    from chatpair.cluster.lane import InboxLane, OutboxLane, open_socket

    def answered(lane: InboxLane | OutboxLane) -> Any:
        lane.sock.setblocking(True)  # a test's reader may wait (the lane itself never does)
        try:
            while True:
                got = lane.on_readable()
                if got:
                    return got
        finally:
            lane.sock.setblocking(False)

    keys = Keys("{chatpair}:")
    out = Outbox(rclient, keys)
    inbox = Inbox(None, keys, "n1")
    writing = OutboxLane(*open_socket(rclient, timeout=5), patience=5, now=0.0)
    reading = InboxLane(*open_socket(rclient, timeout=5), inbox, block_ms=5000, patience=5, now=0.0)
    try:
        for via_lane in (True, False):
            deadline = time.monotonic() + 5  # the XREAD is blocked (Redis counts it) before the batch goes
            while rclient.info("clients")["blocked_clients"] < 1:
                assert time.monotonic() < deadline, "the XREAD never blocked"
                time.sleep(0.005)
            out.send("n0:a-1", "n1:b-2", b"hello")
            out.ack("n1:c-3", "n0:a-1", 7)  # we wrote n1:c-3's message 7: the ack goes to n1 too
            batch = out.take()
            if via_lane:
                writing.send(*out.packed(batch), now=0.0)
                answered(writing)
            else:
                out.write(batch)  # the I/O thread's way, through redis-py
            out.landed(batch)
            assert [item.kind for item in answered(reading)] == ["msg", "ack"], f"via lane: {via_lane}"
            reading.read_on(now=0.0)
    finally:
        writing.close()
        reading.close()


@needs_hiredis
def test_an_error_inside_exec_is_logged_and_the_batch_is_answered(caplog):
    """Redis carried out the other XADDs of the transaction; the refused one would be refused again."""
    from chatpair.cluster.lane import OutboxLane
    from chatpair.cluster.resp import LaneBroken

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    lane = OutboxLane(ours, [], patience=5, now=0.0)
    try:
        lane.send(b"(a transaction of two XADDs)", 4, now=0.0)
        theirs.sendall(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n$3\r\n1-0\r\n-WRONGTYPE not a stream\r\n")
        with caplog.at_level("WARNING", logger="chatpair"):
            assert lane.on_readable() is True  # all answered: the next batch may go
        assert "Redis refused 1 of 2 stream entries (Redis: WRONGTYPE not a stream)" in caplog.text
        lane.send(b"(one XADD)", 1, now=0.0)  # a refusal that says "not now": the batch goes again
        theirs.sendall(b"*1\r\n-OOM command not allowed\r\n")
        with pytest.raises(LaneBroken, match="OOM command not allowed"):
            lane.on_readable()
    finally:
        lane.close()
        theirs.close()


def test_a_single_xadd_refused_for_now_is_written_again_not_counted_written():
    """Through redis-py (the I/O thread's way), one XADD alone is no transaction: its OOM comes as
    a value; it is raised, so the batch stays queued and goes again once Redis takes it."""
    import redis.exceptions as rx

    from chatpair.cluster.inbox import note_refused

    oom = rx.OutOfMemoryError("command not allowed", status_code="OOM")
    assert note_refused([oom]) is oom
    assert note_refused([b"1-0", rx.ResponseError("WRONGTYPE Operation")]) is None  # logged, not retried


def test_which_error_replies_are_waited_out():
    """Unreachable, or an error reply saying "not now" (OOM, READONLY, ...): an outage, retried.
    An error the same command would get again (WRONGTYPE): not retried. Logged on one line,
    code first, without redis-py's listing of the failed command's arguments (a client's message)."""
    import redis.exceptions as rx

    from chatpair.cluster.redisconn import describe, is_outage, refusing

    oom = rx.OutOfMemoryError("Command # 1 (XADD k * p secret) of pipeline caused error: "
                              "command not allowed", status_code="OOM")
    assert describe(oom) == "Redis: OOM command not allowed"
    assert is_outage(oom) and refusing(oom)
    for text in ("MISCONF Errors writing to disk", "BUSY running a script", "READONLY replica"):
        assert is_outage(rx.ResponseError(text)) and refusing(rx.ResponseError(text))
    wrongtype = rx.ResponseError("Command # 2 (XADD k * p secret) of pipeline caused error: WRONGTYPE Operation")
    assert describe(wrongtype) == "Redis: WRONGTYPE Operation"
    assert not is_outage(wrongtype) and refusing(wrongtype)
    gone = rx.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    assert is_outage(gone) and not refusing(gone)
    assert is_outage(rx.BusyLoadingError("OOM command not allowed")) and refusing(rx.BusyLoadingError("OOM x"))


def test_one_batch_in_transit_and_a_failed_one_goes_first_again():
    from chatpair.cluster.inbox import Outbox

    out = Outbox(None, Keys("{chatpair}:"))
    out.send("n0:a-1", "n1:b-2", b"one")
    first = out.take()
    assert out.in_transit is first
    out.send("n0:a-1", "n1:b-2", b"two")
    with pytest.raises(RuntimeError):
        out.take()  # one at a time: the second would overtake the first if it landed sooner
    out.untake(first)  # the first failed: it goes out again, before "two"
    again = out.take()
    assert [(f["q"], f["p"]) for _, f in again] == [(1, b"\x00\x00\x00\x04\x02one"), (2, b"\x00\x00\x00\x04\x02two")]
    out.landed(first)  # a stale answer for a batch given back changes nothing
    assert out.in_transit is again
    out.landed(again)
    assert out.in_transit is None and out.pending() == 0


@needs_hiredis
def test_respconn_queues_what_the_socket_does_not_take_and_reads_replies_in_order():
    from chatpair.cluster.resp import RespConn

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn = RespConn(ours)
    try:
        big = b"x" * (4 << 20)
        conn.send(big)
        assert conn.out  # the socket took only part of it
        got = bytearray()
        theirs.settimeout(5)
        while len(got) < len(big):
            got += theirs.recv(1 << 20)
            conn.flush()
        assert got == big and not conn.out
        assert conn.replies() == []
        theirs.sendall(b"+OK\r\n:5\r\n$3\r\nabc\r\n*1\r\n$1")  # the last one incomplete
        assert conn.replies() == [b"OK", 5, b"abc"]
        theirs.sendall(b"\r\nz\r\n")
        assert conn.replies() == [[b"z"]]
    finally:
        conn.close()
        theirs.close()


@needs_hiredis
@pytest.mark.parametrize(("sent", "said"), [
    (b"-ERR wrong number of arguments\r\n", "Redis: ERR wrong number of arguments"),
    (b"?not resp\r\n", "unreadable reply"),
    (None, "Redis closed the connection"),
])
def test_respconn_failures_are_one_lanebroken_each(sent, said):
    from chatpair.cluster.resp import LaneBroken, RespConn

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    conn = RespConn(ours)
    try:
        if sent is None:
            theirs.close()
        else:
            theirs.sendall(sent)
        with pytest.raises(LaneBroken, match=said):
            conn.replies()
    finally:
        conn.close()
        theirs.close()


@needs_redis
@needs_hiredis
def test_redis_connections_killed_while_a_cross_node_pair_chats_lose_nothing(nodes, rclient):  # noqa: F811
    """Every kill drops the lanes (and the I/O thread's connections): batches on their way are written
    again, the receiver drops what it saw twice, and each side still gets the other's messages in order."""
    n0, n1 = nodes(2)
    a, b = join_and_pair(n0, "ann", n1, "bob")
    sent = 0
    for _ in range(5):
        for i in range(sent, sent + 40):
            a.send_frame(MSG, f"from a {i}".encode())
            b.send_frame(MSG, f"from b {i}".encode())
        rclient.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        for i in range(sent, sent + 40):
            assert b.expect(MSG) == f"from a {i}".encode()
            assert a.expect(MSG) == f"from b {i}".encode()
        sent += 40
    a.send_frame(MSG, b"after")
    assert b.expect(MSG) == b"after"


def test_a_control_entry_closes_the_open_entry_so_later_messages_go_after_it():
    from chatpair.cluster.inbox import Outbox

    out = Outbox(None, Keys("{chatpair}:"))
    out.send("n0:a-1", "n1:b-2", b"m1")
    out.control("n1:b-2", "n0:a-1", "notice", b"{}")
    out.send("n0:a-1", "n1:b-2", b"m2")
    assert [(f["k"], f.get("n")) for _, f in out.take()] == [("msg", 1), ("notice", None), ("msg", 1)]


def test_an_entry_that_cannot_be_decoded_is_skipped_and_the_rest_kept():
    from chatpair.cluster.inbox import Inbox

    inbox = Inbox(None, Keys("{chatpair}:"), "n1")
    good = [b"t", b"n1:b-2", b"s", b"n0:a-1", b"q", b"1", b"k", b"msg", b"n", b"1", b"p", b"\x00\x00\x00\x03\x02hi"]
    bad = [b"t", b"n1:b-2", b"s", b"n0:a-1", b"q", b"one", b"k", b"msg", b"p", b""]
    reply = [[b"{chatpair}:inbox:n1", [[b"1-0", bad], [b"2-0", good]]]]
    items = inbox.accept(reply)
    assert [(i.seq, i.payload) for i in items] == [(1, b"\x00\x00\x00\x03\x02hi")]
    assert inbox.last_id == b"2-0" and inbox.trim_owed


def test_redis_emptied_keeps_the_batch_in_transit_like_the_queued_ones():
    from chatpair.cluster.inbox import Outbox

    out = Outbox(None, Keys("{chatpair}:"))
    out.send("n0:a-1", "n1:b-2", b"written")
    out.landed(out.take())  # in Redis, not acknowledged: may be gone with it
    out.send("n0:a-1", "n1:b-2", b"on its way")
    on_its_way = out.take()
    out.send("n0:a-1", "n1:b-2", b"queued")
    assert out.forfeit() == [("n0:a-1", "n1:b-2", (1,))]  # only the one written before
    assert out.in_flight("n0:a-1", "n1:b-2") == 2
    out.landed(on_its_way)


@needs_hiredis
def test_respconn_writes_a_big_queue_in_order_across_many_wakeups_and_empties_it():
    """Megabytes queued behind a small socket buffer come out whole and in order; the queue is
    emptied (not kept growing) once written, and a queue that never drains is compacted."""
    from chatpair.cluster import resp
    from chatpair.cluster.resp import RespConn

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn = RespConn(ours)
    try:
        parts = [bytes([65 + i % 26]) * (300_000 + i) for i in range(12)]  # about 3.6 MB
        for part in parts:
            conn.send(part)
        want = b"".join(parts)
        got = bytearray()
        theirs.settimeout(5)
        while len(got) < len(want):
            got += theirs.recv(1 << 16)
            conn.flush()
        assert got == want
        assert not conn.out  # emptied once all was written
        big = 3 * resp.COMPACT_AFTER
        conn.send(b"x" * big)
        drained = 0
        while drained < 2 * resp.COMPACT_AFTER:  # a queue that never empties: written bytes are dropped
            drained += len(theirs.recv(1 << 16))
            conn.flush()
        assert len(conn.out) <= big - 1.5 * resp.COMPACT_AFTER
    finally:
        conn.close()
        theirs.close()
