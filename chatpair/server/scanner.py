"""The fast frame scanner: received bytes -> runs of MSG frames, control frames, an error.

This is the relay's hot path, written as a pure function (no socket, no
clock, no connection) so it is tested byte for byte in ``tests/test_scanner.py``.
:func:`scan` walks the frame headers in a buffer and groups consecutive
complete MSG frames into *runs*: a run is forwarded with one ``send`` of one
memoryview slice and checked with one UTF-8 decode, so the cost per message
is a header unpack and a few integer compares. Everything else - control
frames, and every header that is not a plain MSG - is handed on one frame
at a time, in order.

The rules are not repeated here. A header is judged by
:func:`chatpair.proto.wire.check_header` (and, with only its 4 length bytes
in, :func:`~chatpair.proto.wire.check_length`); a MSG payload by
:func:`chatpair.proto.frames.check_client_frame`. The only test written out
is the common case ``ftype == MSG and 1 < length <= max_frame``, which is
exactly the set of MSG headers ``check_header`` accepts; anything outside it
goes to ``check_header``, so the scanner and the decoder cannot disagree.

Frames of one length in a row (a bulk sender, a benchmark's flood) have one
header, repeated at a fixed stride. At the start of a run, and every 8th
message, the scanner looks at the next header and the one 8 frames on;
when both are the same, it measures the whole stretch of equal headers
with five strided slices (one per header byte, in growing windows)
instead of a Python step per frame (:func:`_equal_frames`). Only a header
that is the common case above is stretched, so the rules stay exactly the
same: ``tests/test_scanner.py`` checks the scanner against a
frame-at-a-time reference on stretches of repeated frames.

Why one UTF-8 check per run is enough: a run of MSG frames with lengths up
to 127 is ``header payload header payload ...`` where every header byte is
ASCII (``00 00 00 LL 02``, LL < 0x80). An ASCII byte can neither continue a
multi-byte character nor follow an unfinished one, so the whole run decodes
as UTF-8 exactly when every payload does. A longer frame's header may hold a
byte >= 0x80, so at such a frame the run so far and that payload are
checked on their own.
"""

from __future__ import annotations

from chatpair.proto import (
    HEADER,
    Frame,
    FrameType,
    ProtocolError,
    check_client_frame,
    check_header,
    check_length,
)

#: One item of a scan: ``(start, stop, count)`` over the buffer. ``count >= 1``:
#: a run of that many valid MSG frames in ``buf[start:stop]``; ``count == 0``:
#: one control frame in ``buf[start:stop]`` (type at ``start + 4``), its
#: header checked, its payload not yet (that is for whoever acts on it).
Item = tuple[int, int, int]

_UNPACK_HEADER = HEADER.unpack_from
_MSG = int(FrameType.MSG)
_UTF8 = "utf-8"


