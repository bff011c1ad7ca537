"""Cross-node relay through Redis Streams: one inbox per node, ordered, exactly once, acknowledged.

When two partners are on different nodes, what one sends reaches the other
through the partner's node's **inbox**, a Redis Stream:

=====================  ======  ===========  ============================================
key                    type    TTL          holds
=====================  ======  ===========  ============================================
``P inbox:NODE``       stream  none;        entries for the node's clients, oldest first;
                               MAXLEN ~ N   deleted when the node (re)registers or is purged
=====================  ======  ===========  ============================================

Each entry has the fields ``t`` (target cid), ``s`` (source cid), ``q``
(sequence number, decimal; ``0`` for control entries), ``k`` (kind) and ``p``
(payload bytes), and acks also ``l`` (lost ranges, ``first-last,...``).
Kinds: ``msg`` (a MSG payload, byte for byte), ``paired`` (``p``: the new
partner's name; written by the lobby's JOIN), ``peer_left`` (``p``: the
reason; written by UNPAIR and the purge of a dead node), ``ack`` and ``wake``.

The three promises and how they are kept:

* **In order, exactly once.** The sender numbers each direction of each pair
  1, 2, 3, ... (:class:`Outbox`); one stream per target node keeps the order;
  the receiver (:class:`SeqCheck` inside :class:`Inbox`) drops a number it has
  seen (a batch retried after a Redis error may have been written twice) and
  reports a :class:`Gap` for numbers that never came (trimmed away).
* **Nothing lost silently.** The receiving node acknowledges, per pair, the
  highest number it has *written to its client* (:meth:`Outbox.ack`, coalesced
  and sent with the next flush), with any gap as ``lost``. The sender keeps
  every number not yet acknowledged; each one that is lost, or still
  unacknowledged when the pair ends or the partner's node dies
  (:meth:`Outbox.drop_pair`, :meth:`Outbox.drop_node`), is answered to its
  sender with NOTICE ``undelivered``. (A node killed after writing but before
  its ack was flushed makes that a false alarm, never a silent loss.) Flush
  the outbox before UNPAIR so acks and messages precede ``peer_left``.
* **Bounded, flow-controlled.** At most ``window`` messages per direction of a
  pair are unacknowledged (:meth:`Outbox.can_send`; the relay stops reading a
  sender whose window is full, so a slow reader on node B slows its partner on
  node A); streams are trimmed with ``MAXLEN ~`` (keep it above pairs x window).

Writes are batched: :meth:`Outbox.flush` sends everything queued in one
pipeline (one round trip). No socket of chatpair's here; :class:`Outbox` is
for one thread, :class:`Inbox` for one reader thread.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from chatpair.cluster.names import Keys, node_of

DEFAULT_WINDOW = 1024
DEFAULT_MAXLEN = 100_000
CONTROL_KINDS = frozenset({"paired", "peer_left", "wake"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One inbox entry, decoded."""

    id: bytes
    target: str
    source: str
    seq: int
    kind: str
    payload: bytes
    lost: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages ``first``..``last`` from ``source`` to ``target`` never arrived (trimmed or lost)."""

    source: str
    target: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Acked:
    """What an ack settled for the pair ``source`` -> ``target`` (``source`` is ours)."""

    source: str
    target: str
    delivered: tuple[int, ...]
    undelivered: tuple[int, ...]


def _ranges(text: bytes | None) -> tuple[tuple[int, int], ...]:
    if not text:
        return ()
    out = []
    for part in text.decode().split(","):
        first, _, last = part.partition("-")
        out.append((int(first), int(last)))
    return tuple(out)


def decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    """An XREAD/XRANGE item as an :class:`Entry`."""
    return Entry(entry_id, fields.get(b"t", b"").decode(), fields.get(b"s", b"").decode(),
                 int(fields.get(b"q", b"0")), fields.get(b"k", b"").decode(), fields.get(b"p", b""),
                 _ranges(fields.get(b"l")))


class SeqCheck:
    """Per-pair sequence numbers on the receiving side: ``ok``, ``dup``, or a :class:`Gap`. Pure."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, str], int] = {}

    def check(self, source: str, target: str, seq: int) -> str | Gap:
        expected = self._next.get((source, target), 1)
        if seq < expected:
            return "dup"
        self._next[(source, target)] = seq + 1
        if seq > expected:
            return Gap(source, target, expected, seq - 1)
        return "ok"

    def forget(self, source: str, target: str) -> None:
        self._next.pop((source, target), None)


