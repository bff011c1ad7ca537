"""ScriptLine (chatpair/cluster/scriptline.py): the lobby's batches on a plain socket, against a real redis-server.

Replies come back in order with error replies as values; the connection
logs in like the redis-py client it was made from; every way Redis can fail
it (refused, killed connection, no answer in time, wrong password) is
redis-py's ConnectionError or TimeoutError with one line to log, and the
next call connects afresh. The lobby answers the same through redis-py
(what TLS or a missing hiredis get) as through a line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from redisserver import RedisServer, needs_redis, rclient, redis_server  # noqa: F401 (fixtures)

from chatpair.cluster.lobby import ClusterLobby, Matched, Queued
from chatpair.cluster.resp import pack
from chatpair.cluster.scriptline import ScriptLine, Scripts

pytestmark = [needs_redis, pytest.mark.timeout(30)]

redis = pytest.importorskip("redis")
pytest.importorskip("hiredis")


def test_replies_come_in_order_with_errors_as_values(redis_server, rclient):  # noqa: F811
    line = ScriptLine(redis_server.client())
    try:
        rclient.set("s", "text")
        got = line.call_many([pack("PING"), pack("INCR", "s"), pack("ECHO", "x" * 100_000), pack("INCR", "n")])
        assert got[0] == b"PONG" and got[2] == b"x" * 100_000 and got[3] == 1
        assert isinstance(got[1], redis.exceptions.ResponseError) and "not an integer" in str(got[1])
    finally:
        line.close()


def test_a_killed_connection_is_one_connection_error_and_the_next_call_reconnects(redis_server, rclient):  # noqa: F811
    line = ScriptLine(redis_server.client())
    try:
        assert line.call_many([pack("PING")]) == [b"PONG"]
        rclient.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(redis.exceptions.ConnectionError) as failed:
            line.call_many([pack("PING")])
        assert "\n" not in str(failed.value) and str(failed.value)
        assert line.call_many([pack("PING")]) == [b"PONG"]
    finally:
        line.close()


def test_no_answer_in_time_is_a_timeout_error(redis_server, rclient):  # noqa: F811
    line = ScriptLine(redis_server.client(socket_timeout=0.2))
    try:
        rclient.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        with pytest.raises(redis.exceptions.TimeoutError):
            line.call_many([pack("PING")])
        rclient.execute_command("CLIENT", "UNPAUSE")
        assert line.call_many([pack("PING")]) == [b"PONG"]
    finally:
        rclient.execute_command("CLIENT", "UNPAUSE")
        line.close()


def test_unreachable_redis_is_a_connection_error(tmp_path: Path):
    line = ScriptLine(redis.Redis(unix_socket_path=str(tmp_path / "nobody.sock"), socket_connect_timeout=1))
    with pytest.raises(redis.exceptions.ConnectionError) as failed:
        line.call_many([pack("PING")])
    assert "No such file" in str(failed.value)


def test_it_logs_in_like_its_client_and_says_when_it_cannot(tmp_path: Path):
    server = RedisServer(tmp_path, ("--requirepass", "sesame", "--databases", "4"))
    server.start()
    try:
        good = ScriptLine(server.client(password="sesame", db=3))
        assert good.call_many([pack("SET", "k", "v")]) == [b"OK"]
        assert server.client(password="sesame", db=3).get("k") == b"v"  # the database it was told
        good.close()
        bad = ScriptLine(server.client(password="wrong"))
        with pytest.raises(redis.exceptions.ConnectionError, match="refused the login"):
            bad.call_many([pack("PING")])
    finally:
        server.stop()


@pytest.mark.parametrize("script_line", [True, False], ids=["line", "redis-py"])
def test_the_lobby_answers_the_same_with_or_without_a_line(redis_server, rclient, script_line: bool):  # noqa: F811
    a = ClusterLobby(redis_server.client(), "A", script_line=script_line)
    b = ClusterLobby(redis_server.client(), "B", script_line=script_line)
    try:
        a.register()
        b.register()
        assert a.join(a.cid(1), None, name="ann") == Queued(a.cid(1))
        rclient.script_flush()  # NOSCRIPT: loaded again, and the call made
        got: Any = b.join_many([(b.cid(1), None, "bob", False), (b.cid(2), None, "bea", False)])
        assert got == [Matched(a.cid(1), b.cid(1)), Queued(b.cid(2))] and got[0].waiter_name == "ann"
        with pytest.raises(ValueError, match="already in the lobby"):
            b.join(b.cid(2), None)
    finally:
        a.close()
        b.close()


def test_a_redis_still_loading_its_data_is_unreachable_for_now_not_an_error_reply(tmp_path: Path):
    """LOADING (after a restart with persistence), BUSY, ...: redis-py raises a ConnectionError for
    them, which the I/O thread retries; a line does the same (a stand-in server says LOADING)."""
    import socket
    import threading

    path = tmp_path / "loading.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1000)
            conn.sendall(b"-LOADING Redis is loading the dataset in memory\r\n")

    helper = threading.Thread(target=answer)
    helper.start()
    scripts = Scripts(redis.Redis(unix_socket_path=str(path), socket_timeout=5), {"one": "return 1"})
    assert scripts._line is not None  # (the line's way, not redis-py's)
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="LOADING"):
            scripts.call_many("one", [[]])
    finally:
        scripts.close()
        helper.join(5)
        server.close()