def scan(view: memoryview, end: int, max_frame: int) -> tuple[list[Item], int, ProtocolError | None]:
    """Walk the frames in ``view[:end]``.

    Returns ``(items, stop, error)``: the complete frames, in order, as
    :data:`Item`; where they stop (``view[stop:end]`` is the start of a frame
    not complete yet, to keep for the next read); and the first rule broken,
    if any - then the broken frame starts at ``stop`` and the items are
    everything valid before it (so good messages ahead of a bad one are
    still delivered, as a frame decoder would have delivered them).
    """
    items: list[Item] = []
    pos = run = seg = count = 0  # run: where the current run starts; seg: what its UTF-8 check has not covered
    while end - pos >= 5:
        length, ftype = _UNPACK_HEADER(view, pos)
        # The common case: a plain MSG that check_header accepts (see the module docstring).
        if ftype == _MSG and 1 < length <= max_frame:
            fend = pos + 4 + length
            if fend > end:
                break
            if length > 127:  # (a literal, not a name: this line runs once per message)
                # This header may hold a byte >= 0x80: check the run so far,
                # then this payload alone, and start a new stretch after it.
                if not _utf8_ok(view, seg, pos) or not _utf8_ok(view, pos + 5, fend):
                    return _split_bad_run(view, run, items)
                seg = fend
            elif (not count & 7 and end - pos >= 9 * (length + 4)
                  and _UNPACK_HEADER(view, fend) == _UNPACK_HEADER(view, pos + 8 * (length + 4)) == (length, ftype)):
                # At the start of a run and every 8th message, a look at the
                # next header and the one 8 frames on: when both are the same,
                # a stretch of equal frames (a bulk sender, a flood) is
                # measured at C speed.
                same = _equal_frames(view, pos, length + 4, end)
                count += same
                pos += same * (length + 4)
                continue
            count += 1
            pos = fend
            continue
        # Not a plain MSG: first the run before it, in order.
        if count:
            if seg < pos and not _utf8_ok(view, seg, pos):
                return _split_bad_run(view, run, items)
            items.append((run, pos, count))
            count = 0
        try:
            check_header(length, ftype, max_frame)
        except ProtocolError as err:
            return items, pos, err
        fend = pos + 4 + length
        if fend > end:
            break
        items.append((pos, fend, 0))
        pos = run = seg = fend
    if count:
        if seg < pos and not _utf8_ok(view, seg, pos):
            return _split_bad_run(view, run, items)
        items.append((run, pos, count))
    if end - pos == 4:
        # Only the length is in: what it alone decides is decided now, so a
        # hostile length is refused before a byte of its frame is kept.
        try:
            check_length(int.from_bytes(view[pos:end], "big"), max_frame)
        except ProtocolError as err:
            return items, pos, err
    return items, pos, None


def _equal_frames(view: memoryview, pos: int, stride: int, end: int) -> int:
    """How many complete frames from ``pos`` on have exactly the header of the one at ``pos``.

    Frames of one length sit ``stride`` bytes apart, so header byte ``j`` of
    every one of them is the strided slice ``chunk[j::stride]`` of the bytes
    they fill; the frames agree as far as all five slices start with a run
    of that byte. Five strided slices and five compares in C instead of a
    Python step per frame; only a slice that differs is walked (``lstrip``)
    to find where. The slices are taken of a copy of the window, not of the
    memoryview: CPython copies a strided memoryview a byte at a time through
    its generic buffer code, ten times slower than slicing ``bytes`` (139
    against 21 us for the headers of a 256 KiB read of 64-byte messages).
    They are taken in windows of 64, 512, 4,096, ... frames, stopping at the
    first window that is not all equal, so the work is in proportion to the
    stretch found (a client sending pairs of equal frames must not make
    every 8th message cost a pass over the whole buffer).
    """
    header = view[pos:pos + 5].tobytes()
    fit = (end - pos) // stride  # complete frames that fit
    total, window = 1, 64  # the frame at pos is one of them
    while total < fit:
        start = pos + total * stride
        want = same = min(window, fit - total)
        chunk = view[start:start + (want - 1) * stride + 5].tobytes()
        for j in range(5):
            column = chunk[j::stride]
            byte = header[j:j + 1]
            if column != byte * want:  # all equal is one compare; only a difference is walked
                same = min(same, want - len(column.lstrip(byte)))
        total += same
        if same < want:
            break
        window *= 8
    return total


def _utf8_ok(view: memoryview, start: int, end: int) -> bool:
    try:
        str(view[start:end], _UTF8)
    except UnicodeDecodeError:
        return False
    return True


def _split_bad_run(view: memoryview, start: int, items: list[Item]) -> tuple[list[Item], int, ProtocolError]:
    """A run from ``start`` failed its UTF-8 check: keep the messages before the bad one as a run.

    The bad message is found by the protocol's own check of a client MSG,
    which also words the error. One of the run's messages must fail it (see
    the module docstring), so the walk ends at that one.
    """
    pos = start
    good = 0
    while True:
        fend = pos + 4 + int.from_bytes(view[pos:pos + 4], "big")
        try:
            check_client_frame(Frame(_MSG, bytes(view[pos + 5:fend])))
        except ProtocolError as err:
            if good:
                items.append((start, pos, good))
            return items, pos, err
        good += 1
        pos = fend
