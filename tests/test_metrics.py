"""Status lines and ``/metrics``: counted where things happen, added up over every process.

The endpoint is read the way Prometheus reads it: over HTTP, parsed by a
real parser (``prometheus_client``'s, in the ``test`` extra), and by
``promtool check metrics`` where Debian's ``prometheus`` package is
installed. Real servers on port 0, with and without relay worker processes;
every wait is for a reading with a deadline. The counting pieces (histogram,
worker reports, the ledger that survives a worker restart, the deny list)
are also tested without a socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ROOT, RawClient, ServerProcess, spawned_children, wait_for

parser = pytest.importorskip("prometheus_client.parser", reason="needs prometheus-client (pip install .[test])")

WELCOME, WAITING, PAIRED, MSG, BYE, ERROR = 0x10, 0x11, 0x12, 0x02, 0x04, 0x1F


# -- helpers -------------------------------------------------------------------------------------


def metrics_server(start_server, *args: str) -> tuple[ServerProcess, str]:
    srv = start_server("--metrics", "127.0.0.1:0", *args)
    line = srv.stdout_line(5)
    assert line.startswith("metrics at http://127.0.0.1:") and line.endswith("/metrics"), line
    return srv, line.split()[-1]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return resp.read().decode("utf-8")


def parse(text: str) -> dict[str, Any]:
    """Family name -> {"type": ..., "samples": {(sample name, labels): value}}, by the real parser."""
    out: dict[str, Any] = {}
    for family in parser.text_string_to_metric_families(text):
        out[family.name] = {"type": family.type,
                            "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}}
    return out


def value(families: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    return families[family]["samples"][(sample or family, tuple(sorted(labels.items())))]


def reading(url: str) -> dict[str, Any]:
    return parse(scrape(url))


def reading_where(url: str, pred: Callable[[dict[str, Any]], bool]) -> Callable[[], dict[str, Any] | None]:
    """For wait_for: a reading once ``pred`` holds for it, else None."""
    def attempt() -> dict[str, Any] | None:
        families = reading(url)
        return families if pred(families) else None
    return attempt


def join(port: int, name: str) -> RawClient:
    client = RawClient(port)
    client.hello(name)
    client.expect(WELCOME)
    client.expect(WAITING)
    return client


def make_pair(port: int, a: str, b: str) -> tuple[RawClient, RawClient]:
    first, second = join(port, a), join(port, b)
    assert second.expect(PAIRED)["peer"] == a
    assert first.expect(PAIRED)["peer"] == b
    return first, second


def promtool_check(text: str) -> None:
    """``promtool check metrics`` where it is installed (Debian: apt-get install prometheus)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the endpoint, with real servers -----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["0", "2"])
def test_metrics_while_pairs_chat(start_server, workers: str) -> None:
    srv, url = metrics_server(start_server, "--workers", workers, "--max-per-ip", "6")
    pairs = [make_pair(srv.port, "alice", "bob"), make_pair(srv.port, "carol", "dave")]
    waiter = join(srv.port, "erin")
    bad = RawClient(srv.port)
    bad.hello("not a name!")
    assert bad.expect(ERROR)["code"] == "bad_hello"
    refused = RawClient(srv.port)  # the 7th connection from 127.0.0.1
    refused.hello("frank")
    assert refused.expect(ERROR)["code"] == "too_many_connections"
    sent = 0
    for a, b in pairs:
        for i in range(10):
            a.send_frame(MSG, f"message {i}".encode())
            b.send_frame(MSG, "ünïcode".encode())
            sent += 2
        for _ in range(10):
            assert b.expect(MSG).startswith(b"message ")
            assert a.expect(MSG) == "ünïcode".encode()
    msg_bytes = 2 * sum(5 + len(f"message {i}".encode()) + 5 + len("ünïcode".encode()) for i in range(10))

    families = wait_for("every message counted", reading_where(url, lambda f: value(
        f, "chatpair_messages_relayed", "chatpair_messages_relayed_total") == sent), 10)
    text = scrape(url)
    promtool_check(text)
    types = {name: fam["type"] for name, fam in families.items()}
    assert types["chatpair_connections"] == "gauge" and types["chatpair_pairs"] == "gauge"
    assert types["chatpair_waiting"] == "gauge"
    assert types["chatpair_messages_relayed"] == "counter" and types["chatpair_bytes_relayed"] == "counter"
    assert types["chatpair_refusals"] == "counter" and types["chatpair_errors"] == "counter"
    assert types["chatpair_pair_duration_seconds"] == "histogram"
    assert value(families, "chatpair_bytes_relayed", "chatpair_bytes_relayed_total") == msg_bytes
    assert value(families, "chatpair_pairs") == 2
    assert value(families, "chatpair_waiting") == 1
    assert value(families, "chatpair_pairs_made", "chatpair_pairs_made_total") == 2
    assert value(families, "chatpair_relay_workers") == int(workers)
    assert value(families, "chatpair_refusals", "chatpair_refusals_total", reason="too_many_connections") == 1
    assert value(families, "chatpair_refusals", "chatpair_refusals_total", reason="denied") == 0
    assert value(families, "chatpair_errors", "chatpair_errors_total", code="bad_hello") == 1
    assert value(families, "chatpair_errors", "chatpair_errors_total", code="shutdown") == 0
    assert value(families, "chatpair_connections_accepted", "chatpair_connections_accepted_total") == 7

    # A pair ends: its duration is observed, the gauges follow.
    a, b = pairs[0]
    a.send_frame(BYE)
    b.expect(0x13)  # PEER_LEFT
    b.expect(WAITING)
    assert waiter.expect(PAIRED)["peer"] == "bob"

    def ended(f: dict[str, Any]) -> bool:
        return value(f, "chatpair_pair_duration_seconds", "chatpair_pair_duration_seconds_count") == 1
    families = wait_for("the pair's duration", reading_where(url, ended), 10)
    assert value(families, "chatpair_pair_duration_seconds", "chatpair_pair_duration_seconds_bucket",
                 le="+Inf") == 1
    assert 0 < value(families, "chatpair_pair_duration_seconds", "chatpair_pair_duration_seconds_sum") < 60
    assert value(families, "chatpair_pairs") == 2  # bob and erin now
    assert value(families, "chatpair_pairs_made", "chatpair_pairs_made_total") == 3
    promtool_check(scrape(url))

    for client in (*pairs[1], a, b, waiter, bad, refused):
        client.close()
    assert srv.stop() == 0
    assert "Traceback" not in srv.stderr_text


