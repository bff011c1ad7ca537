"""Who may not connect at all: ``--deny CIDR`` and ``--deny-file FILE``. No sockets.

A :class:`DenyList` is a set of IPv4 and IPv6 networks. The listener's
acceptor asks it about every accepted connection (:meth:`DenyList.match`)
before it spends anything on it: a denied address is closed at once, with
one log line and no banner. The networks from ``--deny`` are fixed; those
from ``--deny-file`` (one CIDR or address a line, ``#`` starts a comment)
are read again when the operator sends SIGHUP (:meth:`DenyList.reload`). A
file that no longer parses is not half applied: the previous list stays,
and the error is logged.

Matching costs one set lookup per distinct prefix length in the list, not
one comparison per network, so a long ban list does not slow down accept.
IPv4 clients of a dual-stack socket arrive as IPv4-mapped IPv6 addresses
(``::ffff:10.0.0.5``); they match IPv4 networks like any IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from chatpair.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_network(text: str, where: str = "--deny") -> Network:
    """``10.0.0.0/8``, ``2001:db8::/32`` or a single address; ConfigError saying where otherwise."""
    value = text.strip()
    try:
        # strict=False: 10.0.0.5/8 means 10.0.0.0/8, as in firewall rules.
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        what = (f"{value!r} is not an IP network (a CIDR such as 10.0.0.0/8 or 2001:db8::/32, "
                "or one address)")
        raise ConfigError(f"{where}: {what}" if where else what) from None
    mapped = getattr(net.network_address, "ipv4_mapped", None)
    if mapped is not None and net.prefixlen >= 96:  # ::ffff:10.0.0.0/104 is 10.0.0.0/8
        net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


def read_deny_file(path: str) -> list[Network]:
    """Every network in ``path``: one a line, blank lines and ``#`` comments ignored."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read the deny file {path}: {err.strerror or err}") from None
    nets = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            nets.append(parse_network(text, f"{path}:{number}"))
    return nets


def client_address(ip: str) -> Address | None:
    """The address a client connected from, IPv4-mapped IPv6 as IPv4; None if it is not an IP."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(addr, "ipv4_mapped", None)
    return mapped if mapped is not None else addr


class DenyList:
    """The networks no client may connect from: fixed ones, plus a file read on :meth:`reload`.

    For callers: :meth:`reload` (at start, and on SIGHUP), :meth:`match`
    (per connection), :attr:`size`. The constructor raises ConfigError for
    a bad fixed network; the file is first read by :meth:`reload`.
    """

    def __init__(self, cidrs: Iterable[str] = (), path: str | None = None) -> None:
        self.fixed = [parse_network(text) for text in cidrs]
        self.path = path
        self.from_file: list[Network] = []
        # prefix length -> network addresses (as ints), per IP version
        self._index: dict[int, dict[int, set[int]]] = {}
        self._build()

    @property
    def size(self) -> int:
        """How many networks are denied."""
        return len(self.fixed) + len(self.from_file)

    def __bool__(self) -> bool:
        return bool(self._index)

    def _build(self) -> None:
        index: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        for net in (*self.fixed, *self.from_file):
            index[net.version].setdefault(net.prefixlen, set()).add(int(net.network_address))
        self._index = {version: by_len for version, by_len in index.items() if by_len}

    def reload(self) -> int:
        """Read the file (again) and use it; the number of networks now denied.

        Raises ConfigError, and keeps the previous list, if the file cannot
        be read or a line is not a network.
        """
        if self.path:
            self.from_file = read_deny_file(self.path)
            self._build()
        return self.size

    def match(self, ip: str) -> str | None:
        """The denied network ``ip`` falls in (as text), or None if it may connect."""
        if not self._index:
            return None
        addr = client_address(ip)
        if addr is None:
            return None
        by_len = self._index.get(addr.version)
        if not by_len:
            return None
        value = int(addr)
        bits = addr.max_prefixlen
        for prefixlen, nets in by_len.items():
            shift = bits - prefixlen
            masked = (value >> shift) << shift
            if masked in nets:
                network = ipaddress.IPv4Network if addr.version == 4 else ipaddress.IPv6Network
                return str(network((masked, prefixlen)))
        return None
