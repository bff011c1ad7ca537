"""``chatpair client``: the curses chat screen in a terminal, pipe mode otherwise."""

from __future__ import annotations

import dataclasses
import os
import sys

from chatpair.client.config import ClientConfig
from chatpair.client.pipe import run_pipe
from chatpair.client.trust import known_servers_path


def run_client(config: ClientConfig, *, json_mode: bool = False, log_path: str | None = None,
               color: bool | None = None, reconnect: bool = True, interactive: bool | None = None) -> int:
    """Entry point for ``chatpair client``: pick the curses UI or pipe mode; returns the exit code."""
    if interactive is None:
        interactive = is_interactive()
    if config.known_servers is None:  # trust on first use: the user's known_servers file
        config = dataclasses.replace(config, known_servers=known_servers_path())
    if interactive and not json_mode:
        # Imported here: curses is loaded only when there is a screen to draw on.
        from chatpair.client.tui.app import available, run_tui

        if available():
            return run_tui(config, log_path=log_path, color=color, reconnect=reconnect)
    return run_pipe(config, json_mode=json_mode, log_path=log_path)


def is_interactive() -> bool:
    """Both ends are terminals and the terminal can do more than print lines."""
    try:
        ttys = os.isatty(sys.stdin.fileno()) and os.isatty(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return ttys and os.environ.get("TERM", "") not in ("", "dumb")
