"""Every knob of a bench run, each default written once.

:class:`BenchConfig` is what a caller fills in (the CLI, a test); plain data,
so it pickles into the load processes. :meth:`BenchConfig.resolved` checks it
and fills in what depends on the mode. The module constants are the fixed
numbers the load processes are tuned with, each with the reason for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from chatpair.bench.messages import BATCH, MIN_SIZE
from chatpair.errors import ConfigError
from chatpair.netutil import parse_hostport

MODES = ("flood", "pingpong", "idle", "churn")

#: One recv may take this much; big reads mean few system calls in a flood.
RECV_SIZE = 256 * 1024
#: A largest frame plus a full read must fit in the shared receive buffer.
RECV_BUFFER = RECV_SIZE + 70_000
#: Pairs being connected at once per load process: enough to keep the
#: listener busy, few enough not to overflow its accept backlog.
CONNECT_WINDOW = 256
#: A load process opening more than this many sockets is split further
#: (the usual per-process limit is 20,000 descriptors here, some are needed
#: for pipes and the interpreter).
MAX_SOCKETS_PER_PROC = 19_000
#: --resume: a client acknowledges at the latest this many seconds after an
#: unacknowledged MSG arrived (PROTOCOL.md allows 1 s; the loop looks every
#: 0.1 s, so half a second leaves room), or after 64 MSG frames, whichever
#: comes first - what a well-behaved client does, so what it costs is measured.
ACK_DELAY = 0.5
#: How long idle mode holds its pairs when --duration is not given.
IDLE_HOLD = 3.0
#: A measured phase shorter than this, or fewer latency samples than
#: MIN_SAMPLES, gets a warning: the figures of such a run mean little.
MIN_SECONDS = 1.0
MIN_SAMPLES = 1_000


@dataclass
class BenchConfig:
    """Every knob of a run; plain data so it pickles into the load processes."""

    mode: str = "flood"
    pairs: int = 10
    #: Messages per client (flood, pingpong: A's turns; churn: per client per
    #: pair). ``None``: run for ``duration`` instead (not for churn).
    messages: int | None = None
    #: Seconds of load (flood, pingpong, churn) or of holding (idle).
    duration: float | None = None
    size: int = 64
    #: Load processes; 0 picks enough for the descriptors needed (at least 1).
    procs: int = 0
    target: tuple[str, int] | None = None
    #: ``--target H1:P1,H2:P2,...``: client ``k`` (pair ``i``'s A is ``2i``, its B
    #: ``2i + 1``) connects to target ``k mod N``, so with two targets or more
    #: the partners of every pair are on different targets (cross-node pairs
    #: in a cluster). ``resolved()`` makes ``target`` the first of them.
    targets: tuple[tuple[str, int], ...] = ()
    tls: bool = False
    cafile: str | None = None
    #: TLS without checking the certificate; implies ``tls`` (as ``fingerprint`` does).
    insecure: bool = False
    #: SHA-256 of the server's certificate (DER) to pin, as ``chatpair client --fingerprint``.
    fingerprint: bytes | None = None
    #: HELLO asks for a resumable session; clients count and acknowledge (PROTOCOL.md section 6).
    resume: bool = False
    #: Extra ``chatpair server`` options for a server bench starts itself.
    server_args: tuple[str, ...] = ()
    #: Measure this running server's process tree (with ``target``).
    server_pid: int | None = None
    #: Flood: messages a sender may have ahead of what its partner received
    #: (0: no limit - the kernel's autotuned buffers then hold seconds of
    #: backlog, so latency measures queue length and a run overshoots its
    #: duration). Enough batches in flight keep the server saturated.
    window: int = 2 * BATCH
    #: Give up on messages not seen for this long once senders are done.
    stall_timeout: float = 10.0
    #: Hard limit on the whole run.
    timeout: float = 600.0

    def resolved(self) -> BenchConfig:
        """Defaults filled in and checked; raises ConfigError for bad values."""
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        if self.pairs < 1:
            raise ConfigError("--pairs must be at least 1")
        if self.size < MIN_SIZE:
            raise ConfigError(f"--size must be at least {MIN_SIZE} bytes (seq and send time are in the message)")
        if self.size > 65_535:
            raise ConfigError("--size must be at most 65535 bytes (the server's default max_frame)")
        if self.messages is not None and self.messages < 1:
            raise ConfigError("--messages must be at least 1")
        if self.duration is not None and self.duration < 0:
            raise ConfigError("--duration cannot be negative")
        if self.server_args and (self.target or self.targets):
            raise ConfigError("server options only apply to the server bench starts; not with --target")
        if self.insecure and self.fingerprint is not None:
            raise ConfigError("--insecure and --fingerprint contradict each other: a pin is a check")
        cfg = BenchConfig(**asdict(self))
        cfg.targets = tuple(tuple(t) for t in cfg.targets) or ((tuple(cfg.target),) if cfg.target else ())  # type: ignore[misc]
        cfg.target = cfg.targets[0] if cfg.targets else None
        cfg.tls = cfg.tls or cfg.fingerprint is not None or cfg.insecure  # both only make sense with TLS
        if cfg.mode == "churn":
            cfg.messages = cfg.messages or 10
            cfg.duration = 3.0 if cfg.duration is None else cfg.duration
        elif cfg.mode == "idle":
            cfg.duration = IDLE_HOLD if cfg.duration is None else cfg.duration
        elif cfg.messages is None and cfg.duration is None:
            cfg.duration = 3.0
        elif cfg.messages is not None:
            cfg.duration = None
        sockets = 2 * cfg.pairs
        need = max(1, math.ceil(sockets / MAX_SOCKETS_PER_PROC))
        cfg.procs = min(cfg.pairs, max(cfg.procs or 1, need))
        return cfg


def target_address(text: str) -> tuple[str, int]:
    """The ``--target`` option: ``HOST:PORT`` or ``[V6]:PORT`` -> (host, port).

    The syntax is :func:`chatpair.netutil.parse_hostport`'s; a target needs
    both parts, and the errors name the option (ConfigError).
    """
    try:
        host, port = parse_hostport(text)
    except ConfigError:
        # parse_hostport's words name the text, not the option: say which it was.
        if text.rpartition(":")[2].isdigit():
            raise ConfigError(f"bad port in --target {text!r}") from None
        raise ConfigError(f"--target must be HOST:PORT, not {text!r}") from None
    if port is None and host is not None and ":" in host:
        # An unbracketed IPv6 address with a port (``::1:7878``): the last
        # colon is the port's, as --target has always read it.
        host, _, last = host.rpartition(":")
        if last.isdigit() and 0 < int(last) < 65536 and host:
            port = int(last)
    if host is None or port is None:
        raise ConfigError(f"--target must be HOST:PORT, not {text!r}")
    return host, port


def target_addresses(text: str) -> tuple[tuple[str, int], ...]:
    """``--target H1:P1,H2:P2,...`` -> every (host, port), in order (see :func:`target_address`)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise ConfigError(f"--target must be HOST:PORT or a comma-separated list of them, not {text!r}")
    return tuple(target_address(part) for part in parts)
