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
lobby. Today: one node with ``--proxy-protocol``. Cluster mode adds three
nodes sharing one Redis, e.g. ``[["--proxy-protocol", "--cluster", url,
"--node-id", f"n{i}"] for i in range(3)]`` - with round robin, consecutive
connections then land on different nodes, and the suite checks that the
cluster keeps every promise of PROTOCOL.md.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from haproxy import ServerGroup, needs_haproxy
from test_conformance import *  # the tests themselves (and their fixtures), collected here again
from wire import HELLO, Server, frame, hello_payload

pytestmark = needs_haproxy

#: Each node's own ``chatpair server`` options, for one group of nodes behind one HAProxy.
Deployment = Callable[[pytest.FixtureRequest], list[list[str]]]


def one_node(request: pytest.FixtureRequest) -> list[list[str]]:
    return [["--proxy-protocol"]]


#: deployment name -> its nodes' options (see the module docstring)
DEPLOYMENTS: dict[str, Deployment] = {
    "1-node": one_node,
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