@pytest.mark.timeout(60)
def test_counts_survive_a_relay_worker_restart(start_server) -> None:
    srv, url = metrics_server(start_server, "--workers", "1")
    alice, bob = make_pair(srv.port, "alice", "bob")
    for i in range(5):
        alice.send_frame(MSG, b"x%d" % i)
        assert bob.expect(MSG) == b"x%d" % i

    def relayed(n: int) -> Any:
        return lambda: value(reading(url), "chatpair_messages_relayed", "chatpair_messages_relayed_total") == n
    wait_for("5 messages counted", relayed(5), 10)
    (worker,) = spawned_children(srv.listener())
    os.kill(worker, signal.SIGKILL)
    srv.wait_stderr("relay worker 0 restarted", 10)
    for client in (alice, bob):
        assert client.expect(ERROR)["code"] == "shutdown"
        client.close()
    carol, dave = make_pair(srv.port, "carol", "dave")
    for i in range(3):
        carol.send_frame(MSG, b"y%d" % i)
        assert dave.expect(MSG) == b"y%d" % i
    wait_for("8 messages counted, the dead worker's 5 included", relayed(8), 10)
    families = reading(url)
    assert value(families, "chatpair_errors", "chatpair_errors_total", code="shutdown") == 2
    assert value(families, "chatpair_relay_workers") == 1
    for client in (carol, dave):
        client.close()
    assert srv.stop() == 0


@pytest.mark.timeout(30)
def test_only_metrics_is_served(start_server) -> None:
    srv, url = metrics_server(start_server)
    base = url.rsplit("/", 1)[0]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/", timeout=5)
    assert err.value.code == 404
    err.value.close()
    head = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as resp:
        assert resp.status == 200 and resp.read() == b""
    assert srv.stop() == 0


def test_a_metrics_port_in_use_is_one_clear_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "chatpair", "server", "--host", "127.0.0.1", "--port", "0",
                                 "--metrics", f"127.0.0.1:{port}"], capture_output=True, text=True, cwd=ROOT,
                                timeout=20, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"chatpair: --metrics: cannot listen on 127.0.0.1:{port}: Address already in use"], result.stderr
    assert result.stdout == ""


# -- the status line ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_status_line_every_interval_and_on_sigusr1(start_server) -> None:
    srv = start_server("--status-interval", "0.3")
    alice, bob = make_pair(srv.port, "alice", "bob")
    for _ in range(4):
        alice.send_frame(MSG, b"hi")
        assert bob.expect(MSG) == b"hi"
    wait_for("two periodic status lines", lambda: srv.stderr().count("status: ") >= 2, 10)
    line = wait_for("a status line with the pair",
                    lambda: next((x for x in srv.stderr().splitlines() if "status: 2 connections" in x), None), 10)
    assert "(0 handshaking), 1 pair, 0 waiting" in line and "messages/s" in line
    assert srv.stop() == 0


@pytest.mark.timeout(30)
def test_status_interval_zero_logs_only_on_demand(start_server) -> None:
    srv = start_server("--status-interval", "0")
    srv.proc.send_signal(signal.SIGUSR1)
    line = srv.wait_stderr("status: ", 5)
    assert "status: 0 connections (0 handshaking), 0 pairs, 0 waiting, 0.0 messages/s" in line
    join(srv.port, "alice").close()  # the listener has gone round its loop again
    assert srv.stop() == 0
    assert srv.stderr_text.count("status: ") == 1


