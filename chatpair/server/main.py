"""Server lifecycle: bind, start the listener process, supervise it, stop it.

The main process does little on purpose, so it cannot be taken down by what
clients send:

* it binds the listening socket itself (so the port survives a listener
  restart and ``listening on HOST:PORT`` can be printed at once);
* it starts the pairing listener in a separate process
  (:func:`chatpair.server.listener.listener_main`, spawn-safe) and hands it the
  listening socket and one end of a control socket pair;
* it waits for a reason to stop - any key (when stdin is a terminal in the
  foreground), Ctrl-C, SIGTERM, SIGHUP when stdin is a terminal - and
  meanwhile restarts the listener if it dies (a crash, ``kill -9``);
* to stop, it writes ``stop`` on the control socket: the listener tells every
  client ERROR ``shutdown``, closes, joins its relay threads and exits; the
  main process joins it, reaps multiprocessing's resource tracker and
  returns 0: when it exits, nothing it started is left.

Signals. Only the main process acts on SIGINT, SIGTERM and SIGHUP. A signal
to the whole process group (Ctrl-C, a terminal hang-up, systemd's default
``KillMode``) reaches the listener and the workers too: they ignore all
three (:func:`ignore_stop_signals`, with the signals blocked from the moment
they are started, so there is no window in which one kills them) and stop
when the main process tells them to, or when it is gone. SIGHUP means "the
terminal went away" when stdin is a terminal, and stops the server like
SIGTERM; detached (systemd, nohup, a supervisor) it is ignored with one log
line - a later release will reload the configuration on it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

from chatpair.errors import ChatpairError
from chatpair.netutil import format_addr
from chatpair.server.config import ServerConfig, setup_logging
from chatpair.server.listener import listener_main

log = logging.getLogger("chatpair")

#: After ``stop`` the listener needs the lingering close (2 s) plus a margin.
STOP_GRACE_SECONDS = 6.0
#: A listener that keeps dying is restarted, but not in a tight loop.
RESTART_BACKOFF_SECONDS = (0.1, 0.5, 1.0, 2.0)


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen; a clear ChatpairError if the address cannot be had."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ChatpairError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    family, _, _, _, addr = infos[0]
    try:
        sock = socket.create_server(addr, family=family, backlog=4096, reuse_port=False)
    except OSError as err:
        # create_server appends "(while attempting to bind on address ...)": we name the address already
        reason = (err.strerror or str(err)).split(" (while attempting", 1)[0]
        raise ChatpairError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


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
    return format_addr(sock.getsockname())


#: The signals a terminal or a service manager sends to a whole process group.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
#: How long the resource tracker may take to go after the last process using it.
TRACKER_EXIT_SECONDS = 2.0


@contextmanager
def signals_blocked(signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Block ``signums`` in this thread; a process started meanwhile inherits the mask.

    The main process receives what arrives meanwhile as soon as the block ends.
    A no-op where there are no signal masks (Windows).
    """
    if not hasattr(signal, "pthread_sigmask") or not signums:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals() -> None:
    """For the listener and worker processes: SIGINT, SIGTERM and SIGHUP are the main process's.

    Sent to the whole process group they reach us too; we ignore them and stop
    when told on our control socket or channel (or when it reaches end of file
    because the main process is gone). They were blocked when we were started
    (see :func:`signals_blocked`): ignore first, then unblock, so one that
    arrived in between is discarded rather than fatal.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _resource_tracker() -> object | None:
    """multiprocessing's resource tracker object, where there is one (POSIX CPython)."""
    if os.name != "posix":
        return None
    try:
        from multiprocessing import resource_tracker
    except ImportError:
        return None
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    needed = ("ensure_running", "_lock", "_fd", "_pid")
    return tracker if tracker is not None and all(hasattr(tracker, a) for a in needed) else None


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker now, immune to SIGHUP.

    Every "spawn" start on POSIX makes sure the tracker runs (a process of its
    own, which ignores SIGINT and SIGTERM itself). Started here with SIGHUP
    blocked, it inherits that mask and a hang-up of the process group does
    not kill it; started lazily it would die, and the next start would warn.
    """
    tracker = _resource_tracker()
    if tracker is None:
        return
    sighup = getattr(signal, "SIGHUP", None)
    with signals_blocked((sighup,) if sighup is not None else ()):
        tracker.ensure_running()  # type: ignore[attr-defined]


def stop_resource_tracker(timeout: float = TRACKER_EXIT_SECONDS) -> None:
    """Stop and reap the resource tracker this process started, if it did.

    It leaves when the last copy of its pipe is closed - ours is the last
    once the processes we started are gone - and nobody waits for it: it
    would outlive us by a moment, a stray process to a supervisor. Close our
    end and wait for it (kill it past ``timeout``: we register nothing it
    would need to clean up). A no-op in a process that did not start it
    (the listener uses the main process's tracker) or where there is none.
    """
    tracker = _resource_tracker()
    if tracker is None:
        return
    with tracker._lock:  # type: ignore[attr-defined]
        fd, pid = tracker._fd, tracker._pid  # type: ignore[attr-defined]
        if fd is None or pid is None:
            return
        tracker._fd = tracker._pid = None  # type: ignore[attr-defined]
    try:
        os.close(fd)
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() >= deadline:
                log.warning("multiprocessing's resource tracker did not exit; killing it")
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.005)
    except ChildProcessError:
        pass  # already reaped


class Server:
    """Owns the listening socket and the listener process; start, supervise, stop."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.sock = bind_listener(config.host, config.port)
        self.address = bound_address(self.sock)
        self.port = self.sock.getsockname()[1]
        self._ctx = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._control: socket.socket | None = None
        self._stop = threading.Event()
        self.restarts = 0

    @property
    def listener_pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        process = self._ctx.Process(
            target=listener_main, args=(self.sock, theirs, self.config), name="chatpair-listener", daemon=False
        )
        start_resource_tracker()
        with signals_blocked():  # until listener_main ignores them: see ignore_stop_signals
            process.start()
        theirs.close()
        self._process, self._control = process, ours

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Thread- and signal-safe: ask :meth:`serve` to stop."""
        self._stop.set()

    def serve(self, poll: Callable[[], bool] | None = None) -> None:
        """Run until stopped; restart the listener if it dies. ``poll`` returning True stops."""
        self.start()
        crashes: list[float] = []
        while not self._stop.is_set():
            assert self._process is not None
            self._process.join(0.1)
            if poll is not None and poll():
                break
            if self._stop.is_set() or self._process.is_alive():
                continue
            code = self._process.exitcode
            now = time.monotonic()
            crashes = [t for t in crashes if now - t < 30] + [now]
            delay = RESTART_BACKOFF_SECONDS[min(len(crashes), len(RESTART_BACKOFF_SECONDS)) - 1]
            log.error("listener process died (exit code %s); starting a new one in %.1fs", code, delay)
            self._close_control()
            if self._stop.wait(delay):
                break
            self.restarts += 1
            self.start()
        self.stop()

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
        stop_resource_tracker()

    def _close_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None


class KeyWatcher:
    """'Press any key to stop' for a terminal in the foreground; inert otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.active = False
        self._fd = -1
        self._saved: list | None = None
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            return
        if not os.isatty(fd):
            return
        if os.name == "nt":
            self.active = True
            return
        try:
            import termios
            import tty

            if os.getpgrp() != os.tcgetpgrp(fd):
                return  # in the background: reading the terminal would stop us (SIGTTIN)
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)  # keys arrive one by one; Ctrl-C still sends SIGINT
        except (ImportError, OSError):
            return
        self._fd = fd
        self.active = True

    def pressed(self) -> bool:
        if not self.active:
            return False
        if os.name == "nt":
            import msvcrt

            if msvcrt.kbhit():  # type: ignore[attr-defined]
                msvcrt.getwch()  # type: ignore[attr-defined]
                return True
            return False
        import select

        try:
            ready, _, _ = select.select([self._fd], [], [], 0)
            if ready:
                os.read(self._fd, 64)  # b"" once the terminal hung up: a reason to stop too
                return True
        except OSError:
            return True  # the terminal is gone
        return False

    def restore(self) -> None:
        if self._saved is not None:
            import termios

            saved, self._saved = self._saved, None
            try:
                termios.tcsetattr(self._fd, termios.TCSADRAIN, saved)
            except (termios.error, OSError):
                pass  # the terminal hung up: there is nothing left to restore


