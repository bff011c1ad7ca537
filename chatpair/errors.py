"""The one error root: every failure a user should read is a ChatpairError.

Each carries a message written for a person. The CLI (and only the CLI) turns
them into a one-line message on stderr and an exit code, so nobody sees a
traceback for a refused connection, a bad name or a garbage frame.
"""

from __future__ import annotations


class ChatpairError(Exception):
    """Base class: ``str(error)`` is the message shown to the user."""

    exit_code = 1


class ConnectError(ChatpairError):
    """Could not reach a server, or what answered is not a chatpair server."""

    exit_code = 2


class RefusedError(ChatpairError):
    """The server answered with ERROR (bad name, room full, shutdown, ...)."""

    exit_code = 3

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConfigError(ChatpairError):
    """A bad option or environment value that click could not catch itself."""

    exit_code = 2
