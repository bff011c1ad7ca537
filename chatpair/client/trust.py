"""Trust on first use, like ssh: the ``known_servers`` file and the question asked once.

A TLS server whose certificate no CA vouches for (a self-signed one, the
usual case for a chatpair server) is trusted the way ssh trusts a host key:

* the first time, in a terminal, the client shows the certificate's SHA-256
  fingerprint and asks once (y/N, one key: ``y`` is yes, any other no; Ctrl-C
  ends the run, exit 130); yes is remembered in ``known_servers``;
* afterwards that ``host:port`` is trusted when it shows the same
  certificate, and refused loudly when it shows another one (both
  fingerprints, and the line of the file to remove if the change is expected);
* pipe mode never asks: an unknown server is one line saying how to trust it.

``--fingerprint`` pins explicitly and ``--cafile`` verifies against given
CAs; neither reads nor writes the file. :mod:`.transport` decides when the
file is consulted; this module only reads, writes and asks.

The file: ``$XDG_CONFIG_HOME/chatpair/known_servers`` (default
``~/.config/chatpair/known_servers``), one ``host:port SHA256:<hex>`` a
line; ``#`` comments and blank lines are ignored, and so are lines that do
not parse (they are never rewritten: the file is only appended to).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from chatpair.client.config import format_fingerprint, parse_fingerprint
from chatpair.errors import ChatpairError, ConfigError
from chatpair.netutil import format_hostport

FILE_NAME = "known_servers"

#: ``ask(label, fingerprint, why_untrusted, path) -> trust?``; only a terminal asks.
Ask = Callable[[str, str, str, str], bool]


def known_servers_path(environ: dict[str, str] | None = None) -> str:
    """Where ``known_servers`` lives: XDG_CONFIG_HOME (if absolute), else ~/.config, under ``chatpair/``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "")
    if not base or not os.path.isabs(base):  # the XDG spec: a relative path is ignored
        base = os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "chatpair", FILE_NAME)


def server_key(host: str, port: int) -> str:
    """How a server is written in the file: ``host:port`` (IPv6 in brackets), host in lower case."""
    return format_hostport(host.lower(), port)


@dataclass(frozen=True)
class Known:
    """One remembered server: its line number in the file and its fingerprint."""

    line: int
    digest: bytes


class KnownServers:
    """The ``known_servers`` file: read on every lookup (it is small), appended to on trust."""

    def __init__(self, path: str) -> None:
        self.path = path

    def lookup(self, host: str, port: int) -> list[Known]:
        """Every entry for ``host:port``, in file order (empty: unknown, or no file)."""
        key = server_key(host, port)
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise ConfigError(f"cannot read {self.path}: {err.strerror or err}") from None
        found: list[Known] = []
        for number, raw in enumerate(text.splitlines(), 1):
            parts = raw.split("#", 1)[0].split()
            if len(parts) != 2 or parts[0].lower() != key:
                continue
            try:
                found.append(Known(number, parse_fingerprint(parts[1])))
            except ConfigError:
                continue  # a line that does not parse counts for nothing
        return found

    def add(self, host: str, port: int, digest: bytes) -> int:
        """Remember ``host:port`` with this fingerprint; returns the line number written."""
        path = Path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            old = path.read_bytes() if path.exists() else b""
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                if old and not old.endswith(b"\n"):
                    f.write("\n")
                f.write(f"{server_key(host, port)} {format_fingerprint(digest)}\n")
        except OSError as err:
            raise ConfigError(f"cannot write {self.path}: {err.strerror or err}") from None
        return old.count(b"\n") + (1 if old and not old.endswith(b"\n") else 0) + 1


def changed_message(label: str, path: str, known: list[Known], got: bytes) -> str:
    """The loud refusal of a certificate that is not the one remembered (one line)."""
    first = known[0]
    lines = ", ".join(str(k.line) for k in known)
    return (f"WARNING: the TLS certificate of {label} HAS CHANGED: {path} line {lines} says "
            f"{format_fingerprint(first.digest)}, the server now shows {format_fingerprint(got)}. "
            f"Someone may be intercepting the connection; if the server really has a new "
            f"certificate, remove line {lines} of {path} and connect again")


def unknown_message(label: str, reason: str, fingerprint: str, path: str) -> str:
    """Pipe mode's one line for a server it may not ask about."""
    return (f"TLS certificate of {label} not trusted: {reason}; its fingerprint is {fingerprint} and it "
            f"is not in {path}: to trust it, run chatpair client once in a terminal (it asks, and "
            f"remembers), or pass --fingerprint {fingerprint}")


class Interrupted(ChatpairError):
    """Ctrl-C at the question: not an answer, so the run ends as any Ctrl-C does (exit 130)."""

    exit_code = 130


def ask_in_terminal(label: str, fingerprint: str, reason: str, path: str, *,
                    out: TextIO | None = None, inp: TextIO | None = None) -> bool:
    """Show the fingerprint and ask once, on the terminal (stderr; the answer from stdin).

    In a terminal one key answers, as the server's own ``[y/N]`` does: ``y``
    is yes, Enter or any other key is no; the answer is echoed. Elsewhere
    (a test's stream) a line answers. Ctrl-C is :class:`Interrupted`.
    """
    out = out or sys.stderr
    inp = inp or sys.stdin
    question = (f"The TLS certificate of {label} is not known ({reason}).\n"
                f"Its SHA-256 fingerprint is {fingerprint}\n"
                f"Compare it with the one the server printed when it started.\n"
                f"Trust {label} and remember it in {path}? [y/N] ")
    try:
        with OneKey(inp) as keys:
            out.write(question)
            out.flush()
            if keys.fd is None:  # not a terminal: a line answers
                line = inp.readline()
                if not line.endswith("\n"):
                    out.write("\n")
                return line.strip().lower() in ("y", "yes")
            key = keys.read()
    except KeyboardInterrupt:  # SIGINT: cbreak mode leaves Ctrl-C to the terminal
        key = "\x03"
    except (OSError, ValueError):
        key = ""
    if key == "\x03":
        out.write("\n")
        out.flush()
        raise Interrupted(f"interrupted; {label} not trusted, not connecting")
    yes = key in ("y", "Y")
    out.write("y\n" if yes else "n\n")
    out.flush()
    return yes


class OneKey:
    """A terminal in cbreak mode while a question waits for one key; restored on exit.

    Keys arrive one by one and are not echoed; Ctrl-C still sends SIGINT.
    Keys typed before the question are dropped on entry, so only a key
    pressed after it answers. ``fd`` is None when ``inp`` is not a terminal.
    """

    def __init__(self, inp: TextIO) -> None:
        self.fd: int | None = None
        self._saved: list[Any] | None = None
        try:
            fd = inp.fileno()
            import termios
        except (AttributeError, OSError, ValueError, ImportError):  # no descriptor, or no termios
            return
        if not os.isatty(fd):
            return
        try:
            self._saved = termios.tcgetattr(fd)
        except termios.error:
            return
        self.fd = fd

    def __enter__(self) -> OneKey:
        if self.fd is not None:
            import termios
            import tty

            try:
                tty.setcbreak(self.fd)
                termios.tcflush(self.fd, termios.TCIFLUSH)
            except termios.error as err:
                raise OSError(str(err)) from None
        return self

    def read(self) -> str:
        """The key pressed ("" once the terminal is gone); an arrow's whole sequence is one read."""
        assert self.fd is not None
        return os.read(self.fd, 32).decode("utf-8", "replace")[:1]

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None and self._saved is not None:
            import termios

            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass  # the terminal hung up: nothing left to restore