def stdin_is_terminal(stream: TextIO | None) -> bool:
    """Whether the server runs in a terminal (SIGHUP then means it went away)."""
    try:
        return stream is not None and os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def run_server(config: ServerConfig, out: TextIO | None = None) -> int:
    """What ``chatpair server`` does. Returns the exit code."""
    out = out or sys.stdout
    setup_logging(config.log_level)
    fingerprint = check_tls(config)
    server = Server(config)  # raises ChatpairError when the port cannot be had
    in_terminal = stdin_is_terminal(sys.stdin)

    def on_signal(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if name == "SIGHUP" and not in_terminal:
            log.warning("SIGHUP ignored: not running in a terminal (a later release will reload "
                        "the configuration on SIGHUP; stop the server with SIGTERM)")
            return
        if not server.stopping:
            log.info("%s: stopping", "the terminal hung up (SIGHUP)" if name == "SIGHUP" else name)
        server.request_stop()

    # Before "listening on": whoever reads that line may signal us at once.
    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        print(f"listening on {server.address}" + (" (TLS)" if fingerprint else ""), file=out, flush=True)
        if fingerprint:
            print(f"certificate fingerprint {fingerprint}", file=out, flush=True)
        keys = KeyWatcher(sys.stdin)
        try:
            if keys.active:
                print("press any key (or Ctrl-C) to stop", file=sys.stderr, flush=True)
            server.serve(poll=keys.pressed)
        finally:
            keys.restore()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("stopped")
    return 0
