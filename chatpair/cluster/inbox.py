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
(payload bytes), messages also ``n`` (how many) and acks ``l`` (lost
ranges, ``first-last,...``). Kinds: ``msg`` (``n`` messages numbered ``q``,
``q + 1``, ...; ``p`` is them as MSG frames, exactly as the wire carries
them, so a frame-mode receiver writes ``p`` to its client as it is),
``paired`` (``p``: the new partner's name; written by the lobby's JOIN),
``peer_left`` (``p``: the reason; written by UNPAIR and the purge of a dead
node), ``notice`` (``p``: ``peer_away`` or ``peer_back``, for a resumable
partner's drop and return), ``lost`` (``p``: how many of the target's
messages an away partner never acknowledged before its session ended), ``ack`` and ``wake``;
and for a session resumed on another node (``chatpair.server.cluster_sessions``):
``handover`` (to the holding node: ``p`` = the token and the count),
``refused`` / ``adopt`` (its answer: ``p`` = the session's state), ``freeze``
/ ``frozen`` / ``thaw`` (the partner's node stops sending, says so, goes on), ``moved``
(``p``: the partner's new cid).

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

Writes are batched twice: the messages one direction of a pair sends
between two flushes go into one entry (up to :data:`MAX_ENTRY_BYTES`), and
:meth:`Outbox.flush` sends every entry queued in one MULTI/EXEC (Redis
answers a blocked XREAD after *each* command: a message and the ack behind
it would take the receiver two XREADs). The reader trims what it has read
(``XTRIM MINID``), so a stream holds little more than what is in flight.
No socket of chatpair's here; :class:`Outbox` is for one thread,
:class:`Inbox` for one reader thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from chatpair.cluster.entries import (
    Acked,
    Entry,
    Gap,
    SeqCheck,
    decode_entry,
    frame_msgs,
    skip_frames,
)
from chatpair.cluster.names import Keys, node_of
from chatpair.cluster.redisconn import describe, not_now
from chatpair.cluster.resp import bulk, pack, pack_head

log = logging.getLogger("chatpair")

DEFAULT_WINDOW = 1024
DEFAULT_MAXLEN = 100_000
CONTROL_KINDS = frozenset({"paired", "peer_left", "wake", "notice", "lost",
                           "handover", "refused", "adopt", "moved", "freeze", "frozen", "thaw"})
#: Messages of one direction of a pair go into one entry up to this many bytes.
MAX_ENTRY_BYTES = 256 * 1024
#: An entry's field names as RESP (they are the same in every entry).
_FIELD_NAMES = {name: bulk(name) for name in ("t", "s", "q", "k", "p", "n", "l")}
#: What a batch of several entries goes between (:meth:`Outbox.packed`).
_MULTI, _EXEC = pack("MULTI"), pack("EXEC")
#: Seconds between two trims of what the reader has read.
TRIM_INTERVAL = 0.5


class _Direction:
    """One direction of a pair, sending side: the next number, and the ranges not yet acknowledged."""

    __slots__ = ("in_flight", "next_seq", "unacked")

    def __init__(self) -> None:
        self.next_seq = 1
        self.unacked: deque[list[int]] = deque()  # [first, last], oldest first
        self.in_flight = 0

    def add(self, first: int, count: int) -> None:
        unacked = self.unacked
        if unacked and unacked[-1][1] == first - 1:
            unacked[-1][1] += count
        else:
            unacked.append([first, first + count - 1])
        self.in_flight += count

    def settle(self, upto: int, lost: tuple[tuple[int, int], ...]) -> tuple[int, int]:
        """Numbers up to ``upto`` are settled: (delivered, undelivered) counts."""
        delivered = undelivered = 0
        unacked = self.unacked
        while unacked and unacked[0][0] <= upto:
            first, last = unacked[0]
            end = min(last, upto)
            n = end - first + 1
            gone = sum(max(0, min(end, b) - max(first, a) + 1) for a, b in lost) if lost else 0
            undelivered += gone
            delivered += n - gone
            if end == last:
                unacked.popleft()
            else:
                unacked[0][0] = end + 1
        self.in_flight -= delivered + undelivered
        return delivered, undelivered

    def seqs(self) -> tuple[int, ...]:
        return tuple(seq for first, last in self.unacked for seq in range(first, last + 1))


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
        self._open: dict[tuple[str, str], list[Any]] = {}  # entries still growing: [fields, frames, size]
        self._acks: dict[tuple[str, str], tuple[int, list[tuple[int, int]]]] = {}
        self._xadd_heads: dict[tuple[str, int], bytes] = {}
        #: the I/O thread waits to take the next batch (a relay's lane leaves it to it)
        self.io_waiting = False
        #: the batch taken and not yet landed (:meth:`take`); several threads: under the node's lock
        self.in_transit: list[tuple[str, dict[str, Any]]] | None = None

    # -- sending -------------------------------------------------------------------------

    def can_send(self, source: str, target: str) -> bool:
        """False while ``window`` messages source -> target are unacknowledged: read the sender later."""
        return self.in_flight(source, target) < self.window

    def in_flight(self, source: str, target: str) -> int:
        d = self._out.get((source, target))
        return d.in_flight if d else 0

    def send(self, source: str, target: str, payload: bytes) -> int:
        """Queue one MSG payload for ``target`` (on another node); returns its sequence number."""
        return self.send_frames(source, target, frame_msgs([payload]), 1)

    def send_frames(self, source: str, target: str, frames: bytes, count: int) -> int:
        """Queue ``count`` messages, as MSG frames, for ``target``; returns the first one's number.

        They join the entry this direction already has queued since the last
        flush while it is under :data:`MAX_ENTRY_BYTES`.
        """
        key = (source, target)
        d = self._out.get(key)
        if d is None:
            d = self._out[key] = _Direction()
        seq = d.next_seq
        d.next_seq += count
        d.add(seq, count)
        growing = self._open.get(key)
        if growing is not None and growing[2] + len(frames) <= MAX_ENTRY_BYTES:
            fields, parts, _ = growing
            fields["n"] += count
            growing[2] += len(frames)
            parts.append(frames)
            return seq
        fields = {"t": target, "s": source, "q": seq, "k": "msg", "n": count}
        parts = [frames]
        self._open[key] = [fields, parts, len(frames)]  # the entry, its frames, their size
        self._queued.append((self.keys.inbox(node_of(target)), fields))
        fields["p"] = parts  # joined at flush
        return seq

    def control(self, target: str, source: str, kind: str, payload: bytes = b"") -> None:
        """Queue a control entry (not numbered, not acknowledged) for ``target``'s node."""
        if kind not in CONTROL_KINDS:
            raise ValueError(f"unknown control kind {kind!r}")
        self._open.pop((source, target), None)  # what source sends next goes after it, not into an earlier entry
        self._queued.append((self.keys.inbox(node_of(target)),
                             {"t": target, "s": source, "q": 0, "k": kind, "p": payload}))

    def ack(self, source: str, target: str, seq: int, lost: tuple[int, int] | None = None) -> None:
        """We wrote message ``seq`` from ``source`` (remote) to our client ``target``; ``lost``: a gap."""
        upto, gaps = self._acks.get((source, target), (0, []))
        if lost is not None:
            gaps.append(lost)
        self._acks[(source, target)] = (max(upto, seq), gaps)

    def queued(self) -> int:
        """Entries queued (messages and controls), acks not counted."""
        return len(self._queued)

    def pending(self) -> int:
        """Entries queued and not yet flushed (messages, controls and acks)."""
        return len(self._queued) + len(self._acks)

    def flush(self) -> int:
        """Write everything queued at once; the number of entries written. On a Redis error it all
        stays queued (the error propagates): the next flush retries; the receiver drops repeats."""
        return self.flush_shared(threading.Condition(), 0.0)

    def flush_shared(self, lock: Any, patience: float) -> int:
        """:meth:`flush` for an outbox a relay's lane writes too (``lock``: the condition every
        thread holds to touch it); the number of entries written.

        Waits for the lane's batch in transit (it answers within ``patience`` or
        gives it back; past that it is taken back and written again here: the
        receiver drops what it sees twice), the lane taking no new one meanwhile
        (under steady traffic it would always be first); then writes without the
        lock, so relays keep queueing. Redis errors propagate, the batch queued again.
        """
        with lock:
            deadline = time.monotonic() + patience
            self.io_waiting = True  # the lane takes no new batch meanwhile: this thread takes the next
            try:
                while self.in_transit is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.untake(self.in_transit)
                        break
                    lock.wait(left)
                batch = self.take()
            finally:
                self.io_waiting = False
        if not batch:
            return 0
        try:
            self.write(batch)
        except BaseException:
            with lock:
                self.untake(batch)
                lock.notify_all()
            raise
        with lock:
            self.landed(batch)
            lock.notify_all()
        return len(batch)

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        """Everything queued, as one batch to write; *in transit* until :meth:`landed` or :meth:`untake`.

        One batch at a time (check :attr:`in_transit` first): batches land in
        the order they were taken, so a direction's numbers reach its stream
        in order whoever writes them (the I/O thread, or a relay's lane).
        """
        if self.in_transit is not None:
            raise RuntimeError("a batch is in transit already")
        self._open.clear()  # from here on (even if this batch fails) these entries no longer grow
        batch = []
        for key, fields in self._queued:
            if isinstance(fields["p"], list):  # a msg entry's frames, joined once (it grows no more)
                fields["p"] = b"".join(fields["p"])
            batch.append((key, fields))
        for (source, target), (upto, gaps) in self._acks.items():
            fields: dict[str, Any] = {"t": source, "s": target, "q": upto, "k": "ack", "p": b""}
            if gaps:
                fields["l"] = ",".join(f"{a}-{b}" for a, b in gaps)
            batch.append((self.keys.inbox(node_of(source)), fields))
        self._queued.clear()
        self._acks.clear()
        if batch:
            self.in_transit = batch
        return batch

    def landed(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """``batch`` (taken) is in Redis."""
        if self.in_transit is batch:
            self.in_transit = None

    def untake(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """``batch`` (taken) failed: back to the front of the queue, for the next take.

        (Written again, what Redis had of it arrives twice: the receiver drops
        messages seen before; acks are idempotent.)
        """
        if self.in_transit is batch:
            self.in_transit = None
            self._queued[:0] = batch

    def write(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """A taken batch, in one round trip (blocking; redis-py errors propagate)."""
        pipe = self.redis.pipeline(transaction=len(batch) > 1)  # as packed(): one XREAD sees all of it
        for key, fields in batch:
            pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)
        not_now = note_refused(pipe.execute(raise_on_error=False))
        if not_now is not None:
            raise not_now  # an outage: waited out, then the batch again (the receiver drops repeats)

    def packed(self, batch: list[tuple[str, dict[str, Any]]]) -> tuple[bytes, int]:
        """A taken batch as RESP XADD commands for a connection of the caller's own (a lane), and
        how many replies they get: several go in one MULTI/EXEC (module docstring), answered with
        MULTI's OK, a QUEUED per XADD and EXEC's list of the entries' ids."""
        heads = self._xadd_heads
        out = []
        for key, fields in batch:
            head = heads.get((key, len(fields)))
            if head is None:  # "XADD key MAXLEN ~ N *": the same for every entry of a kind to a node
                head = heads[(key, len(fields))] = pack_head(6 + 2 * len(fields), "XADD", key, "MAXLEN", "~",
                                                             self.maxlen, "*")
            out.append(head)
            for name, value in fields.items():
                out += (_FIELD_NAMES[name], bulk(value))
        if len(batch) == 1:
            return b"".join(out), 1
        return b"".join((_MULTI, *out, _EXEC)), len(batch) + 2

    # -- settling ------------------------------------------------------------------------

    def on_ack(self, entry: Entry) -> Acked:
        """An ``ack`` entry from our inbox: which of our messages were written, which lost."""
        source, target = entry.target, entry.source
        d = self._out.get((source, target))
        if d is None:
            return Acked(source, target, 0, 0)
        delivered, undelivered = d.settle(entry.seq, entry.lost)
        return Acked(source, target, delivered, undelivered)

    def drop_pair(self, source: str, target: str) -> tuple[int, ...]:
        """The pair ended: forget it; the numbers never acknowledged (NOTICE undelivered each)."""
        d = self._out.pop((source, target), None)
        self._open.pop((source, target), None)
        return d.seqs() if d else ()

    def forfeit(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """Redis lost its data: every message written but not acknowledged may be gone with it.

        Returns them per direction (NOTICE undelivered each) and stops waiting
        for their acks; messages still queued here (or in transit) are kept
        (they go out with the next flush), and numbering goes on where it was.
        """
        queued: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for _, f in (self.in_transit or []) + self._queued:  # a batch on its way lands in the new Redis
            if f["k"] == "msg":
                queued.setdefault((f["s"], f["t"]), []).append((f["q"], f["q"] + f["n"] - 1))
        out = []
        for (source, target), d in self._out.items():
            keep = queued.get((source, target), [])
            gone = tuple(seq for seq in d.seqs() if not any(a <= seq <= b for a, b in keep))
            d.unacked = deque([a, b] for a, b in keep)
            d.in_flight = sum(b - a + 1 for a, b in keep)
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


def note_refused(replies: list[Any]) -> Exception | None:
    """Log the entries of a written batch Redis refused for good (a key that is not a stream: the
    same answer on a retry), which become a gap acked as lost: NOTICE ``undelivered``. A refusal
    that says "not now" (OOM, ...) is returned instead, for the caller to write the batch again."""
    errors = [reply for reply in replies if isinstance(reply, Exception)]
    for error in errors:
        if not_now(error):
            return error
    if errors:
        log.warning("cluster: Redis refused %d of %d stream entries (%s); their messages are not delivered",
                    len(errors), len(replies), describe(errors[0]))
    return None


class Inbox:
    """This node's receiving side: XREAD BLOCK on its own stream, in order, without duplicates."""

    def __init__(self, client: Any, keys: Keys, node: str, *, count: int = 100) -> None:
        self.redis = client
        self.key = keys.inbox(node)
        self.count = count
        self.last_id = b"0-0"
        self.seqs = SeqCheck()
        self.duplicates = 0  # messages dropped as seen before
        self._trimmed_at = 0.0
        self.trim_owed = False  # entries were read since the last trim

    def read(self, block_ms: int | None = None) -> list[Entry | Gap]:
        """What arrived since the last read (waiting up to ``block_ms`` for something).

        Messages come checked: a duplicate is dropped (and counted), a gap is
        reported as a :class:`Gap` just before the message that revealed it.
        ``wake`` entries (:meth:`wake`) only end the wait.
        """
        if block_ms is not None and block_ms <= 0:
            raise ValueError("block_ms must be positive (0 would mean forever)")
        if self.trim_owed and self.trim_due():
            # Before the read, not after it: a trim that fails then loses nothing read.
            self.trim()
        reply = self.redis.xread({self.key: self.last_id}, count=self.count, block=block_ms)
        return self.accept(reply)

    def accept(self, reply: Any) -> list[Entry | Gap]:
        """An XREAD reply (redis-py's, or RESP as it came: fields as a flat list) as checked items."""
        out: list[Entry | Gap] = []
        for _, items in reply or ():
            for entry_id, fields in items:
                self.last_id = entry_id
                if isinstance(fields, list):  # straight off the wire (chatpair.cluster.lane)
                    fields = dict(zip(fields[::2], fields[1::2]))
                try:
                    entry = decode_entry(entry_id, fields)
                except (ValueError, TypeError) as error:  # not written by this version of chatpair
                    log.warning("cluster: inbox entry %s skipped: %s", entry_id.decode(errors="replace"), error)
                    continue
                if entry.kind == "wake":
                    continue
                if entry.kind == "msg":
                    verdict = self.seqs.check(entry.source, entry.target, entry.seq, entry.count)
                    if verdict == "dup":
                        self.duplicates += entry.count
                        continue
                    if isinstance(verdict, Gap):
                        out.append(verdict)
                    elif isinstance(verdict, int):  # a retried batch that grew: its head was seen
                        self.duplicates += verdict
                        entry = Entry(entry.id, entry.target, entry.source, entry.seq + verdict, "msg",
                                      skip_frames(entry.payload, verdict), (), entry.count - verdict)
                out.append(entry)
        if out:
            self.trim_owed = True
        return out

    def trim_due(self) -> bool:
        """Time to drop what has been read (at most every :data:`TRIM_INTERVAL`)?"""
        return time.monotonic() - self._trimmed_at >= TRIM_INTERVAL

    def xread_args(self, block_ms: int) -> tuple[Any, ...]:
        """The XREAD command :meth:`read` sends, for a caller with a connection of its own."""
        return ("XREAD", "COUNT", self.count, "BLOCK", block_ms, "STREAMS", self.key, self.last_id)

    def xtrim_args(self) -> tuple[Any, ...]:
        """The XTRIM command :meth:`trim` sends; counts as a trim from now."""
        self._trimmed_at = time.monotonic()
        self.trim_owed = False
        return ("XTRIM", self.key, "MINID", "~", self.last_id)

    def trim(self) -> None:
        """Drop what has been read from the stream (nobody reads an entry twice)."""
        self.redis.execute_command(*self.xtrim_args())

    def wake(self) -> None:
        """Any thread: end the reader's current wait (e.g. to stop it)."""
        self.redis.xadd(self.key, {"t": "", "s": "", "q": 0, "k": "wake", "p": b""})

    def forget(self, source: str, target: str) -> None:
        """The pair ended: drop its sequence state."""
        self.seqs.forget(source, target)
