"""Every server option and default, written once, and how the server logs.

:class:`ServerConfig` is plain data so it pickles into the listener process
and the relay workers (spawn); :class:`Limits` is the part every selector
loop enforces per connection.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from chatpair.proto import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_FRAME,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PORT,
)

#: Where the server listens unless told otherwise.
DEFAULT_HOST = "0.0.0.0"
#: A partner who reads nothing for this long while we have bytes for them is dropped.
DEFAULT_WRITE_TIMEOUT = 30.0
#: With --rate, how many messages a client may send at once before it is slowed.
DEFAULT_BURST = 100
#: Descriptors kept free for the server's own use when --max-clients is derived.
FD_RESERVE = 100
#: --max-per-ip when not given; by default it spares loopback (the operator's own tools).
DEFAULT_MAX_PER_IP = 256


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
    ) -> None:
        self.max_frame = max_frame
        self.ping_interval = ping_interval
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.rate = rate
        self.burst = burst


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
    relay_threads: int = 1
    workers: int = 0
    log_level: int = logging.INFO
    tls_cert: str | None = None
    tls_key: str | None = None
    max_clients: int = 0  # 0: the descriptor limit minus a reserve
    max_per_ip: int = DEFAULT_MAX_PER_IP  # 0: no limit
    per_ip_loopback: bool = False  # apply max_per_ip to 127.0.0.0/8 and ::1 too
    rate: float = 0.0  # messages per second per client; 0: no limit
    burst: int = DEFAULT_BURST

    def limits(self) -> Limits:
        return Limits(self.max_frame, self.ping_interval, self.idle_timeout, self.write_timeout,
                      self.rate, self.burst)

    def effective_max_clients(self) -> int:
        if self.max_clients:
            return self.max_clients
        try:
            import resource

            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        except (ImportError, OSError, ValueError):
            return 10_000
        if hard == resource.RLIM_INFINITY:
            return 100_000
        return max(16, hard - FD_RESERVE)

    def tls_context(self) -> Any:
        """An SSLContext for the server, or None without --tls-cert."""
        if not self.tls_cert:
            return None
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.tls_cert, self.tls_key or None)
        return ctx




def setup_logging(level: int) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
    )
