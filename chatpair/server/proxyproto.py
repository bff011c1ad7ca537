"""HAProxy's PROXY protocol header, v1 (text) and v2 (binary), sans-IO.

Behind a load balancer every connection comes from the balancer; with
``send-proxy`` / ``send-proxy-v2`` HAProxy first writes one header naming the
real client, then the client's bytes. :func:`parse_proxy_header` reads that
header from the start of a connection's input (spec:
https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt) and returns

* :data:`~chatpair.proto.NEED_DATA` while the header is incomplete,
* a :class:`ProxyHeader` once it is whole: the real source and destination
  (``None`` for LOCAL and UNKNOWN/UNSPEC: use the socket's own peer address)
  and ``rest``, the bytes after the header (the client's own first bytes),
* or raises :class:`ProxyHeaderError` (one clear line) as soon as the input
  can no longer be a valid header: the spec says to abort at once.

What the header looks like::

    v1: "PROXY TCP4 192.0.2.1 198.51.100.7 56324 7878\\r\\n"     (at most 107 bytes)
        "PROXY TCP6 2001:db8::1 2001:db8::2 56324 7878\\r\\n"
        "PROXY UNKNOWN[ anything]\\r\\n"
    v2: 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A   signature (12 bytes)
        2C                                      version 2, command C (0 LOCAL, 1 PROXY)
        FT                                      family F (0 unspec, 1 inet, 2 inet6, 3 unix),
                                                transport T (0 unspec, 1 stream, 2 dgram)
        LL LL                                   length of what follows (big endian)
        addresses (inet: 4+4+2+2, inet6: 16+16+2+2, unix: 108+108), then TLVs

Rules kept strictly (anything else is refused): exactly one space between v1
fields, decimal numbers without leading zeros, ports 0-65535, addresses of
the announced family, CRLF (never a lone CR or LF) within 107 bytes; v2
version 2, commands LOCAL/PROXY only, known family and transport nibbles, a
length at most :data:`MAX_V2_PAYLOAD` (a sender cannot make us buffer more)
and at least the announced family's address block, TLVs that fit exactly.
UDP and UNIX addresses are accepted and reported as "unknown" (the real
peer address is used), as the spec allows. The CRC32C TLV is not verified.

The receiver must not guess whether a header is present: a listener started
with ``--proxy-protocol`` requires one on every connection.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass

from chatpair.errors import ChatpairError
from chatpair.proto import NEED_DATA

#: The v2 signature; v1 starts with ``PROXY `` instead.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: The longest v1 line, CRLF included (spec section 2.1).
MAX_V1_LENGTH = 107
#: The most bytes a v2 header may announce after its 16-byte start. The spec
#: allows 65,535; HAProxy's own TLVs (SSL, unique id, netns) fit in far less.
MAX_V2_PAYLOAD = 2048
V2_HEADER = struct.Struct("!12sBBH")

_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_V2_UNIX_LEN = 216
_V1_IPV4 = re.compile(rb"(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(ChatpairError):
    """The connection did not start with a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. ``source`` is None when the real peer address is to be used."""

    version: int  # 1 or 2
    local: bool  # v2 LOCAL command (a health check by the proxy itself)
    source: tuple[str, int] | None
    dest: tuple[str, int] | None
    rest: bytes  # the bytes after the header
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 type-length-value extensions, in order
    length: int = 0  # bytes the header took


def parse_proxy_header(data: bytes, *, max_v2_payload: int = MAX_V2_PAYLOAD) -> ProxyHeader | object:
    """Parse the header at the start of ``data``: a ProxyHeader, NEED_DATA, or ProxyHeaderError.

    Feed it everything received so far (it keeps no state); call again with
    more bytes after NEED_DATA.
    """
    data = bytes(data)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data, max_v2_payload)
    return _parse_v1(data)


# -- version 1 ------------------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | object:
    if not V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        raise ProxyHeaderError("expected a PROXY protocol header (v1 'PROXY ...' or the v2 signature)")
    window = data[:MAX_V1_LENGTH]
    lf = window.find(b"\n")
    cr = window.find(b"\r")
    if cr >= 0 and cr + 1 < len(window) and window[cr + 1] != 0x0A:
        raise ProxyHeaderError("PROXY v1 header has a CR that is not followed by LF")
    if lf >= 0 and (lf == 0 or window[lf - 1] != 0x0D):
        raise ProxyHeaderError("PROXY v1 header ends with a bare LF (CRLF required)")
    if lf < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 header has no CRLF in its first {MAX_V1_LENGTH} bytes")
        return NEED_DATA
    line, rest = data[: lf - 1], data[lf + 1:]
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(1, False, None, None, rest, length=lf + 1)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("PROXY v1 header must be 'PROXY TCP4|TCP6 SRC DST SPORT DPORT' or 'PROXY UNKNOWN'")
    family = socket.AF_INET if parts[1] == b"TCP4" else socket.AF_INET6
    src = _v1_address(parts[2], family)
    dst = _v1_address(parts[3], family)
    sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    return ProxyHeader(1, False, (src, sport), (dst, dport), rest, length=lf + 1)


def _v1_address(text: bytes, family: int) -> str:
    name = "TCP4" if family == socket.AF_INET else "TCP6"
    try:
        if family == socket.AF_INET:
            if not _V1_IPV4.fullmatch(text):
                raise ValueError
            return str(ipaddress.IPv4Address(text.decode("ascii")))
        if not text or any(c not in b"0123456789abcdefABCDEF:." for c in text):
            raise ValueError
        return str(ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text.decode("ascii"))))
    except (ValueError, OSError, UnicodeDecodeError):
        raise ProxyHeaderError(f"PROXY v1 header has a bad {name} address {text[:40]!r}") from None


def _v1_port(text: bytes) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1 header has a bad port {text[:10]!r} (0-65535, no leading zeros)")
    return int(text)


# -- version 2 ------------------------------------------------------------------------------


def _parse_v2(data: bytes, max_payload: int) -> ProxyHeader | object:
    if not V2_SIGNATURE.startswith(data[:12]):
        raise ProxyHeaderError("expected a PROXY protocol header (v1 'PROXY ...' or the v2 signature)")
    if len(data) > 12 and data[12] >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header has version {data[12] >> 4} (only 2 is defined)")
    if len(data) > 12 and data[12] & 0x0F not in (0, 1):
        raise ProxyHeaderError(f"PROXY v2 header has unknown command {data[12] & 0x0F} (0 LOCAL or 1 PROXY)")
    if len(data) > 13 and (data[13] >> 4 > 3 or data[13] & 0x0F > 2):
        raise ProxyHeaderError(f"PROXY v2 header has unknown family/transport byte 0x{data[13]:02x}")
    if len(data) < V2_HEADER.size:
        return NEED_DATA
    _, ver_cmd, fam, length = V2_HEADER.unpack_from(data)
    if length > max_payload:
        raise ProxyHeaderError(f"PROXY v2 header announces {length} bytes, more than the limit of {max_payload}")
    end = V2_HEADER.size + length
    if len(data) < end:
        return NEED_DATA
    body, rest = data[V2_HEADER.size:end], data[end:]
    family, transport = fam >> 4, fam & 0x0F
    addr_len = {1: _V2_INET.size, 2: _V2_INET6.size, 3: _V2_UNIX_LEN}.get(family, 0)
    local = ver_cmd & 0x0F == 0
    if not local and length < addr_len:
        raise ProxyHeaderError(f"PROXY v2 header is {length} bytes, too short for its {addr_len}-byte addresses")
    if local:
        # LOCAL: the proxy's own connection (a health check); the address block
        # is ignored, but the length field is always honoured.
        return ProxyHeader(2, True, None, None, rest, length=end)
    tlvs = _v2_tlvs(body[addr_len:])
    source = dest = None
    if family in (1, 2) and transport in (1, 2):
        layout = _V2_INET if family == 1 else _V2_INET6
        src, dst, sport, dport = layout.unpack_from(body)
        make = ipaddress.IPv4Address if family == 1 else ipaddress.IPv6Address
        source, dest = (str(make(src)), sport), (str(make(dst)), dport)
    return ProxyHeader(2, False, source, dest, rest, tlvs, end)


def _v2_tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    pos = 0
    while pos < len(block):
        if pos + 3 > len(block):
            raise ProxyHeaderError("PROXY v2 header ends inside a TLV")
        kind, size = block[pos], int.from_bytes(block[pos + 1:pos + 3], "big")
        if pos + 3 + size > len(block):
            raise ProxyHeaderError(f"PROXY v2 TLV 0x{kind:02x} runs past the end of the header")
        out.append((kind, block[pos + 3:pos + 3 + size]))
        pos += 3 + size
    return tuple(out)


# -- building headers (tests, tools) --------------------------------------------------------


def build_v1(source: tuple[str, int] | None, dest: tuple[str, int] | None) -> bytes:
    """A v1 line for ``source`` -> ``dest`` (both None: ``PROXY UNKNOWN``)."""
    if source is None or dest is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {dest[0]} {source[1]} {dest[1]}\r\n".encode("ascii")


def build_v2(source: tuple[str, int] | None, dest: tuple[str, int] | None, *,
             local: bool = False, tlvs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """A v2 header (PROXY over TCP, or LOCAL / UNSPEC when an address is None)."""
    if local or source is None or dest is None:
        fam, body = 0x00, b""
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(dest[0])
        layout = _V2_INET if src.version == 4 else _V2_INET6
        fam = 0x11 if src.version == 4 else 0x21
        body = layout.pack(src.packed, dst.packed, source[1], dest[1])
    body += b"".join(bytes([kind]) + len(value).to_bytes(2, "big") + value for kind, value in tlvs)
    return V2_HEADER.pack(V2_SIGNATURE, 0x20 if local else 0x21, fam, len(body)) + body
