"""Resuming after a dropped connection (PROTOCOL.md section 6), sans-IO.

In a resumable session each side counts the MSG frames it has *received*
from the other since the session began, acknowledges them with ACK, and
keeps every MSG it has *sent* until the other side's ACK covers it, so that
after a RESUME it can send exactly what the other side is missing: nothing
lost, nothing twice, in order. Both the server and the client use the same
three pieces, which know nothing of sockets or clocks (``now`` is passed in):

* :class:`Outbox`   - the sender's MSG frames not yet acknowledged;
* :class:`AckClock` - the receiver's count and when its next ACK is due;
* the frame payloads: :func:`encode_ack` / :func:`parse_ack`,
  :func:`encode_resume` / :func:`parse_resume`, :func:`encode_resumed`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from chatpair.proto.frames import Frame, decode_json, encode_json_frame
from chatpair.proto.handshake import first_frame_json
from chatpair.proto.wire import (
    HEADER,
    PROTOCOL_VERSION,
    ErrorCode,
    FrameType,
    ProtocolError,
)

#: A receiver acknowledges no later than this many MSG frames after its last ACK...
ACK_EVERY: Final = 64
#: ...and no later than this many seconds after an unacknowledged MSG arrived.
ACK_WITHIN: Final = 1.0
#: Tokens are opaque to clients; the spec allows at most 64 characters.
MAX_TOKEN: Final = 64


def _count(value: object, what: str, code: ErrorCode) -> int:
    if type(value) is not int or value < 0:  # bool is an int subclass: refuse it too
        raise ProtocolError(code, f"{what} must carry a count: a whole number from 0")
    return value


# --------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------


def encode_ack(received: int) -> bytes:
    return encode_json_frame(FrameType.ACK, {"received": received})


def parse_ack(frame: Frame) -> int:
    """The count of an ACK (``bad_frame`` if it is not one)."""
    return _count(decode_json(frame.payload).get("received"), "ACK", ErrorCode.BAD_FRAME)


@dataclass(frozen=True, slots=True)
class Resume:
    """A client's RESUME: its session token and how many MSG frames it received."""

    session: str
    received: int


def encode_resume(session: str, received: int) -> bytes:
    return encode_json_frame(FrameType.RESUME, {"version": PROTOCOL_VERSION, "session": session,
                                                "received": received})


def parse_resume(frame: Frame) -> Resume:
    """Validate a RESUME first frame (``bad_hello`` / ``unsupported_version`` if broken)."""
    obj = first_frame_json(frame, "RESUME")
    session = obj.get("session")
    if not isinstance(session, str) or not 1 <= len(session) <= MAX_TOKEN:
        raise ProtocolError(ErrorCode.BAD_HELLO, "RESUME needs the session token WELCOME gave")
    return Resume(session, _count(obj.get("received"), "RESUME", ErrorCode.BAD_HELLO))


def encode_resumed(received: int, peer: str | None, room: str | None) -> bytes:
    return encode_json_frame(FrameType.RESUMED, {"received": received, "peer": peer, "room": room})


# --------------------------------------------------------------------------
# The sender's side
# --------------------------------------------------------------------------


def check_ack(received: int, acked: int, sent: int) -> None:
    """An ACK's count must not go back (below ``acked``) nor beyond the MSGs ``sent``: else ``bad_frame``."""
    if received < acked:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"ACK of {received} after an ACK of {acked}: counts never go back")
    if received > sent:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"ACK of {received} messages, but only {sent} were sent")


def check_resume_count(received: int, acked: int, sent: int) -> None:
    """A RESUME's count, by the same rule: else ``bad_hello`` (and the session is left as it was)."""
    if received > sent:
        raise ProtocolError(ErrorCode.BAD_HELLO,
                            f"RESUME says {received} messages were received, but only {sent} were sent")
    if received < acked:
        raise ProtocolError(ErrorCode.BAD_HELLO,
                            f"RESUME says {received} messages were received after an ACK of {acked}")



