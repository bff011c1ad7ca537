"""The ``chatpair`` command: a thin click group over the library.

The only module that imports click. Each command turns its options into a
call of the library, and :func:`main` turns every :class:`ChatpairError` into
one line on stderr and its exit code - in one place, so no user ever sees a
traceback for a refused connection or a bad option.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from chatpair import __version__
from chatpair.errors import ChatpairError
from chatpair.proto import DEFAULT_PORT, HANDSHAKE_MAX, MAX_FRAME_CEILING

# The server command's defaults, each from its one home (the protocol's own
# defaults reach it through the server's config).
from chatpair.server.config import (
    DEFAULT_BURST,
    DEFAULT_BUSY_POLL_US,
    DEFAULT_RESUME_WINDOW,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_PER_IP,
    DEFAULT_PING_INTERVAL,
    DEFAULT_RATE,
    DEFAULT_LOG_FORMAT,
    DEFAULT_RELAY_THREADS,
    DEFAULT_STATUS_INTERVAL,
    DEFAULT_WORKERS,
    DEFAULT_WRITE_TIMEOUT,
    FD_RESERVE,
    LOG_FORMATS,
    MAX_BUSY_POLL_US,
    MAX_RELAY_THREADS,
    MAX_WORKERS,
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


def _deny_networks(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from chatpair.server.deny import parse_network

    try:
        return tuple(str(parse_network(text, "")) for text in value)
    except ChatpairError as err:
        raise click.BadParameter(str(err)) from None


def _metrics_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from chatpair.server.main import parse_metrics_address

    if value is not None:
        try:
            parse_metrics_address(value)
        except ChatpairError as err:
            raise click.BadParameter(str(err).removeprefix("--metrics: ")) from None
    return value


def _server_seconds(flag: str, default: float, envvar: str, help: str) -> Callable[[Any], Any]:
    """A server option in seconds (greater than 0), shown with its default and variable."""
    return click.option(flag, default=default, show_default=True, type=float, envvar=envvar,
                        show_envvar=True, callback=_positive, help=help)


@cli.command(context_settings=CONTEXT)
@click.option("--host", default=DEFAULT_HOST, show_default=True, envvar="CHATPAIR_HOST", show_envvar=True,
              help="Address to listen on. The default :: is every interface, IPv6 and IPv4 on one "
                   "dual-stack socket (IPv4 only where the system has no IPv6); 0.0.0.0: IPv4 only.")
@click.option("--port", "-p", default=DEFAULT_PORT, show_default=True, envvar="CHATPAIR_PORT", show_envvar=True,
              type=click.IntRange(0, 65535), help="TCP port; 0 picks a free one (printed at start).")
@click.option("--max-frame", default=DEFAULT_MAX_FRAME, show_default=True, envvar="CHATPAIR_MAX_FRAME",
              show_envvar=True, type=click.IntRange(HANDSHAKE_MAX, MAX_FRAME_CEILING),
              help="Largest frame a client may send, in bytes (announced in WELCOME).")
@_server_seconds("--handshake-timeout", DEFAULT_HANDSHAKE_TIMEOUT, "CHATPAIR_HANDSHAKE_TIMEOUT",
                 "Seconds from connect to a valid hello; not extended by trickling bytes.")
@_server_seconds("--ping-interval", DEFAULT_PING_INTERVAL, "CHATPAIR_PING_INTERVAL",
                 "Seconds of silence from a client before the server sends PING.")
@_server_seconds("--idle-timeout", DEFAULT_IDLE_TIMEOUT, "CHATPAIR_IDLE_TIMEOUT",
                 "Seconds without any frame before a frame-mode client is dropped.")
@_server_seconds("--write-timeout", DEFAULT_WRITE_TIMEOUT, "CHATPAIR_WRITE_TIMEOUT",
                 "Seconds a client may leave its data unread before it is dropped.")
@click.option("--relay-threads", default=DEFAULT_RELAY_THREADS, show_default=True,
              type=click.IntRange(1, MAX_RELAY_THREADS),
              envvar="CHATPAIR_RELAY_THREADS", show_envvar=True,
              help="Room relay threads in the listener process (each serves many pairs).")
@click.option("--workers", default=DEFAULT_WORKERS, show_default=True, type=click.IntRange(0, MAX_WORKERS),
              envvar="CHATPAIR_WORKERS", show_envvar=True,
              help="Relay worker processes (POSIX): pairs are relayed there, using more cores. "
                   "0 relays in the listener process.")
@click.option("--busy-poll", "busy_poll_us", default=DEFAULT_BUSY_POLL_US, show_default=True,
              type=click.IntRange(0, MAX_BUSY_POLL_US), metavar="USEC",
              envvar="CHATPAIR_BUSY_POLL", show_envvar=True,
              help="Microseconds a relay polls on without sleeping after quick traffic (a relay thread "
                   "only while the listener and the other relays sleep): lower latency for some CPU. 0: off.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), envvar="CHATPAIR_TLS_CERT", show_envvar=True,
              help="PEM certificate (chain): serve TLS only. Its SHA-256 fingerprint is printed at start.")
@click.option("--tls-key", type=click.Path(dir_okay=False), envvar="CHATPAIR_TLS_KEY", show_envvar=True,
              help="PEM private key for --tls-cert (if not in the same file).")
@click.option("--max-clients", default=DEFAULT_MAX_CLIENTS,
              show_default=f"the descriptor limit minus {FD_RESERVE}", type=click.IntRange(0),
              envvar="CHATPAIR_MAX_CLIENTS", show_envvar=True,
              help="Connections at once; more are told ERROR server_full.")
@click.option("--max-per-ip", default=None, type=click.IntRange(0), envvar="CHATPAIR_MAX_PER_IP",
              show_envvar=True, show_default=f"{DEFAULT_MAX_PER_IP}, loopback exempt",
              help="Connections at once from one address (too_many_connections); 0: no limit. "
                   "Given explicitly, it counts loopback too.")
@click.option("--rate", default=DEFAULT_RATE, show_default="0: off", type=click.FloatRange(0),
              envvar="CHATPAIR_RATE", show_envvar=True,
              help="Messages per second per client. Over it the server reads the client "
                   "later: it is slowed down, never loses a message.")
@click.option("--burst", default=DEFAULT_BURST, show_default=True, type=click.IntRange(1),
              envvar="CHATPAIR_BURST", show_envvar=True,
              help="Messages a client may send at once before --rate applies.")
@click.option("--resume-window", default=DEFAULT_RESUME_WINDOW, show_default=True, type=click.FloatRange(0),
              envvar="CHATPAIR_RESUME_WINDOW", show_envvar=True,
              help="Seconds a client whose connection dropped may come back to the same conversation "
                   "(RESUME); 0 turns resume off.")
@click.option("--deny", multiple=True, metavar="CIDR", envvar="CHATPAIR_DENY", show_envvar=True,
              callback=_deny_networks,
              help="Close connections from this network at once (10.0.0.0/8, 2001:db8::/32, or one "
                   "address); repeat for more. The variable takes several, separated by spaces.")
@click.option("--deny-file", type=click.Path(exists=True, dir_okay=False), envvar="CHATPAIR_DENY_FILE",
              show_envvar=True,
              help="More networks to deny, one a line (# comments); read again on SIGHUP, which then "
                   "no longer stops the server.")
@click.option("--status-interval", default=DEFAULT_STATUS_INTERVAL, show_default="60; 0: off",
              type=click.FloatRange(0), envvar="CHATPAIR_STATUS_INTERVAL", show_envvar=True,
              help="Seconds between status lines in the log (connections, pairs, waiting, messages/s). "
                   "SIGUSR1 logs one at once.")
@click.option("--metrics", default=None, metavar="HOST:PORT", envvar="CHATPAIR_METRICS", show_envvar=True,
              callback=_metrics_address,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (:PORT: every interface).")
@click.option("--proxy-protocol", is_flag=True, envvar="CHATPAIR_PROXY_PROTOCOL", show_envvar=True,
              help="Behind HAProxy (send-proxy or send-proxy-v2): every connection must start with a "
                   "PROXY protocol header (v1 or v2); the client address it names is the one the log, "
                   "--deny and --max-per-ip see. Connections without one are closed.")
@click.option("--cluster", default=None, metavar="redis://HOST:PORT/DB", envvar="CHATPAIR_CLUSTER",
              show_envvar=True,
              help="Run as one node of a cluster sharing one lobby in Redis (needs the cluster extra: "
                   "pip install 'chatpair[cluster]'). Prints `listening on` once the node has joined.")
@click.option("--node-id", default=None, metavar="NAME", envvar="CHATPAIR_NODE_ID", show_envvar=True,
              help="This node's name in the cluster (A-Z a-z 0-9 _ . -; default: host name and port).")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default=DEFAULT_LOG_FORMAT, show_default=True,
              envvar="CHATPAIR_LOG_FORMAT", show_envvar=True,
              help="Log lines as text (ISO 8601 time, level, message) or as one JSON object each.")
@click.option("-v", "--verbose", count=True,
              help="More log on stderr (-v: debug detail). "
                   "By default it logs connects, pairs, leaves and errors.")
@click.option("-q", "--quiet", count=True, help="Less log on stderr (-q: warnings only, -qq: errors).")
def server(host: str, port: int, max_frame: int, handshake_timeout: float, ping_interval: float,
           idle_timeout: float, write_timeout: float, relay_threads: int, workers: int,
           busy_poll_us: int, tls_cert: str | None, tls_key: str | None, max_clients: int, max_per_ip: int | None,
           rate: float, burst: int, resume_window: float, deny: tuple[str, ...], deny_file: str | None,
           status_interval: float, metrics: str | None, proxy_protocol: bool, cluster: str | None,
           node_id: str | None, log_format: str, verbose: int, quiet: int) -> None:
    """Run a pairing server.

    Prints `listening on HOST:PORT` once ready. Stop it with Ctrl-C or
    SIGTERM (to it or to its process group): every client is told the
    server is shutting down, and the exit code is 0. Any key (in a
    terminal) stops it the same way after asking `stop the server and
    disconnect N clients? [y/N]` - only `y` stops; with no client connected
    it stops at once. SIGHUP stops it too when it runs in a terminal;
    detached, it is ignored (and logged) - but with --deny-file, SIGHUP
    reads the file again instead. SIGUSR1 logs a status line.
    """
    from chatpair.server.config import ServerConfig
    from chatpair.server.main import run_server
    from chatpair.server.workers import workers_supported

    if workers and not workers_supported():
        raise click.BadParameter("relay worker processes need a POSIX system (they pass sockets with "
                                 "SCM_RIGHTS); use --relay-threads instead", param_hint="--workers")

    level = logging.INFO + 10 * (quiet - verbose)
    config = ServerConfig(
        host=host, port=port, max_frame=max_frame, handshake_timeout=handshake_timeout,
        ping_interval=ping_interval, idle_timeout=idle_timeout, write_timeout=write_timeout,
        relay_threads=relay_threads, workers=workers, busy_poll_us=busy_poll_us, tls_cert=tls_cert, tls_key=tls_key,
        max_clients=max_clients, rate=rate, burst=burst, resume_window=resume_window,
        deny=deny, deny_file=deny_file, status_interval=status_interval, metrics=metrics, log_format=log_format,
        proxy_protocol=proxy_protocol, cluster=cluster or None, node_id=node_id or "",
        max_per_ip=DEFAULT_MAX_PER_IP if max_per_ip is None else max_per_ip,
        per_ip_loopback=max_per_ip is not None, log_level=max(logging.DEBUG, min(level, logging.CRITICAL)),
    )
    sys.exit(run_server(config))


def _client_option(*decls: str, **kwargs: Any) -> Callable[[Any], Any]:
    """A client option with its own variable, CHATPAIR_CLIENT_<NAME> (never a server's CHATPAIR_*)."""
    long = next(d for d in decls if d.startswith("--"))
    envvar = "CHATPAIR_CLIENT_" + long[2:].upper().replace("-", "_")
    return click.option(*decls, envvar=envvar, show_envvar=True, **kwargs)


@cli.command(context_settings=CONTEXT)
@click.argument("target", required=False, metavar="[HOST[:PORT] [PORT]]")
@click.argument("port_arg", required=False, metavar="")
@_client_option("--host", default=None,
                help="Server host (default 127.0.0.1); same as HOST (HOST:PORT and chatpair://... too).")
@_client_option("--port", "-p", default=None, type=click.IntRange(1, 65535),
                help=f"Server port (default {DEFAULT_PORT}); same as :PORT or a PORT after HOST.")
@_client_option("--name", "-n", default=None,
                help="Your name: 1-32 letters, digits, '_', '-', '.' (default: your login name).")
@_client_option("--room", "-r", default=None, help="Room code: only clients with the same code are paired.")
@_client_option("--json", "json_mode", is_flag=True, help="One JSON object per event on stdout (for bots).")
@_client_option("--log", "log_path", default=None, metavar="FILE", help="Append a timestamped transcript to FILE.")
@_client_option("--tls", is_flag=True, help="Connect with TLS (verified against the system CAs or --cafile).")
@_client_option("--cafile", default=None, metavar="PEM", help="CA certificate(s) to verify the server with.")
@_client_option("--fingerprint", default=None, metavar="SHA256:...",
                help="Pin the server certificate's SHA-256 (hex or base64) instead of CA checks; implies --tls.")
@_client_option("--timeout", default=10.0, show_default=True, type=float, callback=_positive,
                help="Seconds allowed to connect and complete the handshake.")
@_client_option("--no-color", is_flag=True, help="No colours (also: NO_COLOR set in the environment).")
@_client_option("--no-reconnect", is_flag=True, help="Interactive mode: exit when the connection is lost.")
@_client_option("--no-resume", is_flag=True,
                help="Do not ask the server to keep the conversation over a dropped connection.")
def client(target: str | None, port_arg: str | None, host: str | None, port: int | None, name: str | None,
           room: str | None, json_mode: bool, log_path: str | None, tls: bool, cafile: str | None,
           fingerprint: str | None, timeout: float, no_color: bool, no_reconnect: bool, no_resume: bool) -> None:
    """Chat: connect to a server and get paired.

    The server is HOST, HOST:PORT, HOST PORT (as for nc), [IPv6]:PORT or
    chatpair://HOST[:PORT]. Every option can also come from its
    CHATPAIR_CLIENT_* environment variable; the command line wins.

    In a terminal this is a full-screen chat; with stdin or stdout redirected
    it reads lines (messages, or /next /quit /help /ping) and prints events,
    one per line. Lines typed before you are paired are held and sent once
    you are; at end of input the client sends BYE and exits 0. SIGTERM and
    SIGHUP end it the same way (within 5 s), exit code 143 and 129.
    """
    from click.core import ParameterSource

    from chatpair.client import ClientConfig, default_name, parse_fingerprint, resolve_target, run_client

    ctx = click.get_current_context()
    env = {p: ctx.get_parameter_source(p) is ParameterSource.ENVIRONMENT for p in ("host", "port")}
    host, port = resolve_target(target, None if env["host"] else host, None if env["port"] else port, port_arg,
                                env_host=host if env["host"] else None, env_port=port if env["port"] else None)
    name = name if name is not None else default_name()  # a bad name is the server's to refuse
    pin = parse_fingerprint(fingerprint) if fingerprint else None
    config = ClientConfig(name=name, host=host, port=port, room=room, tls=tls or pin is not None,
                          cafile=cafile, fingerprint=pin, timeout=timeout, resume=not no_resume)
    sys.exit(run_client(config, json_mode=json_mode, log_path=log_path,
                        color=False if no_color else None, reconnect=not no_reconnect))


class _BenchCommand(click.Command):
    """``chatpair bench``: its own options before ``--``, the server's after it.

    An unknown option is click's usual error ("did you mean --pairs?"), and
    one that is a ``chatpair server`` option says where it goes.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        dashes = "--" in args  # before parsing: click consumes the list
        try:
            rest = super().parse_args(ctx, args)
        except click.NoSuchOption as err:
            server_opts = {o for p in server.params for o in p.opts}
            if err.option_name in server_opts and not err.possibilities:
                raise click.NoSuchOption(
                    err.option_name, ctx=ctx,
                    message=f"No such option: {err.option_name} (a server option goes after --: "
                            f"chatpair bench [OPTIONS] -- {err.option_name} ...)") from None
            raise
        extra = ctx.params.get("server_args") or ()
        if extra and not dashes:
            raise click.UsageError(f"unexpected argument {extra[0]!r}: server options go after --, "
                                   f"as in chatpair bench -- --workers 2", ctx=ctx)
        return rest


def _plot_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from chatpair.bench.plot import check_plot_path

        try:
            check_plot_path(value)  # before the run, not after it
        except ChatpairError as err:
            raise click.BadParameter(str(err).removeprefix(f"--plot {value}: ")) from None
    return value


@cli.command(cls=_BenchCommand, context_settings=CONTEXT)
@click.option("--mode", "-m", type=click.Choice(["flood", "pingpong", "idle", "churn"]), default="flood",
              show_default=True, help="flood: all send at once; pingpong: strict turns; idle: open and hold "
              "pairs; churn: pairs come, chat briefly and go.")
@click.option("--pairs", "-P", default=10, show_default=True, type=click.IntRange(1), help="Pairs of clients.")
@click.option("--messages", default=None, type=click.IntRange(1),
              help="Messages per client (churn: per client and pair). Default: run for --duration.")
@click.option("--duration", "-d", default=None, type=click.FloatRange(0),
              help="Seconds of load (idle: of holding the pairs). Default 3.")
@click.option("--size", "-s", default=64, show_default=True, type=click.IntRange(31, 65535),
              help="Message size in bytes (seq and send time take the first 31).")
@click.option("--procs", default=0, show_default="enough for the sockets", type=click.IntRange(0, 256),
              help="Load-generating processes.")
@click.option("--window", default=2000, show_default=True, type=click.IntRange(0),
              help="flood: messages a sender may be ahead of its partner's reading (0: no limit).")
@click.option("--target", "-t", default=None, metavar="HOST:PORT[,HOST:PORT...]",
              help="Measure a running server instead of starting one. Several (cluster nodes): client k "
                   "connects to the k-th mod N, so partners are on different servers; the report adds "
                   "per-target and cross-target figures.")
@click.option("--server-pid", default=None, type=int, help="With --target: sample this local server's RSS/CPU.")
@click.option("--tls", is_flag=True, help="Connect with TLS (verified against the system CAs or --cafile).")
@click.option("--cafile", default=None, metavar="PEM", help="CA certificate(s) to verify a TLS server with.")
@click.option("--fingerprint", default=None, metavar="SHA256:...",
              help="Pin the server certificate's SHA-256 (hex or base64) instead of CA checks; implies --tls.")
@click.option("--insecure", is_flag=True,
              help="TLS without verifying the certificate (self-signed servers); implies --tls.")
@click.option("--resume", is_flag=True,
              help="Ask for resumable sessions; clients count and ACK what they receive (what that costs).")
@click.option("--json", "json_mode", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False, writable=True),
              help="Also write the JSON result to this file.")
@click.option("--plot", "plot_path", default=None, metavar="FILE", callback=_plot_path,
              help="Draw the latency distribution and throughput over time (FILE.svg; .png needs rsvg-convert).")
@click.option("--timeout", default=600.0, show_default=True, type=float, callback=_positive,
              help="Give up on the whole run after this many seconds.")
@click.argument("server_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- SERVER OPTIONS]")
def bench(mode: str, pairs: int, messages: int | None, duration: float | None, size: int, procs: int,
          window: int, target: str | None, server_pid: int | None, tls: bool, cafile: str | None,
          fingerprint: str | None, insecure: bool, resume: bool, json_mode: bool, out_path: str | None,
          plot_path: str | None, timeout: float, server_args: tuple[str, ...]) -> None:
    """Measure a server: throughput, latency, pairing rate, memory.

    Without --target it starts `chatpair server` on a free loopback port
    (options after `--` go to it, e.g. `chatpair bench -- --workers 2`) and
    stops it afterwards. Each server is first checked with one connection:
    one that is not a chatpair server (or needs --tls) is one line, exit 2.
    Every message carries its sequence number and send
    time; a lost or reordered message makes the exit code 1. Ctrl-C prints
    the report of the run so far and exits 130.
    """
    import json

    from chatpair.bench import BenchConfig, ProgressBar, render, run_bench, target_addresses
    from chatpair.client import parse_fingerprint

    config = BenchConfig(
        mode=mode, pairs=pairs, messages=messages, duration=duration, size=size, procs=procs, window=window,
        targets=target_addresses(target) if target else (), tls=tls, cafile=cafile, insecure=insecure,
        fingerprint=parse_fingerprint(fingerprint) if fingerprint else None, resume=resume,
        server_args=tuple(server_args), server_pid=server_pid, timeout=timeout,
    )
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    try:
        result = run_bench(config, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    data = result.to_dict()
    if out_path:
        with open(out_path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
    if plot_path:
        from chatpair.bench.plot import write_plot

        write_plot(result, plot_path)
    if json_mode:
        click.echo(json.dumps(data))
        for warning in result.warnings:
            click.echo(f"chatpair bench: warning: {warning}", err=True)
    else:
        click.echo(render(result))
    if result.interrupted:
        sys.exit(130)
    if not result.ok:
        if json_mode:
            click.echo("chatpair bench: FAIL: " + "; ".join(result.failures), err=True)
        sys.exit(1)


def main() -> None:
    """Console entry point: run the group, map errors to one line and an exit code."""
    try:
        cli.main(prog_name="chatpair", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort)
        click.echo("chatpair: interrupted", err=True)
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
