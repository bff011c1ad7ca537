"""What the server's processes share about starting, stopping and dying.

The main process starts the listener process, and the listener starts the
relay worker processes. They follow the same rules, written once here:

* **Signals are the main process's.** SIGINT, SIGTERM and SIGHUP sent to the
  whole process group (Ctrl-C, a terminal hang-up, systemd's default
  ``KillMode``) reach every process, and so may SIGUSR1 (status) when an
  operator signals the group. A parent starts a child with them blocked
  (:func:`signals_blocked`); the child ignores them first thing
  (:func:`prepare_child_process`), and stops (or reloads, or logs its
  status) when its parent tells it to on its control socket or channel; it
  stops when that reaches end of file.
* **Nothing is left behind.** multiprocessing's resource tracker (a helper
  process every ``spawn`` start on POSIX makes sure of) is started by the
  main process immune to SIGHUP and stopped and reaped by whoever started it
  (:func:`start_resource_tracker`, :func:`stop_resource_tracker`).
* **A child that keeps dying is restarted, but not in a tight loop**
  (:class:`RestartBackoff`): the listener by the main process, a relay
  worker by the listener.
* **The garbage collector runs less often** in the processes that relay
  (:func:`tune_gc`), and **their descriptor table is full size from the
  start** (:func:`presize_fd_table`).
* **The listener says when it serves** (:func:`tell_ready`): the main process
  prints ``listening on`` only then, so whoever reads that line and connects
  is answered at once, not after the listener process has started.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from chatpair.netutil import raise_fd_limit
from chatpair.server.config import DEFAULT_LOG_FORMAT
from chatpair.server.logs import setup_logging

log = logging.getLogger("chatpair")

#: The signals a terminal or a service manager sends to a whole process group.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
#: SIGUSR1 asks the main process for a status line (its default action would kill a child).
STATUS_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1",) if hasattr(signal, name))
#: What the listener and the workers ignore: every signal above is the main process's to act on.
CHILD_SIGNALS = STOP_SIGNALS + STATUS_SIGNALS
#: How long the resource tracker may take to go after the last process using it.
TRACKER_EXIT_SECONDS = 2.0
#: The n-th death of a child within CRASH_WINDOW_SECONDS waits the n-th delay
#: before the restart (the last one from then on).
RESTART_BACKOFF_SECONDS = (0.1, 0.5, 1.0, 2.0)
CRASH_WINDOW_SECONDS = 30.0


@contextmanager
def signals_blocked(signums: tuple[int, ...] = CHILD_SIGNALS) -> Iterator[None]:
    """Block ``signums`` in this thread; a process started meanwhile inherits the mask.

    The calling process receives what arrives meanwhile as soon as the block
    ends. A no-op where there are no signal masks (Windows).
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
    """For the listener and worker processes: SIGINT, SIGTERM, SIGHUP and SIGUSR1 are the main process's.

    Sent to the whole process group they reach us too; we ignore them and stop
    when told on our control socket or channel (or when it reaches end of file
    because our parent is gone). They were blocked when we were started (see
    :func:`signals_blocked`): ignore first, then unblock, so one that arrived
    in between is discarded rather than fatal.
    """
    for signum in CHILD_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_SIGNALS)


def prepare_child_process(log_level: int, log_format: str = DEFAULT_LOG_FORMAT) -> None:
    """First thing in the listener and in each relay worker: signals, logging, descriptors."""
    # Signals first: until they are ignored, only the mask inherited from the
    # parent keeps a group-wide Ctrl-C from killing us.
    ignore_stop_signals()
    raise_fd_limit()
    presize_fd_table()  # while this process has one thread: see there
    setup_logging(log_level, batched=True, log_format=log_format)
    tune_gc()


#: The most descriptor slots :func:`presize_fd_table` makes ready (8 bytes of
#: kernel memory each, and two bits: about 530 KiB); past it the table grows
#: as it always did.
FD_TABLE_PRESIZE_CAP = 65_536


def presize_fd_table(cap: int = FD_TABLE_PRESIZE_CAP) -> int:
    """Grow this process's descriptor table now to its limit (at most ``cap``); the size made ready.

    Linux grows a process's descriptor table by doubling as descriptors are
    opened (64, 128, 256, ...), and in a process with more than one thread
    each growth waits for an RCU grace period (``expand_fdtable`` calls
    ``synchronize_rcu``): 10-20 ms here, during which the listener, which
    opened the descriptor by accepting, stands still while clients wait. On
    the way to 9,900 pairs that is nine stops; a single-threaded server such
    as the uvloop relay never pays them. Done first thing, while the process
    has one thread, the growth is immediate, and a table never shrinks.
    ``F_DUPFD`` takes the lowest free descriptor at or above the one asked
    for, so nothing open is touched. Linux only: elsewhere it returns 0.
    """
    if not sys.platform.startswith("linux"):
        return 0
    import fcntl
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    top = cap if soft == resource.RLIM_INFINITY else min(soft, cap)
    try:
        probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        high = fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, top - 1)
    except OSError:  # every slot up there is taken, or the limit moved: the table grows as before
        return 0
    finally:
        os.close(probe)
    os.close(high)
    return top


#: Net allocations between two young collections in the listener and relay
#: workers (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Make the cyclic garbage collector's young collections about 14 times rarer.

    The listener and the relays allocate a few objects per message and a few
    dozen per connection. Reference counting frees nearly all of them at
    once: the collector only has cycles to find, and a server makes few. At
    the default threshold, a listener that accepts 20,000 clients runs about
    150 collections, and each one walks the connections it promotes to the
    older generations. At 10,000 it runs about 10, with the same memory per
    pair. That was worth 3-9 % of connect+pair in two sittings, side by side
    (``docs/performance.md``).
    A young collection then walks at most 10,000 objects, which takes about
    a millisecond.
    """
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


#: The line the listener writes on its control socket once it serves clients
#: (in cluster mode: once it has joined the cluster).
READY_LINE = b"ready\n"


def tell_ready(control: socket.socket | None) -> None:
    """The listener's word to the main process that clients are served from now on."""
    if control is not None:
        try:  # a few bytes on an idle socket pair: never blocks
            control.send(READY_LINE)
        except OSError:
            pass  # the main process is gone: the control socket's EOF stops us soon


class RestartBackoff:
    """How long to wait before restarting a child that died: longer the more often it dies."""

    def __init__(self, steps: tuple[float, ...] = RESTART_BACKOFF_SECONDS,
                 window: float = CRASH_WINDOW_SECONDS) -> None:
        self.steps = steps
        self.window = window
        self._deaths: list[float] = []  # when it died, within the last ``window`` seconds

    def record_death(self, now: float) -> float:
        """The child died at ``now``: the delay before starting it again."""
        self._deaths = [t for t in self._deaths if now - t < self.window] + [now]
        return self.steps[min(len(self._deaths), len(self.steps)) - 1]


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
