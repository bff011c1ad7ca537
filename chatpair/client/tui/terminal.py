"""Terminal text helpers: display widths, wrapping and clipping by cells.

A terminal cell is not a code point: CJK ideographs and most emoji take two
cells, combining marks and zero-width joiners take none. The curses UI lays
out its message area and input line with these functions, so they must agree
with what terminals actually do for the common cases (Unicode's
East_Asian_Width property, like wcwidth(3)). No curses here: every function is
pure and tested without a terminal.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

#: Code points that never take a cell even though their category says
#: otherwise: zero width space/joiners, word joiner, BOM.
_ZERO_WIDTH = frozenset([0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF])


@lru_cache(maxsize=4096)
def char_width(ch: str) -> int:
    """Cells one code point takes: 0, 1 or 2 (controls count as 0)."""
    cp = ord(ch)
    if cp < 0x20 or 0x7F <= cp < 0xA0:
        return 0  # controls are sanitized away before display; never count them
    if cp in _ZERO_WIDTH or 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:
        return 0  # variation selectors modify the previous glyph
    cat = unicodedata.category(ch)
    if cat in ("Mn", "Me", "Cf"):
        return 0
    if 0x1160 <= cp <= 0x11FF:
        return 0  # Hangul jamo medial vowels and final consonants combine
    if unicodedata.east_asian_width(ch) in ("W", "F"):
        return 2
    return 1


def str_width(text: str) -> int:
    """Cells a string takes on one terminal line."""
    return sum(char_width(ch) for ch in text)


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
    middle of a word; a wide character is never split across two lines.
    Always returns at least one (possibly empty) piece.
    """
    width = max(width, 2)  # a wide character needs two cells
    pieces: list[str] = []
    line: list[str] = []
    used = 0
    last_space = -1  # index in ``line`` just after the last space
    for ch in text:
        w = char_width(ch)
        if used + w > width and line:
            if ch == " ":
                pieces.append("".join(line))
                line, used, last_space = [], 0, -1
                continue  # the space at a break is swallowed
            if 0 < last_space < len(line):
                rest = line[last_space:]
                pieces.append("".join(line[:last_space]).rstrip(" "))
                line, used = rest, str_width("".join(rest))
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
    """The longest prefix of ``text`` that fits in ``width`` cells."""
    used = 0
    for i, ch in enumerate(text):
        used += char_width(ch)
        if used > width:
            return text[:i]
    return text


def clip_left(text: str, width: int) -> str:
    """The longest suffix of ``text`` that fits in ``width`` cells."""
    used = 0
    for i in range(len(text) - 1, -1, -1):
        used += char_width(text[i])
        if used > width:
            return text[i + 1:]
    return text


def input_view(chars: list[str], cursor: int, width: int, offset: int) -> tuple[int, int]:
    """Horizontal scrolling of an input line.

    Given the line's characters, the cursor index, the cells available and
    the index of the first character shown last time, return the new first
    index and the cursor's column within the view. The view only moves when
    the cursor would leave it, so the text does not jump while typing.
    """
    width = max(width, 2)
    offset = min(max(offset, 0), cursor)
    # Keep one cell free after the cursor so it is visible at the end of a line.
    while str_width("".join(chars[offset:cursor])) + 1 > width and offset < cursor:
        offset += 1
    return offset, str_width("".join(chars[offset:cursor]))