@dataclass(slots=True)
class _Direction:
    next_seq: int = 1
    unacked: deque[int] = field(default_factory=deque)


class Outbox:
    """This node's sending side: numbers, batches, remembers until acknowledged.

    For callers: :meth:`send`, :meth:`control`, :meth:`ack`, :meth:`flush`;
    :meth:`can_send` / :meth:`in_flight` for flow control; :meth:`on_ack`
    for ack entries read from our inbox; :meth:`drop_pair` and
    :meth:`drop_node` when a pair ends or a node dies.
    """

    def __init__(self, client: Any, keys: Keys, *, maxlen: int = DEFAULT_MAXLEN,
                 window: int = DEFAULT_WINDOW) -> None:
        self.redis = client
        self.keys = keys
        self.maxlen = maxlen
        self.window = window
        self._out: dict[tuple[str, str], _Direction] = {}
        self._queued: list[tuple[str, dict[str, Any]]] = []
        self._acks: dict[tuple[str, str], tuple[int, list[tuple[int, int]]]] = {}

    # -- sending -------------------------------------------------------------------------

    def can_send(self, source: str, target: str) -> bool:
        """False while ``window`` messages source -> target are unacknowledged: read the sender later."""
        return self.in_flight(source, target) < self.window

    def in_flight(self, source: str, target: str) -> int:
        d = self._out.get((source, target))
        return len(d.unacked) if d else 0

    def send(self, source: str, target: str, payload: bytes) -> int:
        """Queue a MSG payload for ``target`` (on another node); returns its sequence number."""
        d = self._out.setdefault((source, target), _Direction())
        seq = d.next_seq
        d.next_seq += 1
        d.unacked.append(seq)
        self._queued.append((self.keys.inbox(node_of(target)),
                             {"t": target, "s": source, "q": seq, "k": "msg", "p": payload}))
        return seq

    def control(self, target: str, source: str, kind: str, payload: bytes = b"") -> None:
        """Queue a control entry (not numbered, not acknowledged) for ``target``'s node."""
        if kind not in CONTROL_KINDS:
            raise ValueError(f"unknown control kind {kind!r}")
        self._queued.append((self.keys.inbox(node_of(target)),
                             {"t": target, "s": source, "q": 0, "k": kind, "p": payload}))

    def ack(self, source: str, target: str, seq: int, lost: tuple[int, int] | None = None) -> None:
        """We wrote message ``seq`` from ``source`` (remote) to our client ``target``; ``lost``: a gap."""
        upto, gaps = self._acks.get((source, target), (0, []))
        if lost is not None:
            gaps.append(lost)
        self._acks[(source, target)] = (max(upto, seq), gaps)

    def pending(self) -> int:
        """Entries queued and not yet flushed (messages, controls and acks)."""
        return len(self._queued) + len(self._acks)

    def flush(self) -> int:
        """Write everything queued in one pipeline; the number of entries written.

        On a Redis error everything stays queued (and the error propagates):
        the next flush retries, and the receiver drops what was written twice.
        """
        batch = list(self._queued)
        for (source, target), (upto, gaps) in self._acks.items():
            fields: dict[str, Any] = {"t": source, "s": target, "q": upto, "k": "ack", "p": b""}
            if gaps:
                fields["l"] = ",".join(f"{a}-{b}" for a, b in gaps)
            batch.append((self.keys.inbox(node_of(source)), fields))
        if not batch:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for key, fields in batch:
            pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)
        pipe.execute()
        self._queued.clear()
        self._acks.clear()
        return len(batch)

    # -- settling ------------------------------------------------------------------------

    def on_ack(self, entry: Entry) -> Acked:
        """An ``ack`` entry from our inbox: which of our messages were written, which lost."""
        source, target = entry.target, entry.source
        d = self._out.get((source, target))
        delivered, undelivered = [], []
        while d and d.unacked and d.unacked[0] <= entry.seq:
            seq = d.unacked.popleft()
            lost = any(a <= seq <= b for a, b in entry.lost)
            (undelivered if lost else delivered).append(seq)
        return Acked(source, target, tuple(delivered), tuple(undelivered))

    def drop_pair(self, source: str, target: str) -> tuple[int, ...]:
        """The pair ended: forget it; the numbers never acknowledged (NOTICE undelivered each)."""
        d = self._out.pop((source, target), None)
        return tuple(d.unacked) if d else ()

    def forfeit(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """Redis lost its data: every message written but not acknowledged may be gone with it.

        Returns them per direction (NOTICE undelivered each) and stops waiting
        for their acks; messages still queued here are kept (they go out with
        the next flush), and numbering goes on where it was.
        """
        queued = {(f["s"], f["t"], f["q"]) for _, f in self._queued if f["k"] == "msg"}
        out = []
        for (source, target), d in self._out.items():
            keep = deque(seq for seq in d.unacked if (source, target, seq) in queued)
            gone = tuple(seq for seq in d.unacked if (source, target, seq) not in queued)
            d.unacked = keep
            if gone:
                out.append((source, target, gone))
        return out

    def drop_node(self, node: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """``node`` died: for each of our senders with messages to it, those never acknowledged."""
        out = []
        for source, target in [k for k in self._out if node_of(k[1]) == node]:
            seqs = self.drop_pair(source, target)
            if seqs:
                out.append((source, target, seqs))
        return out


class Inbox:
    """This node's receiving side: XREAD BLOCK on its own stream, in order, without duplicates."""

    def __init__(self, client: Any, keys: Keys, node: str, *, count: int = 1000) -> None:
        self.redis = client
        self.key = keys.inbox(node)
        self.count = count
        self.last_id = b"0-0"
        self.seqs = SeqCheck()
        self.duplicates = 0

    def read(self, block_ms: int | None = None) -> list[Entry | Gap]:
        """What arrived since the last read (waiting up to ``block_ms`` for something).

        Messages come checked: a duplicate is dropped (and counted), a gap is
        reported as a :class:`Gap` just before the message that revealed it.
        ``wake`` entries (:meth:`wake`) only end the wait.
        """
        if block_ms is not None and block_ms <= 0:
            raise ValueError("block_ms must be positive (0 would mean forever)")
        reply = self.redis.xread({self.key: self.last_id}, count=self.count, block=block_ms)
        out: list[Entry | Gap] = []
        for _, items in reply or ():
            for entry_id, fields in items:
                self.last_id = entry_id
                entry = decode_entry(entry_id, fields)
                if entry.kind == "wake":
                    continue
                if entry.kind == "msg":
                    verdict = self.seqs.check(entry.source, entry.target, entry.seq)
                    if verdict == "dup":
                        self.duplicates += 1
                        continue
                    if isinstance(verdict, Gap):
                        out.append(verdict)
                out.append(entry)
        return out

    def wake(self) -> None:
        """Any thread: end the reader's current wait (e.g. to stop it)."""
        self.redis.xadd(self.key, {"t": "", "s": "", "q": 0, "k": "wake", "p": b""})

    def forget(self, source: str, target: str) -> None:
        """The pair ended: drop its sequence state."""
        self.seqs.forget(source, target)
