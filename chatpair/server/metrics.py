"""``--metrics HOST:PORT``: the server's numbers at ``/metrics``, in Prometheus's text format.

:func:`render` writes a :class:`~chatpair.server.stats.Totals` in the text
exposition format (version 0.0.4): ``# HELP`` and ``# TYPE`` for each
family, counters ending in ``_total``, every label value shown even at 0 so
that a series never appears out of nowhere, and the pair durations as a
histogram (``_bucket{le=...}``, ``_sum``, ``_count``).

:class:`MetricsServer` serves it over HTTP from one thread of the listener
process (``http.server``, one request at a time, each with a socket
timeout, so a stuck scraper holds nobody but itself). The socket is bound
by the main process (a port that cannot be had is an error at start) and
handed to the listener with the listening socket. The thread never touches
the listener's state: it renders the latest ``Totals`` the listener's own
thread made (:class:`~chatpair.server.operations.Operations` refreshes it
twice a second), so a reading is at most that old, and a relay worker's
counts up to a second older (see :mod:`chatpair.server.stats`). Its owner
starts it, and stops and joins it when the listener stops.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer

from chatpair.server.stats import Totals

log = logging.getLogger("chatpair")

#: The Content-Type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds a scraper may take to send its request; then its connection is closed.
REQUEST_TIMEOUT = 5.0
#: How often the serving thread checks whether it was asked to stop.
POLL_SECONDS = 0.2


def _value(number: float) -> str:
    if number == float("inf"):
        return "+Inf"
    return str(number) if isinstance(number, int) or not float(number).is_integer() else str(int(number))


def _bound(bound: float) -> str:
    """A bucket's ``le`` label: ``1.0``, ``+Inf``."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _Writer:
    """Lines of the exposition format, one family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        """``samples``: (the sample's name suffix and labels, value), e.g. ``('{code="x"}', 3)``."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        self.lines.extend(f"{name}{suffix} {_value(value)}" for suffix, value in samples)

    def simple(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text, [("", value)])


def render(totals: Totals) -> str:
    """``totals`` as a Prometheus text exposition."""
    w = _Writer()
    w.simple("chatpair_connections", "gauge",
             "Client connections open now (handshaking, waiting or paired).", totals.connections)
    w.simple("chatpair_handshaking", "gauge", "Connections not past their hello yet.", totals.handshaking)
    w.simple("chatpair_waiting", "gauge", "Clients waiting for a partner.", totals.waiting)
    w.simple("chatpair_pairs", "gauge", "Pairs chatting now.", totals.pairs)
    w.simple("chatpair_relay_workers", "gauge", "Relay worker processes running (--workers).", totals.workers)
    w.simple("chatpair_connections_accepted_total", "counter",
             "Connections accepted (denied and refused ones included).", totals.accepted)
    w.simple("chatpair_pairs_made_total", "counter", "Pairs made.", totals.pairs_total)
    w.simple("chatpair_messages_relayed_total", "counter",
             "Messages relayed from one partner to the other.", totals.msgs)
    w.simple("chatpair_bytes_relayed_total", "counter",
             "Bytes of the relayed messages, as their senders sent them.", totals.bytes)
    w.family("chatpair_refusals_total", "counter", "Connections refused, by reason.",
             [(f'{{reason="{reason}"}}', n) for reason, n in sorted(totals.refusals.items())])
    w.family("chatpair_errors_total", "counter", "ERROR frames (or * error: lines) sent to clients, by code.",
             [(f'{{code="{code}"}}', n) for code, n in sorted(totals.errors.items())])
    hist = totals.durations
    samples: list[tuple[str, float]] = [(f'_bucket{{le="{_bound(bound)}"}}', n) for bound, n in hist.cumulative()]
    samples += [("_sum", hist.sum), ("_count", hist.count)]
    w.family("chatpair_pair_duration_seconds", "histogram", "How long pairs chatted, in seconds.", samples)
    return "\n".join(w.lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    """GET (or HEAD) /metrics; anything else is 404."""

    server: _Server
    timeout = REQUEST_TIMEOUT
    server_version = "chatpair-metrics"

    def do_GET(self) -> None:  # http.server's naming
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            body, status, kind = b"chatpair serves its metrics at /metrics\n", 404, "text/plain; charset=utf-8"
        else:
            body, status, kind = self.server.render().encode("utf-8"), 200, CONTENT_TYPE
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # http.server's signature
        log.debug("metrics: %s %s", self.address_string(), format % args)


class _Server(HTTPServer):
    """An HTTPServer on a socket that is already bound and listening."""

    def __init__(self, sock: socket.socket, render: Callable[[], str]) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()  # the one HTTPServer made; ours is bound already
        self.socket = sock
        self.render = render

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("metrics: a request from %s failed: %r", client_address, sys.exc_info()[1])


class MetricsServer:
    """``/metrics`` served from a thread; its owner calls :meth:`start`, then :meth:`stop` (which joins)."""

    def __init__(self, sock: socket.socket, render: Callable[[], str]) -> None:
        sock.setblocking(True)
        self._httpd = _Server(sock, render)
        self.thread = threading.Thread(target=self._serve, name="chatpair-metrics", daemon=True)

    def _serve(self) -> None:
        try:
            self._httpd.serve_forever(poll_interval=POLL_SECONDS)
        except Exception:  # a bug must not pass silently, nor take the listener down
            log.exception("the metrics endpoint stopped")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop serving, join the thread, close the socket (the main process keeps its own)."""
        if self.thread.is_alive():
            self._httpd.shutdown()  # returns once serve_forever has returned
            self.thread.join()
        self._httpd.server_close()
