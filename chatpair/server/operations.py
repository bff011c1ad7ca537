"""What the listener does for the operator: the control socket, the deny list, status lines, ``/metrics``.

:class:`Operations` lives in the listener process, held by the
:class:`~chatpair.server.listener.Listener` and run on its thread:

* the **control socket** from the main process (:meth:`Operations.on_control`):
  ``stop`` (or its end: the main process went away) stops the listener,
  ``count`` is answered with the number of clients, ``reload`` and
  ``status`` are below;
* the **deny list** (``--deny``, ``--deny-file``): made here, consulted by
  the acceptor for every connection, and read again on ``reload`` from the
  control socket (the main process sends it on SIGHUP). A file that does
  not parse leaves the previous list in force, with one error line;
* the **status line**: every ``--status-interval`` seconds, and on
  ``status`` from the control socket (SIGUSR1 to the main process), one
  log line with connections, pairs, waiting and messages per second (with
  ``--log-format json`` the numbers are fields of their own);
* the **metrics endpoint** (``--metrics``): a
  :class:`~chatpair.server.metrics.MetricsServer` thread, started by
  :meth:`Operations.serve_metrics`, stopped and joined by
  :meth:`Operations.close`. It reads the :class:`~chatpair.server.stats.Totals`
  this object makes on the listener's thread in :meth:`Operations.tick`.

The listener calls :meth:`tick` from its timer, :meth:`on_control` when the
control socket is readable, and :meth:`close` when it exits.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from chatpair.errors import ConfigError
from chatpair.server.config import ServerConfig
from chatpair.server.deny import DenyList
from chatpair.server.metrics import MetricsServer, render
from chatpair.server.stats import Totals, WorkerLedger

log = logging.getLogger("chatpair")

#: How often the numbers behind /metrics are refreshed (on the listener's thread).
SAMPLE_SECONDS = 0.5


class Operations:
    """The deny list, the status line and the metrics endpoint of one listener process."""

    def __init__(self, listener: Any, config: ServerConfig) -> None:
        # ``listener``: the Listener holding us (not imported: it imports this module)
        self.listener = listener
        self.deny = DenyList(config.deny, config.deny_file)
        if config.deny_file:
            self._read_deny_file(at_start=True)
        self.status_interval = config.status_interval
        now = time.monotonic()
        self._next_status = now + self.status_interval if self.status_interval > 0 else float("inf")
        self._next_sample = now
        self._workers = WorkerLedger()
        self._last_status = Totals(time=time.monotonic())  # the reading the last status line was made from
        self.latest = Totals(time=time.monotonic())  # what /metrics shows: replaced whole, never changed
        self.metrics: MetricsServer | None = None
        self._control_buf = b""  # a partial line from the main process

    # -- the control socket --------------------------------------------------------------

    def on_control(self, control: socket.socket) -> None:
        """``stop`` (or end of file: the main process went away) stops; ``count\n`` -> ``clients N\n``."""
        try:
            data = control.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data or b"stop" in data:
            self.listener.begin_stop()
            return
        self._control_buf = (self._control_buf + data)[-64:]
        while b"\n" in self._control_buf:
            line, self._control_buf = self._control_buf.split(b"\n", 1)
            if line.strip() == b"count":
                try:  # a few bytes on an idle socket pair: never blocks; if it fails, the main process copes
                    control.send(b"clients %d\n" % len(self.listener.admission.live))
                except OSError:
                    pass
            else:
                self.on_command(line.strip())  # reload (SIGHUP), status (SIGUSR1)

    def on_command(self, command: bytes) -> bool:
        """``reload`` (the deny file) or ``status`` (a status line now); whether it was one of ours."""
        if command == b"reload":
            self._read_deny_file(at_start=False)
        elif command == b"status":
            self.log_status()
        else:
            return False
        return True

    def _read_deny_file(self, at_start: bool) -> None:
        before = self.deny.size
        try:
            size = self.deny.reload()
        except ConfigError as err:
            log.error("deny list %s: %s; %s", "not loaded" if at_start else "not reloaded", err,
                      f"keeping the previous {before} network{'s' if before != 1 else ''}" if not at_start
                      else "denying only the --deny networks")
            return
        if not at_start:
            log.info("deny list reloaded from %s: %d network%s denied", self.deny.path, size,
                     "" if size == 1 else "s", extra={"fields": {"event": "deny_reloaded", "networks": size}})

    # -- numbers ------------------------------------------------------------------------------

    def collect(self) -> Totals:
        """Add up every loop's counters and read the gauges: one :class:`Totals` (listener thread)."""
        listener = self.listener
        totals = Totals(time=time.monotonic())
        totals.connections = len(listener.admission.live)
        totals.handshaking = len(listener.reception.handshaking)
        totals.waiting = len(listener.waiting)
        totals.pairs = (listener.cluster or listener.lobby).pairs_chatting()
        totals.accepted = listener.acceptor.accepted
        totals.refusals["denied"] += listener.acceptor.denied
        for reason, n in listener.admission.refused.items():
            totals.refusals[reason] = totals.refusals.get(reason, 0) + n
        totals.add(listener.stats.snapshot())
        pool = listener.relays
        for worker in pool.workers:
            self._workers.update(worker.index, worker.stats_report)
            totals.workers += int(worker.alive())
        self._workers.add_to(totals)
        for relay in pool.relays:
            loop = getattr(relay, "relay", None)  # a RelayThread's loop; workers report instead
            if loop is not None:
                totals.add(loop.stats.snapshot())
        return totals

    def log_status(self) -> None:
        totals = self.collect()
        text, fields = totals.status_line(self._last_status)
        self._last_status = totals
        log.info("%s", text, extra={"fields": fields})

    def tick(self, now: float) -> None:
        """From the listener's timer: refresh what /metrics shows; the periodic status line."""
        if self.metrics is not None and now >= self._next_sample:
            self._next_sample = now + SAMPLE_SECONDS
            self.latest = self.collect()
        if now >= self._next_status:
            self._next_status = now + self.status_interval
            self.log_status()

    # -- the metrics endpoint ----------------------------------------------------------------

    def serve_metrics(self, sock: socket.socket | None) -> None:
        """Serve /metrics on ``sock`` (bound by the main process) from a thread of ours."""
        if sock is None:
            return
        self.latest = self.collect()
        self.metrics = MetricsServer(sock, self.render_metrics)
        self.metrics.start()

    def render_metrics(self) -> str:
        """Called on the metrics thread: renders the latest finished reading."""
        return render(self.latest)

    def close(self) -> None:
        """Stop and join the metrics thread (the listener is exiting)."""
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
