"""The ``chatpair`` command: a thin click group over the library.

The only module that imports click. Each command turns its options into a
call of the library, and :func:`main` turns every :class:`ChatpairError` into
one line on stderr and its exit code - in one place, so no user ever sees a
traceback for a refused connection or a bad option.
"""

from __future__ import annotations

import logging
import sys

import click

from chatpair import __version__
from chatpair.errors import ChatpairError
from chatpair.protocol import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_FRAME,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PORT,
    HANDSHAKE_MAX,
    MAX_FRAME_CEILING,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="chatpair")
def cli() -> None:
    """chatpair: 1:1 pair chat over TCP.

    Start a server, then connect two clients (or `nc HOST 7878`): they are
    paired, first come first served or by a shared room code, and chat.
    """


def _positive(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value is not None and value <= 0:
        raise click.BadParameter("must be greater than 0")
    return value


@cli.command(context_settings=CONTEXT)
@click.option("--host", default="0.0.0.0", show_default=True, envvar="CHATPAIR_HOST", show_envvar=True,
              help="Address to listen on (0.0.0.0: every IPv4 interface; :: for IPv6).")
@click.option("--port", "-p", default=DEFAULT_PORT, show_default=True, envvar="CHATPAIR_PORT", show_envvar=True,
              type=click.IntRange(0, 65535), help="TCP port; 0 picks a free one (printed at start).")
@click.option("--max-frame", default=DEFAULT_MAX_FRAME, show_default=True, envvar="CHATPAIR_MAX_FRAME",
              show_envvar=True, type=click.IntRange(HANDSHAKE_MAX, MAX_FRAME_CEILING),
              help="Largest frame a client may send, in bytes (announced in WELCOME).")
@click.option("--handshake-timeout", default=DEFAULT_HANDSHAKE_TIMEOUT, show_default=True, type=float,
              envvar="CHATPAIR_HANDSHAKE_TIMEOUT", show_envvar=True, callback=_positive,
              help="Seconds from connect to a valid hello; not extended by trickling bytes.")
@click.option("--ping-interval", default=DEFAULT_PING_INTERVAL, show_default=True, type=float,
              envvar="CHATPAIR_PING_INTERVAL", show_envvar=True, callback=_positive,
              help="Seconds of silence from a client before the server sends PING.")
@click.option("--idle-timeout", default=DEFAULT_IDLE_TIMEOUT, show_default=True, type=float,
              envvar="CHATPAIR_IDLE_TIMEOUT", show_envvar=True, callback=_positive,
              help="Seconds without any frame before a frame-mode client is dropped.")
@click.option("--write-timeout", default=30.0, show_default=True, type=float,
              envvar="CHATPAIR_WRITE_TIMEOUT", show_envvar=True, callback=_positive,
              help="Seconds a client may leave its data unread before it is dropped.")
@click.option("--relay-threads", default=1, show_default=True, type=click.IntRange(1, 64),
              envvar="CHATPAIR_RELAY_THREADS", show_envvar=True,
              help="Room relay threads in the listener process (each serves many pairs).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0, 64),
              envvar="CHATPAIR_WORKERS", show_envvar=True,
              help="Relay worker processes (POSIX): pairs are relayed there, using more cores. "
                   "0 relays in the listener process.")
@click.option("-v", "--verbose", count=True, help="More log on stderr (-v: every connection).")
@click.option("-q", "--quiet", count=True, help="Less log on stderr (-q: warnings only, -qq: errors).")
def server(host: str, port: int, max_frame: int, handshake_timeout: float, ping_interval: float,
           idle_timeout: float, write_timeout: float, relay_threads: int, workers: int, verbose: int,
           quiet: int) -> None:
    """Run a pairing server.

    Prints `listening on HOST:PORT` once ready. Stop it with any key (in a
    terminal), Ctrl-C or SIGTERM: every client is told the server is
    shutting down, and the exit code is 0.
    """
    from chatpair.listener import ServerConfig
    from chatpair.server import run_server
    from chatpair.workers import workers_supported

    if workers and not workers_supported():
        raise click.BadParameter("relay worker processes need a POSIX system (they pass sockets with "
                                 "SCM_RIGHTS); use --relay-threads instead", param_hint="--workers")

    level = logging.INFO + 10 * (quiet - verbose)
    config = ServerConfig(
        host=host, port=port, max_frame=max_frame, handshake_timeout=handshake_timeout,
        ping_interval=ping_interval, idle_timeout=idle_timeout, write_timeout=write_timeout,
        relay_threads=relay_threads, workers=workers, log_level=max(logging.DEBUG, min(level, logging.CRITICAL)),
    )
    sys.exit(run_server(config))


def main() -> None:
    """Console entry point: run the group, map errors to one line and an exit code."""
    try:
        cli.main(prog_name="chatpair", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except ChatpairError as err:
        click.echo(f"chatpair: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141 if sys.platform != "win32" else 1)
