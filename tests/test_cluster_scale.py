"""Cluster mode at scale: three real nodes, a real redis-server, a real HAProxy, ``chatpair bench``.

Issue 12's load figures, as a test: 1,000 clients spread over 3 nodes by
HAProxy (round robin) are all paired, each exactly once (the bench gives
each pair a room of its own and fails the run on a PAIRED naming anyone
else, or on a second PAIRED); then 200 pairs whose partners are on
different nodes (``--target n0,n1,n2``: client k on node k mod 3) exchange
1,000 messages each way, and the bench finds nothing lost, duplicated or
reordered (every message carries its sequence number). Skipped when
redis-server, the redis package or haproxy is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, ServerProcess
from haproxy import HAProxy, needs_haproxy
from redisserver import RedisServer, needs_redis, redis_server  # noqa: F401 (fixture)

pytestmark = [needs_redis, needs_haproxy]


def bench(*args: str, timeout: float = 40) -> dict:
    """``chatpair bench --json ARGS``; its result (the run must be clean: exit code 0)."""
    out = subprocess.run([sys.executable, "-m", "chatpair", "bench", "--json", *args], cwd=ROOT,
                         capture_output=True, timeout=timeout)
    result = json.loads(out.stdout)
    assert out.returncode == 0 and result["ok"], (out.returncode, result.get("failures"), out.stderr[-2000:])
    return result


@pytest.mark.timeout(60)
def test_1000_clients_over_3_nodes_and_200_cross_node_pairs(redis_server: RedisServer, start_server) -> None:  # noqa: F811
    redis_server.client().flushall()
    nodes: list[ServerProcess] = [
        start_server("--cluster", redis_server.url, "--node-id", f"n{i}") for i in range(3)]
    # No PROXY header here (the bench also connects to the nodes themselves below);
    # tests/test_conformance_haproxy.py runs 3 nodes behind send-proxy-v2.
    haproxy = HAProxy([n.port for n in nodes], send="")
    try:
        # 1,000 clients through HAProxy: all paired, each exactly once.
        idle = bench("-m", "idle", "-P", "500", "-d", "0.5", "-t", f"127.0.0.1:{haproxy.port}")
        assert idle["pairs_connected"] == 500
        joined = [n.stderr().count("joined room") for n in nodes]
        assert sum(joined) >= 1000 and min(joined) >= 300, joined  # round robin: about a third each
        # 200 pairs across nodes, 1,000 messages each way: nothing lost, duplicated or reordered.
        targets = ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        flood = bench("-m", "flood", "-P", "200", "--messages", "1000", "-t", targets)
        assert flood["pairs_connected"] == 200 and flood["cross_target_pairs"] == 200
        assert flood["delivered"] == 400_000 and flood["lost"] == 0 and flood["out_of_order"] == 0
    finally:
        haproxy.stop()
