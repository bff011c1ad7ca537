"""The conformance suite (tests/test_conformance.py) again, through a real HAProxy.

    test client ──► haproxy (mode tcp, balance roundrobin, send-proxy-v2) ──► chatpair server(s)
                                                                             --proxy-protocol

Every test of tests/test_conformance.py is imported here and runs unchanged;
only its ``make_server`` fixture is overridden, so that each "server" a test
starts is a :class:`~haproxy.ServerGroup`: the nodes of one deployment behind
one HAProxy, whose port is the one the test connects to. What a test does to
the server's process (SIGTERM, waiting for the exit code, looking for
children left) it does to every node.

``DEPLOYMENTS`` lists the deployments: for each, a function that returns the
``chatpair server`` options of every node (the test's own options come
after). It is called once per group a test starts, with the fixture
request, so a deployment that needs a fixture (a Redis server) gets it with
``request.getfixturevalue``, and may give each group a lobby of its own (a
fresh Redis database): tests that start a fresh server expect an empty
lobby. Two deployments:

* ``1-node``: one server with ``--proxy-protocol``;
* ``3-nodes``: three cluster nodes (``--cluster`` on one redis-server,
  ``--node-id n0..n2``, ``--proxy-protocol``). Each group of nodes a test
  starts gets a Redis database of its own (the ``cluster_redis`` fixture:
  one redis-server per test module and worker, a thousand databases, each
  handed out once), so a fresh "server" has an empty lobby. With round
  robin, consecutive connections land on different nodes: the pairs the
  suite makes are cross-node (paired by a JOIN script on one node, announced
  to the other through its inbox), relayed through Redis Streams, ended with
  UNPAIR and ``peer_left``, and the suite checks that the cluster keeps every
  promise of PROTOCOL.md.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator

import pytest
from haproxy import ServerGroup, needs_haproxy
from redisserver import REDIS_SERVER, RedisServer, redis
from test_conformance import *  # the tests themselves (and their fixtures), collected here again
from wire import HELLO, Server, frame, hello_payload

pytestmark = needs_haproxy

#: Each node's own ``chatpair server`` options, for one group of nodes behind one HAProxy.
Deployment = Callable[[pytest.FixtureRequest], list[list[str]]]


def one_node(request: pytest.FixtureRequest) -> list[list[str]]:
    return [["--proxy-protocol"]]


class ClusterRedis:
    """One redis-server with many databases; :meth:`fresh_url` hands each out once."""

    DATABASES = 1000

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self._numbers = itertools.count(1)

    def fresh_url(self) -> str:
        db = next(self._numbers)
        assert db < self.DATABASES, "more server groups in one module than Redis databases"
        return f"{self.server.url}?db={db}"


@pytest.fixture(scope="module")
def cluster_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterRedis]:
    if REDIS_SERVER is None or redis is None:
        pytest.skip("needs redis-server (Debian package redis-server) and the redis package")
    server = RedisServer(tmp_path_factory.mktemp("redis"), ("--databases", str(ClusterRedis.DATABASES)))
    server.start()
    try:
        yield ClusterRedis(server)
    finally:
        server.stop()


def three_nodes(request: pytest.FixtureRequest) -> list[list[str]]:
    url = request.getfixturevalue("cluster_redis").fresh_url()
    return [["--proxy-protocol", "--cluster", url, "--node-id", f"n{i}"] for i in range(3)]


#: deployment name -> its nodes' options (see the module docstring)
DEPLOYMENTS: dict[str, Deployment] = {
    "1-node": one_node,
    "3-nodes": three_nodes,
}


@pytest.fixture(scope="module", params=sorted(DEPLOYMENTS))
def deployment(request: pytest.FixtureRequest) -> Deployment:
    return DEPLOYMENTS[request.param]


@pytest.fixture(scope="module")
def make_server(deployment: Deployment, request: pytest.FixtureRequest) -> Callable[..., ServerGroup]:
    """Each server a conformance test starts: the deployment's nodes behind a fresh HAProxy."""

    def make(*args: str) -> ServerGroup:
        return ServerGroup(Server, deployment(request), args)

    return make


@pytest.mark.timeout(20)
def test_the_suite_really_goes_through_haproxy(shared):
    """The port the tests use is the balancer's; a node itself wants a PROXY header first."""
    assert shared.port == shared.haproxy.port
    for node in shared.nodes:
        assert node.port != shared.port
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as direct:
            direct.sendall(frame(HELLO, hello_payload("mallory")))  # no PROXY header: closed, no banner
            assert direct.recv(100) == b""
