"""The main process: bind, start the listener process, supervise it, stop it.

The main process does little on purpose, so it cannot be taken down by what
clients send:

* it binds the listening socket itself (so the port survives a listener
  restart: clients who connect meanwhile wait in the backlog) - by
  default ``::`` on one dual-stack socket that takes IPv6 and IPv4 clients
  alike (IPv4 only where the system has no IPv6) - and the ``--metrics``
  socket, so a port that cannot be had is one clear line at start;
* it starts the pairing listener in a separate process
  (:func:`chatpair.server.listener.listener_main`, spawn-safe) and hands it the
  listening socket and one end of a control socket pair, and prints
  ``listening on HOST:PORT`` once the listener says ``ready`` on it (a
  cluster node: once it has joined);
* it waits for a reason to stop - any key (when stdin is a terminal in the
  foreground; it asks ``stop the server and disconnect N clients? [y/N]``
  first, N from ``count`` on the control socket), Ctrl-C, SIGTERM, SIGHUP
  when stdin is a terminal - and meanwhile restarts the listener if it dies
  (a crash, ``kill -9``);
* to stop, it writes ``stop`` on the control socket: the listener tells every
  client ERROR ``shutdown``, closes, joins its relay threads and exits; the
  main process joins it, reaps multiprocessing's resource tracker and
  returns 0: when it exits, nothing it started is left.

Signals. Only the main process acts on SIGINT, SIGTERM, SIGHUP and SIGUSR1.
A signal to the whole process group (Ctrl-C, a terminal hang-up, systemd's
default ``KillMode``) reaches the listener and the workers too: they ignore
them and do what the main process tells them on the control socket, and
stop when it is gone (:mod:`chatpair.server.processes` has the rules every
process follows). With ``--deny-file``, SIGHUP re-reads the file: the main
process writes ``reload`` on the control socket and the listener reads the
file and logs the outcome. Without it, SIGHUP means "the terminal went
away" when stdin is a terminal, and stops the server like SIGTERM; detached
(systemd, nohup, a supervisor) it is ignored with one log line. SIGUSR1
asks for a status line in the log (``status`` on the control socket).
Commands from signal handlers are queued and written by :meth:`Server.serve`,
which uses the control socket in the same thread as :meth:`Server.client_count`
and, before it, :meth:`Server.wait_ready` (the listener's ``ready``, once per
start: a restarted listener's comes unasked, and ``client_count`` skips it).
The "any key" watcher is :mod:`chatpair.server.keys`.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

from chatpair.errors import ChatpairError, ConfigError
from chatpair.netutil import format_addr
from chatpair.server.config import ServerConfig
from chatpair.server.deny import DenyList
from chatpair.server.keys import KeyWatcher, StopPrompt, stdin_is_terminal
from chatpair.server.listener import listener_main
from chatpair.server.logs import setup_logging
from chatpair.server.processes import (
    READY_LINE,
    STATUS_SIGNALS,
    STOP_SIGNALS,
    RestartBackoff,
    signals_blocked,
    start_resource_tracker,
    stop_resource_tracker,
)

log = logging.getLogger("chatpair")

#: After ``stop`` the listener needs the lingering close (2 s) plus a margin.
STOP_GRACE_SECONDS = 6.0
#: How long "any key" waits for the listener to say how many clients it has
#: (it answers in microseconds; a loaded machine made 0.5 s too short, and
#: then the question cannot say how many clients a stop would disconnect).
COUNT_TIMEOUT_SECONDS = 2.0


#: Hosts that mean "every interface": served on one dual-stack socket (IPv6 and IPv4) where possible.
ANY_HOSTS = ("::", "")
#: bind() errors that mean "this system has no IPv6" (so "every interface" falls back to IPv4).
_NO_IPV6_ERRNOS = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def _reason(err: OSError) -> str:
    # create_server appends "(while attempting to bind on address ...)": we name the address already
    return (err.strerror or str(err)).split(" (while attempting", 1)[0]


def bind_listener(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """Bind and listen; a clear ChatpairError if the address cannot be had.

    ``::`` (the default) is every interface, IPv6 and IPv4 on one
    dual-stack socket where the system allows it; IPv4 clients then show as
    their IPv4 address (the acceptor unmaps ``::ffff:a.b.c.d``). Without
    IPv6 it falls back to ``0.0.0.0``, with one warning. Any other IPv6
    address is IPv6 only, as asked.
    """
    if host in ANY_HOSTS:
        if socket.has_dualstack_ipv6():
            try:
                return socket.create_server(("::", port), family=socket.AF_INET6, backlog=backlog,
                                            dualstack_ipv6=True)
            except OSError as err:
                if err.errno not in _NO_IPV6_ERRNOS:
                    raise ChatpairError(f"cannot listen on [::]:{port}: {_reason(err)}") from None
        log.warning("IPv6 and IPv4 cannot share one socket on this system; listening on IPv4 only")
        host = "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ChatpairError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    family, _, _, _, addr = infos[0]
    try:
        sock = socket.create_server(addr, family=family, backlog=backlog, reuse_port=False)
    except OSError as err:
        raise ChatpairError(f"cannot listen on {host}:{port}: {_reason(err)}") from None
    return sock


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every interface) -> (host, port); ConfigError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics: {text!r} is not HOST:PORT (or :PORT for every interface)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "::", int(port)


def bind_metrics(text: str) -> socket.socket:
    """The listening socket for ``--metrics HOST:PORT``."""
    host, port = parse_metrics_address(text)
    try:
        return bind_listener(host, port, backlog=64)
    except ChatpairError as err:
        raise ChatpairError(f"--metrics: {err}") from None


def certificate_fingerprint(cert_path: str) -> str:
    """``SHA256:<hex>`` of the first certificate in a PEM file (what clients pin)."""
    import hashlib
    import ssl

    with open(cert_path, encoding="ascii", errors="replace") as fh:
        pem = fh.read()
    start = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise ChatpairError(f"{cert_path}: no PEM certificate in this file")
    der = ssl.PEM_cert_to_DER_cert(pem[start:end + len("-----END CERTIFICATE-----")])
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def check_tls(config: ServerConfig) -> str | None:
    """Load the certificate and key once here, so a mistake is one clear line; the fingerprint."""
    if not config.tls_cert:
        if config.tls_key:
            raise ChatpairError("--tls-key needs --tls-cert")
        return None
    if config.workers:
        raise ChatpairError("TLS connections cannot be handed to relay worker processes; "
                            "use --relay-threads with --tls-cert")
    for path in (config.tls_cert, config.tls_key):
        if path and not os.path.isfile(path):
            raise ChatpairError(f"cannot load TLS: {path}: no such file")
    try:
        config.tls_context()
    except (OSError, ValueError) as err:
        detail = getattr(err, "reason", None) or err.__class__.__name__
        key = f" and {config.tls_key}" if config.tls_key else ""
        raise ChatpairError(f"cannot load TLS from {config.tls_cert}{key}: expected a PEM certificate and "
                            f"its private key ({detail})") from None
    return certificate_fingerprint(config.tls_cert)


def bound_address(sock: socket.socket) -> str:
    """``HOST:PORT`` the socket listens on, and ``(IPv6 and IPv4)`` for a dual-stack one."""
    address = format_addr(sock.getsockname())
    if sock.family == socket.AF_INET6:
        try:
            if not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                address += " (IPv6 and IPv4)"
        except (OSError, AttributeError):
            pass
    return address


def check_deny(config: ServerConfig) -> int:
    """Read --deny and --deny-file once here, so a mistake is one clear line; how many networks."""
    return DenyList(config.deny, config.deny_file).reload()


class Server:
    """Owns the listening socket and the listener process; start, supervise, stop."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.sock = bind_listener(config.host, config.port)
        self.address = bound_address(self.sock)
        self.port = self.sock.getsockname()[1]
        try:
            self.metrics_sock = bind_metrics(config.metrics) if config.metrics else None
        except ChatpairError:
            self.sock.close()
            raise
        self._commands: deque[bytes] = deque()  # for the listener, queued by signal handlers
        self._ctx = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._control: socket.socket | None = None
        # A plain flag, not a threading.Event: signal handlers set it, and Event.set takes a
        # lock that the code the handler interrupted may hold (a second SIGTERM arriving
        # inside the first one's Event.set hung the process for good). Every wait here is
        # at most 0.1 s long and looks at it afterwards.
        self._stop_asked = False
        self.restarts = 0

    @property
    def listener_pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        process = self._ctx.Process(
            target=listener_main, args=(self.sock, theirs, self.config, self.metrics_sock), name="chatpair-listener",
            daemon=False
        )
        start_resource_tracker()
        with signals_blocked():  # until listener_main ignores them: see ignore_stop_signals
            process.start()
        theirs.close()
        self._process, self._control = process, ours

    @property
    def stopping(self) -> bool:
        return self._stop_asked

    def request_stop(self) -> None:
        """Thread- and signal-safe (no lock taken): ask :meth:`serve` to stop."""
        self._stop_asked = True

    def request_command(self, command: bytes) -> None:
        """Signal-safe: have :meth:`serve` write ``command`` (``reload``, ``status``) to the listener."""
        self._commands.append(command)

    def _send_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if self._control is None or self._process is None or not self._process.is_alive():
                log.warning("the listener is not running; %s not done", command.decode())
                continue
            try:
                self._control.sendall(command + b"\n")
            except OSError as err:
                log.warning("could not ask the listener to %s: %s", command.decode(), err.strerror or err)

    @property
    def listener_exitcode(self) -> int | None:
        return self._process.exitcode if self._process else None

    def wait_ready(self) -> bool:
        """Wait for the listener's ``ready`` (it serves; a cluster node: it joined); False if stopped first.

        ``listening on`` is printed only after it: whoever reads that line and
        connects is answered at once, not after the listener process has started.
        """
        seen = b""
        while not self._stop_asked:
            control, process = self._control, self._process
            if control is None or process is None:
                return False
            # The socket first: a listener that said ready and died at once was ready
            # (serve() restarts it); only a dead one with nothing to read never was.
            if not select.select([control], [], [], 0.1)[0]:
                if not process.is_alive():
                    return False
                continue
            try:
                chunk = control.recv(64)
            except OSError:
                chunk = b""
            seen += chunk
            if READY_LINE in seen:
                return True
            if not chunk:
                return False
        return False

    def serve(self, poll: Callable[[], bool] | None = None) -> None:
        """Run until stopped; restart the listener if it dies. ``poll`` returning True stops."""
        if self._process is None:
            self.start()
        backoff = RestartBackoff()
        while not self._stop_asked:
            assert self._process is not None
            self._process.join(0.1)
            if poll is not None and poll():
                break
            if self._commands:
                self._send_commands()
            if self._stop_asked or self._process.is_alive():
                continue
            code = self._process.exitcode
            delay = backoff.record_death(time.monotonic())
            log.error("listener process died (exit code %s); starting a new one in %.1fs", code, delay)
            self._close_control()
            if self._stopped_within(delay):
                break
            self.restarts += 1
            self.start()
        self.stop()

    def _stopped_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a stop request (looking every 0.1 s: see ``_stop_asked``)."""
        deadline = time.monotonic() + seconds
        while not self._stop_asked:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.1))
        return True

    def stop(self) -> None:
        """Tell the listener to stop, wait for it, release the port, reap the resource tracker."""
        process = self._process
        if process is not None and process.is_alive() and self._control is not None:
            try:
                self._control.sendall(b"stop")
            except OSError:
                pass
            process.join(STOP_GRACE_SECONDS)
            if process.is_alive():  # it ignores SIGTERM (see ignore_stop_signals)
                log.warning("listener did not stop in time; killing it")
                process.kill()
                process.join()
        self._close_control()
        self.sock.close()
        if self.metrics_sock is not None:
            self.metrics_sock.close()
        stop_resource_tracker()

    def client_count(self, timeout: float = COUNT_TIMEOUT_SECONDS) -> int | None:
        """How many clients the listener has (``count`` on the control socket); None: no answer in time."""
        control = self._control
        if control is None or self._process is None or not self._process.is_alive():
            return None
        try:
            control.setblocking(False)
            try:  # a late answer to an earlier question must not pass for this one
                while control.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            control.sendall(b"count\n")
            reply = b""
            deadline = time.monotonic() + timeout
            while not self._stop_asked:
                # A restarted listener's ``ready`` may come between the question and its answer.
                while reply.startswith(READY_LINE):
                    reply = reply[len(READY_LINE):]
                if b"\n" in reply:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if select.select([control], [], [], min(left, 0.05))[0]:
                    chunk = control.recv(64)
                    if not chunk:
                        return None
                    reply += chunk
        except OSError:
            return None
        finally:
            try:
                control.setblocking(True)
            except OSError:
                pass
        words = reply.split(b"\n", 1)[0].split()
        if len(words) == 2 and words[0] == b"clients" and words[1].isdigit():
            return int(words[1])
        return None

    def _close_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None


def run_server(config: ServerConfig, out: TextIO | None = None) -> int:
    """What ``chatpair server`` does. Returns the exit code."""
    out = out or sys.stdout
    setup_logging(config.log_level, log_format=config.log_format)
    fingerprint = check_tls(config)
    denied = check_deny(config)
    server = Server(config)  # raises ChatpairError when the port cannot be had
    if config.cluster:
        from chatpair.server.cluster_desk import check_cluster

        try:
            check_cluster(config, server.port)
        except ChatpairError:
            server.stop()
            raise
    in_terminal = stdin_is_terminal(sys.stdin)

    def on_signal(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if name == "SIGUSR1":
            server.request_command(b"status")
            return
        if name == "SIGHUP" and config.deny_file:
            log.debug("SIGHUP: reading the deny file %s again", config.deny_file)  # the listener says how it went
            server.request_command(b"reload")
            return
        if name == "SIGHUP" and not in_terminal:
            log.warning("SIGHUP ignored: not running in a terminal, and no --deny-file to read again "
                        "(stop the server with SIGTERM)")
            return
        if server.stopping:
            return  # said once: a storm of signals must not nest a log call per signal
        server.request_stop()  # first: a signal arriving while we log sees it and returns
        log.info("%s: stopping", "the terminal hung up (SIGHUP)" if name == "SIGHUP" else name)

    # Before "listening on": whoever reads that line may signal us at once.
    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS + STATUS_SIGNALS}
    try:
        if config.cluster:
            from chatpair.cluster.redisconn import public_url

            log.info("node %s: joining the cluster at %s", config.node_id, public_url(config.cluster))
        server.start()
        if not server.wait_ready():  # stopped, or the listener died, before it served anyone
            server.stop()  # joins it: its exit code is known after
            if not server.stopping:
                log.error("the listener process ended before it was ready (exit code %s)", server.listener_exitcode)
            log.info("stopped")
            return 0 if server.stopping else 1
        print(f"listening on {server.address}" + (" (TLS)" if fingerprint else ""), file=out, flush=True)
        if fingerprint:
            print(f"certificate fingerprint {fingerprint}", file=out, flush=True)
        if server.metrics_sock is not None:
            print(f"metrics at http://{format_addr(server.metrics_sock.getsockname())}/metrics", file=out,
                  flush=True)
        if denied:
            log.info("denying %d network%s", denied, "" if denied == 1 else "s")
        keys = KeyWatcher(sys.stdin)
        try:
            if keys.active:
                print("press any key to stop (it asks first), or Ctrl-C", file=sys.stderr, flush=True)
            server.serve(poll=StopPrompt(keys, server.client_count, out).poll)
        finally:
            keys.restore()
    finally:
        for signum, handler in previous.items():
            # Stopping because of a signal: more of them (Ctrl-C held down) are ignored
            # until we exit, rather than raise KeyboardInterrupt in the middle of it.
            ignore = server.stopping and signum in STOP_SIGNALS
            signal.signal(signum, signal.SIG_IGN if ignore else handler)
    log.info("stopped")
    return 0
