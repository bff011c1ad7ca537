"""The bench's MSG payloads: numbered, timestamped, and built a batch at a time.

Every MSG payload is ASCII (valid UTF-8)::

    SSSSSSSSSS:TTTTTTTTTTTTTTTTTTT:abcdef...   (seq 10 digits, send time 19 digits)

``seq`` counts the sender's messages from 0; ``T`` is ``time.monotonic_ns()``
(CLOCK_MONOTONIC is system-wide, so a latency measured across processes is
valid). Senders work in *batches* of :data:`BATCH` messages whose seqs are
``b*BATCH .. b*BATCH+BATCH-1``: the whole batch is made with a handful of
C-level bulk operations (:class:`MessageFactory`), so a batch of a thousand
frames costs a few microseconds. All messages of a batch carry the time the
batch was made - each message still has its own seq and its own send time
field.

The check is the same construction: a receiver builds the frames it expects
and compares bytes (see :meth:`chatpair.bench.load_traffic.LoadTraffic.process`).
"""

from __future__ import annotations

from chatpair.proto import HEADER, FrameType

#: Messages per sender batch. A power of ten, so seq = batch * BATCH + index
#: is the decimal batch number followed by a fixed 3-digit index.
BATCH = 1000
SEQ_DIGITS = 10
TS_DIGITS = 19
#: ``SSSSSSSSSS:TTTTTTTTTTTTTTTTTTT:`` - the smallest valid bench message.
MIN_SIZE = SEQ_DIGITS + 1 + TS_DIGITS + 1
#: Offsets inside a frame (5-byte header first).
SEQ_AT = HEADER.size
TS_AT = SEQ_AT + SEQ_DIGITS + 1
TS_END = TS_AT + TS_DIGITS


class MessageFactory:
    """Builds bench MSG frames of one size (see the module docstring).

    A batch is one 69-byte (for size 64) *unit* repeated - header, batch
    number, a ``000`` index, send time, padding - with the three index digit
    columns then written by strided slice assignment from precomputed
    columns. That is three C loops and one memcpy-doubling per batch, about
    6 ns per message, where ``bytes.replace`` over a template took 160.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.frame = size + HEADER.size
        self.header = HEADER.pack(size + 1, int(FrameType.MSG))
        pad_len = size - MIN_SIZE
        alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789"
        self.pad = (alphabet * (pad_len // len(alphabet) + 1))[:pad_len]
        digits = [b"%03d" % i for i in range(BATCH)]
        #: Column j holds digit j of the index of every message of a batch.
        self.columns = [bytes(d[j] for d in digits) for j in range(3)]
        self._fmt = b"%07d%03d:%019d:"
        #: One whole frame as a single %-template (a '%' in the header or the
        #: padding is escaped), so a lone message costs one formatting call.
        self._one = self.header.replace(b"%", b"%%") + self._fmt + self.pad.replace(b"%", b"%%")

    def build(self, seq: int, count: int, ts: int) -> bytearray | bytes:
        """Frames ``seq .. seq+count-1`` (within one batch), all stamped ``ts``."""
        batch, first = divmod(seq, BATCH)
        if count == 1:
            return self._one % (batch, first, ts)
        assert first + count <= BATCH
        out = bytearray(self.header + self._fmt % (batch, 0, ts) + self.pad) * count
        f, end, last = self.frame, count * self.frame, first + count
        at = SEQ_AT + SEQ_DIGITS - 3
        for j, column in enumerate(self.columns):
            out[at + j:end:f] = column[first:last]
        return out
