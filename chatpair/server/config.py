"""Every server option and default, written once (how the server logs: :mod:`chatpair.server.logs`).

:class:`ServerConfig` is plain data so it pickles into the listener process
and the relay workers (spawn); :class:`Limits` is the part every selector
loop enforces per connection. The ``chatpair server`` command takes its
option defaults from the constants here; the protocol's own defaults (port,
frame size, timeouts) live in :mod:`chatpair.proto`, shared with the client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from chatpair.proto import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_FRAME,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PORT,
)

#: Where the server listens unless told otherwise: every interface, IPv6 and
#: IPv4 on one dual-stack socket where the system allows (else IPv4 only).
DEFAULT_HOST = "::"
#: Room relay threads in the listener process, and the most one may ask for.
DEFAULT_RELAY_THREADS = 1
MAX_RELAY_THREADS = 64
#: Relay worker processes (0: relay in the listener process), and the most one may ask for.
DEFAULT_WORKERS = 0
MAX_WORKERS = 64
#: How much the server logs unless -v or -q say otherwise: connects, pairs, leaves, errors.
DEFAULT_LOG_LEVEL = logging.INFO
#: A partner who reads nothing for this long while we have bytes for them is dropped.
DEFAULT_WRITE_TIMEOUT = 30.0
#: Messages per second per client; 0: no limit.
DEFAULT_RATE = 0.0
#: With --rate, how many messages a client may send at once before it is slowed.
DEFAULT_BURST = 100
#: Seconds a dropped resumable session is kept for its client's RESUME (PROTOCOL.md section 6).
DEFAULT_RESUME_WINDOW = 30.0
#: --max-clients when not given: 0 means derive it from the descriptor limit.
DEFAULT_MAX_CLIENTS = 0
#: Descriptors kept free for the server's own use when --max-clients is derived.
FD_RESERVE = 100
#: Derived --max-clients when the descriptor limit cannot be read, or is unlimited.
MAX_CLIENTS_LIMIT_UNKNOWN = 10_000
MAX_CLIENTS_LIMIT_INFINITE = 100_000
#: Derived --max-clients is never below this, however low the descriptor limit.
MAX_CLIENTS_FLOOR = 16
#: --max-per-ip when not given; by default it spares loopback (the operator's own tools).
DEFAULT_MAX_PER_IP = 256
#: How log lines are written: "text" (ISO 8601 time, level, message) or "json" (one object a line).
LOG_FORMATS = ("text", "json")
DEFAULT_LOG_FORMAT = "text"
#: The longest a relay loop polls on without sleeping after a batch of events
#: (server/busypoll.py: only after a short wait, while the process is otherwise
#: quiet); 0: never. The most one may ask for.
DEFAULT_BUSY_POLL_US = 50
MAX_BUSY_POLL_US = 10_000
#: Seconds between two status lines in the log (connections, pairs, waiting, messages/s); 0: none.
DEFAULT_STATUS_INTERVAL = 60.0


class Limits:
    """The per-connection numbers every loop enforces (picklable)."""

    def __init__(
        self,
        max_frame: int,
        ping_interval: float,
        idle_timeout: float,
        write_timeout: float,
        rate: float = 0.0,
        burst: int = 0,
        resume_window: float = 0.0,
    ) -> None:
        self.max_frame = max_frame
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.rate = rate
        self.burst = burst
        self.resume_window = resume_window  # seconds a dropped resumable session is kept (0: no resume)


@dataclass
class ServerConfig:
    """Every server option; plain data so it pickles into the listener process."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    ping_interval: float = DEFAULT_PING_INTERVAL
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    relay_threads: int = DEFAULT_RELAY_THREADS
    workers: int = DEFAULT_WORKERS
    busy_poll_us: int = DEFAULT_BUSY_POLL_US  # --busy-poll: microseconds a relay may spin; 0: off
    log_level: int = DEFAULT_LOG_LEVEL
    tls_cert: str | None = None
    tls_key: str | None = None
    max_clients: int = DEFAULT_MAX_CLIENTS  # 0: the descriptor limit minus a reserve
    max_per_ip: int = DEFAULT_MAX_PER_IP  # 0: no limit
    per_ip_loopback: bool = False  # apply max_per_ip to 127.0.0.0/8 and ::1 too
    rate: float = DEFAULT_RATE  # messages per second per client; 0: no limit
    burst: int = DEFAULT_BURST
    resume_window: float = DEFAULT_RESUME_WINDOW  # seconds; 0 turns resume off
    log_format: str = DEFAULT_LOG_FORMAT  # "text" or "json"
    deny: tuple[str, ...] = ()  # --deny CIDR: addresses closed at accept
    deny_file: str | None = None  # --deny-file: more CIDRs, read again on SIGHUP
    status_interval: float = DEFAULT_STATUS_INTERVAL  # seconds; 0: no periodic status line
    metrics: str | None = None  # --metrics HOST:PORT: serve /metrics (Prometheus) there
    cluster: str | None = None  # --cluster redis://HOST:PORT/DB: one of many nodes sharing a lobby in Redis
    node_id: str = ""  # --node-id: this node's name in the cluster (default: host name and port)
    proxy_protocol: bool = False  # --proxy-protocol: every connection starts with HAProxy's PROXY header

    def limits(self) -> Limits:
        return Limits(self.max_frame, self.ping_interval, self.idle_timeout, self.write_timeout,
                      self.rate, self.burst, self.resume_window)

    def effective_max_clients(self) -> int:
        """--max-clients, or what the descriptor limit allows with a reserve for the server."""
        if self.max_clients:
            return self.max_clients
        try:
            import resource

            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        except (ImportError, OSError, ValueError):
            return MAX_CLIENTS_LIMIT_UNKNOWN
        if hard == resource.RLIM_INFINITY:
            return MAX_CLIENTS_LIMIT_INFINITE
        return max(MAX_CLIENTS_FLOOR, hard - FD_RESERVE)

    def tls_context(self) -> Any:
        """An SSLContext for the server, or None without --tls-cert."""
        if not self.tls_cert:
            return None
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.tls_cert, self.tls_key or None)
        return ctx
