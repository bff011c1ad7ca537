"""Who may connect: ``--max-clients``, ``--max-per-ip`` and the counts behind them. No sockets.

The listener asks :class:`Admission` about every accepted connection before
it spends anything on it. A connection over a limit is not closed at once:
it is kept just long enough to be told why (ERROR ``server_full`` or
``too_many_connections``, in the mode its first byte shows), but only so
many at a time - beyond :data:`REFUSING_MAX` a flood is closed without a
word. An admitted connection counts until it is closed, wherever it is:
waiting in the listener, chatting in a relay thread, or in a relay worker
process (which reports it gone or back).
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter

from chatpair.proto import ErrorCode

#: Connections over a limit are kept just long enough to be told why (at
#: most this many at once); beyond that they are closed without a word.
REFUSING_MAX = 256

#: (error code, message) for a connection over a limit.
Refusal = tuple[str, str]


class Admission:
    """The limits on connections at once, and the counts they are checked against.

    Per connection: :meth:`check` first; then :meth:`admit` (it counts) or
    :meth:`start_refusal` (it is being told no); at the end :meth:`forget` or
    :meth:`end_refusal`.
    """

    def __init__(self, max_clients: int, max_per_ip: int, per_ip_loopback: bool) -> None:
        self.max_clients = max_clients
        self.max_per_ip = max_per_ip  # 0: no limit
        self.per_ip_loopback = per_ip_loopback  # False: loopback (the operator's own tools) is exempt
        self.live: dict[int, str] = {}  # cid -> ip of every connection admitted and not yet gone
        self.per_ip: Counter[str] = Counter()
        self.refusing = 0  # connections being told why they are refused
        self.refused: dict[str, int] = {}  # error code -> connections refused with it (for metrics)

    def check(self, ip: str) -> Refusal | None:
        """Why a new connection from ``ip`` is refused, or None if it may come in.

        Asked once per connection: a refusal is counted in :attr:`refused`.
        """
        refusal: Refusal | None = None
        if len(self.live) >= self.max_clients:
            refusal = (ErrorCode.SERVER_FULL.value,
                       f"the server is full ({self.max_clients} client{'s' if self.max_clients != 1 else ''}); "
                       + "try again later")
        else:
            limit = self.max_per_ip
            if limit and self.per_ip[ip] >= limit and (self.per_ip_loopback or not is_loopback(ip)):
                refusal = (ErrorCode.TOO_MANY_CONNECTIONS.value,
                           f"too many connections from {ip} (the limit is {limit})")
        if refusal is not None:
            self.refused[refusal[0]] = self.refused.get(refusal[0], 0) + 1
        return refusal

    @property
    def refusals_full(self) -> bool:
        """Too many refusals under way: close the next one without telling it."""
        return self.refusing >= REFUSING_MAX

    def admit(self, cid: int, ip: str) -> None:
        self.live[cid] = ip
        self.per_ip[ip] += 1

    def forget(self, cid: int) -> None:
        """The connection is gone (harmless for one never admitted, or forgotten already)."""
        ip = self.live.pop(cid, None)
        if ip is not None:
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]

    def start_refusal(self) -> None:
        self.refusing += 1

    def end_refusal(self) -> None:
        self.refusing -= 1


@functools.lru_cache(maxsize=4096)
def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1 (with or without an IPv6 zone); cached, it is asked per connection."""
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
