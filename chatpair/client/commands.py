"""What a line typed into the client means: a message, or one of its commands.

The parsing rules (``//x`` sends ``/x``, an unknown ``/word`` is not sent)
are the protocol's line-mode rules (:func:`chatpair.proto.parse_client_line`);
the client knows one command more than a netcat user: ``/ping``.
"""

from __future__ import annotations

from typing import Final

from chatpair.proto import LineCommand, LineKind, parse_client_line

#: The commands of ``chatpair client``.
COMMANDS: Final = frozenset({LineKind.NEXT, LineKind.QUIT, LineKind.HELP, LineKind.PING})

HELP_TEXT: Final = (
    "commands: /next (leave your partner, find a new one), /quit (leave), "
    "/ping (round-trip time), /help (this text); start a message with // to send a leading /"
)


def parse_input(line: str) -> LineCommand:
    """``/next`` etc. are commands, ``//x`` sends ``/x``, anything else is a message."""
    return parse_client_line(line, COMMANDS)
