"""The cluster-wide lobby: chatpair's pairing rules, atomic in Redis, for many nodes.

:class:`ClusterLobby` has the rules of :class:`chatpair.server.lobby.Lobby`
(FIFO open lobby; rooms paired within themselves; ``room_full`` for an
*arrival* at a room with a pair chatting and nobody it may join; a client
*requeued* after its partner left is never refused; two clients one of which
sent NEXT are never paired again while both connections last; a waiting
client *away* for a RESUME keeps its place but is not paired), with client
ids that are strings ``NODE:BOOT-N`` (:mod:`chatpair.cluster.names`). Every
transition is one Lua script (:mod:`chatpair.cluster.scripts`), so two nodes
can never pair the same client twice.

Liveness: each node holds a key with a TTL and renews it (:meth:`heartbeat`,
a few times per TTL). JOIN skips every waiter whose node's key is gone and
purges it on the way (a ghost is never paired); :meth:`purge_node` removes a
dead node's clients and tells their partners on other nodes (a ``peer_left``
entry in their node's inbox, and the list returned). Which nodes to purge,
and when, is :class:`chatpair.cluster.liveness.DeathWatch`'s decision.

Keys (prefix ``P``, default ``{chatpair}:``; room token ``*`` = open lobby):

=====================  ======  ==========  ==================================================
key                    type    TTL         holds
=====================  ======  ==========  ==================================================
``P node:NODE``        string  ttl (PX)    the node's boot token while it heartbeats; ``?``:
                                           a placeholder giving a node time to come back
                                           after Redis lost its data
``P nodes``            set     none        node ids registered and not yet purged
``P epoch``            string  none        random, set once (SET NX); a new value means Redis
                                           came back empty and nodes must rebuild
``P nc:NODE``          set     none        cids of the node's clients Redis knows of
``P c:CID``            hash    none        ``state`` (waiting/chatting/idle), ``room``,
                                           ``name``, ``partner`` (cid or empty), ``away``
                                           (``1``: waiting but away, see :meth:`set_away`)
``P q:ROOM``           list    none        waiting cids of a room, oldest first
``P rooms``            hash    none        room token -> pairs chatting there (field gone at 0)
``P x:CID``            set     none        cids this client may not be paired with (NEXT)
``P inbox:NODE``       stream  MAXLEN ~    the node's inbox (:mod:`chatpair.cluster.inbox`)
=====================  ======  ==========  ==================================================

Nothing but node keys has a TTL: a client's records live exactly as long as
its node says (leave) or its node is purged. After Redis restarted empty,
nodes re-register their waiting clients and pairs with :meth:`restore`;
NEXT exclusions and *away* marks are not rebuilt (two clients who NEXTed
each other may meet again after such a loss; a node marks its away clients
again), and waiting clients lose their place in the queue (they are queued
again in the order each node lists them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from chatpair.cluster import scripts
from chatpair.cluster.names import (
    DEFAULT_PREFIX,
    Keys,
    check_node_id,
    make_cid,
    new_boot_token,
    node_of,
    room_token,
)
from chatpair.cluster.redisconn import ClusterError, redis_module
from chatpair.cluster.scriptline import Scripts

#: Node key TTL (ms): a node that has not renewed it for this long is presumed dead.
DEFAULT_TTL_MS = 3000
#: Approximate length bound of each node's inbox stream (XADD MAXLEN ~).
DEFAULT_INBOX_MAXLEN = 100_000


class NodeGone(ClusterError):
    """This node's registration lapsed (heartbeat missed, or Redis restarted): heartbeat, then retry."""


@dataclass(frozen=True, slots=True)
class Queued:
    """The client waits in its room's queue."""

    cid: str
    ghosts: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class Matched:
    """``waiter`` (queued earlier, maybe on another node) and ``newcomer`` now form a pair."""

    waiter: str
    newcomer: str
    waiter_name: str = field(default="", compare=False)
    ghosts: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class RoomFull:
    """Refused: the room has a pair chatting and nobody this client may join."""

    cid: str
    ghosts: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True, order=True)
