"""Cluster mode: many chatpair nodes sharing one lobby and one message bus in Redis.

Groundwork, not yet wired into ``chatpair server``:

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
  node: ordered, deduplicated by per-pair sequence numbers, acknowledged.

Only this package imports ``redis``; the core works without it
(``pip install 'chatpair[cluster]'`` adds it).
"""
