"""Section 5 of the protocol: what may reach a terminal.

A partner's text (and name) is untrusted: control characters other than tab
and newline, and the bidirectional controls, become visible text before
anything is printed, so nobody can move a cursor, set a title, plant an
OSC 8 link or reorder text in someone else's terminal.
"""

from __future__ import annotations

from typing import Final

_BIDI_CONTROLS: Final = frozenset(
    [0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0x200E, 0x200F, 0x061C]
)
#: Line and paragraph separators would break a terminal line as well.
_LINE_BREAKERS: Final = frozenset([0x2028, 0x2029])


def _visible(cp: int) -> str:
    if cp < 0x20:
        return "^" + chr(cp + 0x40)  # caret notation: ESC -> ^[, BEL -> ^G
    if cp == 0x7F:
        return "^?"
    if cp < 0xA0:
        return f"\\x{cp:02x}"  # C1 controls, e.g. CSI 0x9b -> \x9b
    return f"<U+{cp:04X}>"


def _build_sanitize_table() -> dict[int, str]:
    table = {cp: _visible(cp) for cp in range(0x20) if cp not in (0x09, 0x0A)}
    table.update({cp: _visible(cp) for cp in range(0x7F, 0xA0)})
    table.update({cp: _visible(cp) for cp in _BIDI_CONTROLS | _LINE_BREAKERS})
    # Lone surrogates cannot be written as UTF-8 at all (a JSON escape such as
    # "\\ud800" in a hostile server's frame makes one): a log file or curses
    # would raise on them, so they are made visible like the controls.
    table.update({cp: _visible(cp) for cp in range(0xD800, 0xE000)})
    return table


_SANITIZE_TABLE: Final = _build_sanitize_table()


def sanitize(text: str, keep_newlines: bool = True) -> str:
    """Make untrusted text safe for a terminal (docs/protocol.md, section 5).

    Every C0/C1 control but tab and newline, DEL, and the bidirectional
    controls become visible text (``^[``, ``\\x9b``, ``<U+202E>``), so nobody
    can move a cursor, set a title, plant an OSC 8 link or reorder text.
    """
    out = text.translate(_SANITIZE_TABLE)
    if not keep_newlines:
        out = out.replace("\n", "^J")
    return out


def sanitize_name(name: str) -> str:
    """Names are validated by the server, but a client must not trust that."""
    return sanitize(name, keep_newlines=False).replace("\t", "^I")
