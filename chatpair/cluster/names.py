"""Names in cluster mode: node ids, client ids and every Redis key, in one place.

* A **node id** is 1-64 characters from ``A-Z a-z 0-9 _ . -`` (``--node-id``,
  by default the host name). It never contains ``:``.
* A **client id** (cid) is ``NODE:BOOT-N``: the node's id, the node's boot
  token (fresh random hex each time the node starts) and the connection's
  local number. The node of a cid is the part before the first ``:``; the
  boot token keeps a restarted node's clients distinct from the ghosts of its
  previous run (a late message for an old client can never reach a new one).
* Every key starts with a **prefix**, by default ``{chatpair}:``. The braces
  are a Redis Cluster hash tag: all keys land in one slot. Today one plain
  Redis is the target (the scripts compute the keys they touch rather than
  declare them, which only a single Redis allows); the tag keeps the move to
  a Redis Cluster small. The prefix lets several chatpair clusters (or tests)
  share one Redis.

The keys themselves, their types and TTLs are listed in
:mod:`chatpair.cluster.lobby` (the lobby's) and :mod:`chatpair.cluster.inbox`
(the streams); the Lua in :mod:`chatpair.cluster.scripts` builds the same
names as :class:`Keys`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from chatpair.errors import ConfigError

DEFAULT_PREFIX = "{chatpair}:"
_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: The open lobby's queue name; no room code can be ``*`` (PROTOCOL.md: letters, digits, _ - .).
OPEN_LOBBY = "*"


def check_node_id(node: str) -> str:
    """``node`` if it is a valid node id; ConfigError saying the rule otherwise."""
    if not _NODE_ID.fullmatch(node):
        raise ConfigError(f"bad node id {node!r}: 1-64 characters from A-Z a-z 0-9 _ . -")
    return node


def new_boot_token() -> str:
    """A fresh token for one run of a node (48 random bits, hex)."""
    return secrets.token_hex(6)


#: A node id this long or shorter names its node in a session token as it is; a longer one by a hash.
_TOKEN_TAG_MAX = 39


def node_tag(node: str) -> str:
    """How a session token names ``node``: its id, or ``!`` and 16 hex digits of a hash of a long id."""
    if len(node) <= _TOKEN_TAG_MAX:
        return node
    return "!" + hashlib.sha256(node.encode()).hexdigest()[:16]


def session_token(node: str) -> str:
    """A resume token (PROTOCOL.md section 6) made by ``node``: ``TAG~`` and 144 random bits, <= 64 characters.

    Opaque to clients; other nodes read the tag (:func:`token_tag`) to know
    which node holds the session. ``~`` and ``!`` are never in a node id.
    """
    return f"{node_tag(node)}~{secrets.token_urlsafe(18)}"


def token_tag(token: str) -> str | None:
    """The node tag of a token :func:`session_token` made (None for anything else)."""
    tag, sep, rest = token.partition("~")
    if not sep or not rest or not tag:
        return None
    return tag


def token_hash(token: str) -> str:
    """What Redis keeps of a resume token (a bearer secret): 32 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def make_cid(node: str, boot: str, local: int) -> str:
    """The cluster-wide id of local connection ``local`` on this run of ``node``."""
    return f"{node}:{boot}-{local}"


def node_of(cid: str) -> str:
    """The node a client id belongs to."""
    return cid.split(":", 1)[0]


def room_token(room: str | None) -> str:
    """The queue name of a room (``*``: the open lobby)."""
    return OPEN_LOBBY if room is None else room


def room_of_token(token: str) -> str | None:
    return None if token == OPEN_LOBBY else token


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix (the Lua scripts build the same strings)."""

    prefix: str = DEFAULT_PREFIX

    @property
    def nodes(self) -> str:
        return self.prefix + "nodes"

    @property
    def rooms(self) -> str:
        return self.prefix + "rooms"

    def node(self, node: str) -> str:
        return f"{self.prefix}node:{node}"

    def node_clients(self, node: str) -> str:
        return f"{self.prefix}nc:{node}"

    def client(self, cid: str) -> str:
        return f"{self.prefix}c:{cid}"

    def queue(self, room: str | None) -> str:
        return f"{self.prefix}q:{room_token(room)}"

    def excluded(self, cid: str) -> str:
        return f"{self.prefix}x:{cid}"

    def inbox(self, node: str) -> str:
        return f"{self.prefix}inbox:{node}"

    def session(self, hashed: str) -> str:
        """Where a resumed session that moved to another node lives now (:func:`token_hash`)."""
        return f"{self.prefix}s:{hashed}"
