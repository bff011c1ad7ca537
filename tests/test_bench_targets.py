"""``chatpair bench --target H1:P1,H2:P2,...``: clients spread over servers, partners apart.

Client ``k`` (A of pair ``i`` is ``2i``, its B ``2i + 1``) connects to target
``k mod N``, so with two targets or more the partners of every pair are on
different servers - in a cluster, cross-node pairs. Independent servers never
pair across each other, so the figures are checked with one server listed
twice (every pair pairs, and the report adds per-target and cross-target
figures), and the spreading itself with three independent servers, read
from their logs (who joined where), before Ctrl-C ends the run.

Real processes and sockets on 127.0.0.1; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for

from chatpair.bench import target_addresses
from chatpair.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


def chatpair(*args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatpair", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "120"}, check=False)


def test_a_target_list_is_read_in_order() -> None:
    assert target_addresses("127.0.0.1:7001") == (("127.0.0.1", 7001),)
    assert target_addresses("a:1, b:2,[::1]:3") == (("a", 1), ("b", 2), ("::1", 3))
    for bad in ("a:1,,b:2", "a:1,", "a:1,b", ","):
        with pytest.raises(ConfigError, match="--target"):
            target_addresses(bad)


def test_a_bad_target_list_is_one_clear_line() -> None:
    proc = chatpair("bench", "--target", "127.0.0.1:7001,nowhere")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--target" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("mode", ["flood", "pingpong"])
def test_one_server_twice_reports_per_target_and_cross_target_figures(server, mode: str) -> None:
    target = f"127.0.0.1:{server.port}"
    proc = chatpair("bench", "--mode", mode, "--target", f"{target},{target}", "--pairs", "4",
                    "--messages", "50", "--size", "40", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] and data["lost"] == 0 and data["pairs_connected"] == 4
    assert data["config"]["targets"] == [["127.0.0.1", server.port]] * 2
    assert data["cross_target_pairs"] == 4
    assert [t["target"] for t in data["targets"]] == [target, target]
    assert [t["clients"] for t in data["targets"]] == [4, 4]  # every A on target 1, every B on target 2
    assert [t["paired"] for t in data["targets"]] == [4, 4]
    assert sum(t["delivered"] for t in data["targets"]) == data["delivered"] > 0
    assert sum(t["sent"] for t in data["targets"]) == data["sent"]

    text = chatpair("bench", "--target", f"{target},{target}", "--pairs", "2", "--messages", "20", "--size", "40")
    assert text.returncode == 0, text.stderr
    assert re.search(rf"target 1 +{re.escape(target)}: 2 clients \(2 paired\)", text.stdout), text.stdout
    assert re.search(r"cross-target +2 of 2 pairs had their partners on different targets", text.stdout), text.stdout


def test_one_target_reports_no_target_rows(server) -> None:
    proc = chatpair("bench", "--target", f"127.0.0.1:{server.port}", "--pairs", "1", "--messages", "10",
                    "--size", "40")
    assert proc.returncode == 0, proc.stderr
    assert "cross-target" not in proc.stdout and "target 1" not in proc.stdout


def test_clients_spread_over_three_servers_client_k_on_target_k_mod_n(start_server) -> None:
    servers = [start_server() for _ in range(3)]
    pairs = 3
    args = [sys.executable, "-m", "chatpair", "bench", "--mode", "idle", "--pairs", str(pairs),
            "--target", ",".join(f"127.0.0.1:{s.port}" for s in servers)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Independent servers never pair across each other: wait until every
        # client has joined somewhere, then stop the run (Ctrl-C).
        wait_for("every bench client to join", lambda: sum(s.stderr().count(": joined room bench")
                                                           for s in servers) == 2 * pairs, timeout=20)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    joined = [sorted(re.findall(r"INFO ([ab]\d+)@\S+: joined room bench", s.stderr())) for s in servers]
    # client k = 2i + role -> target k mod 3: a0 b0 a1 / b1 a2 b2 land on 0 1 2 / 0 1 2
    assert joined == [["a0", "b1"], ["a2", "b0"], ["a1", "b2"]], joined