# -- the pieces, without sockets -------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_render_for_the_parser() -> None:
    from chatpair.server.metrics import render
    from chatpair.server.stats import Histogram, Totals

    hist = Histogram((1.0, 10.0))
    for seconds in (0.5, 1.0, 3.0, 11.0):
        hist.observe(seconds)
    assert hist.cumulative() == [(1.0, 2), (10.0, 3), (float("inf"), 4)]
    assert hist.count == 4 and hist.sum == 15.5
    totals = Totals()
    totals.durations.observe(2.5)
    families = parse(render(totals))
    assert value(families, "chatpair_pair_duration_seconds", "chatpair_pair_duration_seconds_bucket", le="10.0") == 1
    assert value(families, "chatpair_pair_duration_seconds", "chatpair_pair_duration_seconds_sum") == 2.5


def test_a_worker_reports_only_when_due_and_changed() -> None:
    from chatpair.server.stats import REPORT_SECONDS, LoopStats

    stats = LoopStats()
    assert stats.report_due(0.0) is None  # nothing counted yet
    stats.msgs += 3
    assert stats.report_due(0.1) is None  # not due yet
    report = stats.report_due(REPORT_SECONDS + 0.1)
    assert report is not None and report["msgs"] == 3 and report["pid"] == os.getpid()
    assert stats.report_due(2 * REPORT_SECONDS + 0.2) is None  # due, but nothing new
    stats.pair_started(7, 3, 10.0)
    stats.pair_ended(3, 7, 70.5)
    stats.pair_ended(3, 7, 80.0)  # a pair ends once
    assert stats.durations.count == 1 and stats.durations.sum == 60.5
    stats.error("bad_frame")
    assert stats.report_due(10 * REPORT_SECONDS)["errors"] == {"bad_frame": 1}  # type: ignore[index]


def test_the_ledger_keeps_what_a_dead_worker_counted() -> None:
    from chatpair.server.stats import Totals, WorkerLedger

    ledger = WorkerLedger()
    ledger.update(0, {"pid": 10, "msgs": 5, "bytes": 50, "pairs": 1, "errors": {"timeout": 1},
                      "durations": [], "durations_sum": 0.0})
    ledger.update(0, {"pid": 10, "msgs": 7, "bytes": 70, "pairs": 1, "errors": {}, "durations": [],
                      "durations_sum": 0.0})  # the same process: its newest counts replace the old
    ledger.update(1, {"pid": 11, "msgs": 1, "bytes": 1, "pairs": 1})
    ledger.update(0, {"pid": 12, "msgs": 2, "bytes": 20, "pairs": 1, "errors": {"timeout": 1}})  # restarted
    ledger.update(0, {})  # nothing reported yet: nothing changes
    totals = Totals()
    ledger.add_to(totals)
    assert (totals.msgs, totals.bytes, totals.pairs_total) == (10, 91, 3)
    assert totals.errors["timeout"] == 1


def test_deny_list_matching() -> None:
    from chatpair.errors import ConfigError
    from chatpair.server.deny import DenyList, parse_network

    deny = DenyList(["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::ffff:172.16.0.0/108"])
    assert deny.match("10.200.3.4") == "10.0.0.0/8"
    assert deny.match("::ffff:10.1.1.1") == "10.0.0.0/8"  # an IPv4 client of a dual-stack socket
    assert deny.match("192.168.1.7") == "192.168.1.7/32" and deny.match("192.168.1.8") is None
    assert deny.match("2001:db8:1::5") == "2001:db8::/32" and deny.match("2001:db9::1") is None
    assert deny.match("172.16.9.9") == "172.16.0.0/12"
    assert deny.match("fe80::1%eth0") is None and deny.match("not an address") is None
    assert deny.match("0.0.0.1") is None  # small IPv4 numbers are not mistaken for IPv6 ones
    assert str(parse_network("10.1.2.3/8")) == "10.0.0.0/8"  # host bits are forgiven, as in firewalls
    assert not DenyList() and DenyList().match("10.0.0.1") is None
    with pytest.raises(ConfigError, match="--deny: '10.0.0.0/40' is not an IP network"):
        parse_network("10.0.0.0/40", "--deny")


def test_deny_file_reload_keeps_the_previous_list_on_error(tmp_path) -> None:
    from chatpair.errors import ConfigError
    from chatpair.server.deny import DenyList

    path = tmp_path / "deny"
    path.write_text("# comment\n\n10.0.0.0/8   # trailing comment\n")
    deny = DenyList(["192.0.2.1"], str(path))
    assert deny.reload() == 2 and deny.match("10.1.1.1")
    path.write_text("10.0.0.0/8\noops\n")
    with pytest.raises(ConfigError, match=r"deny:2: 'oops' is not an IP network"):
        deny.reload()
    assert deny.size == 2 and deny.match("10.1.1.1")
    path.unlink()
    with pytest.raises(ConfigError, match="cannot read the deny file"):
        deny.reload()
    assert deny.match("10.1.1.1") and deny.match("192.0.2.1")
