"""Cluster mode: many chatpair nodes sharing one lobby and one message bus in Redis.

``chatpair server --cluster URL`` (docs/cluster.md); the server's side is
:mod:`chatpair.server.cluster_desk` and :mod:`chatpair.server.cluster_relay`.

* :mod:`chatpair.cluster.redisconn` - the optional ``redis`` package, imported
  lazily, and the one error a user sees when Redis is missing or unreachable;
* :mod:`chatpair.cluster.names` - node ids, client ids (``node:boot-n``) and
  every Redis key name, in one place;
* :mod:`chatpair.cluster.scripts` - the server-side Lua scripts (pairing,
  unpairing, node registration, purge, rebuild after Redis came back empty);
* :mod:`chatpair.cluster.lobby` - :class:`ClusterLobby`, the same pairing rules
  as :mod:`chatpair.server.lobby`, cluster-wide and atomic;
* :mod:`chatpair.cluster.liveness` - when a node whose heartbeat key is gone
  is really dead (pure logic, time passed in);
* :mod:`chatpair.cluster.inbox` - cross-node relay through one Redis Stream per
  node: ordered, deduplicated by per-pair sequence numbers, acknowledged;
* :mod:`chatpair.cluster.peer` - a partner on another node as a relay sees it;
* :mod:`chatpair.cluster.node` and :mod:`chatpair.cluster.nodeio` - the
  node's two threads (Redis I/O in request order; the inbox reader);
* :mod:`chatpair.cluster.results` - what the node tells the listener, timings.

Only this package imports ``redis``; the core works without it
(``pip install 'chatpair[cluster]'`` adds it).
"""
