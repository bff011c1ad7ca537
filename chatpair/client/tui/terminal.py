"""Terminal text helpers: display widths, wrapping and clipping by cells.

A terminal cell is not a code point. CJK ideographs and most emoji take two
cells, combining marks and zero-width joiners none, and several code points
may make one picture: a family (``👨‍👩‍👧``: emoji joined by ZERO WIDTH JOINER),
a flag (two regional indicators), a skin tone (emoji + modifier), ``❤️``
(a narrow symbol + VARIATION SELECTOR-16, which makes it wide). Text is
therefore cut into clusters (:func:`clusters`), never split inside one, and
each is measured as a whole (:func:`cluster_width`).

The reference for widths is the ``wcwidth`` package (``wcwidth.width``);
this module matches it with the standard library - ``unicodedata``'s East
Asian width and categories - and the VS16 table of :mod:`.emoji`, and
``tests/test_tui_widths.py`` checks a table of cases against it:

* controls, Mn/Me/Mc marks, Cf format characters (but the soft hyphen,
  which is 1), line/paragraph separators, variation selectors, Hangul
  medial and final jamo: 0, joined to the cluster before them;
* East Asian Wide or Fullwidth: 2, and so is every regional indicator; a
  pair of them (a flag) is one cluster of 2;
* a code point after ZERO WIDTH JOINER joins its cluster and adds nothing;
* an emoji skin-tone modifier after a symbol joins it and adds nothing
  (after a letter it stands alone, 2 cells);
* VS16 after a character of :data:`~.emoji.VS16_NARROW_TO_WIDE` makes it 2.

No curses here: every function is pure and tested without a terminal.
"""

from __future__ import annotations

import bisect
import unicodedata
from functools import lru_cache

from chatpair.client.tui.emoji import wide_with_vs16

ZWJ = "\u200d"
VS16 = "\ufe0f"
#: Code points that never take a cell even though their category says
#: otherwise: zero width space/joiners, word joiner, BOM.
_ZERO_WIDTH = frozenset([0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF])
_ZERO_CATEGORIES = frozenset(["Mn", "Me", "Mc", "Cf", "Zl", "Zp"])
SOFT_HYPHEN = 0x00AD


def is_regional(ch: str) -> bool:
    """A regional indicator symbol (half of a flag)."""
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def is_skin_tone(ch: str) -> bool:
    return 0x1F3FB <= ord(ch) <= 0x1F3FF


@lru_cache(maxsize=4096)
def char_width(ch: str) -> int:
    """Cells one code point takes on its own: 0, 1 or 2 (controls count as 0)."""
    cp = ord(ch)
    if cp < 0x20 or 0x7F <= cp < 0xA0:
        return 0  # controls are sanitized away before display; never count them
    if cp in _ZERO_WIDTH or 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:
        return 0  # variation selectors modify the previous glyph
    if cp == SOFT_HYPHEN:
        return 1
    if unicodedata.category(ch) in _ZERO_CATEGORIES:
        return 0
    if 0x1160 <= cp <= 0x11FF or 0xD7B0 <= cp <= 0xD7FF:
        return 0  # Hangul jamo medial vowels and final consonants combine
    if unicodedata.east_asian_width(ch) in ("W", "F") or is_regional(ch):
        return 2
    return 1


def _joins(cluster: str, ch: str) -> bool:
    """Does ``ch`` belong to the cluster before it?"""
    if cluster.endswith(ZWJ) or char_width(ch) == 0 and ord(ch) >= 0x20:
        return True
    if is_skin_tone(ch):
        return unicodedata.category(cluster[0]) == "So"
    if is_regional(ch):  # pairs: a flag is two; a third one starts the next flag
        trailing = len(cluster) - len(cluster.rstrip("".join(map(chr, range(0x1F1E6, 0x1F200)))))
        return trailing % 2 == 1
    return False


def clusters(text: str) -> list[str]:
    """``text`` cut into what a terminal draws as one picture (approximate grapheme clusters)."""
    out: list[str] = []
    for ch in text:
        if out and _joins(out[-1], ch):
            out[-1] += ch
        else:
            out.append(ch)
    return out


