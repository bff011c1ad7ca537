"""An inbox entry: its fields as Redis holds them, and the MSG frames a ``msg`` entry carries.

The fields of every entry of a node's inbox stream (:mod:`chatpair.cluster.inbox`
says how they are written, read and acknowledged): ``t`` (target cid), ``s``
(source cid), ``q`` (sequence number, decimal; ``0`` for control entries),
``k`` (kind), ``p`` (payload bytes), for messages ``n`` (how many) and for
acks ``l`` (lost ranges, ``first-last,...``); and :class:`SeqCheck`, the
receiver's check of a pair's numbers. Pure: no Redis, no sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatpair.proto import FrameType, encode_frame


def frame_msgs(payloads: list[bytes]) -> bytes:
    """MSG payloads as MSG frames, the way a ``msg`` entry carries them."""
    return b"".join(encode_frame(FrameType.MSG, p) for p in payloads)


def split_frames(frames: bytes) -> list[bytes]:
    """The payloads of the MSG frames in ``frames`` (a ``msg`` entry's ``p``)."""
    out, pos, end = [], 0, len(frames)
    while pos < end:
        stop = pos + 4 + int.from_bytes(frames[pos:pos + 4], "big")
        out.append(frames[pos + 5:stop])
        pos = stop
    return out


def skip_frames(frames: bytes, skip: int) -> bytes:
    """``frames`` without its first ``skip`` frames."""
    pos = 0
    for _ in range(skip):
        pos += 4 + int.from_bytes(frames[pos:pos + 4], "big")
    return frames[pos:]


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
    count: int = 1  # msg: how many messages (``seq`` .. ``seq + count - 1``, frames in ``payload``)

    def payloads(self) -> list[bytes]:
        """A ``msg`` entry's messages, one payload each."""
        return split_frames(self.payload)


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages ``first``..``last`` from ``source`` to ``target`` never arrived (trimmed or lost)."""

    source: str
    target: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Acked:
    """What an ack settled for the pair ``source`` -> ``target`` (``source`` is ours): how many of each."""

    source: str
    target: str
    delivered: int
    undelivered: int


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
                 _ranges(fields.get(b"l")), int(fields.get(b"n", b"1")))


class SeqCheck:
    """Per-pair sequence numbers on the receiving side: ``ok``, ``dup``, a :class:`Gap`, or how
    many of a batch were seen before (an int). Pure."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, str], int] = {}

    def check(self, source: str, target: str, seq: int, count: int = 1) -> str | Gap | int:
        """Messages ``seq`` .. ``seq + count - 1`` arrived: ``ok``, ``dup`` (all seen), a
        :class:`Gap` before them, or the number of leading ones seen before (drop those)."""
        expected = self._next.get((source, target), 1)
        last = seq + count - 1
        if last < expected:
            return "dup"
        self._next[(source, target)] = last + 1
        if seq > expected:
            return Gap(source, target, expected, seq - 1)
        if seq < expected:
            return expected - seq
        return "ok"

    def forget(self, source: str, target: str) -> None:
        self._next.pop((source, target), None)