class PeerGone:
    """``partner`` (on a live node) lost ``gone`` (on a dead node): tell it PEER_LEFT disconnected."""

    partner: str
    gone: str


@dataclass(frozen=True, slots=True)
class Restored:
    """What :meth:`ClusterLobby.restore` found: new pairs, and pairs that had ended meanwhile."""

    matched: tuple[Matched, ...]
    ended: tuple[tuple[str, str], ...]  # (this node's client, its former partner)
    ghosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Waiting:
    """A waiting client as :meth:`ClusterLobby.restore` takes it."""

    cid: str
    name: str
    room: str | None


@dataclass(frozen=True, slots=True)
class Chatting:
    """One side of a pair as :meth:`ClusterLobby.restore` takes it (``cid`` is on this node)."""

    cid: str
    partner: str
    name: str
    partner_name: str
    room: str | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ClusterLobby:
    """One node's handle on the shared lobby. Thread-safe as far as its redis client is.

    For callers: :meth:`register`, :meth:`heartbeat`, :meth:`cid`,
    :meth:`join`, :meth:`unpair`, :meth:`set_away`, :meth:`back`,
    :meth:`leave`, :meth:`dead_nodes`,
    :meth:`purge_node`, :meth:`restore`; queries for tests and operators:
    :meth:`waiting`, :meth:`partner_of`, :meth:`state_of`, :meth:`pairs_chatting`.
    Redis being unreachable raises redis-py's ConnectionError/TimeoutError
    (see :func:`chatpair.cluster.redisconn.redis_errors`); the caller decides.
    """

    def __init__(self, client: Any, node: str, *, prefix: str = DEFAULT_PREFIX,
                 ttl_ms: int = DEFAULT_TTL_MS, inbox_maxlen: int = DEFAULT_INBOX_MAXLEN,
                 script_line: bool = True) -> None:
        """``script_line``: False runs the scripts through redis-py even where a
        :class:`~chatpair.cluster.scriptline.ScriptLine` could be used."""
        self.redis = client
        self.node = check_node_id(node)
        self.boot = new_boot_token()
        self.keys = Keys(prefix)
        self.ttl_ms = ttl_ms
        self.epoch = ""
        self._base = [prefix, str(inbox_maxlen)]
        self._scripts = Scripts(client, scripts.ALL, script_line=script_line)

    def _call(self, name: str, *args: Any) -> Any:
        reply = self._scripts.call_many(name, [self._base + [str(a) for a in args]])[0]
        if isinstance(reply, redis_module().exceptions.ResponseError):
            raise self._translate(name, reply)
        return reply

    def close(self) -> None:
        """Close this handle's connections (its redis-py client's too)."""
        self._scripts.close()
        self.redis.close()

    @staticmethod
    def _translate(name: str, error: BaseException) -> Exception:
        """A script's error reply as the exception a caller handles."""
        text = str(error)
        if text.startswith("CALLER "):
            return ValueError(text[7:])
        if text.startswith("NODEGONE "):
            return NodeGone(text[9:])
        return ClusterError(f"Redis script {name} failed: {text}")

    # -- the node ------------------------------------------------------------------------

    def cid(self, local: int) -> str:
        """The cluster-wide id of this node's connection number ``local``."""
        return make_cid(self.node, self.boot, local)

    def register(self) -> list[PeerGone]:
        """Join the cluster, replacing a stale registration of this node id (purging its clients)."""
        epoch, told = self._call("register", self.node, self.boot, self.ttl_ms, new_boot_token())
        self.epoch = _text(epoch)
        return self._peers_gone(told)

    def heartbeat(self) -> str:
        """Renew this node's key. ``ok``; ``expired`` (it had lapsed: :meth:`restore` with
        ``rebuild=False``); ``reset`` (Redis lost its data: :meth:`restore` with
        ``rebuild=True``); ``taken`` (another run of this node id took over: stop)."""
        status, epoch = self._call("heartbeat", self.node, self.boot, self.ttl_ms, self.epoch, new_boot_token())
        self.epoch = _text(epoch)
        return _text(status)

    def dead_nodes(self) -> set[str]:
        """Registered nodes whose key is gone right now (candidates for :meth:`purge_node`)."""
        return self._nodes(alive=False)

    def live_nodes(self) -> set[str]:
        """Registered nodes whose key is there right now."""
        return self._nodes(alive=True)

    def _nodes(self, alive: bool) -> set[str]:
        nodes = sorted(_text(n) for n in self.redis.smembers(self.keys.nodes))
        if not nodes:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for node in nodes:
            pipe.exists(self.keys.node(node))
        return {node for node, there in zip(nodes, pipe.execute()) if bool(there) == alive}

    def purge_node(self, node: str) -> list[PeerGone] | None:
        """Remove a dead node's clients; None if it turned out to be alive (nothing done).

        The partners returned were also sent a ``peer_left`` entry to their node's inbox.
        """
        done, told = self._call("purge_node", node)
        return self._peers_gone(told) if done else None

    @staticmethod
    def _peers_gone(flat: list[Any]) -> list[PeerGone]:
        items = [_text(x) for x in flat]
        return [PeerGone(items[i], items[i + 1]) for i in range(0, len(items), 2)]

    # -- clients -------------------------------------------------------------------------

    def join(self, cid: str, room: str | None, *, name: str = "", requeued: bool = False) -> Queued | Matched | RoomFull:
        """A client of this node arrives (or comes back after its partner left).

        A match with a waiter on another node also puts a ``paired`` entry
        (payload: this client's name) in that node's inbox.
        """
        if node_of(cid) != self.node:
            raise ValueError(f"client {cid} is not on node {self.node}")
        return self.parse_join(cid, self._call("join", cid, name, room_token(room), int(requeued)))

    def join_many(self, joins: list[tuple[str, str | None, str, bool]],
                  via: Scripts | None = None) -> list[Queued | Matched | RoomFull | Exception]:
        """Several :meth:`join` calls (cid, room, name, requeued) in one round trip, in order.

        Each script is as atomic as alone; the answer for each is its result,
        or the exception :meth:`join` would have raised (ValueError, NodeGone,
        ClusterError). Redis being unreachable raises, as everywhere. ``via``:
        another connection's :class:`Scripts` (the listener's own, see
        :mod:`chatpair.server.cluster_joins`) instead of this handle's.
        """
        for cid, _, _, _ in joins:
            if node_of(cid) != self.node:
                raise ValueError(f"client {cid} is not on node {self.node}")
        calls = [self._base + [cid, name, room_token(room), str(int(requeued))]
                 for cid, room, name, requeued in joins]
        replies = (via or self._scripts).call_many("join", calls)
        errors = redis_module().exceptions.ResponseError
        return [self._translate("join", reply) if isinstance(reply, errors) else self.parse_join(cid, reply)
                for (cid, _, _, _), reply in zip(joins, replies)]

    @staticmethod
    def parse_join(cid: str, reply: list[Any]) -> Queued | Matched | RoomFull:
        """The answer to ``cid``'s JOIN script, from its reply."""
        status, waiter, waiter_name, ghosts = reply
        gone = tuple(_text(g) for g in ghosts)
        status = _text(status)
        if status == "matched":
            return Matched(_text(waiter), cid, _text(waiter_name), gone)
        if status == "room_full":
            return RoomFull(cid, gone)
        return Queued(cid, gone)

    def unpair(self, a: str, b: str, *, next_by: str | None = None,
               leaver: str | None = None, reason: str = "") -> bool:
        """End the pair (a, b); False if it had already ended (e.g. b's node was purged).

        ``next_by``: who sent NEXT (the two are then never paired again while
        both last). ``leaver``: who left; if the one who stays is on another
        node, a ``peer_left`` entry with ``reason`` goes to its inbox, so flush
        this node's outbox first (messages before PEER_LEFT).
        """
        return bool(self._call("unpair", a, b, next_by or "", leaver or "", reason))

    def set_away(self, cid: str) -> bool:
        """A waiting client's connection dropped, its session kept for RESUME: it keeps
        its place in the queue, but nobody is paired with it until :meth:`back`."""
        return bool(self._call("set_away", cid))

    def back(self, cid: str) -> Matched | None:
        """An away client is back: paired now if someone it may join is waiting, else None."""
        status, waiter, waiter_name, ghosts = self._call("back", cid)
        if _text(status) != "matched":
            return None
        return Matched(_text(waiter), cid, _text(waiter_name), tuple(_text(g) for g in ghosts))

    def move(self, old: str, new: str, partner: str | None, tell: bool, state: str, hashed: str) -> bool:
        """A resumed session moves from ``old`` (ours) to ``new`` (another node's): records
        follow, ``new``'s node gets ``adopt`` with ``state``, ``partner``'s ``moved`` if ``tell``;
        ``hashed`` (the token's :func:`~chatpair.cluster.names.token_hash`) finds ``new`` from then on."""
        return bool(self._call("move", old, new, partner or "", "1" if tell else "0", state, hashed))

    def moved_to(self, hashed: str) -> str | None:
        """The client a session moved to (None: it never moved, or has ended)."""
        found = self.redis.get(self.keys.session(hashed))
        return _text(found) if found is not None else None

    def leave(self, cid: str) -> None:
        """The connection is gone: forget the client everywhere (unpair first if chatting)."""
        self._call("leave", cid)

    def restore(self, waiting: Iterable[Waiting], chatting: Iterable[Chatting], *, rebuild: bool) -> Restored:
        """Re-register this node's waiting clients (in queue order) and pairs.

        After :meth:`heartbeat` said ``expired`` (``rebuild=False``) or
        ``reset`` (``rebuild=True``). Idempotent. A waiting client Redis no
        longer has is queued again (and may be paired at once); a pair Redis no
        longer has is rebuilt when Redis lost its data (or both sides are on
        this node), and otherwise reported in ``ended``: its partner was told
        already, so tell this side PEER_LEFT ``disconnected`` and requeue it.
        """
        waiting, chatting = list(waiting), list(chatting)
        args: list[Any] = [self.node, int(rebuild), self.ttl_ms, len(waiting)]
        for w in waiting:
            args += [w.cid, w.name, room_token(w.room)]
        for c in chatting:
            args += [c.cid, c.partner, c.name, c.partner_name, room_token(c.room)]
        matched, ended, ghosts = self._call("restore", *args)
        m = [_text(x) for x in matched]
        e = [_text(x) for x in ended]
        return Restored(tuple(Matched(m[i], m[i + 1], m[i + 2]) for i in range(0, len(m), 3)),
                        tuple((e[i], e[i + 1]) for i in range(0, len(e), 2)),
                        tuple(_text(g) for g in ghosts))

    # -- queries -------------------------------------------------------------------------

    def waiting(self, room: str | None = None) -> list[str]:
        return [_text(c) for c in self.redis.lrange(self.keys.queue(room), 0, -1)]

    def state_of(self, cid: str) -> str | None:
        """``waiting``, ``chatting``, ``idle``, or None when Redis does not know the client."""
        value = self.redis.hget(self.keys.client(cid), "state")
        return None if value is None else _text(value)

    def partner_of(self, cid: str) -> str | None:
        value = self.redis.hget(self.keys.client(cid), "partner")
        return _text(value) or None if value is not None else None

    def name_of(self, cid: str) -> str:
        """The name ``cid`` joined with ("" if Redis does not know it)."""
        return _text(self.redis.hget(self.keys.client(cid), "name") or b"")

    def pairs_chatting(self) -> int:
        """Pairs chatting, in all rooms and the open lobby."""
        return sum(int(v) for v in self.redis.hvals(self.keys.rooms))

    def pairs_in(self, room: str | None) -> int:
        """Pairs chatting in ``room`` (None: the open lobby)."""
        return int(self.redis.hget(self.keys.rooms, room_token(room)) or 0)

    def clients_of(self, node: str) -> set[str]:
        return {_text(c) for c in self.redis.smembers(self.keys.node_clients(node))}
