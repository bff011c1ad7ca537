"""Screen-cell widths against a table from the ``wcwidth`` package (the reference), without it.

Each case is what ``wcwidth.width()`` (0.7.0) returns; chatpair matches it
with the standard library (chatpair/client/tui/terminal.py). Clusters
(a family, a flag, a skin tone) are never cut by wrapping or clipping.
"""

from __future__ import annotations

import pytest

from chatpair.client.tui.terminal import clip, clusters, input_view, str_width, wrap

FAMILY = "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466"
#: (text, cells) as wcwidth.width() says.
TABLE = [
    ("a", 1), ("你", 2), ("😀", 2), (FAMILY, 2), ("🇺🇸", 2), ("🇺", 2), ("👍🏽", 2), ("❤️", 2), ("❤", 1),
    ("☺️", 2), ("e\u0301", 1), ("1️⃣", 2), ("🏳️‍🌈", 2), ("👩🏽‍💻", 2), ("ﾊ", 1), ("\u200d", 0), ("한", 2),
    ("\u1100\u1161", 2), ("🇺🇸🇫🇷", 4), ("a\u200db", 1), ("🧑‍🤝‍🧑", 2), ("✌🏿", 1), ("🇦🇧🇨", 4), ("#️⃣", 2),
    ("\u00ad", 1), ("\u0300", 0), ("x\ufe0f", 1), ("©️", 2), ("↔️", 2), ("🏽", 2), ("a🏽", 3), ("你🏽", 4),
    ("🇺a", 3), ("\u200e", 0), ("\u2060", 0), ("\ufeff", 0), ("\u0903", 0), ("\ud7b0", 0), ("\u1160", 0),
    ("🏴\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F", 2), ("❤︎", 1), ("😀\ufe0e", 2),
    ("\u200d😀", 0), ("😀\u200d", 2), ("a\u0301\u0301", 1), ("👨🏽‍🦰", 2), ("🇺🇸\u200d🇫🇷", 2), ("\u3099", 0),
    ("\u00a0", 1), ("\u2028", 0), ("🇦🇦🇦🇦", 4), ("hello 👨‍👩‍👧 world", 14), ("ＡＢ", 4), ("½", 1), ("…", 1),
]


@pytest.mark.parametrize(("text", "cells"), TABLE)
def test_width_matches_wcwidth(text, cells):
    assert str_width(text) == cells


def test_clusters_are_kept_whole():
    assert clusters(f"a{FAMILY}🇺🇸🇫🇷👍🏽") == ["a", FAMILY, "🇺🇸", "🇫🇷", "👍🏽"]
    assert [r.rstrip() for r in wrap(f"abc {FAMILY}{FAMILY}", 5)] == ["abc", f"{FAMILY}{FAMILY}"]
    assert wrap(f"{FAMILY}" * 3, 4) == [FAMILY * 2, FAMILY]
    assert clip(f"x{FAMILY}y", 2) == "x" and clip(f"x{FAMILY}y", 3) == f"x{FAMILY}"


def test_input_view_rescrolls_after_widening():
    chars = list("abcdefghij")
    offset, col = input_view(chars, 10, 5, 0)
    assert (offset, col) == (6, 4)
    assert input_view(chars, 10, 20, offset) == (0, 10)  # wider: everything is back in view
    assert input_view(chars, 7, 5, 6) == (6, 1)  # moving left does not make it jump