class Outbox:
    """Every MSG frame sent in this session that the other side has not acknowledged.

    Frames are kept as *runs* - bytes holding whole frames, with their count -
    so a relay that forwards 300 frames with one send stores them with one
    append. An ACK that ends inside a run cuts it at a frame boundary.
    """

    __slots__ = ("_runs", "acked", "nbytes", "sent")

    def __init__(self) -> None:
        self.sent = 0  # MSG frames sent since the session began
        self.acked = 0  # ...of which the other side has acknowledged this many
        self.nbytes = 0  # bytes held (this is what flow control counts)
        self._runs: deque[tuple[bytes, int]] = deque()

    @property
    def unacked(self) -> int:
        return self.sent - self.acked

    def record(self, frames: bytes, count: int) -> None:
        """``count`` whole MSG frames in ``frames`` were sent (or queued to be)."""
        if count:
            self._runs.append((frames, count))
            self.sent += count
            self.nbytes += len(frames)

    def acknowledge(self, received: int) -> None:
        """An ACK: forget what it covers. ``bad_frame`` if it goes back or beyond what was sent."""
        check_ack(received, self.acked, self.sent)
        self._drop(received - self.acked)

    def since(self, received: int) -> list[bytes]:
        """What to send again after a RESUME that says ``received``: every frame past it, in order.

        Also forgets what the count acknowledges. ``bad_hello`` if the count
        is beyond what was sent, or below an earlier ACK (counts never go
        back; those frames are gone): the session is left as it was.
        """
        check_resume_count(received, self.acked, self.sent)
        self._drop(received - self.acked)
        return [frames for frames, _ in self._runs]

    def _drop(self, n: int) -> None:
        runs = self._runs
        while n:
            frames, count = runs[0]
            if count <= n:
                runs.popleft()
                self.nbytes -= len(frames)
                self.acked += count
                n -= count
                continue
            cut = frame_offset(frames, n)
            runs[0] = (frames[cut:], count - n)
            self.nbytes -= cut
            self.acked += n
            n = 0


def frame_offset(frames: bytes, n: int) -> int:
    """Byte offset just past the first ``n`` frames of ``frames``."""
    pos = 0
    unpack = HEADER.unpack_from
    for _ in range(n):
        length, _type = unpack(frames, pos)
        pos += 4 + length
    return pos


# --------------------------------------------------------------------------
# The receiver's side
# --------------------------------------------------------------------------


class AckClock:
    """The receiver's count of MSG frames and when the next ACK is due.

    Call :meth:`received_msgs` for what was read, then :meth:`ack_due` after a
    batch of reads (one ACK may cover 300 frames read at once); when it says
    so, send :meth:`take_ack`'s count. :meth:`deadline` is when to look again
    if no more frames come. ``delay`` may be shorter than the spec's
    :data:`ACK_WITHIN` to leave room for a loop's timer resolution.
    """

    __slots__ = ("_first_unacked_at", "acked", "delay", "received")

    def __init__(self, delay: float = ACK_WITHIN) -> None:
        self.received = 0
        self.acked = 0
        self.delay = delay
        self._first_unacked_at: float | None = None

    def received_msgs(self, count: int, now: float) -> None:
        if count:
            self.received += count
            if self._first_unacked_at is None:
                self._first_unacked_at = now

    def ack_due(self, now: float) -> bool:
        if self.received - self.acked >= ACK_EVERY:
            return True
        first = self._first_unacked_at
        return first is not None and now - first >= self.delay

    def deadline(self) -> float | None:
        """When an ACK falls due if nothing else arrives (None: nothing to acknowledge)."""
        first = self._first_unacked_at
        return None if first is None else first + self.delay

    def restore(self, received: int, acked: int, now: float) -> None:
        """Carry the counts over from another process; an ACK still owed falls due a delay from ``now``."""
        self.received, self.acked = received, acked
        self._first_unacked_at = now if received > acked else None

    def take_ack(self) -> int:
        """The count to put in the ACK being sent now."""
        self.acked = self.received
        self._first_unacked_at = None
        return self.received