@lru_cache(maxsize=4096)
def cluster_width(cluster: str) -> int:
    """Cells one cluster takes: its first code point's width, 2 with VS16 after an emoji-capable one."""
    if not cluster:
        return 0
    width = char_width(cluster[0])
    if width == 1 and len(cluster) > 1 and cluster[1] == VS16 and wide_with_vs16(ord(cluster[0])):
        return 2
    return width


def str_width(text: str) -> int:
    """Cells a string takes on one terminal line."""
    if text.isascii():
        return sum(1 for ch in text if " " <= ch < "\x7f")
    return sum(cluster_width(c) for c in clusters(text))


def boundaries(chars: list[str]) -> list[int]:
    """Indexes in ``chars`` (code points) where a cluster starts, and ``len(chars)``."""
    out = [0]
    for c in clusters("".join(chars)):
        out.append(out[-1] + len(c))
    return out


def expand_tabs(text: str, tabsize: int = 4) -> str:
    """Tabs become spaces so that our width arithmetic matches the screen."""
    if "\t" not in text:
        return text
    out: list[str] = []
    col = 0
    for ch in text:
        if ch == "\t":
            pad = tabsize - col % tabsize
            out.append(" " * pad)
            col += pad
        else:
            out.append(ch)
            col += char_width(ch)
    return "".join(out)


def wrap(text: str, width: int) -> list[str]:
    """Split one line of text into pieces of at most ``width`` cells.

    Breaks at the last space that fits when there is one, otherwise in the
    middle of a word; a cluster (a wide character, a family emoji) is never
    split across two lines. Always returns at least one (possibly empty) piece.
    """
    width = max(width, 2)  # a wide character needs two cells
    pieces: list[str] = []
    line: list[str] = []
    used = 0
    last_space = -1  # index in ``line`` just after the last space
    for ch in clusters(text):
        w = cluster_width(ch)
        if used + w > width and line:
            if ch == " ":
                pieces.append("".join(line))
                line, used, last_space = [], 0, -1
                continue  # the space at a break is swallowed
            if 0 < last_space < len(line):
                rest = line[last_space:]
                pieces.append("".join(line[:last_space]).rstrip(" "))
                line, used = rest, sum(cluster_width(c) for c in rest)
            else:
                pieces.append("".join(line))
                line, used = [], 0
            last_space = -1
        line.append(ch)
        used += w
        if ch == " ":
            last_space = len(line)
    pieces.append("".join(line))
    return pieces


def clip(text: str, width: int) -> str:
    """The longest prefix of ``text`` that fits in ``width`` cells (whole clusters only)."""
    used = 0
    out: list[str] = []
    for c in clusters(text):
        used += cluster_width(c)
        if used > width:
            break
        out.append(c)
    return "".join(out)


def clip_left(text: str, width: int) -> str:
    """The longest suffix of ``text`` that fits in ``width`` cells (whole clusters only)."""
    used = 0
    out: list[str] = []
    for c in reversed(clusters(text)):
        used += cluster_width(c)
        if used > width:
            break
        out.append(c)
    return "".join(reversed(out))


def input_view(chars: list[str], cursor: int, width: int, offset: int) -> tuple[int, int]:
    """Horizontal scrolling of an input line.

    Given the line's characters, the cursor index, the cells available and
    the index of the first character shown last time, return the new first
    index and the cursor's column within the view. The view only moves when
    the cursor would leave it, so the text does not jump while typing - or
    when there is room to show more of the start (the window got wider, or
    the end of the line was deleted): the view never leaves empty space on
    the right while text is hidden on the left. Offsets fall on cluster starts.
    """
    width = max(width, 2)
    parts = clusters("".join(chars))
    starts, widths = [0], [0]  # code point index and cells where each cluster starts
    for c in parts:
        starts.append(starts[-1] + len(c))
        widths.append(widths[-1] + cluster_width(c))
    at = bisect.bisect_right(starts, cursor) - 1  # the cluster the cursor is on
    first = min(bisect.bisect_right(starts, max(offset, 0)) - 1, at)
    # Keep one cell free after the cursor so it is visible at the end of a line.
    while widths[at] - widths[first] + 1 > width and first < at:
        first += 1
    # Room to spare on the right: bring back what is hidden on the left.
    while first > 0 and widths[-1] - widths[first - 1] + 1 <= width:
        first -= 1
    return starts[first], widths[at] - widths[first]
